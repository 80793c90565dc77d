"""The `merge` stage: fold the adapters of the last trained stage into full-precision base
weights and write a chat-ready checkpoint to run_dir/merged.

Before the merge is marked complete, the merged model's logits must match the adapter model's
on a probe batch; a mismatch is an error and no manifest is written.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig

from mistral_tune import card, runs
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.runs import RunDir
from mistral_tune.stages import rounds
from mistral_tune.training.modeling import DTYPES, load_policy
from mistral_tune.formats.tokenizer import load_tokenizer

log = logging.getLogger("mistral_tune")

PROBE = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Sort these digits: 3, 1, 2"}],
]


class MergeMismatch(UserError):
    pass


def probe_batch(fmt: ChatFormat) -> torch.Tensor:
    """Equal-length prompts (right-trimmed to the shortest), so no padding enters the check."""
    ids = [fmt.encode_prompt(m) for m in PROBE]
    n = min(len(x) for x in ids)
    return torch.tensor([x[:n] for x in ids])


@torch.no_grad()
def logits(model, batch: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch.to(model.device)).logits.float().cpu()


def verify_merge(expected: torch.Tensor, merged_model, batch: torch.Tensor, atol: float) -> float:
    """Max absolute logit difference; raises MergeMismatch above `atol`."""
    diff = (logits(merged_model, batch) - expected).abs().max().item()
    if not diff <= atol:  # also catches NaN
        raise MergeMismatch(f"merged model's logits differ from the adapter model's by {diff:.3g} (> merge.atol={atol})")
    return diff


def merge_chain(cfg: DictConfig, model_ref: dict, batch: torch.Tensor, dtype: torch.dtype):
    """Base + every adapter merged, checking the last merge against the unmerged adapter model."""
    from peft import PeftModel

    adapters = model_ref.get("adapters", [])
    model = load_policy(cfg, {"base": model_ref["base"], "adapters": adapters[:-1]}, dtype=dtype, inference=True)
    if not adapters:
        return model, 0.0
    peft_model = PeftModel.from_pretrained(model, adapters[-1])
    expected = logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    return merged, verify_merge(expected, merged, batch, cfg.merge.atol)


def run(cfg: DictConfig) -> Path:
    run_dir = RunDir.of(cfg)
    out = run_dir.merged
    source, last = rounds.last_manifest(cfg, "merge")  # the last trained stage (or DPO round)
    inputs = {"from": source, "fingerprint": last["fingerprint"]}
    if runs.check_done(cfg, "merge", inputs):
        return out
    if not runs.is_main_process():
        runs.wait_for_everyone()
        return out

    fmt = ChatFormat.load(run_dir, "merge")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    # Merging happens in float32 (full precision), whatever the training dtype.
    merged, diff = merge_chain(cfg, last["model"], probe_batch(fmt), torch.float32)
    save_dtype = DTYPES.get(cfg.merge.dtype) if cfg.merge.dtype != "auto" else None
    if save_dtype is None:
        base_dtype = getattr(merged.config, "dtype", None) or getattr(merged.config, "torch_dtype", None)
        save_dtype = DTYPES.get(str(base_dtype).replace("torch.", ""), torch.float32)
    merged = merged.to(save_dtype)
    merged.config.dtype = save_dtype

    gen = merged.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
    )
    merged.config.pad_token_id = tokenizer.pad_token_id
    tmp = out.with_name("merged.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True, max_shard_size=cfg.merge.max_shard_size)
    tokenizer.save_pretrained(tmp)  # carries the exact chat template used in training
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    runs.write_stage_config(cfg, "merge")
    log.info("merge: %s + %d adapter(s) -> %s (probe max |dlogit| %.2e)",
             last["model"]["base"], len(last["model"]["adapters"]), out, diff)
    runs.finish_stage(cfg, "merge", {"from": source, "model": last["model"], "probe_max_abs_diff": diff,
                                     "dtype": str(save_dtype).replace("torch.", "")}, inputs)
    card.write_card(cfg)  # eval rewrites it with its table; a run without eval still has a card
    runs.wait_for_everyone()
    return out
