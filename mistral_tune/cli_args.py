"""Hydra's own command-line flags and per-command help, for `mistral-tune <command> ...`.

Hydra's parser never sees our argv (commands compose through its compose API), so the flags a
Hydra user expects are translated here: `--config-dir DIR` (the user's own experiment/, model/,
data/... files, found next to the shipped ones), `--config-name NAME`, `--cfg job`, `--info`,
`-m`, and `-h/--help` for the command's own help.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mistral_tune.errors import UserError

# The primary config name travels in the environment, so the ranks that `launcher=` starts
# (`python -m mistral_tune <stage> <overrides>`) compose the same primary config as their parent.
CONFIG_NAME_ENV = "MISTRAL_TUNE_CONFIG_NAME"
CONFIG_DIRS_ENV = "MISTRAL_TUNE_CONFIG_DIRS"  # --config-dir, likewise (also for a sweep job's ranks)


@dataclass
class Args:
    overrides: list[str] = field(default_factory=list)
    help: bool = False
    cfg: str | None = None  # job | hydra | all
    info: bool = False
    multirun: bool = False
    config_name: str | None = None
    search_dirs: list[Path] = field(default_factory=list)


_VALUE_FLAGS = {"--config-dir": "config_dir", "-cd": "config_dir", "--config-path": "config_dir",
                "-cp": "config_dir", "--config-name": "config_name", "-cn": "config_name"}


def parse(argv: list[str]) -> Args:
    """Split Hydra's flags from the key=value overrides. A user config dir becomes a
    `hydra.searchpath` override, so it also reaches sweeps and launched ranks."""
    args = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if arg in ("-h", "--help"):
            args.help = True
        elif arg in ("-m", "--multirun"):
            args.multirun = True
        elif name == "--cfg" or arg == "-c":
            args.cfg = value if eq else "job"
            if not eq and i + 1 < len(argv) and argv[i + 1] in ("job", "hydra", "all"):
                args.cfg = argv[i + 1]
                i += 1
            if args.cfg not in ("job", "hydra", "all"):
                raise UserError(f"--cfg {args.cfg}: choose job, hydra or all")
        elif name == "--info":
            args.info = True
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-") and "=" not in argv[i + 1]:
                i += 1  # `--info config` and friends: one report covers them all
        elif arg in ("--resolve", "-p", "--package") or name in ("--package",):
            if arg in ("-p", "--package"):
                i += 1  # its value
        elif name in _VALUE_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"{arg} needs a value")
                value = argv[i + 1]
                i += 1
            if _VALUE_FLAGS[name] == "config_dir":
                path = Path(value).expanduser().resolve()
                if not path.is_dir():
                    raise UserError(f"{name} {value}: no such directory")
                args.search_dirs.append(path)
            else:
                args.config_name = value
        elif arg.startswith("-") and "=" not in arg:
            raise UserError(f"unknown flag {arg!r}",
                            hint="flags: -h/--help, --cfg job, --info, --config-dir DIR, --config-name NAME, -m")
        else:
            args.overrides.append(_experiment_file(arg, args))
        i += 1
    if args.search_dirs:
        entries = ",".join(f"'file://{p}'" for p in args.search_dirs)
        args.overrides.append(f"hydra.searchpath=[{entries}]")
    return args


def _experiment_file(override: str, args: Args) -> str:
    """`experiment=/path/mine.yaml` (or `+experiment=...`): a file outside any config tree. Its
    folder joins the search path under a temporary `experiment/` group folder, so the file composes
    like a shipped experiment (Hydra itself accepts only names from a group folder)."""
    key, eq, value = override.partition("=")
    if not eq or key.lstrip("+") != "experiment" or not value.endswith((".yaml", ".yml")):
        return override
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"experiment={value}: no such file")
    if path.parent.name == "experiment":
        args.search_dirs.append(path.parent.parent)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="mistral_tune_cfg_"))
        atexit.register(shutil.rmtree, tmp, True)
        (tmp / "experiment").mkdir()
        shutil.copyfile(path, tmp / "experiment" / path.name)
        args.search_dirs.append(tmp)
    return f"experiment={path.stem}"


# What each command is for, and the keys a user sets most (their defaults come from the config).
COMMAND_HELP = {
    "data": ("Build the chat-templated, tokenized, masked datasets into run_dir/data/<stage>.",
             ["sft.data.files", "dpo.data.files", "sft.data.max_length", "data.on_error", "data.dedup", "data.show"]),
    "sft": ("Supervised fine-tuning (full, LoRA or QLoRA) into run_dir/sft.",
            ["sft.data.files", "sft.data.max_length", "sft.trainer.learning_rate", "sft.trainer.num_train_epochs",
             "sft.trainer.max_steps", "sft.trainer.per_device_train_batch_size",
             "sft.trainer.gradient_accumulation_steps", "peft.method", "peft.r", "peft.lora_alpha"]),
    "dpo": ("Preference tuning (DPO), from run_dir/sft by default, into run_dir/dpo.",
            ["dpo.data.files", "dpo.data.max_length", "dpo.trainer.beta", "dpo.trainer.learning_rate",
             "dpo.trainer.num_train_epochs", "dpo.trainer.max_steps", "dpo.trainer.per_device_train_batch_size",
             "pairs.name", "peft.method"]),
    "orpo": ("Odds-ratio preference optimisation (no reference model) into run_dir/orpo; stages=[orpo] trains it from the base.",
             ["stages", "orpo.data.files", "orpo.data.max_length", "orpo.trainer.beta", "orpo.trainer.learning_rate",
              "orpo.trainer.num_train_epochs", "orpo.trainer.max_steps", "peft.method"]),
    "kto": ("KTO on replies labelled desirable or undesirable (preference pairs split into one of each), from "
            "run_dir/sft by default, into run_dir/kto; stages=[sft,kto] in a pipeline.",
            ["stages", "kto.data.files", "kto.data.max_length", "kto.trainer.beta", "kto.trainer.learning_rate",
             "kto.trainer.desirable_weight", "kto.trainer.undesirable_weight", "kto.trainer.num_train_epochs",
             "kto.trainer.max_steps", "kto.trainer.per_device_train_batch_size", "peft.method"]),
    "merge": ("Merge the adapters of the last stage into full-precision weights: run_dir/merged.",
              ["merge.dtype", "merge.atol", "merge.max_shard_size"]),
    "eval": ("Evaluate the base model and each trained stage side by side on held-out data: run_dir/eval.",
             ["eval.files", "eval.pref_files", "eval.models", "eval.max_samples", "eval.max_new_tokens",
              "eval.harness", "eval.harness_limit"]),
    "push": ("Upload run_dir/merged to the Hugging Face Hub.",
             ["push.repo_id", "push.private", "push.revision", "push.dry_run", "push.include_adapters"]),
    "export": ("run_dir/merged (or export.model=DIR) as GGUF for llama.cpp and Ollama, with a Modelfile: run_dir/export.",
               ["export.quant", "export.model", "export.name", "export.enabled"]),
    "pipeline": ("data -> training stages -> merge -> eval (-> push when push.repo_id is set).",
                 ["stages", "pairs.name", "sft.trainer.learning_rate", "sft.trainer.num_train_epochs", "dpo.trainer.beta",
                  "eval.enabled", "push.repo_id"]),
    "tokenizer": ("Write the HF tokenizer with the exact chat template used in training to run_dir/tokenizer.",
                  ["template.name"]),
    "plan": ("Parameters, steps per epoch and per-GPU memory, without loading weights.",
             ["plan.num_gpus", "plan.gpu_memory_gb", "plan.sft_rows", "plan.dpo_rows"]),
    "chat": ("Talk to the merged model (run_dir/merged, or model.name_or_path=...) through its chat template;"
             " reads one user turn per line from stdin when it is not a terminal.",
             ["chat.max_new_tokens", "chat.temperature", "chat.system", "model.name_or_path"]),
}
COMMON_KEYS = ["run_dir", "model.name_or_path", "template.name", "seed", "force"]
TRAINING = ("sft", "dpo", "orpo", "kto", "pipeline")


def command_help(command: str, cfg=None, choices: dict | None = None) -> str:
    """The command's purpose, its config groups (chosen option and the others) and its most used
    keys with the values they would take with these overrides."""
    purpose, keys = COMMAND_HELP[command]
    lines = [f"usage: mistral-tune {command} [key=value ...] [--config-dir DIR] [--cfg job] [--info] [-m]", "",
             purpose, ""]
    if choices:
        choices = {group.split("@")[0]: choice for group, choice in choices.items()}  # sft_trainer@sft.trainer
        lines.append("Config groups (group=option; yours come from --config-dir DIR/<group>/NAME.yaml):")
        for group, options in config_groups().items():
            if group in ("schema", "hydra") or group.startswith("hydra/"):
                continue
            chosen = choices.get(group)
            lines.append(f"  {group:<15} {chosen if chosen is not None else '(none)':<18} options: {', '.join(options)}")
        lines.append("")
    lines.append("Most used keys (value with these overrides):")
    for key in COMMON_KEYS + keys:
        lines.append(f"  {key}={_value(cfg, key)}")
    if command in TRAINING:
        lines.append("  launcher=none|ddp|zero2|zero3|fsdp2 (accelerate launch per training stage)")
    lines += ["", f"Every key and its value: mistral-tune {command} --cfg job   (schema: mistral_tune/schema.py)",
              f"Search path and groups: mistral-tune {command} --info"]
    return "\n".join(lines)


def _value(cfg, key: str):
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if cfg is None:
        return "?"
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=True)
    except MissingMandatoryValue:
        return f"{_trl_default(key)}  (TRL's default)"
    value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    return "null" if value is None else value


def _trl_default(key: str):
    """The default TRL gives a trainer argument mistral_tune leaves unset (sft.trainer.max_steps)."""
    import dataclasses

    stage, _, name = key.split(".", 2)
    import trl

    if stage == "orpo":
        from trl.experimental.orpo import ORPOConfig as cls
    else:
        cls = {"sft": trl.SFTConfig, "kto": trl.KTOConfig}.get(stage, trl.DPOConfig)
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.default if f.default is not dataclasses.MISSING else "?"
    return "?"


_SEARCH_DIRS: list[Path] = []


def config_groups(search_dirs: list[Path] | None = None) -> dict[str, list[str]]:
    """Group -> options, over the shipped configs and every user config dir."""
    from mistral_tune.config import CONFIG_DIR

    groups: dict[str, set[str]] = {}
    for root in [CONFIG_DIR, *(search_dirs if search_dirs is not None else _SEARCH_DIRS)]:
        for path in sorted(root.glob("*/*.y*ml")):
            groups.setdefault(path.parent.name, set()).add(path.stem)
    return {g: sorted(o) for g, o in sorted(groups.items())}


def info(command: str, args: Args, choices: dict) -> str:
    from mistral_tune.config import CONFIG_DIR

    lines = [f"mistral-tune {command}: primary config {args.config_name or 'config'}", "Config search path:",
             f"  file://{CONFIG_DIR}  (shipped)"]
    lines += [f"  file://{d}  (--config-dir)" for d in args.search_dirs]
    choices = {group.split("@")[0]: choice for group, choice in choices.items()}
    lines += ["", "Config groups (chosen option; all options):"]
    for group, options in config_groups(args.search_dirs).items():
        lines.append(f"  {group:<15} {str(choices.get(group)):<18} {', '.join(options)}")
    lines += ["", "Overrides: " + (" ".join(o for o in args.overrides) or "(none)")]
    return "\n".join(lines)


def set_search_dirs(args: Args) -> None:
    """Remember --config-dir and --config-name, here and for every process this one starts."""
    _SEARCH_DIRS[:] = args.search_dirs
    if args.search_dirs:
        os.environ[CONFIG_DIRS_ENV] = os.pathsep.join(map(str, args.search_dirs))
    elif os.environ.get(CONFIG_DIRS_ENV):  # a launched rank: its parent's dirs
        _SEARCH_DIRS[:] = [Path(d) for d in os.environ[CONFIG_DIRS_ENV].split(os.pathsep)]
    if args.config_name:
        os.environ[CONFIG_NAME_ENV] = args.config_name
