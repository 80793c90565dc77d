"""The first hour of a new user (issue 14): help, Hydra's flags, user config dirs, and mistakes
reported in one or two lines before any work."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

from mistral_tune import cli_args
from mistral_tune.cli import COMMANDS, main
from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.preflight import check_hub_model, check_launcher, check_model_folder
from mistral_tune.runs import check_done, finish_stage, write_stage_config
from tests.helpers import tiny_mistral


def cli(*args, env=None, timeout=300):
    env = {**os.environ, "WANDB_MODE": "disabled", **(env or {})}
    env.pop("MISTRAL_TUNE_LOCK_HOLDER", None)
    return subprocess.run([sys.executable, "-m", "mistral_tune", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """The error and what follows it (the log of resolved defaults may come before)."""
    lines = stderr.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if ": error: " in line)
    return lines[first:]


def one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    err = error_lines(proc.stderr)
    assert 1 <= len(err) <= 2 and (len(err) == 1 or err[1].startswith("hint: ")), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(autouse=True)
def fresh_cli_state():
    """main() records --config-name for launched ranks in the environment: not for the next test."""
    yield
    os.environ.pop(cli_args.CONFIG_NAME_ENV, None)
    os.environ.pop(cli_args.CONFIG_DIRS_ENV, None)
    cli_args.set_search_dirs(cli_args.Args())


@pytest.fixture()
def user_dir(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: small\nsft:\n  trainer:\n    learning_rate: 1.5e-5\n")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("defaults:\n  - tiny\n  - _self_\ninit_seed: 7\n")
    return tmp_path


def test_sft_help_lists_purpose_groups_and_key_defaults():
    proc = cli("sft", "--help", "sft.trainer.learning_rate=0.02")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Supervised fine-tuning" in out
    assert "sft.trainer.learning_rate=0.02" in out  # the value with these overrides
    assert "sft.trainer.max_steps=-1  (TRL's default)" in out
    assert "model           tiny" in out and "mistral_7b_v0_3" in out  # group, choice, options
    assert "--cfg job" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    assert main([command, "-h"]) == 0
    assert cli_args.COMMAND_HELP[command][0] in capsys.readouterr().out


def test_config_dir_experiment_and_model_files(user_dir, capsys):
    for flags in (["--config-dir", str(user_dir)], [f"--config-dir={user_dir}"], ["-cd", str(user_dir)]):
        assert main(["sft", *flags, "experiment=mine", "--cfg", "job"]) == 0
        shown = yaml.safe_load(capsys.readouterr().out)
        assert shown["sft"]["trainer"]["learning_rate"] == 1.5e-5
        assert shown["model"]["init_seed"] == 7  # DIR/model/small.yaml, chosen by the experiment
    assert os.environ[cli_args.CONFIG_DIRS_ENV] == str(user_dir)  # for the ranks a launcher starts


def test_launched_rank_inherits_the_config_dir(user_dir, capsys, monkeypatch):
    """A rank started by `launcher=` (or a sweep job's) gets overrides without the flag."""
    monkeypatch.setenv(cli_args.CONFIG_DIRS_ENV, str(user_dir))
    assert main(["sft", "experiment=mine", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sft"]["trainer"]["learning_rate"] == 1.5e-5


def test_experiment_file_outside_any_config_dir(user_dir, tmp_path_factory, capsys):
    loose = tmp_path_factory.mktemp("loose") / "trial.yaml"
    loose.write_text("# @package _global_\nsft:\n  trainer:\n    learning_rate: 0.0123\n")
    assert main(["sft", f"+experiment={loose}", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["sft"]["trainer"]["learning_rate"] == 0.0123


def test_config_name_picks_the_users_primary_config(user_dir, capsys):
    (user_dir / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\nseed: 99\n")
    assert main(["sft", "--config-dir", str(user_dir), "--config-name", "mine", "--cfg", "job"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["seed"] == 99
    assert os.environ[cli_args.CONFIG_NAME_ENV] == "mine"  # launched ranks compose the same config


def test_info_shows_search_path_and_user_options(user_dir, capsys):
    assert main(["sft", "--config-dir", str(user_dir), "--info"]) == 0
    out = capsys.readouterr().out
    assert f"file://{user_dir}  (--config-dir)" in out
    assert "mine" in out and "small" in out


def test_unknown_flag_and_missing_experiment_are_one_line(capsys):
    assert main(["sft", "--bogus"]) == 2
    assert "unknown flag '--bogus'" in capsys.readouterr().err
    assert main(["sft", "experiment=nope"]) == 2
    assert "--config-dir DIR" in capsys.readouterr().err


@pytest.mark.parametrize(("override", "expected"), [
    ("+sft.trainer.learnin_rate=1", "unknown config key 'sft.trainer.learnin_rate' (did you mean 'sft.trainer.learning_rate'?)"),
    ("+modle.init_seed=1", "unknown config key 'modle' (did you mean 'model'?)"),
])
def test_plus_key_typos_fail_at_compose_time(override, expected):
    with pytest.raises(UserError) as err:
        compose([override])
    assert str(err.value) == expected
    compose(["+model.config.rope_theta=1000.0"])  # free-form model.config takes any MistralConfig field


# --- model folders: checked before any work -------------------------------------------------

@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    tiny_mistral(vocab_size=64).save_pretrained(path, safe_serialization=True)
    return path


def test_good_model_folder_passes(good_model):
    check_model_folder(good_model)


def test_adapter_folder_says_how_to_load_it(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/models/base"}))
    with pytest.raises(UserError, match="holds a PEFT adapter, not a model .its base: /models/base.") as err:
        check_model_folder(tmp_path)
    assert "model.name_or_path=/models/base" in err.value.hint


def test_tokenizer_only_folder(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="holds a tokenizer but no model"):
        check_model_folder(tmp_path)


@pytest.mark.parametrize("damage", ["no_weights", "bin_only", "truncated", "garbage", "bad_config", "missing_shard"])
def test_broken_model_folders(good_model, tmp_path, damage):
    import shutil

    shutil.copytree(good_model, tmp_path / "m")
    m = tmp_path / "m"
    weights = m / "model.safetensors"
    if damage == "no_weights":
        weights.unlink()
    elif damage == "bin_only":
        weights.rename(m / "pytorch_model.bin")
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage":
        weights.write_bytes(b"not a safetensors file at all")
    elif damage == "bad_config":
        (m / "config.json").write_text("{not json")
    elif damage == "missing_shard":
        (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(UserError):
        check_model_folder(m)


def test_broken_model_folder_through_the_cli(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "mistral"}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    proc = cli("sft", f"model.name_or_path={tmp_path / 'model'}", f"run_dir={tmp_path / 'run'}", "logger=none")
    one_line_error(proc, "model.safetensors is not a valid safetensors file")
    assert not (tmp_path / "run" / "data").exists()  # before the data build


def test_adapter_folder_through_the_cli(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "mistralai/Mistral-7B-v0.1"}))
    proc = cli("sft", f"model.name_or_path={tmp_path}", f"run_dir={tmp_path / 'run'}", "logger=none")
    one_line_error(proc, "holds a PEFT adapter", "hint: give the base, model.name_or_path=mistralai/Mistral-7B-v0.1")


# --- the Hub, unreachable: one probe, one line ------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again once the socket is


def test_hub_id_unreachable_is_one_line_without_retries(tmp_path):
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0"}
    proc = cli("sft", "model.name_or_path=someorg/some-model", f"run_dir={tmp_path / 'run'}", "logger=none", env=env)
    one_line_error(proc, "someorg/some-model: cannot reach the Hub at http://127.0.0.1:")
    assert "Retrying" not in proc.stderr


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="not in the local Hugging Face cache"):
        check_hub_model("someorg/some-model")


def test_fsdp_on_cpu_is_refused_before_launching(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("FSDP is allowed on CUDA")
    cfg = compose(["launcher=fsdp2", f"run_dir={tmp_path}"])
    with pytest.raises(UserError, match="launcher=fsdp2 .FSDP. needs CUDA"):
        check_launcher(cfg)
    check_launcher(compose(["launcher=ddp"]))  # DDP runs on CPU


# --- a refused stage says what changed --------------------------------------------------------

def test_refused_stage_lists_the_changed_keys(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])
    write_stage_config(cfg, "sft")
    finish_stage(cfg, "sft", {})
    assert check_done(cfg, "sft") is not None
    changed = compose([f"run_dir={tmp_path}", "sft.trainer.learning_rate=0.001", "sft.trainer.logging_steps=3", "seed=7"])
    with pytest.raises(UserError) as err:
        check_done(changed, "sft")
    message = err.value.message
    assert "seed: 42 -> 7" in message and "sft.trainer.learning_rate: 0.003 -> 0.001" in message
    assert "logging_steps" not in message  # not part of the stage's decision
