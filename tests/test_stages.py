"""Stage-level behaviour that needs no training: the data stage, merge verification, the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mistral_tune.stages import merge
from mistral_tune.config import compose
from mistral_tune.formats.chat_format import ChatFormat
from tests.helpers import tiny_mistral


def cli(*args):
    return subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True)


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"messages": [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "1 + 2 = 3"}]}
BAD_ROLE = {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]}


def test_bad_row_is_a_clear_error_without_traceback(tmp_path):
    f = _write_jsonl(tmp_path / "mine.jsonl", [GOOD, "{not json", GOOD])
    proc = cli("data", f"run_dir={tmp_path / 'run'}", f"sft.data.files=[{f}]", "dpo.data.files=[]")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mine.jsonl, line 2" in proc.stderr and "data.on_error=skip" in proc.stderr
    assert not (tmp_path / "run" / "data" / "sft" / "manifest.json").exists()


def test_skip_mode_accounts_for_every_row(tmp_path):
    long = {"messages": [{"role": "user", "content": "x " * 400}, {"role": "assistant", "content": "ok"}]}
    f = _write_jsonl(tmp_path / "mine.jsonl", [GOOD, "{not json", BAD_ROLE, long, GOOD])
    run = tmp_path / "run"
    proc = cli("data", f"run_dir={run}", f"sft.data.files=[{f}]", "dpo.data.files=[]", "data.on_error=skip",
               "sft.data.max_length=64", "data.max_drop_fraction=0.5")  # 1 of 5 too long: past the 0.1 default
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run / "data" / "sft" / "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"], report["too_long"]) == (5, 2, 2, 1)
    rejects = [json.loads(line) for line in (run / "data" / "sft" / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted(r["reason"] for r in rejects)
    assert len(rejects) == 3 and any("max_length" in r for r in reasons) and any("role" in r for r in reasons)


def test_changed_tokenizer_or_template_never_reuses_the_build(tmp_path):
    run = tmp_path / "run"
    args = [f"run_dir={run}", "sft.data.limit=8", "dpo.data.limit=8"]
    assert cli("data", *args).returncode == 0
    v1 = json.loads((run / "data" / "sft" / "manifest.json").read_text())
    proc = cli("data", *args, "template=mistral_v3")  # one run_dir, one chat format
    assert proc.returncode == 2 and "was built with template mistral_v1" in proc.stderr
    assert cli("data", *args, "template=mistral_v3", "force=true").returncode == 0
    for kind in ("sft", "dpo"):
        v3 = json.loads((run / "data" / kind / "manifest.json").read_text())
        assert v3["format"]["template"] == "mistral_v3" and v3["fingerprint"] != v1["fingerprint"]
    assert json.loads((run / "data" / "format.json").read_text()) == {"template": "mistral_v3", "vocab": "mistral_v3"}


def test_zero_trained_tokens_is_an_error(tmp_path, monkeypatch):
    from mistral_tune.stages import data
    from mistral_tune.formats import templates

    monkeypatch.setattr(
        templates, "encode_chat",
        lambda messages, template, train_on="assistant", **kwargs: templates.Encoded([1, 2, 3], [0, 0, 0]),
    )
    f = _write_jsonl(tmp_path / "mine.jsonl", [GOOD])
    cfg = compose([f"run_dir={tmp_path / 'run'}", f"sft.data.files=[{f}]", "dpo.data.files=[]"])
    with pytest.raises(Exception, match="zero trained tokens"):
        data.run(cfg)


def test_merge_check_fails_on_a_wrong_merge():
    """The probe check is what stops a bad merge from being marked complete: it must fire."""
    model = tiny_mistral(vocab_size=32000)
    batch = merge.probe_batch(ChatFormat("mistral_v1", "mistral_v1"))
    expected = merge.logits(model, batch)
    assert merge.verify_merge(expected, model, batch, atol=1e-5) == 0.0
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(1.5)  # a merge that went wrong
    with pytest.raises(merge.MergeMismatch, match="differ"):
        merge.verify_merge(expected, model, batch, atol=1e-3)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))
    with pytest.raises(merge.MergeMismatch):
        merge.verify_merge(expected, model, batch, atol=1e-3)


def test_tiny_default_window_is_shorter_than_the_training_rows(tmp_path):
    """The default tiny model's sliding window must matter on the bundled data."""
    cfg = compose([f"run_dir={tmp_path}"])
    assert cfg.model.config.sliding_window is not None
    assert cfg.model.config.num_key_value_heads < cfg.model.config.num_attention_heads  # GQA
    from mistral_tune.stages import data

    data.run(cfg)
    report = json.loads((tmp_path / "data" / "sft" / "report.json").read_text())
    assert report["length"]["max"] > cfg.model.config.sliding_window


def test_model_config_fields_are_overridable(tmp_path):
    from mistral_tune.training.modeling import tiny_config

    cfg = compose([f"run_dir={tmp_path}", "model.config.hidden_size=256", "model.config.head_dim=64"])
    config = tiny_config(cfg, vocab_size=32000)
    assert config.hidden_size == 256 and config.vocab_size == 32000 and config.sliding_window == 48


def test_qlora_without_cuda_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = cli("sft", f"run_dir={tmp_path}", "peft=qlora", "sft.data.limit=8", "dpo.data.limit=8", "logger=none")
    assert proc.returncode == 2 and "CUDA" in proc.stderr and "Traceback" not in proc.stderr


def test_unwritable_run_dir_is_a_one_line_error():
    proc = cli("data", "run_dir=/proc/mistral_tune_cannot_write_here")
    assert proc.returncode == 2 and "not writable" in proc.stderr and "Traceback" not in proc.stderr
