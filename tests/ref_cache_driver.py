"""Precompute DPO reference log-probs with mistral_tune's DPO trainer and write them out.

Run by tests/test_ref_cache.py in-process, and under
`accelerate launch --config_file launch/accelerate/ddp.yaml --num_processes 2 tests/ref_cache_driver.py DATA OUT MODE`
for the 2-process check. Every rank writes OUT.rank<N>.json with the precomputed columns it sees
(the whole dataset, in dataset order) and the number of processes it ran with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # launched as a script: tests/ is on sys.path, the repo root is not
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from tests.helpers import tiny_mistral  # noqa: E402

VOCAB = 32000
MODES = ("full", "full-noref", "lora", "lora-trained")


def pairs(n: int = 13, seed: int = 0) -> list[dict]:
    """Pre-tokenized rows like the data stage's, with varied lengths so that a row matched to the
    wrong reference value is caught (13 rows: batches of 2 on 2 ranks leave an uneven tail)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": [1] + ids(3, 14), "chosen_ids": ids(1, 9) + [2], "rejected_ids": ids(1, 9) + [2]}
            for _ in range(n)]


def lora_policy(seed: int = 0):
    """A PEFT policy whose adapter is NOT a no-op (lora_B randomised), over the tiny base of `seed`:
    the reference must be the base with the adapter disabled, not the policy."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_mistral(vocab_size=VOCAB, seed=seed).train(),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def trainer_for(mode: str, dataset, out: Path, **kw):
    """mistral_tune's DPO trainer. full: a separate frozen reference (what dpo.py passes today);
    full-noref: no ref_model (TRL precomputes with the initial policy and keeps no reference); lora: a
    fresh adapter from peft_config, as dpo.py does (reference = adapter disabled = the base);
    lora-trained: a policy that already has a non-zero adapter (TRL copies it as the "ref" adapter,
    so the reference is the initial policy, adapter included)."""
    from trl import DPOConfig

    from mistral_tune.training.trainers import dpo_trainer_class
    from mistral_tune.formats.tokenizer import build_hf_tokenizer

    args = DPOConfig(**{**dict(
        output_dir=str(out), use_cpu=True, bf16=False, report_to=[], max_steps=1, optim="sgd", learning_rate=0.1,
        lr_scheduler_type="constant", warmup_steps=0, logging_steps=1, save_strategy="no", seed=0,
        gradient_checkpointing=False, per_device_train_batch_size=2, beta=0.1, disable_tqdm=True), **kw})
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        model, ref = tiny_mistral(vocab_size=VOCAB, seed=0).train(), None
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    elif mode == "lora-trained":
        model, ref = lora_policy(), None
    else:
        model = tiny_mistral(vocab_size=VOCAB, seed=1).train()
        ref = tiny_mistral(vocab_size=VOCAB, seed=0) if mode == "full" else None
    return dpo_trainer_class()(model=model, ref_model=ref, args=args, train_dataset=dataset,
                                processing_class=build_hf_tokenizer("mistral_v1"), peft_config=peft_config)


def main(data_dir: str, out: str, mode: str) -> None:
    from datasets import load_from_disk

    kw = {"precompute_ref_log_probs": True}
    trainer = trainer_for(mode, load_from_disk(data_dir), Path(out).parent / "trainer", **kw)
    ds = trainer.train_dataset
    rank = trainer.accelerator.process_index
    Path(f"{out}.rank{rank}.json").write_text(json.dumps({
        "num_processes": trainer.accelerator.num_processes, "deepspeed": bool(trainer.is_deepspeed_enabled),
        "ref_chosen_logps": list(ds["ref_chosen_logps"]), "ref_rejected_logps": list(ds["ref_rejected_logps"]),
        "prompt_ids": list(ds["prompt_ids"]),
    }))


if __name__ == "__main__":
    main(*sys.argv[1:4])
