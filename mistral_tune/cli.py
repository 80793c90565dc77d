"""`mistral-tune <command> [hydra overrides]` (also `python -m mistral_tune ...`)."""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from mistral_tune.errors import UserError
from mistral_tune.runs import RunDir, is_main_process

USAGE = """usage: mistral-tune <command> [key=value ...] [-m]

Turn a Mistral base model into an instruct model. Commands:
  data       build chat-templated, tokenized, masked datasets into run_dir/data/<stage>
  sft        supervised fine-tuning (full, LoRA, QLoRA) into run_dir/sft
  dpo        preference tuning (from run_dir/sft by default) into run_dir/dpo
  orpo       odds-ratio preference optimisation, no reference model, into run_dir/orpo
  kto        KTO on replies labelled good or bad (pairs split), from run_dir/sft by default, into run_dir/kto
  merge      merge adapters into full-precision weights: run_dir/merged
  eval       the base model and each trained stage side by side on held-out data: run_dir/eval
  push       upload run_dir/merged to the Hugging Face Hub (push.repo_id=org/name)
  export     run_dir/merged as GGUF for llama.cpp / Ollama: run_dir/export (export.quant=f16|q8_0|q4_k_m)
  pipeline   data -> stages (stages=[sft,dpo] by default; [orpo], [sft,kto], [sft], ...) -> merge -> eval (-> push)
  tokenizer  write the HF tokenizer with its chat template to run_dir/tokenizer
  plan       parameters, steps per epoch and per-GPU memory, without loading weights
  chat       talk to run_dir/merged through its chat template (stdin lines when piped)

Overrides are Hydra's: run_dir=runs/x model=mistral_7b_v0_1 peft=lora sft.trainer.max_steps=10
logger=none experiment=zephyr_7b_beta_qlora; -m sweeps (job k writes to run_dir/k).
launcher=ddp|zero2|zero3|... runs each training command under accelerate launch.
Your own config files: --config-dir DIR experiment=mine (DIR/experiment/mine.yaml; also DIR/model/,
DIR/data/, ...), or experiment=/path/to/mine.yaml; --config-name NAME picks DIR/NAME.yaml as primary.
Each command's keys and defaults: mistral-tune <command> --help
Show the composed config with: mistral-tune <command> --cfg job (search path and groups: --info)
Set MISTRAL_TUNE_TRACEBACK=1 to see tracebacks of user errors.
"""

COMMANDS = ("data", "sft", "dpo", "orpo", "kto", "merge", "eval", "push", "pipeline", "tokenizer", "plan", "chat", "export")
log = logging.getLogger("mistral_tune")


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """Launchers (torch.distributed.launch, deepspeed) append --local_rank=N, which Hydra's parser
    rejects; the rank is in the environment anyway."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if re.fullmatch(r"--local[_-]rank=\d+", arg):
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="[mistral_tune] %(message)s" if rank == 0 else f"[mistral_tune rank {rank}] %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()


COMMAND_MODULES = {"eval": "evaluate"}  # the command's stage module, where the names differ


def run_command(command: str, cfg, overrides: list[str]):
    """Run one command. The CLI, not the stages, builds the datasets a command needs, once, before
    any launcher starts (so ranks never race to build them). Stage modules import torch and
    transformers: they load here, once a command runs, so `--help` and config errors are instant."""
    from mistral_tune.launch import train
    from mistral_tune.stages import DATA_LAYOUT, data, pipeline

    if "RANK" in os.environ:  # a launched rank: its process group with the configured timeout
        from mistral_tune.runs import init_distributed

        init_distributed(cfg.launcher.timeout_s)
    if command == "tokenizer":
        return write_tokenizer(cfg)
    if command in DATA_LAYOUT:
        pipeline.prepare(cfg, command)
        train(cfg, command, overrides)
        return RunDir.of(cfg).stage(command)
    if command == "plan" and not any(cfg.plan[f"{s}_rows"] for s in ("sft", "dpo")):
        for kind in cfg.stages:
            if data.has_data(cfg, kind):
                data.ensure(cfg, kind)
    module = importlib.import_module(f"mistral_tune.stages.{COMMAND_MODULES.get(command, command)}")
    return module.run(cfg, overrides) if command == "pipeline" else module.run(cfg)


def write_tokenizer(cfg) -> Path:
    """`mistral-tune tokenizer`: the HF tokenizer and chat template of the chosen format."""
    from mistral_tune.formats.chat_format import ChatFormat

    out = RunDir.of(cfg).tokenizer
    if is_main_process():
        ChatFormat.resolve(cfg).hf_tokenizer().save_pretrained(out)
    return out


def _report(command: str, err: UserError) -> None:
    if os.environ.get("MISTRAL_TUNE_TRACEBACK"):
        import traceback

        traceback.print_exc()
    print(f"mistral-tune {command}: error: {err}", file=sys.stderr)


def _locked(command: str, cfg, overrides: list[str]):
    """run_command holding run_dir's lock (one command per run_dir at a time)."""
    from mistral_tune.lock import run_dir_lock

    with run_dir_lock(cfg.run_dir, command, cfg.launcher):
        return run_command(command, cfg, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = _strip_launcher_args(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"mistral-tune: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        from mistral_tune import cli_args

        args = cli_args.parse(rest)
        cli_args.set_search_dirs(args)
        overrides = args.overrides
        if args.multirun and not (args.help or args.cfg or args.info):
            if args.config_name:
                raise UserError("--config-name does not combine with -m yet",
                                hint="put the sweep's settings in DIR/experiment/NAME.yaml: --config-dir DIR experiment=NAME -m ...")
            from mistral_tune.sweep import multirun

            return multirun(command, overrides, _locked, _report)
        from mistral_tune.config import compose_with_choices, to_container

        if args.help:
            try:
                cfg, choices = compose_with_choices(overrides)
            except UserError as err:  # help still helps; the error says what to fix
                print(f"(config not composed: {err})", file=sys.stderr)
                cfg, choices = None, None
            print(cli_args.command_help(command, cfg, choices))
            return 0
        cfg, choices = compose_with_choices(overrides, announce=not (args.info or args.cfg) and command != "chat")
        if args.info:
            print(cli_args.info(command, args, choices))
            return 0
        if args.cfg:
            import yaml

            shown = {} if args.cfg == "hydra" else to_container(cfg)
            if args.cfg != "job":
                shown["hydra"] = {"searchpath": [f"file://{d}" for d in args.search_dirs], "choices": choices}
            print(yaml.safe_dump(shown, sort_keys=False))
            return 0
        from mistral_tune.preflight import preflight
        from mistral_tune.runs import check_writable

        if command != "chat":  # chat only reads
            check_writable(cfg.run_dir)
        preflight(command, cfg)
        result = run_command(command, cfg, overrides) if command == "chat" else _locked(command, cfg, overrides)
        if isinstance(result, Path):
            log.info("%s: output in %s", command, result)
        return 0
    except UserError as err:
        _report(command, err)
        return 2
    except KeyboardInterrupt:
        print(f"mistral-tune {command}: interrupted", file=sys.stderr)
        return 130
