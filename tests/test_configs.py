"""Every shipped config composes and builds the real TRL arguments; config mistakes are one-line errors.

litgpt tests every YAML of its config hub against the scripts' signatures; the alignment-handbook
shipped recipes with keys its pinned TRL no longer had. Here every `configs/experiment/*.yaml`
(found by glob, so a new recipe is tested without touching this file) and every group option is
composed, and the real `trl.SFTConfig` / `trl.DPOConfig` is built from it. No training, no network.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from trl import DPOConfig, KTOConfig, SFTConfig

from mistral_tune.cli import _strip_launcher_args
from mistral_tune.config import CONFIG_DIR, compose, trainer_kwargs
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from mistral_tune.training.modeling import lora_config
from mistral_tune.schema import OWNED_TRAINER_FIELDS
from mistral_tune.formats.templates import ALL_TEMPLATES
from mistral_tune.training.trainers import orpo_config_class, trl_args

STAGES = {"sft": SFTConfig, "dpo": DPOConfig, "orpo": orpo_config_class(), "kto": KTOConfig}  # orpo, kto: configs/<stage>_trainer/
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
GROUPS = ("model", "peft", "template", "logger", "launcher", "data")
GROUP_OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]
COMMANDS = ("data", "sft", "dpo", "merge", "eval", "push", "pipeline", "tokenizer", "plan")

# The published alignment-handbook values each Zephyr recipe must carry (recipes/zephyr-7b-beta/
# {sft,dpo}/config_{full,qlora}.yaml), so an edit to a recipe or to a default it leans on cannot
# silently change them.
RECIPE_VALUES = {
    "zephyr_7b_beta_full": {
        "model.name_or_path": "mistralai/Mistral-7B-v0.1",
        "model.dtype": "bfloat16",
        "peft.method": "none",
        "template.name": "mistral_v1",
        "template.train_on": "all",  # the handbook's SFTTrainer took the loss on every token
        "launcher.num_processes": 8,
        "sft.data.max_length": 2048,
        "sft.trainer.learning_rate": 2.0e-5,
        "sft.trainer.num_train_epochs": 1,
        "sft.trainer.per_device_train_batch_size": 16,
        "sft.trainer.gradient_accumulation_steps": 1,
        "sft.trainer.lr_scheduler_type": "cosine",
        "sft.trainer.warmup_steps": 0.1,
        "dpo.data.max_length": 1024,
        "dpo.trainer.beta": 0.01,
        "dpo.trainer.learning_rate": 5.0e-7,
        "dpo.trainer.num_train_epochs": 1,
        "dpo.trainer.per_device_train_batch_size": 8,
        "dpo.trainer.gradient_accumulation_steps": 2,
        "dpo.trainer.lr_scheduler_type": "cosine",
        "dpo.trainer.warmup_steps": 0.1,
        "dpo.trainer.optim": "adamw_torch",
    },
    "zephyr_7b_beta_qlora": {
        "model.name_or_path": "mistralai/Mistral-7B-v0.1",
        "model.dtype": "bfloat16",
        "peft.method": "qlora",
        "peft.r": 16,
        "peft.lora_alpha": 16,
        "peft.lora_dropout": 0.05,
        "peft.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "peft.bnb_4bit_quant_type": "nf4",
        "peft.bnb_4bit_use_double_quant": False,
        "template.name": "mistral_v1",
        "template.train_on": "all",  # the handbook's SFTTrainer took the loss on every token
        "launcher.num_processes": 1,
        "sft.data.max_length": 2048,
        "sft.trainer.learning_rate": 2.0e-4,
        "sft.trainer.num_train_epochs": 1,
        "sft.trainer.per_device_train_batch_size": 4,
        "sft.trainer.gradient_accumulation_steps": 2,
        "sft.trainer.lr_scheduler_type": "cosine",
        "sft.trainer.warmup_steps": 0.1,
        "dpo.data.max_length": 1024,
        "dpo.peft": {"r": 128, "lora_alpha": 128},  # dpo/config_qlora.yaml: the DPO adapter's own rank
        "dpo.trainer.beta": 0.01,
        "dpo.trainer.learning_rate": 5.0e-6,
        "dpo.trainer.num_train_epochs": 1,
        "dpo.trainer.per_device_train_batch_size": 4,
        "dpo.trainer.gradient_accumulation_steps": 4,
        "dpo.trainer.lr_scheduler_type": "cosine",
        "dpo.trainer.warmup_steps": 0.1,
        "dpo.trainer.optim": "paged_adamw_32bit",
    },
}


def build_all(cfg, out: Path) -> dict:
    """The real TRL arguments of both stages, and the real LoRA config, from a composed config.

    bf16 is built as the config asks, also on this CPU-only machine: without CUDA, trl_args sets
    use_cpu=True, and transformers accepts bf16 on CPU then (it refuses bf16 only without use_cpu).
    """
    args = {stage: trl_args(cfg, stage, cls, out / stage, report_to=[]) for stage, cls in STAGES.items()}
    for stage, built in args.items():
        # Every value the config sets reaches TRL unchanged (max_length is the data stage's).
        for key, value in trainer_kwargs(cfg[stage].trainer).items():
            if key != "max_length":
                assert getattr(built, key) == value, f"{stage}.trainer.{key}"
        assert built.output_dir == str(out / stage) and built.report_to == []
    lora_config(cfg)  # peft.* must be valid LoraConfig arguments whatever the method
    assert ChatFormat.resolve(cfg).template in ALL_TEMPLATES
    return args


def test_experiments_are_found():
    assert {"zephyr_7b_beta_full", "zephyr_7b_beta_qlora"} <= set(EXPERIMENTS)


def test_default_config_builds(tmp_path):
    build_all(compose([]), tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds(experiment, tmp_path):
    cfg = compose([f"experiment={experiment}"])
    args = build_all(cfg, tmp_path)
    bf16 = cfg.model.dtype == "bfloat16"
    assert args["sft"].bf16 == bf16 and args["dpo"].bf16 == bf16
    for stage in STAGES:  # the trainer's max_length is taken from <stage>.data.max_length
        assert OmegaConf.is_missing(cfg[stage].trainer, "max_length"), f"set {stage}.data.max_length instead"


@pytest.mark.parametrize("experiment", sorted(RECIPE_VALUES))
def test_recipe_values(experiment):
    cfg = compose([f"experiment={experiment}"])
    for key, expected in RECIPE_VALUES[experiment].items():
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        assert value == expected, f"{experiment}: {key}={value!r}, the handbook's is {expected!r}"
    # Hub datasets are not a source yet: the user passes exported files, never the bundled toy data.
    assert list(cfg.sft.data.files) == [] and list(cfg.dpo.data.files) == []


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_group_option_builds(group, option, tmp_path):
    extra = []
    if (group, option) == ("model", "pretrained"):  # needs a checkpoint: its tokenizer gives the format
        build_hf_tokenizer("mistral_v3").save_pretrained(tmp_path / "ckpt")
        extra = [f"model.name_or_path={tmp_path / 'ckpt'}"]
    build_all(compose([f"{group}={option}", *extra]), tmp_path)


def test_every_group_has_options():
    for group in GROUPS:
        assert any(g == group for g, _ in GROUP_OPTIONS), f"configs/{group}/ has no options"


# --- Config mistakes: one line, naming the key, saying what to do ---------------------------------


def config_error(overrides: list[str]) -> str:
    with pytest.raises(UserError) as err:
        compose(overrides)
    message = str(err.value)
    assert "\n" not in message.strip(), message
    return message


def test_misspelt_key_suggests_the_right_one():
    message = config_error(["sft.trainer.learning_rat=1"])
    assert "'sft.trainer.learning_rat'" in message
    assert "learning_rate" in message


def test_wrong_type_names_the_key():
    assert "sft.trainer.learning_rate" in config_error(["sft.trainer.learning_rate=abc"])
    assert "peft.r" in config_error(["peft.r=abc"])


def test_unknown_group_option_lists_the_choices():
    message = config_error(["model=foo"])
    assert "foo" in message
    for path in (CONFIG_DIR / "model").glob("*.yaml"):
        assert path.stem in message


@pytest.mark.parametrize(("stage", "name"), [("sft", "output_dir"), ("dpo", "report_to"), ("sft", "hub_token")])
def test_owned_field_is_explained(stage, name):
    message = config_error([f"{stage}.trainer.{name}=x"])
    assert f"{stage}.trainer.{name}" in message
    assert OWNED_TRAINER_FIELDS[name] in message


def test_unknown_experiment_lists_the_choices():
    message = config_error(["experiment=zephyr_7b_beta_ful"])
    for name in EXPERIMENTS:
        assert name in message


# --- The command line ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Each CLI run imports TRL (seconds), so the runs are started together and awaited once."""
    tmp = tmp_path_factory.mktemp("cli")
    runs = {
        "misspelt": ["sft", "sft.trainer.learning_rat=1", f"run_dir={tmp / 'misspelt'}"],
        "local_rank": ["sft", "--local_rank=1", "--cfg", f"run_dir={tmp / 'local_rank'}"],
        "help": ["--help"],
        "eval": ["eval"],
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    env.pop("MISTRAL_TUNE_TRACEBACK", None)
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "mistral_tune", *argv], cwd=tmp, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for name, argv in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    return tmp, results


def test_cli_misspelt_key_is_one_line_exit_2(cli):
    tmp, results = cli
    rc, _, stderr = results["misspelt"]
    assert rc == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert "sft.trainer.learning_rat" in stderr and "learning_rate" in stderr
    assert "Traceback" not in stderr
    assert not (tmp / "misspelt").exists()  # nothing written for a config that never composed


def test_cli_accepts_local_rank(cli):
    tmp, results = cli
    rc, stdout, stderr = results["local_rank"]
    assert rc == 0, stderr
    assert f"run_dir: {tmp / 'local_rank'}" in stdout


def test_strip_launcher_args():
    assert _strip_launcher_args(["sft", "--local_rank=1", "a=1"]) == ["sft", "a=1"]
    assert _strip_launcher_args(["sft", "--local-rank", "3", "a=1"]) == ["sft", "a=1"]


def test_cli_help_lists_every_command(cli):
    _, results = cli
    rc, stdout, _ = results["help"]
    assert rc == 0
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s", stdout, re.M), f"--help does not list {command}"


def test_cli_eval_without_a_run_is_a_clear_error(cli):
    _, results = cli
    rc, _, stderr = results["eval"]
    assert rc == 2
    assert "Traceback" not in stderr and "error" in stderr
