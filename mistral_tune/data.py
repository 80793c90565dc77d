"""The `data` stage: files -> validated rows -> templated, tokenized, masked examples on disk.

Writes run_dir/data/{sft,dpo} (datasets.save_to_disk; SFT rows carry `input_ids` and
`assistant_masks`, preference rows `prompt_ids`, `chosen_ids`, `rejected_ids`, TRL's names),
report.json that accounts for every input row, rejects.jsonl, and run_dir/tokenizer.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import shutil
import statistics
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs, sources, templates
from mistral_tune.errors import UserError
from mistral_tune.modeling import resolve_template
from mistral_tune.tokenizer import build_hf_tokenizer

log = logging.getLogger("mistral_tune")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_inputs(cfg: DictConfig, template: str) -> dict:
    """What the built data depends on, by content: data file bytes, the tokenizer file, and the
    template code. A changed tokenizer or template can never reuse a stale build (a Mistral run
    once reused another tokenizer's cache and trained at loss ~10)."""
    files = {}
    for stage in ("sft", "dpo"):
        for path in sources.expand_files(list(cfg[stage].data.files)) if cfg[stage].data.files else []:
            files[str(path)] = _file_digest(path)
    return {
        "files": files,
        "tokenizer": _file_digest(templates.mistral_tokenizer_file(template)),
        "template_code": hashlib.sha256(inspect.getsource(templates).encode()).hexdigest(),
    }


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    return {
        "min": min(lengths),
        "mean": round(statistics.fmean(lengths), 1),
        "median": statistics.median(lengths),
        "max": max(lengths),
    }


def build_sft(rows: list[dict], template: str, train_on: str, max_length: int):
    """Encode SFT rows; rows longer than max_length are dropped and counted, never truncated
    (a truncated row loses its final EOS and teaches the model not to stop)."""
    examples, too_long = [], []
    for i, row in enumerate(rows):
        enc = templates.encode_chat(row["messages"], template, train_on=train_on)
        if len(enc.input_ids) > max_length:
            too_long.append({**row, "_reason": f"{len(enc.input_ids)} tokens > max_length {max_length}", "_index": i})
            continue
        examples.append({"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks})
    return examples, too_long


def build_dpo(rows: list[dict], template: str, max_length: int):
    examples, too_long = [], []
    for i, row in enumerate(rows):
        prompt_ids, chosen_ids, rejected_ids = templates.encode_preference(
            row["prompt"], row["chosen"], row["rejected"], template
        )
        longest = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
        if longest > max_length:
            too_long.append({**row, "_reason": f"{longest} tokens > max_length {max_length}", "_index": i})
            continue
        examples.append({"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids})
    return examples, too_long


def _save(examples: list[dict], out: Path) -> None:
    from datasets import Dataset

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(examples).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _stage_report(kind: str, result, examples, too_long, lengths) -> dict:
    trained = sum(sum(e["assistant_masks"]) for e in examples) if kind == "sft" else None
    total = sum(lengths)
    report = {
        "read": result.read,
        "kept": len(examples),
        "rejected": len(result.rejects),
        "too_long": len(too_long),
        "per_file": result.per_file,
        "tokens": total,
        "length": _length_stats(lengths),
    }
    if trained is not None:
        report["trained_tokens"] = trained
        report["trained_fraction"] = round(trained / total, 4) if total else 0.0
    assert report["read"] == report["kept"] + report["rejected"] + report["too_long"], report
    return report


def show_examples(examples: list[dict], tokenizer, n: int) -> None:
    """Print examples with the trained spans in [[...]], so users see what will be learned."""
    for e in examples[:n]:
        pieces, current, trained = [], [], None
        for tok, m in zip(e["input_ids"], e["assistant_masks"]):
            if trained is not None and m != trained:
                text = tokenizer.decode(current)
                pieces.append(f"[[{text}]]" if trained else text)
                current = []
            current.append(tok)
            trained = m
        if current:
            text = tokenizer.decode(current)
            pieces.append(f"[[{text}]]" if trained else text)
        print("".join(pieces).replace("\n", "\\n"))
        print("-" * 40)


def run(cfg: DictConfig) -> Path:
    """Build on rank 0 (unless a build of the same inputs is there); other ranks wait for it."""
    out = Path(cfg.run_dir) / "data"
    if runs.is_main_process():
        build(cfg, out)
    runs.wait_for_everyone()
    return out


def build(cfg: DictConfig, out: Path) -> None:
    template = resolve_template(cfg)
    inputs = cache_inputs(cfg, template)
    if runs.check_done(cfg, "data", inputs):
        return
    runs.write_stage_config(cfg, "data")
    tokenizer = build_hf_tokenizer(template)
    tokenizer.save_pretrained(Path(cfg.run_dir) / "tokenizer")
    report, rejects = {"template": template}, []
    for kind in ("sft", "dpo"):
        stage = cfg[kind]
        if not stage.data.files:
            continue
        result = sources.load_rows(list(stage.data.files), kind, on_error=cfg.data.on_error, fmt=stage.data.format)
        rows = result.rows[: stage.data.limit] if stage.data.limit else result.rows
        if kind == "sft":
            examples, too_long = build_sft(rows, template, cfg.template.train_on, stage.data.max_length)
            lengths = [len(e["input_ids"]) for e in examples]
        else:
            examples, too_long = build_dpo(rows, template, stage.data.max_length)
            lengths = [len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples]
        if stage.data.limit:
            result.read = len(rows) + len(result.rejects)  # rows past the limit were never used
        if not examples:
            raise UserError(f"{kind}: no usable rows in {list(stage.data.files)} (see the rejects above)")
        stage_report = _stage_report(kind, result, examples, too_long, lengths)
        if kind == "sft" and stage_report["trained_tokens"] == 0:
            raise UserError("sft: the dataset has zero trained tokens; check template.train_on")
        report[kind] = stage_report
        rejects += result.rejects
        rejects += [
            sources.Reject(file="", row=r["_index"], field="", reason=r["_reason"], raw=r) for r in too_long
        ]
        _save(examples, out / kind)
        log.info(
            "data/%s: read %d, kept %d, rejected %d, too long %d; %d tokens",
            kind, stage_report["read"], stage_report["kept"], stage_report["rejected"],
            stage_report["too_long"], stage_report["tokens"],
        )
        if kind == "sft" and cfg.data.show:
            show_examples(examples, tokenizer, cfg.data.show)
    sources.write_rejects(rejects, out / "rejects.jsonl")
    runs.write_json(out / "report.json", report)
    runs.finish_stage(cfg, "data", {"template": template, "report": report}, inputs)
