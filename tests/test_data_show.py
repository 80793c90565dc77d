"""`data.show=N` on a finished data build: shown from disk, never rebuilt; SFT and DPO."""

from __future__ import annotations

import json

from mistral_tune.config import compose
from mistral_tune.stages import data

CHATS = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                       {"role": "assistant", "content": f"It is {2 * i}."}]} for i in range(3)]
PAIRS = [{"prompt": f"Name colour {i}.", "chosen": f"Blue {i}.", "rejected": f"Seven {i}."} for i in range(2)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_show_reads_the_finished_build_for_sft_and_dpo(tmp_path, capsys):
    sft, dpo = write_jsonl(tmp_path / "c.jsonl", CHATS), write_jsonl(tmp_path / "p.jsonl", PAIRS)
    base = [f"run_dir={tmp_path / 'run'}", "logger=none", f"sft.data.files=[{sft}]", f"dpo.data.files=[{dpo}]"]
    data.run(compose(base))
    manifests = {k: (tmp_path / "run" / "data" / k / "manifest.json").read_text() for k in ("sft", "dpo")}
    capsys.readouterr()

    data.run(compose([*base, "data.show=2"]))
    out = capsys.readouterr().out
    for k in ("sft", "dpo"):  # not rebuilt: same manifest (same finished_at)
        assert (tmp_path / "run" / "data" / k / "manifest.json").read_text() == manifests[k]
    assert "data/sft: the first 2 of 3 examples" in out and "data/dpo: the first 2 of 2 examples" in out
    assert "[[It is 0.</s>]]" in out.replace("[[ ", "[[")  # the reply and its EOS are trained
    assert "What is 0 plus 0?" in out and "[[What is" not in out  # the user turn is not
    assert "prompt:   <s> [INST] Name colour 0. [/INST]" in out
    assert "chosen:   [[Blue 0.</s>]]" in out.replace("[[ ", "[[") and "rejected: [[" in out
