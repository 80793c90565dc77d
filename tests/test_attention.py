"""The attention kernel: what `model.attn_implementation=auto` picks where, and flex_attention's
block mask on packed rows (per-sequence causal AND Mistral's sliding window) against per-row runs.

flex_attention is forward-only on CPU in torch 2.13, so its training speed is a GPU check; its
mask and outputs are checked here."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.training import modeling
from tests.helpers import tiny_mistral


def _pick(monkeypatch, cuda: bool, flash_attn: bool, choice: str = "auto", inference: bool = False) -> str:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if flash_attn else None) if name == "flash_attn" else real(name, *a))
    return modeling.resolve_attn(compose([f"model.attn_implementation={choice}"]), inference)


def test_auto_picks_varlen_or_block_sparse_kernels_on_cuda_and_sdpa_on_cpu(monkeypatch):
    assert _pick(monkeypatch, cuda=True, flash_attn=True) == "flash_attention_2"
    assert _pick(monkeypatch, cuda=True, flash_attn=False) == "flex_attention"  # never packed SDPA on a GPU
    assert _pick(monkeypatch, cuda=False, flash_attn=True) == "sdpa"
    assert _pick(monkeypatch, cuda=False, flash_attn=False, choice="eager") == "eager"  # an explicit choice stays
    # eval, sampling, merge: padded batches and generation, where flex_attention would recompile per length
    assert _pick(monkeypatch, cuda=True, flash_attn=False, inference=True) == "sdpa"
    assert _pick(monkeypatch, cuda=True, flash_attn=True, inference=True) == "flash_attention_2"
    assert _pick(monkeypatch, cuda=True, flash_attn=False, choice="flex_attention", inference=True) == "flex_attention"
    with pytest.raises(UserError, match="needs CUDA and the flash-attn package"):
        _pick(monkeypatch, cuda=False, flash_attn=False, choice="flash_attention_2")


@pytest.mark.slow  # torch.compile of flex_attention on CPU: about a minute
def test_flex_attention_packed_rows_equal_per_row_runs_with_the_window():
    """Two sequences packed in one row with restarting position_ids give, through flex_attention,
    the logits of each sequence run alone (window 8 < lengths 20 and 13: the boundary is crossed),
    and equal the eager kernel; without the window the logits move, so the window is applied."""
    model = tiny_mistral(vocab_size=512, sliding_window=8).eval()
    torch.manual_seed(0)
    a, b = torch.randint(3, 512, (1, 20)), torch.randint(3, 512, (1, 13))
    packed = torch.cat([a, b], 1)
    positions = torch.cat([torch.arange(20), torch.arange(13)])[None]
    out = {}
    for impl in ("eager", "flex_attention"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out[impl] = (model(a, use_cache=False).logits[0], model(b, use_cache=False).logits[0],
                         model(packed, position_ids=positions, use_cache=False).logits[0])
    alone_a, alone_b, both = out["flex_attention"]
    assert (both[:20] - alone_a).abs().max() < 1e-5 and (both[20:] - alone_b).abs().max() < 1e-5
    assert (alone_a - out["eager"][0]).abs().max() < 1e-5
    model.config.sliding_window = None
    with torch.no_grad():
        no_window = model(a, use_cache=False).logits[0]
    assert (no_window[8:] - alone_a[8:]).abs().max() > 1e-3 and (no_window[:8] - alone_a[:8]).abs().max() < 1e-5


@pytest.mark.parametrize("cuda,installed,usable", [(True, True, True), (True, False, False), (False, True, False)])
def test_liger_kernels_are_opt_in_and_refused_where_they_cannot_run(monkeypatch, cuda, installed, usable):
    """Liger's kernels are Triton: never on unless asked (on an H100 with flex_attention they stalled
    training, bench/results/gpu.md); asked for without CUDA or liger-kernel, a clear error before
    any model loads, instead of transformers' ImportError when training starts."""
    from trl import DPOConfig, SFTConfig

    from mistral_tune.training import trainers

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "liger_kernel" else real(name, *a))
    assert trainers.liger_usable() is usable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # build the TRL configs on this CPU
    monkeypatch.setattr(trainers, "liger_usable", lambda: usable)
    for stage, config_cls in (("sft", SFTConfig), ("dpo", DPOConfig)):
        assert trainers.trl_args(compose(["logger=none"]), stage, config_cls, "/tmp/x", []).use_liger_kernel is False
        on = compose(["logger=none", f"{stage}.trainer.use_liger_kernel=true"])
        if usable:
            assert trainers.trl_args(on, stage, config_cls, "/tmp/x", []).use_liger_kernel is True
        else:
            with pytest.raises(UserError, match="use_liger_kernel=true needs a CUDA GPU"):
                trainers.trl_args(on, stage, config_cls, "/tmp/x", [])
