"""The CUDA training path against the plain computation: same weights, same rows, one batch, fp32.

    python bench/gpu_exact.py [--json OUT]

mistral_tune's defaults on CUDA are flex_attention on packed rows, TRL's tiled LM head, and (DPO)
padded batches run padding-free through it (`lean.add_packing`); Liger's RMSNorm/SwiGLU/RoPE
kernels are opt-in (`use_liger_kernel=true`) and checked too. None of these has a CPU training path (flex_attention is forward-only on CPU
in torch 2.13, Liger and TRL's head are Triton), so tests/ cannot compare them with the plain path;
this script does, on the GPU: the loss and every parameter's gradient of one batch, through the
real trainers (`build_sft_trainer`, `build_dpo_trainer`; Liger applied as `Trainer.train` applies
it), against TRL's plain configuration (SDPA, padded batches, no Liger). The model is a random
Mistral (hidden 256, 2 layers, GQA) with a sliding window of 16 over rows of 20-90 tokens, so a
wrong window or a mask leaking across packed sequences changes the result. fp32 throughout: the
tolerance (loss 1e-4 relative, gradients 1e-3 relative in norm) is far below what a masking error
moves (checked: dropping the window is reported as `window_effect`).

On CPU it runs the cases CPU can train (SDPA padded against the lean head packed), to check the
script itself. Exit status 1 if a case fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

WINDOW = 16


def rows(n: int, seed: int, vocab: int, pairs: bool):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(20, 91, (1,), generator=g))
        ids = [1] + torch.randint(3, vocab, (length - 1,), generator=g).tolist()
        cut = int(torch.randint(4, length - 8, (1,), generator=g))
        if pairs:
            other = torch.randint(3, vocab, (int(torch.randint(6, 60, (1,), generator=g)),), generator=g).tolist()
            out.append({"prompt_ids": ids[:cut], "chosen_ids": ids[cut:] + [2], "rejected_ids": other + [2]})
        else:
            out.append({"input_ids": ids + [2], "assistant_masks": [0] * cut + [1] * (length + 1 - cut)})
    return out


def build_model(attn: str, window: int | None, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                           num_attention_heads=8, num_key_value_heads=4, head_dim=32, sliding_window=window,
                           max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = MistralForCausalLM(config).float()
    model.config._attn_implementation = attn
    return model


def one_step(stage: str, attn: str, liger: bool, padding_free: bool, data, tokenizer, window=WINDOW):
    """Loss and gradients of the first batch through the stage's real trainer."""
    from datasets import Dataset
    from transformers.integrations.liger import apply_liger_kernel

    from mistral_tune.config import compose
    from mistral_tune.training.trainers import build_dpo_trainer, build_sft_trainer

    overrides = ["logger=none", "model.dtype=float32", f"{stage}.trainer.per_device_train_batch_size={len(data)}",
                 f"{stage}.trainer.use_liger_kernel={str(liger).lower()}", f"{stage}.trainer.max_steps=1",
                 f"++{stage}.trainer.bf16=false", f"++{stage}.trainer.tf32=false"]
    if stage == "sft":
        overrides.append(f"sft.trainer.padding_free={str(padding_free).lower()}")
    cfg = compose(overrides)
    model = build_model(attn, window)
    out = Path(tempfile.mkdtemp(prefix=f"exact_{stage}_"))
    dataset = Dataset.from_list(data)
    if stage == "sft":
        trainer = build_sft_trainer(cfg, model, tokenizer, dataset, out, [])
    else:
        ref = build_model(attn, window, seed=1)  # another model as the reference: the log-ratios are not 0
        trainer = build_dpo_trainer(cfg, model, ref, tokenizer, dataset, out, [])
    if liger:
        apply_liger_kernel(trainer.model, trainer.args.liger_kernel_config)
    device = trainer.args.device
    trainer.model.to(device).train()
    if stage == "dpo":
        trainer.ref_model.to(device)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(data))])
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.detach().float().cpu() for n, p in trainer.model.named_parameters() if p.grad is not None}
    forward = trainer.model.forward
    return {"loss": loss.item(), "grads": grads, "packed": bool(getattr(forward, "packed", False)),
            "lean": bool(getattr(forward, "lean_lm_head", False)),
            "padding_free_batch": "attention_mask" not in batch or bool(batch["attention_mask"].all())}


def compare(ref: dict, got: dict) -> dict:
    loss_rel = abs(got["loss"] - ref["loss"]) / abs(ref["loss"])
    num = sum((got["grads"][n] - g).pow(2).sum() for n, g in ref["grads"].items()) ** 0.5
    den = sum(g.pow(2).sum() for g in ref["grads"].values()) ** 0.5
    return {"loss": got["loss"], "loss_rel_err": loss_rel, "grad_rel_err": float(num / den),
            "missing_grads": sorted(set(ref["grads"]) - set(got["grads"]))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from mistral_tune.formats.tokenizer import build_hf_tokenizer

    tokenizer = build_hf_tokenizer("mistral_v1")
    cuda = torch.cuda.is_available()
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "cases": {}}
    ok = True
    for stage in ("sft", "dpo"):
        data = rows(8, seed=3 if stage == "sft" else 4, vocab=32000, pairs=stage == "dpo")
        plain = one_step(stage, "sdpa", False, False, data, tokenizer)
        no_window = one_step(stage, "sdpa", False, False, data, tokenizer, window=None)
        window_effect = compare(plain, no_window)
        report["cases"][f"{stage}: window_effect (sdpa, window dropped)"] = window_effect
        cases = {"flex_attention packed (the CUDA default)": ("flex_attention", False, True),
                 "flex_attention packed + Liger (opt-in)": ("flex_attention", True, True),
                 "sdpa packed": ("sdpa", False, True)} if cuda else {"sdpa packed (lean head)": ("sdpa", False, True)}
        for name, (attn, liger, padding_free) in cases.items():
            try:
                got = one_step(stage, attn, liger, padding_free, data, tokenizer)
                r = compare(plain, got)
                r.update(packed_head=got["packed"], lean_head=got["lean"], padding_free_batch=got["padding_free_batch"])
                r["pass"] = (r["loss_rel_err"] < 1e-4 and r["grad_rel_err"] < 1e-3 and not r["missing_grads"]
                             and r["grad_rel_err"] < window_effect["grad_rel_err"] / 10)
            except Exception as err:  # noqa: BLE001 - a kernel that fails to run is a failed case, reported
                r = {"pass": False, "error": f"{type(err).__name__}: {str(err)[:300]}"}
            ok &= r["pass"]
            report["cases"][f"{stage}: {name}"] = r
            print(f"{stage}: {name}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in r.items()), flush=True)
        print(f"{stage}: plain loss {plain['loss']:.6f}; window effect on gradients "
              f"{window_effect['grad_rel_err']:.2e}", flush=True)
    report["pass"] = ok
    print("gpu_exact:", "PASS" if ok else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
