"""`mistral-tune chat`: a tiny merged model with the real Mistral v1 tokenizer and chat template."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
import torch

from mistral_tune.cli import main
from mistral_tune.formats.chat_format import ChatFormat
from tests.helpers import tiny_mistral


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = ChatFormat("mistral_v1", "mistral_v1").hf_tokenizer()
    model = tiny_mistral(vocab_size=len(tokenizer), seed=3)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "merged", safe_serialization=True)
    tokenizer.save_pretrained(root / "merged")
    return root


def greedy(run_dir, messages, max_new_tokens):
    """The plain computation: the chat template, then greedy generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    model = AutoModelForCausalLM.from_pretrained(run_dir / "merged", dtype=torch.float32).eval()
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_piped_lines_are_turns_of_one_conversation(run_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is 2 plus 3?\n\nAnd 4 plus 4?\n"))
    assert main(["chat", f"run_dir={run_dir}", "chat.max_new_tokens=6", "chat.system=Be brief."]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = greedy(run_dir, [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "What is 2 plus 3?"}], 6)
    second = greedy(run_dir, [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "What is 2 plus 3?"},
                              {"role": "assistant", "content": first},
                              {"role": "user", "content": "And 4 plus 4?"}], 6)
    assert first  # the random tiny model does say something
    assert [line.strip() for line in lines] == [first, second]  # the empty line is no turn


def test_echo_into_chat_answers_and_exits_0(run_dir):
    proc = subprocess.run([sys.executable, "-m", "mistral_tune", "chat", f"run_dir={run_dir}", "chat.max_new_tokens=4"],
                          input="What is 2 plus 3?\n", capture_output=True, text=True,
                          env={**os.environ, "WANDB_MODE": "disabled"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()  # the reply
    assert "Traceback" not in proc.stderr


def test_chat_without_merged_model_is_one_line(tmp_path, capsys):
    assert main(["chat", f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "merged" in err[0] and err[1].startswith("hint:")
