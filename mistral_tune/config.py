"""Composing the Hydra config, and turning Hydra's errors into one-line user errors."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mistral_tune.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DATA_DIR = REPO_ROOT / "data"


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("bundled"):
        # Absolute path of a bundled data file, so runs work from any working directory.
        OmegaConf.register_new_resolver("bundled", lambda name: str(DATA_DIR / name))


def setup() -> None:
    """Register the schema and resolvers; idempotent."""
    from mistral_tune import schema

    _register_resolvers()
    schema.register()


def compose(overrides: list[str], config_name: str | None = None) -> DictConfig:
    """The resolved config for these command-line overrides, or a UserError naming the bad key."""
    return compose_with_choices(overrides, config_name)[0]


def compose_with_choices(overrides: list[str], config_name: str | None = None,
                         announce: bool = False) -> tuple[DictConfig, dict]:
    """The resolved config and the option chosen in each config group. The primary config is
    `config` unless --config-name chose another (passed down to launched ranks in the environment);
    `hydra.searchpath=[file://DIR]` among the overrides adds a user config dir (--config-dir).
    `announce`: log the model-dependent defaults with where each came from (the CLI, once, for a
    command that does work)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import open_dict

    setup()
    _register_default_resolvers()
    GlobalHydra.instance().clear()
    config_name = config_name or os.environ.get("MISTRAL_TUNE_CONFIG_NAME") or "config"
    inherited = os.environ.get("MISTRAL_TUNE_CONFIG_DIRS")  # a launched rank of a --config-dir command
    if inherited and not any(o.startswith("hydra.searchpath=") for o in overrides):
        entries = ",".join(f"'file://{d}'" for d in inherited.split(os.pathsep))
        overrides = [*overrides, f"hydra.searchpath=[{entries}]"]
    primary_dir, overrides = _primary_dir(config_name, overrides)
    try:
        with initialize_config_dir(str(primary_dir), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=model_group_overrides(overrides), return_hydra_config=True)
        with open_dict(cfg):
            hydra_node = cfg.pop("hydra")
        choices = OmegaConf.to_container(hydra_node.runtime.choices)
        OmegaConf.resolve(cfg)
    except Exception as err:  # Hydra and OmegaConf raise many types; all are user errors here
        raise UserError(explain_config_error(err)) from None
    # `+key=value` appends past Hydra's struct check (and OmegaConf.merge into the structured
    # schema accepts it too): compare the keys with the schema, before any data or model work.
    from mistral_tune.schema import Config

    unknown = unknown_keys(cfg, OmegaConf.structured(Config))
    if unknown:
        raise UserError(unknown_key_message(unknown[0]))
    check_stages(list(cfg.stages))
    if OmegaConf.is_missing(cfg.model, "name_or_path"):
        raise UserError("model=pretrained needs model.name_or_path=<a local checkpoint folder or a cached hub id>")
    resolved = resolve_model_defaults(cfg, overrides)
    if announce:
        log_choices(resolved)
    return cfg, choices


def _primary_dir(config_name: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """Hydra 1.3 looks the primary config up before it applies `hydra.searchpath`: a primary config
    of a user config dir (--config-name) makes that dir the primary one, with the shipped configs
    on the search path (so its `defaults: [config]` finds ours)."""
    searchpath = next((o for o in overrides if o.startswith("hydra.searchpath=")), "")
    dirs = re.findall(r"'file://([^']+)'", searchpath)
    for d in dirs:
        if config_name != "config" and (Path(d) / f"{config_name}.yaml").exists():
            entries = ",".join(f"'file://{x}'" for x in [*dirs, str(CONFIG_DIR)])
            return Path(d), [o for o in overrides if o != searchpath] + [f"hydra.searchpath=[{entries}]"]
    return CONFIG_DIR, overrides


# --- defaults that follow the model and the data (issue 11) -------------------------------------
#
# The tiny model's demo values (configs/model/tiny.yaml: full fine-tuning, lr 3e-3, 8 epochs) and
# the bundled data's max_length 256 must never reach a real checkpoint or the user's own data.
# `model.name_or_path=<folder or cached hub id>` alone selects configs/model/pretrained.yaml (LoRA,
# the Zephyr recipe's values, the format read from the checkpoint); `<stage>.data.max_length` left
# null becomes 256 for the bundled files and the model's context (capped) for anything else.

BUNDLED_MAX_LENGTH = 256  # the bundled chats run to ~130 tokens (v1-v7 alike); tools_sft.jsonl to <256


def _register_default_resolvers() -> None:
    if not OmegaConf.has_resolver("by_peft"):
        # ${by_peft:${peft.method},${model.default_peft},<LoRA value>,<full fine-tuning value>}:
        # a pretrained model's learning rate follows the training method actually used.
        OmegaConf.register_new_resolver(
            "by_peft", lambda method, default, lora, full: full if (default if method == "auto" else method) == "none"
            else lora)


def _override_keys(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        if "=" in o:
            key, value = o.split("=", 1)
            out[key.lstrip("+~")] = value
    return out


def model_group_overrides(overrides: list[str]) -> list[str]:
    """`model.name_or_path=X` without a `model=` (or `experiment=`) choice: the pretrained-model
    group, not the tiny model's demo values. Also used by sweeps (-m) before Hydra composes."""
    keys = _override_keys(overrides)
    path = keys.get("model.name_or_path")
    if path not in (None, "", "null") and "model" not in keys and "experiment" not in keys:
        return ["model=pretrained", *overrides]
    return list(overrides)


def is_bundled(cfg: DictConfig, kind: str) -> bool:
    """True when `kind`'s dataset is exactly files shipped in data/ (no other file, no source), or
    DPO's pairs sampled (pairs=onpolicy) on the bundled SFT prompts."""
    if kind == "dpo" and cfg.pairs.name == "onpolicy" and not cfg.pairs.prompts_files:
        return is_bundled(cfg, "sft")
    data = cfg[kind].data
    files = [Path(f).resolve() for f in data.files or []]
    return bool(files) and not data.sources and all(DATA_DIR.resolve() in f.parents for f in files)


def model_context(cfg: DictConfig) -> tuple[int | None, str]:
    """(max_position_embeddings, where from) of the model the run trains."""
    if not cfg.model.name_or_path:
        n = cfg.model.config.get("max_position_embeddings") if cfg.model.config else None
        return n, "model.config.max_position_embeddings"
    from mistral_tune.formats.checkpoint import inspect_checkpoint

    try:
        context = inspect_checkpoint(cfg.model.name_or_path, cfg.model.revision).context
    except UserError:
        return None, f"{cfg.model.name_or_path} not readable here"
    return context, f"{cfg.model.name_or_path}/config.json max_position_embeddings"


def resolve_model_defaults(cfg: DictConfig, overrides: list[str]) -> list[tuple[str, str, str]]:
    """Fill what depends on the model and the data (each stage's max_length), and return
    [(choice, value, where it came from)] for the log."""
    keys = _override_keys(overrides)
    experiment = keys.get("experiment")
    model_choice = keys.get("model") or ("pretrained" if cfg.model.name_or_path else "tiny")
    where = f"experiment={experiment}" if experiment else f"configs/model/{model_choice}.yaml"

    def source(key: str) -> str:
        return "command line" if key in keys else where

    choices = []
    for kind in ("sft", "dpo", "orpo", "kto"):  # every stage's, so a later `stages=` sees the same values
        data, shown = cfg[kind].data, kind in cfg.stages
        if data.max_length is not None:
            value, why = data.max_length, source(f"{kind}.data.max_length")
        elif is_bundled(cfg, kind):
            value, why = BUNDLED_MAX_LENGTH, "the bundled data's (configs/data/bundled.yaml)"
        else:
            context, whence = model_context(cfg)
            cap = cfg.model.max_length_cap
            value = min(context, cap) if context else cap
            why = (f"min({whence} {context}, model.max_length_cap {cap})" if context
                   else f"model.max_length_cap ({whence})")
        data.max_length = value
        if shown:
            choices.append((f"{kind}.data.max_length", str(value), why))

    from mistral_tune.formats.chat_format import ChatFormat

    try:
        fmt = ChatFormat.resolve(cfg)
        template = f"{fmt.template} ({fmt.vocab} vocabulary)" if fmt.template != fmt.vocab else fmt.template
        template_src = ("template=" + cfg.template.name if cfg.template.name != "auto" else
                        ChatFormat.describe_auto(cfg))
    except UserError as err:
        template, template_src = "unresolved", str(err).splitlines()[0]
    choices.insert(0, ("template", template, template_src))
    method = cfg.model.default_peft if cfg.peft.method == "auto" else cfg.peft.method
    choices.insert(1, ("peft", method, "peft=" + cfg.peft.method if cfg.peft.method != "auto"
                       else f"model.default_peft ({where})"))
    for kind in cfg.stages:
        trainer = cfg[kind].trainer
        for key in ("learning_rate", "num_train_epochs", *(["beta"] if kind in ("dpo", "kto") else [])):
            value = trainer.get(key) if not OmegaConf.is_missing(trainer, key) else "TRL default"
            choices.append((f"{kind}.trainer.{key}", str(value), source(f"{kind}.trainer.{key}")))
    import torch

    dtype = cfg.model.dtype
    if dtype == "auto":
        dtype = f"auto: {'bfloat16 (CUDA)' if torch.cuda.is_available() else 'float32 (no CUDA)'}"
    choices.append(("model.dtype", dtype, source("model.dtype")))
    return choices


def log_choices(choices: list[tuple[str, str, str]]) -> None:
    """Once per command, on the launching process (ranks started by a launcher stay quiet)."""
    import logging
    import os

    if os.environ.get("LOCAL_RANK") is not None:
        return
    log = logging.getLogger("mistral_tune")
    width = max(len(c) for c, _, _ in choices)
    log.info("resolved defaults:\n%s", "\n".join(f"  {c:<{width}}  {v}  <- {s}" for c, v, s in choices))


def check_stages(stages: list[str]) -> None:
    from mistral_tune.stages import DATA_LAYOUT

    unknown = [s for s in stages if s not in DATA_LAYOUT]
    if unknown or not stages or len(set(stages)) != len(stages):
        raise UserError(f"stages={stages}: give each training stage once, in order, from: {', '.join(DATA_LAYOUT)}"
                        + (f" (unknown: {', '.join(unknown)})" if unknown else ""))


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            keys.append(full)
            keys.extend(_all_keys(node._get_node(k), full))
    return keys


def _known_keys() -> list[str]:
    from mistral_tune.schema import Config

    return _all_keys(OmegaConf.structured(Config))


def unknown_keys(node: Any, schema: Any, prefix: str = "") -> list[str]:
    """Keys of the composed config that the schema does not have. Free-form dict fields of the
    schema (model.config, columns) take any key; lists are not descended."""
    if not isinstance(node, DictConfig) or not isinstance(schema, DictConfig):
        return []
    free = OmegaConf.get_type(schema) in (dict, None)
    known = set(schema.keys())  # `in schema` is False for a MISSING value
    found = []
    for key in node.keys():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            if not free:
                found.append(full)
            continue
        found += unknown_keys(node._get_node(key), schema._get_node(key), full)
    return found


def unknown_key_message(key: str) -> str:
    from mistral_tune.schema import OWNED_TRAINER_FIELDS

    stage_key = re.fullmatch(r"(sft|dpo|orpo|kto)\.trainer\.(\w+)", key)
    if stage_key and stage_key.group(2) in OWNED_TRAINER_FIELDS:
        return f"'{key}' is set by mistral_tune: {OWNED_TRAINER_FIELDS[stage_key.group(2)]}"
    hint = ""
    close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.75)
    if close:
        hint = f" (did you mean '{close[0]}'?)"
    return f"unknown config key '{key}'{hint}"


def explain_config_error(err: BaseException) -> str:
    """One or two lines: what is wrong, with which key, and the likely fix."""
    chain = []
    e: BaseException | None = err
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(x) for x in chain)
    full_key = None
    for x in chain:
        if isinstance(x, OmegaConfBaseException) and getattr(x, "full_key", None):
            full_key = x.full_key
    m = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' (?:is )?not in", text)
    if re.search(r"Key '[^']+' (is )?not in", text):
        key = full_key or (m.group(1) if m else "?")
        return unknown_key_message(re.sub(r"^[+~]+", "", key))
    m = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if m:
        group, choice = m.groups()
        from mistral_tune.cli_args import config_groups

        options = config_groups().get(group, [])
        return (f"no config '{choice}' in group '{group}'; choose one of: {', '.join(options)}"
                f" (or your own DIR/{group}/{choice}.yaml with --config-dir DIR)")
    first_line = str(chain[-1]).strip().splitlines()[0] if str(chain[-1]).strip() else type(chain[-1]).__name__
    where = f"{full_key}: " if full_key else ""
    return f"invalid config: {where}{first_line}"


def to_container(cfg: DictConfig) -> dict:
    """Plain dict of the config with unset (MISSING) trainer fields left out."""
    return _drop_missing(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False))


def _drop_missing(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _drop_missing(v) for k, v in node.items() if v != "???"}
    if isinstance(node, list):
        return [_drop_missing(v) for v in node]
    return node


def trainer_kwargs(node: DictConfig) -> dict:
    """The TRL arguments the user (or a config file) set, ready for SFTConfig/DPOConfig(**kw)."""
    return to_container(node)


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able object (configs, file lists)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
