"""Sweeps (`-m`): each job's objective, returned to Hydra's sweeper, and the summary of all jobs.

The objective is a metric a stage already wrote: `<stage>/<metric>` from run_dir/<stage>/metrics.json
(`sft/train_loss`) or `eval/<model>/<metric>` from run_dir/eval/results.json
(`eval/dpo/task_score`). The summary table (overrides, objective, run_dir) is printed and saved
as <sweep run_dir>/sweep.json and sweep.md.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.stages import DATA_LAYOUT

from mistral_tune import runs
from mistral_tune.errors import UserError

def objective_name(cfg: DictConfig, command: str) -> str | None:
    if cfg.sweep.objective:
        return cfg.sweep.objective
    if command in DATA_LAYOUT:  # a training command: its own train loss
        return f"{command}/train_loss"
    if command in ("pipeline", "eval"):
        from mistral_tune.stages import rounds

        last = cfg.eval.models[-1] if cfg.eval.models else rounds.last_name(cfg)
        return f"eval/{last}/task_score"
    return None


def direction(cfg: DictConfig, name: str) -> str:
    if cfg.sweep.direction != "auto":
        if cfg.sweep.direction not in ("minimize", "maximize"):
            raise UserError(f"sweep.direction={cfg.sweep.direction!r} is not one of auto, minimize, maximize")
        return cfg.sweep.direction
    return "minimize" if any(k in name for k in ("loss", "perplexity")) else "maximize"


def read_objective(run_dir: str | Path, name: str) -> float:
    """The metric `name` of the run in run_dir; a UserError naming what is missing."""
    parts = name.split("/")
    run_dir = Path(run_dir)
    if parts[0] == "eval" and len(parts) == 3:
        path, keys = run_dir / "eval" / "results.json", parts[1:]
    elif len(parts) == 2:
        path, keys = runs.STAGE_FOLDERS.get(parts[0], parts[0]), parts[1:]
        path = run_dir / path / "metrics.json"
    else:
        raise UserError(f"sweep.objective={name!r}: expected <stage>/<metric> or eval/<model>/<metric>")
    if not path.exists():
        raise UserError(f"sweep.objective={name!r}: {path} does not exist (did the job run that stage?)")
    node = json.loads(path.read_text())
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            raise UserError(f"sweep.objective={name!r}: no {key!r} in {path}")
        node = node[key]
    if not isinstance(node, (int, float)):
        raise UserError(f"sweep.objective={name!r}: {node!r} in {path} is not a number")
    return float(node)


def summary_table(jobs: list[dict], name: str, how: str) -> str:
    """Jobs sorted best first (failed jobs last)."""
    def key(job):
        value = job.get("objective")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return (1, 0.0)
        return (0, value if how == "minimize" else -value)

    rows = [["job", name + (" (min)" if how == "minimize" else " (max)"), "overrides", "run_dir"]]
    for job in sorted(jobs, key=key):
        value = job.get("objective")
        shown = "failed" if job.get("error") else ("-" if value is None else f"{value:.4f}")
        rows.append([str(job["job"]), shown, " ".join(job["overrides"]), job["run_dir"]])
    return _aligned(rows)


def _aligned(rows: list[list[str]]) -> str:
    """Rows of cells as left-aligned columns two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


SEED_KEYS = ("seed", "model.init_seed")
EVAL_METRICS = ("task_score", "preferred_rate", "preference_accuracy", "eval_loss")
GAINS = ("task_score", "preferred_rate")  # each model's gain over the model in the row above, per seed
TABLE_COLUMNS = (*EVAL_METRICS, *(f"{m}_gain" for m in GAINS))


def seed_groups(jobs: list[dict]) -> dict[str, dict]:
    """Eval results of the finished jobs that differ only in their seeds, as mean and sample
    standard deviation per model and metric: {other overrides: {"seeds", "models": {model:
    {metric: [mean, sd]}}}}. Groups of one job are left out (no spread to show)."""
    groups: dict[str, list[tuple[list[str], dict]]] = {}
    for job in jobs:
        path = Path(job["run_dir"]) / "eval" / "results.json"
        if job.get("error") or not path.exists():
            continue
        seeds = [o for o in job["overrides"] if _is_seed(o)]
        rest = " ".join(o for o in job["overrides"] if not _is_seed(o))
        groups.setdefault(rest, []).append((seeds, json.loads(path.read_text())))
    out = {}
    for rest, members in groups.items():
        if len(members) < 2:
            continue
        models: dict[str, dict] = {}
        previous = None
        for name in members[0][1]:  # results.json lists base, then the stages in order
            if not all(name in results for _, results in members):
                continue
            for metric in EVAL_METRICS:
                values = [results[name].get(metric) for _, results in members]
                if all(isinstance(v, (int, float)) for v in values):
                    models.setdefault(name, {})[metric] = [statistics.fmean(values), statistics.stdev(values)]
            # The gain over the model before, seed by seed: the spread of a difference, not of levels.
            for metric in GAINS:
                if previous and metric in models.get(name, {}) and metric in models.get(previous, {}):
                    gains = [results[name][metric] - results[previous][metric] for _, results in members]
                    models[name][f"{metric}_gain"] = [statistics.fmean(gains), statistics.stdev(gains)]
            previous = name
        out[rest] = {"seeds": [" ".join(s) for s, _ in members], "models": models}
    return out


def _is_seed(override: str) -> bool:
    return override.split("=")[0].lstrip("+") in SEED_KEYS


def seed_table(groups: dict[str, dict]) -> str:
    """Mean +- sample standard deviation over the seeds of each group."""
    def cell(metrics: dict, column: str) -> str:
        if column not in metrics:
            return "-"
        mean, sd = metrics[column]
        return f"{mean:+.3f} ± {sd:.3f}" if column.endswith("_gain") else f"{mean:.3f} ± {sd:.3f}"

    parts = []
    for rest, group in groups.items():
        rows = [["model", *TABLE_COLUMNS]]
        rows += [[name, *(cell(metrics, c) for c in TABLE_COLUMNS)] for name, metrics in group["models"].items()]
        head = f"eval over {len(group['seeds'])} seeds ({'; '.join(group['seeds'])})" + (f", {rest}" if rest else "")
        parts.append(head + ": mean ± sd\n" + _aligned(rows))
    return "\n\n".join(parts)


def write_summary(sweep_dir: str | Path, jobs: list[dict], name: str, how: str) -> str:
    sweep_dir = Path(sweep_dir)
    text = summary_table(jobs, name, how)
    groups = seed_groups(jobs)
    if groups:
        text += "\n\n" + seed_table(groups)
    runs.write_json(sweep_dir / "sweep.json", {"objective": name, "direction": how, "jobs": jobs,
                                              "over_seeds": groups})
    runs.atomic_write_text(sweep_dir / "sweep.md", f"```\n{text}\n```\n")
    return text


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """The first job's overrides of a sweep, to validate the config before any job starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    first = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.is_sweep_override():
            value = next(iter(o.sweep_string_iterator()))
            first.append(f"{o.get_key_element()}={value}")
        else:
            first.append(o.input_line)
    return first


def multirun(command: str, overrides: list[str], run_command, report) -> int:
    """`mistral-tune <command> -m ...`: Hydra's sweeper runs one job per override combination in
    <run_dir>/<k>; `run_command(command, cfg, overrides)` runs one, `report(command, err)` prints a
    user error. Returns the exit status."""
    import sys

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mistral_tune.config import CONFIG_DIR, compose, model_group_overrides, resolve_model_defaults, setup

    try:
        compose(_first_of_sweeps(overrides))
    except UserError:
        raise
    except Exception:
        pass  # sweeps the simple check cannot expand: Hydra reports its own errors below
    setup()

    from mistral_tune.training.tracking import group_name

    jobs: list[dict] = []  # one entry per job, for the summary table
    where: dict = {}

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def job(cfg):
        hc = HydraConfig.get()
        where["sweep_dir"] = hc.sweep.dir
        with open_dict(cfg):
            cfg.run_dir = hc.runtime.output_dir  # <run_dir>/<job number>
            cfg.logger.group = cfg.logger.group or group_name(hc.sweep.dir)  # one W&B group per sweep
        job_overrides = [o for o in hc.overrides.task if not o.startswith("run_dir=")]
        resolve_model_defaults(cfg, job_overrides)  # max_length from the model and data, as compose does
        name = where["objective"] = objective_name(cfg, command)
        where["direction"] = direction(cfg, name) if name else "minimize"
        record = {"job": hc.job.num, "overrides": job_overrides, "run_dir": cfg.run_dir, "objective": None}
        jobs.append(record)
        try:
            run_command(command, cfg, job_overrides + [f"run_dir={cfg.run_dir}"])
            if name:
                record["objective"] = read_objective(cfg.run_dir, name)
        except UserError as err:
            record["error"] = str(err)
            report(command, err)
            _summarise(where, jobs)
            sys.exit(2)
        return record["objective"]  # what Hydra's sweeper (e.g. Optuna) optimises

    saved = sys.argv
    sys.argv = [saved[0], "-m", *model_group_overrides(overrides)]
    try:
        job()
    finally:
        sys.argv = saved
    _summarise(where, jobs)
    return 0


def _summarise(where: dict, jobs: list[dict]) -> None:
    if jobs and where.get("sweep_dir"):
        name = where.get("objective") or "objective"
        text = write_summary(where["sweep_dir"], jobs, name, where.get("direction", "minimize"))
        print(f"sweep: {len(jobs)} job(s), summary in {Path(where['sweep_dir']) / 'sweep.md'}\n{text}")
