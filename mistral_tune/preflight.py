"""Checks of what a command will load, before any work: one or two lines and exit 2, not a
traceback after the data build, the base model download and the W&B run.

- model.name_or_path: an adapter folder, a tokenizer-only or broken folder, missing or truncated
  safetensors shards; a hub id with the Hub unreachable (one probe, not transformers' retry storm).
- launcher=fsdp2 on a machine without CUDA (accelerate would train it as plain DDP, or fail inside
  every rank with a torch-elastic traceback).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.errors import UserError

log = logging.getLogger("mistral_tune")

MODEL_COMMANDS = ("sft", "dpo", "orpo", "kto", "pipeline", "merge", "eval", "plan")
LAUNCHED_COMMANDS = ("sft", "dpo", "orpo", "kto", "pipeline")
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json")


def preflight(command: str, cfg: DictConfig) -> None:
    if command in MODEL_COMMANDS and cfg.model.name_or_path:
        check_model(str(cfg.model.name_or_path), cfg.model.revision)
    if command in LAUNCHED_COMMANDS:
        check_launcher(cfg)
    from mistral_tune.launch import check_machines

    check_machines(cfg.launcher)
    if cfg.launcher.num_machines > 1 and cfg.launcher.machine_rank > 0 and command not in (*LAUNCHED_COMMANDS, "data", "plan"):
        raise UserError(f"`{command}` runs in one process, on machine rank 0: launcher.machine_rank="
                        f"{cfg.launcher.machine_rank} has nothing to do", hint="run it on machine rank 0 only")
    if command in ("eval", "pipeline") and cfg.eval.harness:  # lm-eval installed, task names known
        from mistral_tune.evaluation.harness import check_tasks

        check_tasks(list(cfg.eval.harness))


def check_model(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path") -> None:
    path = Path(name_or_path).expanduser()
    if path.exists():
        check_model_folder(path, key)
    elif path.is_absolute() or name_or_path.startswith((".", "~")) or not HUB_ID.fullmatch(name_or_path):
        raise UserError(f"{key}={name_or_path!r} does not exist")
    elif "RANK" not in os.environ:  # the launching process probes once; its ranks do not
        check_hub_model(name_or_path, revision, key)


def adapter_base(folder: Path) -> str | None:
    """The base model a PEFT adapter folder names (adapter_config.json), None when unreadable."""
    try:
        return json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except ValueError:
        return None


def check_model_folder(path: Path, key: str = "model.name_or_path") -> None:
    """A folder transformers can load a causal LM from, with intact safetensors weights."""
    if not path.is_dir():
        raise UserError(f"{key}={path} is a file; give the model's folder")
    if (path / "adapter_config.json").exists():
        base = adapter_base(path)
        raise UserError(
            f"{key}={path} holds a PEFT adapter, not a model" + (f" (its base: {base})" if base else ""),
            hint=f"give the base, model.name_or_path={base or 'BASE'}; to start from base + adapter, merge them first "
                 "(a mistral_tune run's is run_dir/merged; else peft's merge_and_unload().save_pretrained(DIR))",
        )
    config = path / "config.json"
    if not config.exists():
        if any((path / name).exists() for name in TOKENIZER_FILES):
            raise UserError(f"{key}={path} holds a tokenizer but no model (no config.json)",
                            hint="give the folder with config.json and *.safetensors (e.g. run_dir/merged)")
        raise UserError(f"{key}={path} is not a model folder: no config.json")
    try:
        fields = json.loads(config.read_text())
    except ValueError as err:
        raise UserError(f"{config} is not valid JSON ({err})") from None
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise UserError(f"{config} has no model_type: not a transformers model config")
    for shard in _shards(path, key):
        _check_safetensors(shard)


def _shards(path: Path, key: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as err:
            raise UserError(f"{index} is damaged ({err})") from None
        missing = [n for n in names if not (path / n).exists()]
        if missing:
            raise UserError(f"{key}={path}: {len(missing)} of {len(names)} weight shards are missing ({missing[0]}, ...)",
                            hint="the download or copy was interrupted; fetch the folder again")
        return [path / n for n in names]
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        other = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
        raise UserError(f"{key}={path} has no *.safetensors weights" + (f" (found {other[0]})" if other else ""),
                        hint="mistral_tune loads safetensors only (pickled weights can run code); convert with "
                             "`model.save_pretrained(dir, safe_serialization=True)`" if other else None)
    return shards


def _check_safetensors(shard: Path) -> None:
    """The header parses and the file is as long as the tensors it lists (a truncated copy is
    otherwise a cryptic error deep inside from_pretrained)."""
    size = shard.stat().st_size
    try:
        with shard.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise UserError(f"{shard} is not a valid safetensors file ({err})",
                        hint="the file is damaged; copy or download the model again") from None
    if 8 + n + end > size:
        raise UserError(f"{shard} is truncated ({size} of {8 + n + end} bytes)",
                        hint="the download or copy was interrupted; fetch it again")


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_hub_model(repo_id: str, revision: str | None = None, key: str = "model.name_or_path") -> None:
    """One quick probe of the Hub (5 s, no retries). Unreachable: use the local cache if it has the
    model (and switch to offline mode, so transformers does not retry each file ~45 times), else
    say so in one line."""
    from huggingface_hub import constants, get_token, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str)
    if _offline() or constants.HF_HUB_OFFLINE:
        if not cached:
            raise UserError(f"{key}={repo_id} is not in the local Hugging Face cache, and HF_HUB_OFFLINE is set",
                            hint="download it where there is network (`hf download ...`) or give a local folder")
        return
    url = f"{constants.ENDPOINT}/api/models/{repo_id}" + (f"/revision/{revision}" if revision else "")
    request = urllib.request.Request(url, method="HEAD")
    token = get_token()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=5).close()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise UserError(f"{key}={repo_id}: the Hub refused access (HTTP {err.code}); it is gated or private",
                            hint="accept its terms on the Hub and log in (`hf auth login` or HF_TOKEN)") from None
        if err.code == 404:
            raise UserError(f"{key}={repo_id}: no such model on {constants.ENDPOINT}"
                            + (f" (revision {revision})" if revision else ""),
                            hint="check the spelling (org/name), or log in if it is private") from None
        return  # other statuses: let the download say what it is
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        if cached:
            log.warning("the Hub (%s) is unreachable (%s): using the cached %s, offline", constants.ENDPOINT, reason, repo_id)
            os.environ["HF_HUB_OFFLINE"] = "1"  # launched ranks
            constants.HF_HUB_OFFLINE = True  # this process: huggingface_hub read the variable at import
            return
        raise UserError(f"{key}={repo_id}: cannot reach the Hub at {constants.ENDPOINT} ({reason}) and the model is "
                        "not in the local cache",
                        hint="check the network (HF_ENDPOINT, proxies), or give a local folder") from None


def check_launcher(cfg: DictConfig) -> None:
    """An FSDP accelerate config needs CUDA: on CPU accelerate builds no FSDP process group."""
    if cfg.launcher.name == "none" or not cfg.launcher.config_file:
        return
    from mistral_tune.config import REPO_ROOT

    path = Path(cfg.launcher.config_file)
    path = path if path.is_absolute() else REPO_ROOT / path
    if not path.exists():
        raise UserError(f"launcher.config_file={cfg.launcher.config_file} does not exist")
    import yaml

    launch = yaml.safe_load(path.read_text()) or {}
    if str(launch.get("distributed_type", "")).upper() == "FSDP":
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"launcher={cfg.launcher.name} (FSDP) needs CUDA GPUs; this machine has none",
                            hint="on CPU use launcher=ddp (or launcher=none)")
