"""The run folder: where each stage writes, its manifest, and which process may write.

`RunDir` owns every path of the layout; no other module joins paths under run_dir itself:

    DIR/data/format.json        the chat format (template + vocabulary), fixed by the first data build
    DIR/data/<stage>/           one build per training stage's dataset: dataset/, report.json,
                                rejects.jsonl, length_histogram.png, config.yaml, manifest.json
    DIR/tokenizer/              the HF tokenizer with the exact chat template used in training
    DIR/base/                   the (tiny) base model when it is made here, not loaded from a path
    DIR/<stage>/                each training stage's output (sft, dpo, orpo, pairs), eval
    DIR/merged/                 the chat-ready merged model
    DIR/export/                 GGUF files of the merged model and their Ollama Modelfiles
    DIR/rounds/<r>/             round r >= 2 of iterative DPO (pairs.rounds): pairs/, data/dpo/, dpo/
    DIR/wandb/                  W&B's (offline) run folders
    DIR/.lock                   the process holding the run_dir

A stage writes `<its folder>/config.yaml` (the resolved config) when it starts and
`<its folder>/manifest.json` last: a manifest means the stage finished. A training stage also
writes `started.json` (the fingerprint it started with): its checkpoints resume only that run.
The next stage reads the previous stage's manifest, never its Python objects.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from mistral_tune.config import fingerprint, to_container
from mistral_tune.errors import UserError

log = logging.getLogger("mistral_tune")

MANIFEST = "manifest.json"


def is_main_process() -> bool:
    """Rank 0 of a launch (or the only process). Read from the launcher's environment, so it
    works before torch.distributed is initialised."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def wait_for_everyone() -> None:
    import torch
    from accelerate import PartialState

    # cpu=True without CUDA: a plain PartialState() resolves to DistributedType.NO there, even under
    # torchrun, and its barrier would return at once (rank 1 then read run_dir/base before rank 0
    # wrote it).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes > 1:
        state.wait_for_everyone()


def init_distributed(timeout_s: float) -> None:
    """In a launched rank, start torch.distributed now, with launcher.timeout_s as the gloo/NCCL
    timeout of every collective. accelerate's PartialState is one per process: ours, the Trainer's
    and DeepSpeed's all share this one (the Trainer passes its ddp_timeout only on GPUs, so on CPU
    this is the one place a timeout can be set). A collective waiting on a lost machine then fails
    after timeout_s instead of torch's default 30 minutes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    from datetime import timedelta

    import torch
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_s))


STAGE_FOLDERS = {"merge": "merged"}  # the contract names the merged checkpoint's folder `merged`


@dataclass(frozen=True)
class RunDir:
    """Every path of a run folder (see the module docstring for the layout)."""

    root: Path

    @classmethod
    def of(cls, cfg: DictConfig) -> RunDir:
        return cls(Path(cfg.run_dir))

    def stage(self, stage: str) -> Path:
        """A stage's folder: `sft`, `dpo`, `orpo`, `pairs`, `merge` (-> merged), `eval`, or a data
        build `data/<stage>`."""
        return self.root / STAGE_FOLDERS.get(stage, stage)

    def data(self, stage: str) -> Path:
        """The folder of the dataset built for a training stage."""
        return self.stage(data_stage(stage))

    def dataset(self, stage: str) -> Path:
        """The tokenized dataset (datasets.save_to_disk) a training stage trains on."""
        return self.data(stage) / "dataset"

    @property
    def data_root(self) -> Path:
        return self.root / "data"

    @property
    def chat_format(self) -> Path:
        return self.data_root / "format.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def merged(self) -> Path:
        return self.stage("merge")

    @property
    def export(self) -> Path:
        """GGUF exports: <name>-<quant>.gguf, <name>-<quant>.Modelfile, manifest.json."""
        return self.stage("export")

    def round(self, r: int) -> Path:
        """Round r >= 2 of iterative DPO (pairs.rounds): a run folder of its own, see stages/rounds.py."""
        return self.root / "rounds" / str(r)

    @property
    def lock(self) -> Path:
        return self.root / ".lock"


def data_stage(stage: str) -> str:
    """The name of the data build of a training stage (its manifest lives in DIR/data/<stage>)."""
    return f"data/{stage}"


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    return RunDir.of(cfg).stage(stage)


def check_writable(run_dir: str) -> None:
    """A run_dir that cannot be written is a one-line error before any work, not a traceback
    after the first stage."""
    path = Path(run_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"run_dir={run_dir} is not writable: {err.strerror or err}",
                        hint="choose a folder you can write, e.g. run_dir=runs/mine") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name and rename into place: a kill mid-write leaves the old file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def stage_config(cfg: DictConfig, stage: str) -> dict:
    """The part of the config that decides a stage's output (for skip/resume decisions). A
    training stage depends on the model, format, PEFT and its own node (`sft`, `dpo`, `orpo`); a
    data build `data/<stage>` on the cleaning settings and that stage's `data` node alone, so
    giving DPO new data never invalidates the SFT data."""
    full = to_container(cfg)
    if stage.startswith("data/"):
        paths = ["template", "data", f"{stage.split('/', 1)[1]}.data", "model.default_template", "seed"]
    else:
        paths = {
            "merge": ["merge"],
            "push": ["push"],
            # (kto's beta only in runs with KTO, so that older runs' eval fingerprints stand)
            "eval": ["eval", "template", "dpo.trainer.beta", *(["kto.trainer.beta"] if "kto" in cfg.stages else [])],
        }.get(stage, ["model", "template", "peft", stage, "seed"])
    picked = {}
    for path in paths:
        node = full
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[path] = node
    if isinstance(picked.get("data"), dict):  # data.show prints examples: it changes no build
        picked["data"] = {k: v for k, v in picked["data"].items() if k != "show"}
    if isinstance(picked.get("eval"), dict):  # the harness keeps its own per-task record (eval/harness.json)
        picked["eval"] = {k: v for k, v in picked["eval"].items() if not k.startswith("harness")}
    if isinstance(picked.get("pairs"), dict):  # how many DPO rounds follow changes no one round
        picked["pairs"] = {k: v for k, v in picked["pairs"].items() if k != "rounds"}
    for node in picked.values():  # logging and checkpoint cadence do not change the result
        trainer = node.get("trainer") if isinstance(node, dict) else None
        if isinstance(trainer, dict):
            node["trainer"] = {n: v for n, v in trainer.items() if not n.startswith(("logging_", "save_"))}
    return picked


def stage_key(cfg: DictConfig, stage: str, inputs: dict | None = None) -> str:
    """The fingerprint a stage's output is known by: its config (stage_config) and its inputs."""
    return fingerprint({"config": stage_config(cfg, stage), "inputs": inputs or {}})


def read_manifest(cfg: DictConfig, stage: str) -> dict | None:
    path = stage_dir(cfg, stage) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def check_done(cfg: DictConfig, stage: str, inputs: dict | None = None) -> dict | None:
    """The stage's manifest if it finished with this same config (skip it), None to (re)run it.

    A finished stage whose recorded config differs is an error unless `force=true`: never a
    silent overwrite, never a silent reuse.
    """
    manifest = read_manifest(cfg, stage)
    if manifest is None:
        return None
    if manifest.get("fingerprint") == stage_key(cfg, stage, inputs):
        log.info("%s: already complete in %s, skipping (force=true to redo)", stage, stage_dir(cfg, stage))
        return manifest
    if cfg.force:
        log.info("%s: config changed and force=true: redoing the stage", stage)
        return None
    raise UserError(
        f"{stage_dir(cfg, stage)} holds a finished {stage} stage made with a different config: "
        + config_changes(stage_dir(cfg, stage) / "config.yaml", stage_config(cfg, stage)),
        hint="use a new run_dir=..., or force=true to redo it in place",
    )


def _flatten(node: Any, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def config_changes(old_config: Path, new: dict, limit: int = 6) -> str:
    """`key: old -> new, ...` between a finished stage's config.yaml and the keys `new` (a
    stage_config) decides the stage by; the inputs (data, previous stage) when no key changed."""
    try:
        old_full = yaml.safe_load(old_config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return f"its config ({old_config}) is unreadable"
    old = {}
    for path in new:
        node = old_full
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        old[path] = node
    old_flat, new_flat = _flatten(old), _flatten(new)
    ignored = (".logging_", ".save_")  # stage_config leaves these out of the decision
    changes = [f"{key}: {old_flat.get(key, '(unset)')} -> {new_flat.get(key, '(unset)')}"
               for key in sorted(old_flat.keys() | new_flat.keys())
               if old_flat.get(key) != new_flat.get(key) and key != "data.show" and not key.startswith("eval.harness") and not any(m in f".{key.rsplit('.', 1)[-1]}" for m in ignored)]
    if not changes:
        return "no config key changed, so its inputs did (data files, tokenizer or the previous stage)"
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return ", ".join(changes[:limit]) + more


def write_stage_config(cfg: DictConfig, stage: str) -> None:
    if is_main_process():
        path = stage_dir(cfg, stage) / "config.yaml"
        atomic_write_text(path, yaml.safe_dump(to_container(cfg), sort_keys=False))


STARTED = "started.json"


def begin_training(cfg: DictConfig, stage: str, inputs: dict | None = None) -> None:
    """Before a training stage (re)starts: keep only checkpoints this same config and inputs made.

    TRL resumes from the newest checkpoint-N in the stage folder, whatever made it. Left alone, a
    stage redone with force=true after a config change resumed from the old run's last checkpoint
    (at or past the new max_steps it trains nothing and is saved as the new result), and a crashed
    stage re-run with other settings continued the other run. So the fingerprint a run starts
    with is kept in started.json: checkpoints from another fingerprint, or those of a finished
    stage being redone, are an error without force=true and deleted with it. Writes config.yaml.
    """
    out = stage_dir(cfg, stage)
    key = stage_key(cfg, stage, inputs)
    started = out / STARTED
    old = json.loads(started.read_text()).get("fingerprint") if started.exists() else None
    redo = (out / MANIFEST).exists()  # check_done let a finished stage through: force=true
    checkpoints = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    stale = checkpoints if redo or (old is not None and old != key) else []
    if stale and not cfg.force:
        raise UserError(
            f"{out} holds checkpoints of an unfinished {stage} run with a different config, which "
            f"training would resume from: " + config_changes(out / "config.yaml", stage_config(cfg, stage)),
            hint="re-run with the config it started with to resume it, or force=true to start over",
        )
    if is_main_process():
        for path in stale:
            log.info("%s: deleting %s (made by another config or a finished run being redone)", stage, path.name)
            shutil.rmtree(path)
        if redo:
            (out / MANIFEST).unlink()
        write_json(started, {"fingerprint": key})
    write_stage_config(cfg, stage)
    wait_for_everyone()


def finish_stage(cfg: DictConfig, stage: str, payload: dict, inputs: dict | None = None) -> dict:
    """Write the manifest last: from now on the stage counts as complete."""
    manifest = {
        "stage": stage,
        "fingerprint": stage_key(cfg, stage, inputs),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **payload,
    }
    if is_main_process():
        write_json(stage_dir(cfg, stage) / MANIFEST, manifest)
    return manifest


def previous_stage(cfg: DictConfig, stage: str) -> str | None:
    """The training stage before `stage` in `stages=[...]`, None for the first."""
    order = list(cfg.stages)
    if stage not in order:
        raise UserError(f"{stage} is not in stages={order}",
                        hint=f"list it where it belongs, e.g. stages=[{stage}] or stages=[sft,{stage}]")
    i = order.index(stage)
    return order[i - 1] if i else None


def require_manifest(cfg: DictConfig, stage: str, needed_by: str) -> dict:
    manifest = read_manifest(cfg, stage)
    if manifest is None:
        raise UserError(
            f"{needed_by} needs a finished {stage} stage in {stage_dir(cfg, stage)}, found none",
            hint=f"run `mistral-tune {stage} run_dir={cfg.run_dir}` first (or `mistral-tune pipeline`)",
        )
    return manifest
