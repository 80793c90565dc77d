"""harness.json read back: the table eval prints, the model card's section and model-index
entries, the W&B table. No lm-eval import: the card reads results without it installed."""

from __future__ import annotations

import json
from pathlib import Path

from mistral_tune.runs import RunDir

BUNDLED = "mistral_tune_bundled"
RESULTS = "harness.json"  # in run_dir/eval


def rows(record: dict, names: list[str] | None = None) -> list[tuple[str, str, dict]]:
    """(task, metric, {model: {"value", "stderr", "samples"}}) for the table and the card: each task's
    own metrics, or its subtasks' when it has none of its own (a tag)."""
    order: dict[tuple[str, str], dict] = {}
    for model, entry in record.get("models", {}).items():
        for task, result in entry.get("tasks", {}).items():
            if names is not None and task not in names:
                continue
            shown = {task: result["metrics"]} if result["metrics"] else result.get("subtasks", {})
            for sub, metrics in shown.items():
                for metric, value in metrics.items():
                    order.setdefault((sub, metric), {})[model] = {**value, "samples": result.get("samples")}
    return [(task, metric, cells) for (task, metric), cells in order.items()]


def table(record: dict, names: list[str] | None = None) -> str:
    models = list(record.get("models", {}))
    head = ["task", "metric", *models]
    body = [[task, metric, *(_cell(cells.get(m)) for m in models)] for task, metric, cells in rows(record, names)]
    if not body:
        return ""
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in [head, *body])


def _cell(value: dict | None) -> str:
    if not value:
        return "-"
    return f"{value['value']:.3f}" + (f" ± {value['stderr']:.3f}" if value.get("stderr") is not None else "")


def card_lines(run_dir: Path) -> list[str]:
    """The card's lm-evaluation-harness section, from run_dir/eval/harness.json (none: nothing)."""
    path = RunDir(run_dir).stage("eval") / RESULTS
    if not path.exists():
        return []
    record = json.loads(path.read_text())
    shown = table(record)
    if not shown:
        return []
    lines = ["### lm-evaluation-harness", "",
             f"EleutherAI's lm-eval {record.get('lm_eval')} on each model (value ± stderr; "
             f"`{BUNDLED}`: the held-out chats above, lm-eval's exact match of the same greedy answers).", "",
             "```", shown, "```", ""]
    if record.get("skipped"):
        lines += ["Not run: " + "; ".join(f"`{t}` {why}" for t, why in record["skipped"].items()) + ".", ""]
    return lines


def model_index_results(run_dir: Path) -> list[dict]:
    """Hub model-index entries of the card's model: the merged model's harness results (else the
    last model's, when eval.harness_models left merged out)."""
    path = RunDir(run_dir).stage("eval") / RESULTS
    models = json.loads(path.read_text()).get("models", {}) if path.exists() else {}
    if not models:
        return []
    out = []
    for task, result in models.get("merged", list(models.values())[-1]).get("tasks", {}).items():
        metrics = [{"type": k.split(",")[0], "name": k, "value": round(v["value"], 4)} for k, v in result["metrics"].items()]
        if metrics:
            out.append({"task": {"type": "text-generation"}, "dataset": {"name": task, "type": "lm-evaluation-harness"},
                        "metrics": metrics})
    return out


def log_wandb(record: dict, names: list[str]) -> None:
    import wandb

    models = list(record["models"])
    data = [[task, metric, *((cells.get(m) or {}).get("value") for m in models)] for task, metric, cells in rows(record, names)]
    flat = {f"harness/{m}/{task}/{metric}": cells[m]["value"] for task, metric, cells in rows(record, names)
            for m in cells}
    wandb.log({"harness/results": wandb.Table(columns=["task", "metric", *models], data=data), **flat})
    wandb.run.summary.update(flat)
