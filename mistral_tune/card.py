"""The merged model's card: run_dir/merged/README.md with Hugging Face model-card metadata.

Everything in it is read from the run folder (data/<stage>/report.json, each stage's config.yaml,
metrics.json and manifest.json, eval/results.json), so the card describes what was trained, not
what the current config says. `write_card(cfg)` works without evaluation results too (merge can
call it); `mistral-tune eval` rewrites it with the evaluation table.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.datasets import tasks
from mistral_tune.runs import RunDir
from mistral_tune.evaluation import report as harness_report
from mistral_tune.stages import rounds
from mistral_tune.stages.data import eval_files

VERSIONS = ("mistral-tune", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "mistral-common")
HUB_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./")


def _read(path: Path):
    if not path.exists():
        return None
    return json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())


def _versions() -> dict[str, str]:
    out = {}
    for name in VERSIONS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and set(name) <= HUB_ID_CHARS


def _card_model(cfg: DictConfig, results: dict | None) -> str | None:
    """The results row of the model this card is for (the run's last stage or DPO round), else the
    last row evaluated (eval.models without it: its samples are shown, named, but the model-index
    metadata claims nothing)."""
    if not results:
        return None
    return _model_name(cfg) if _model_name(cfg) in results else list(results)[-1]


def _model_name(cfg: DictConfig) -> str:
    """The eval name of the merged model: its run's last stage, or the last DPO round."""
    return rounds.last_name(cfg) if rounds.count(cfg) > 1 else _run_stages(cfg)[-1]


def _run_stages(cfg: DictConfig) -> list[str]:
    """The training stages the merged model was made from (its merge config), else cfg.stages: a
    command run later without the run's stages=[...] (export after stages=[sft,kto]) still
    describes the model it has."""
    merged = _read(RunDir.of(cfg).merged / "config.yaml") or {}
    return list(merged.get("stages") or cfg.stages)


def _stage_rows(cfg: DictConfig) -> list[dict]:
    """Each finished training stage, then each DPO round after the first (pairs.rounds)."""
    run_dir = RunDir.of(cfg)
    folders = [(stage, stage, run_dir.stage(stage)) for stage in _run_stages(cfg)]
    folders += [(rounds.name(r), "dpo", RunDir(run_dir.round(r)).stage("dpo")) for r in range(2, rounds.count(cfg) + 1)]
    rows = []
    for label, node, folder in folders:
        config = _read(folder / "config.yaml")
        manifest = _read(folder / "manifest.json")
        if not (config and manifest):
            continue
        rows.append({"stage": label, "node": node, "config": config, "manifest": manifest,
                     "metrics": _read(folder / "metrics.json") or manifest.get("metrics", {})})
    return rows


def render(cfg: DictConfig, results: dict | None = None, results_table: str = "") -> str:
    run_dir = RunDir.of(cfg)
    reports = {kind: r for kind in _run_stages(cfg) if (r := _read(run_dir.data(kind) / "report.json"))}
    stages = _stage_rows(cfg)
    name_or_path = cfg.model.name_or_path
    template = (_read(run_dir.chat_format) or {}).get("template") or cfg.template.name
    files = {kind: {Path(f).name: c for f, c in r.get("per_file", {}).items()} for kind, r in reports.items()}

    meta: dict = {"library_name": "transformers", "pipeline_tag": "text-generation",
                  "tags": ["mistral", "mistral_tune", "trl", *dict.fromkeys(s["node"] for s in stages)]}
    if _is_hub_id(name_or_path):
        meta["base_model"] = name_or_path
    license_ = cfg.push.license or base_license(cfg)
    if license_:
        meta["license"] = license_
    hub_ids = sorted({_hub_dataset(label) for r in reports.values() for label in r.get("per_source", {})} - {None})
    if hub_ids:
        meta["datasets"] = hub_ids  # Hub dataset ids only; local files are listed under Data
    held_out = _eval_data_names(cfg)
    last = _card_model(cfg, results)
    if results and last == _model_name(cfg):  # model-index: this model's own figures, or none
        metrics = [{"type": k, "name": k, "value": round(results[last][k], 4)}
                   for k in ("task_score", "preferred_rate", "eval_loss", "perplexity", "preference_accuracy",
                             "reward_margin")
                   if results[last].get(k) is not None]
        meta["model-index"] = [{"name": run_dir.root.resolve().name, "results": [{
            "task": {"type": "text-generation"},
            "dataset": {"name": ", ".join(held_out), "type": "held-out"},
            "metrics": metrics}, *harness_report.model_index_results(run_dir.root)]}]

    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {run_dir.root.resolve().name}", ""]
    base = (f"[{name_or_path}](https://huggingface.co/{name_or_path})" if _is_hub_id(name_or_path)
            else f"`{name_or_path}`" if name_or_path
            else f"a randomly initialised Mistral-architecture model (seed {cfg.model.init_seed}, "
                 f"{_shape(run_dir.base)})")
    lines += [f"Trained with mistral_tune ({' -> '.join(['data', *[s['stage'] for s in stages], 'merge'])}) "
              f"from {base}.", ""]

    lines += ["## Data", "", "| stage | file | rows read | kept | rejected |", "|---|---|---:|---:|---:|"]
    for kind, per in files.items():
        for name, c in per.items():
            lines.append(f"| {kind} | {name} | {c['read']} | {c['kept']} | {c['rejected']} |")
    for kind, r in reports.items():
        lines.append(f"\n{kind}: {r['kept']} rows used ({r['too_long']} dropped as too long), {r['tokens']} tokens"
                     + (f", {r['trained_tokens']} trained" if "trained_tokens" in r else ""))
    if template.startswith("mistral_"):
        template_line = (f"Mistral's `{template}` instruct format ({_template_note(template)}), token-exact to "
                         "`mistral-common`")
    else:  # chatml and zephyr have no mistral-common reference: nothing to be exact to
        vocab = (_read(run_dir.chat_format) or {}).get("vocab", "?")
        template_line = (f"The `{template}` format ({_template_note(template)}) over the {vocab} vocabulary; its "
                         "markers are plain text, not control tokens")
    lines += ["", "## Chat template", "",
              f"{template_line}; the tokenizer in this folder carries it as `chat_template`. "
              f"Loss on: `{cfg.template.train_on}` tokens. Padding uses `<unk>` (never EOS).", ""]
    lines += [f"License: {license_ or 'not known (set push.license=...; the base model card gives none)'}.", ""]

    lines += ["## Training", ""]
    for s in stages:
        c, m = s["config"], s["metrics"]
        trainer = c.get(s["node"], {}).get("trainer", {})
        method = s["manifest"].get("method", "?")
        lines.append(f"### {s['stage']} ({'full fine-tuning' if method == 'none' else method})")
        lines.append("")
        keys = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
                "beta", "loss_type", "padding_free", "packing")
        params = {k: trainer[k] for k in keys if k in trainer}
        params["max_length"] = c.get(s["node"], {}).get("data", {}).get("max_length")
        if method != "none":
            peft = {**c.get("peft", {}), **(c.get(s["node"], {}).get("peft") or {})}  # the stage's own over peft.*
            params.update({f"lora_{k}" if k == "r" else k: peft[k]
                           for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in peft})
        params.update(dtype=c.get("model", {}).get("dtype"), seed=c.get("seed"),
                      processes=c.get("launcher", {}).get("num_processes"))
        lines += ["| hyperparameter | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in params.items()]
        lines += ["", f"{m.get('global_step')} steps, train loss {_num(m.get('train_loss'))}, "
                      f"{_num(m.get('train_runtime'))} s, {m.get('tokens')} tokens "
                      f"({_num(m.get('tokens_per_second'))} tokens/s), peak RSS {_num(m.get('peak_rss_mb'))} MB"
                      + (f", peak CUDA {m['peak_cuda_mb']} MB" if "peak_cuda_mb" in m else ""), ""]
    total = sum((s["metrics"].get("train_runtime") or 0) for s in stages)
    lines += [f"Hardware: {_hardware()} (where this card was written); total training time {total:.0f} s.", ""]

    lines += ["## Evaluation", ""]
    if results:
        task = ("`task_score`: greedy answers exactly right; " if any(r.get("task_score") is not None
                                                                       for r in results.values()) else "")
        if any(r.get("preferred_rate") is not None for r in results.values()):
            task += f"`preferred_rate`: greedy replies that keep the bundled rule ({tasks.RULE}), right or wrong; "
        lines += [f"Held-out data: {', '.join(held_out)} "
                  f"(at most {cfg.eval.max_samples} rows each). `eval_loss`/`perplexity`: on the trained tokens "
                  f"of the held-out chats; {task}"
                  "`preference_accuracy`: the model gives the chosen reply a higher log-probability than the "
                  "rejected one; `reward_accuracy`/`reward_margin`: the implicit reward of DPO and KTO, "
                  "beta * (logp_model - logp_ref), against the model the stage started from ("
                  + ", ".join(f"{r['reference']} for {n}" for n, r in results.items() if r.get("reference"))
                  + ").", "", "```", results_table, "```", ""]
        samples = results[last].get("samples", [])
        if samples:
            lines += [f"Sample generations ({last}):", "", "| prompt | generation | right |", "|---|---|---|"]
            lines += [f"| {_cell(x['prompt'])} | {_cell(x['generation'])} | {'yes' if x['correct'] else 'no'} |"
                      for x in samples]
            lines.append("")
        lines += harness_report.card_lines(run_dir.root)  # eval.harness: lm-eval's numbers, when it ran
    else:
        lines += ["Not evaluated yet: `mistral-tune eval run_dir=...` adds the table here.", ""]

    lines += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'path = "."  # this folder, or its Hub repo id',
              "tok = AutoTokenizer.from_pretrained(path)",
              "model = AutoModelForCausalLM.from_pretrained(path)",
              'messages = [{"role": "user", "content": "Sort these digits: 5, 1, 3"}]',
              "inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)",
              "out = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
              "print(tok.decode(out[0, inputs[\"input_ids\"].shape[1]:], skip_special_tokens=True))", "```", ""]
    lines += _gguf_lines(run_dir)
    lines += ["## Framework versions", ""]
    lines += [f"- {k} {v}" for k, v in _versions().items()]
    return "\n".join(lines) + "\n"


def _gguf_lines(run_dir: RunDir) -> list[str]:
    """The GGUF files of `mistral-tune export` (run_dir/export/manifest.json) made from this merged
    model: not those of export.model=<another folder>, nor those of a merged model since redone."""
    merge = _read(run_dir.merged / "manifest.json") or {}
    files = {name: f for name, f in (_read(run_dir.export / "manifest.json") or {}).get("files", {}).items()
             if Path(f["source"]).resolve() == run_dir.merged.resolve()
             and f.get("source_key", merge.get("fingerprint")) == merge.get("fingerprint")}
    if not files:
        return []
    lines = ["## GGUF (llama.cpp, Ollama)", "", "| file | quantization | size | Ollama Modelfile |", "|---|---|---:|---|"]
    for f in files.values():
        lines.append(f"| `{f['gguf']}` | {f['quant']} | {f['bytes'] / 1e6:.1f} MB | `{f['modelfile']}` |")
    first = next(iter(files.values()))
    lines += ["", "In the run folder's `export/`, made from this model with `mistral-tune export`: "
              f"`llama-cli -m {first['gguf']} --jinja` uses the chat template inside the file; "
              f"`ollama create NAME -f {first['modelfile']}` then `ollama run NAME`."]
    notes = {f.get("sliding_window_note") for f in files.values()} - {None}
    lines += [f"Note: {n}." for n in sorted(notes)]
    return lines + [""]


def write_card(cfg: DictConfig, results: dict | None = None, results_table: str = "") -> Path | None:
    """Write run_dir/merged/README.md (rank 0); None when there is no merged model. Without
    results (merge, export) the card keeps eval's results when they were made of this merged model."""
    merged = RunDir.of(cfg).merged
    if not (merged / "config.json").exists() or not runs.is_main_process():
        return None
    if results is None:
        results, results_table = stored_results(cfg)
    path = merged / "README.md"
    runs.atomic_write_text(path, render(cfg, results, results_table))
    return path


def stored_results(cfg: DictConfig) -> tuple[dict | None, str]:
    """eval/results.json and its table when eval's manifest names the current merged model
    (`merge`: its fingerprint), else (None, "")."""
    from mistral_tune.stages.evaluate import table  # evaluate writes cards: imported when needed

    evaluated, merge = runs.read_manifest(cfg, "eval"), runs.read_manifest(cfg, "merge")
    path = runs.stage_dir(cfg, "eval") / "results.json"
    if not (evaluated and merge and evaluated.get("merge") == merge.get("fingerprint") and path.exists()):
        return None, ""
    results = json.loads(path.read_text())
    return results, table(results)


def base_license(cfg: DictConfig) -> str | None:
    """The `license` of the base model's own card (README.md metadata) in its local folder or the HF
    cache, else None (nothing is downloaded)."""
    if not cfg.model.name_or_path:
        return None
    from mistral_tune.formats.checkpoint import locate

    folder = locate(cfg.model.name_or_path, cfg.model.revision)
    readme = folder / "README.md" if folder else None
    if not (readme and readme.exists()):
        return None
    text = readme.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    return str(value) if value else None


def _hub_dataset(label: str) -> str | None:
    """org/name of a report's hub source label (hub:org/name[subset]:split@rev), None for files."""
    if not label.startswith("hub:"):
        return None
    return label[4:].split(":")[0].split("[")[0]


def _eval_data_names(cfg: DictConfig) -> list[str]:
    """What eval held out, by name: the files, or `<stage>/eval.jsonl (held-out split of your data)`."""

    names = []
    for layout in ("sft", "dpo"):
        files, kind = eval_files(cfg, layout)
        for f in files:
            path = Path(f)
            names.append(f"{path.parent.name}/{path.name} (held-out split of the training data)"
                         if kind == "held_out" else path.name)
    return names


def _shape(base: Path) -> str:
    config = _read(base / "config.json") or {}
    keys = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config) or "shape unknown"


def _template_note(template: str) -> str:
    return {"mistral_v1": "Mistral-7B-Instruct v0.1/v0.2: `<s>[INST] user [/INST] reply</s>`",
            "mistral_v3": "Mistral-7B-Instruct v0.3: `[INST]`/`[/INST]` control tokens",
            "mistral_v7": "system prompt in `[SYSTEM_PROMPT]` blocks",
            "chatml": "`<|im_start|>role ... <|im_end|>`", "zephyr": "`<|user|>` / `<|assistant|>` headers, EOS after each message"
            }.get(template, template)


def _num(x) -> str:
    return "?" if x is None else f"{x:.4g}" if isinstance(x, float) else str(x)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
