"""Iterative on-policy DPO (`pairs=onpolicy pairs.rounds=N`): after DPO, sample again from the DPO
policy and train another round of DPO from it, N rounds in all (online/iterative DPO: Xu et al.
2023, "Some things are more CRINGE than others"; Yuan et al. 2024, "Self-Rewarding Language Models").

Round 1 is the ordinary pairs and DPO stages (run_dir/pairs, run_dir/dpo). Round r >= 2 is a run
folder of its own, run_dir/rounds/<r>, holding what round 1 holds at the top: pairs/, data/dpo/,
dpo/ (and wandb/). Its `sft/manifest.json` is a link, not an SFT run: it names the policy the round
starts from, round r-1's DPO model, so the pairs and DPO stages find their start model there as
they find run_dir/sft at the top. Each round's reference model is the policy it starts from, as
in iterative DPO. `merge` takes the last round's model, `eval` adds a row per round
(`dpo_round2`, ...), and re-running the pipeline skips finished rounds like any finished stage.
"""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mistral_tune import runs
from mistral_tune.errors import UserError
from mistral_tune.runs import RunDir

PAIRS_FILE = "pairs.jsonl"  # as mistral_tune.stages.pairs writes it


def count(cfg: DictConfig) -> int:
    """How many DPO rounds run: pairs.rounds with pairs=onpolicy and DPO the last stage, else 1."""
    n = cfg.pairs.rounds
    if n == 1:
        return 1
    if n < 1:
        raise UserError(f"pairs.rounds={n}: give 1 or more")
    if cfg.pairs.name != "onpolicy":
        raise UserError(f"pairs.rounds={n} samples each round's pairs from the policy: it needs pairs=onpolicy")
    if list(cfg.stages)[-1] != "dpo":
        raise UserError(f"pairs.rounds={n} repeats the last stage, DPO: stages={list(cfg.stages)} does not end with dpo")
    return n


def name(r: int) -> str:
    """The eval row (and sweep objective) of round r's model: dpo, dpo_round2, ..."""
    return "dpo" if r == 1 else f"dpo_round{r}"


def _values(cfg: DictConfig, r: int) -> dict:
    """The keys that make round r's config from the run's: its folder, the link stage before DPO,
    and DPO's data in that folder (the run's pairs file replaced by the round's)."""
    top = RunDir.of(cfg)
    root = top.round(r).resolve()
    files = [str(root / "pairs" / PAIRS_FILE) if Path(f).resolve() == (top.stage("pairs") / PAIRS_FILE).resolve() else f
             for f in cfg.dpo.data.files]
    return {"run_dir": str(root), "stages": ["sft", "dpo"], "dpo.data.files": files, "pairs.rounds": 1}


def overrides(cfg: DictConfig, r: int, given: list[str]) -> list[str]:
    """The command line of a launched round: the user's overrides, those of `_values` replaced, so
    that its ranks compose the config `config(cfg, r)` is."""
    values = _values(cfg, r)
    kept = [o for o in given if o.lstrip("+~").partition("=")[0] not in values]
    return [*kept, *(f"{k}=[{','.join(repr(v) for v in value)}]" if isinstance(value, list) else f"{k}={value}"
                     for k, value in values.items())]


def config(cfg: DictConfig, r: int) -> DictConfig:
    """Round r's config: the run's, with `_values(cfg, r)` set."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        for key, value in _values(cfg, r).items():
            OmegaConf.update(out, key, value, merge=False)
    return out


def last_name(cfg: DictConfig) -> str:
    """The eval name of the model the run ends with: the last stage's, or the last DPO round's."""
    n = count(cfg)
    return cfg.stages[-1] if n == 1 else name(n)


def last_manifest(cfg: DictConfig, needed_by: str) -> tuple[str, dict]:
    """(eval name, manifest) of the model the run ends with (an error while it is unfinished)."""
    n = count(cfg)  # with rounds, the last stage is DPO: its manifest in the last round's folder
    return last_name(cfg), runs.require_manifest(cfg if n == 1 else config(cfg, n), cfg.stages[-1], needed_by)


def finished(cfg: DictConfig) -> dict[str, dict]:
    """{eval name: DPO manifest} of the finished rounds after the first."""
    out = {}
    for r in range(2, count(cfg) + 1):
        manifest = runs.read_manifest(config(cfg, r), "dpo")
        if manifest:
            out[name(r)] = manifest
    return out


def start(cfg: DictConfig, r: int) -> DictConfig:
    """Write round r's link to round r-1's DPO model and return its config (its chat format and
    tokenizer are written by the pipeline's `prepare`, as for any run folder). The link changes
    when round r-1 is redone, so round r's stages see new inputs and redo (or refuse without
    force=true) like any stage."""
    previous = runs.require_manifest(config(cfg, r - 1) if r > 2 else cfg, "dpo", f"DPO round {r}")
    rcfg = config(cfg, r)
    if runs.is_main_process():
        link = {"stage": "sft", "fingerprint": previous["fingerprint"], "model": previous["model"],
                "method": previous.get("method"), "round": r,
                "link": f"not an SFT run: round {r} of DPO starts from round {r - 1}'s model"}
        if runs.read_manifest(rcfg, "sft") != link:  # written again only when round r-1 changed
            runs.write_json(RunDir.of(rcfg).stage("sft") / runs.MANIFEST, link)
    runs.wait_for_everyone()
    return rcfg
