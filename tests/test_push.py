"""`mistral-tune push`: dry run, retries on transient hub errors, an honest failure report."""

from __future__ import annotations

import json

import pytest

from mistral_tune.stages import push
from mistral_tune.config import compose
from mistral_tune.errors import UserError


@pytest.fixture
def run_dir(tmp_path):
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "model.safetensors").write_bytes(b"weights")
    (merged / "config.json").write_text("{}")
    (merged / "manifest.json").write_text(json.dumps({"stage": "merge"}))
    sft = tmp_path / "sft"
    (sft / "checkpoint-2").mkdir(parents=True)
    (sft / "adapter_model.safetensors").write_bytes(b"lora")
    (sft / "checkpoint-2" / "optimizer.pt").write_bytes(b"x")
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft", "method": "lora"}))
    (sft / "started.json").write_text(json.dumps({"fingerprint": "f"}))
    (sft / "logs").mkdir()
    (sft / "logs" / "notes.txt").write_text("kept")
    return tmp_path


class FakeApi:
    def __init__(self, failures: list[Exception]):
        self.failures, self.uploads = failures, []

    def create_repo(self, repo_id, private, exist_ok):
        pass

    def create_branch(self, repo_id, branch, exist_ok):
        pass

    def upload_folder(self, **kwargs):
        if self.failures:
            raise self.failures.pop(0)
        kwargs["ignore_patterns"] += [".git"]  # as HfApi.upload_folder adds its defaults, in place
        self.uploads.append(kwargs)


def test_dry_run_lists_what_would_be_sent(run_dir, capsys):
    cfg = compose([f"run_dir={run_dir}", "push.repo_id=org/m", "push.dry_run=true", "push.include_adapters=true"])
    push.run(cfg)
    out = capsys.readouterr().out
    assert "org/m:model.safetensors" in out and "org/m:adapters/sft/adapter_model.safetensors" in out
    assert "checkpoint-2" not in out and "manifest.json" not in out and "started.json" not in out
    assert "org/m:adapters/sft/logs/notes.txt" in out  # the ignore patterns are fnmatch, as upload_folder's


def test_transient_errors_are_retried(run_dir, monkeypatch):
    api = FakeApi([ConnectionError("reset by peer"), TimeoutError("slow")])
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    monkeypatch.setattr(push.time, "sleep", lambda s: None)
    push.run(compose([f"run_dir={run_dir}", "push.repo_id=org/m"]))
    assert len(api.uploads) == 1 and api.uploads[0]["repo_id"] == "org/m"
    assert "started.json" in api.uploads[0]["ignore_patterns"]
    assert (run_dir / "merged" / "model.safetensors").exists()  # the local checkpoint stays


def test_a_failed_push_says_what_was_and_was_not_uploaded(run_dir, monkeypatch):
    api = FakeApi([])
    original = api.upload_folder

    def fail_on_adapters(**kwargs):
        if kwargs["path_in_repo"]:
            raise ValueError("403 Forbidden: no write access")
        original(**kwargs)

    api.upload_folder = fail_on_adapters
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    with pytest.raises(UserError) as err:
        push.run(compose([f"run_dir={run_dir}", "push.repo_id=org/m", "push.include_adapters=true"]))
    message = str(err.value)
    assert "403" in message and f"uploaded: ['{run_dir / 'merged'}']" in message
    assert f"not uploaded: ['{run_dir / 'sft'}']" in message
    assert (run_dir / "merged" / "model.safetensors").exists()


def test_push_needs_a_repo_and_a_merged_model(tmp_path):
    with pytest.raises(UserError, match="push.repo_id"):
        push.run(compose([f"run_dir={tmp_path}"]))
    with pytest.raises(UserError, match="finished merge"):
        push.run(compose([f"run_dir={tmp_path}", "push.repo_id=org/m"]))
