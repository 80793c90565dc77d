"""The `data` stage: sources -> validated rows -> cleaned, templated, tokenized, masked examples.

Writes run_dir/data/{sft,dpo} (datasets.save_to_disk; SFT rows carry `input_ids` and
`assistant_masks`, preference rows `prompt_ids`, `chosen_ids`, `rejected_ids`, TRL's names),
report.json that accounts for every input row, rejects.jsonl (every row not used, with its
reason), length_histogram.png, and run_dir/tokenizer.

Per stage, in order: each source is read and validated (rejected), rows past `limit` are not
read, rows overlapping evaluation prompts are dropped (decontaminated), then duplicates of
earlier rows (deduplicated), then rows over max_length tokens (too_long). Per stage and per
source: kept + rejected + deduplicated + decontaminated + too_long = read. The mixture then
takes round(weight x kept) examples of each source (weight < 1: a seeded random subset;
weight > 1: every row int(weight) times plus a seeded subset for the fraction).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
import shutil
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mistral_tune.datasets import cleaning, sources
from mistral_tune import runs
from mistral_tune.formats import templates, tokenizer as hf_tokenizer
from mistral_tune.errors import UserError
from mistral_tune.training.modeling import resolve_template
from mistral_tune.formats.tokenizer import build_hf_tokenizer

log = logging.getLogger("mistral_tune")

COUNTS = ("read", "kept", "rejected", "deduplicated", "decontaminated", "too_long")
HISTOGRAM = "length_histogram.png"


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def template_and_vocab(cfg: DictConfig) -> tuple[str, str | None]:
    """The chat format, and for chatml/zephyr the Mistral format whose vocabulary they use
    (the model's own: mistral_v1 for v0.1, mistral_v3 for v0.3)."""
    template = resolve_template(cfg)
    if template not in templates.ALL_TEMPLATES:
        raise UserError(f"template={template!r} is not one of {', '.join(templates.ALL_TEMPLATES)}")
    vocab = cfg.model.default_template if template in templates.TEXT_TEMPLATES else None
    if vocab is not None and vocab not in templates.TEMPLATES:
        raise UserError(f"{template} needs a Mistral vocabulary: model.default_template={vocab!r} is not one of "
                        f"{', '.join(templates.TEMPLATES)}")
    return template, vocab


def stage_sources(cfg: DictConfig, kind: str) -> list[sources.Source]:
    """`<kind>.data.files` (each entry a source) or `<kind>.data.sources`, never both."""
    data = cfg[kind].data
    files, given = list(data.files or []), list(data.sources or [])
    if files and given:
        raise UserError(
            f"{kind}.data.files and {kind}.data.sources are both set (files: {files})",
            hint=f"give one: add {kind}.data.files=[] (or data=none) to use only your sources",
        )
    if files:
        return [sources.Source(path=str(f)) for f in files]
    out = [sources.Source(**OmegaConf.to_container(s, resolve=True)) for s in given]
    for src in out:
        if not src.weight >= 0:
            raise UserError(f"{kind}.data.sources: weight of {src.path!r} is {src.weight}; weights must be >= 0")
    local = [p.resolve() for src in out if not src.is_hub for p in sources.expand_files([src.path])]
    if len(local) != len(set(local)):
        raise UserError(f"{kind}.data.sources: a file is listed in two sources (to repeat rows, use weight)")
    return out


def cache_inputs(cfg: DictConfig, template: str, vocab: str | None = None) -> dict:
    """What the built data depends on, by content: data file bytes (Hub datasets: their datasets
    fingerprint), the tokenizer file, the template and Jinja code, and the cleaning settings. A
    changed tokenizer or template can never reuse a stale build (a Mistral run once reused
    another tokenizer's cache and trained at loss ~10)."""
    files, hub, weighted = {}, {}, False
    for kind in ("sft", "dpo"):
        for src in stage_sources(cfg, kind):
            weighted |= src.weight != 1.0
            if src.is_hub:
                hub[src.label] = sources.load_hub_dataset(src)._fingerprint
            else:
                for path in sources.expand_files([src.path]):
                    files[str(path)] = _file_digest(path)
    decontaminate = cfg.data.decontaminate
    code = inspect.getsource(templates) + inspect.getsource(hf_tokenizer)
    return {
        "files": files,
        "hub": hub,
        "tokenizer": _file_digest(templates.mistral_tokenizer_file(template, vocab)),
        "template_code": hashlib.sha256(code.encode()).hexdigest(),
        "cleaning": {
            "dedup": cfg.data.dedup,
            "near_dup_threshold": cfg.data.near_dup_threshold,
            "decontaminate": {str(p): _file_digest(p) for p in sources.expand_files(list(decontaminate.files))}
            if decontaminate.files else {},
            "ngram": decontaminate.ngram,
        },
        "seed": cfg.seed if weighted else None,  # only weighted mixtures are random
    }


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def encode_row(row: dict, kind: str, template: str, vocab: str | None, train_on: str) -> dict:
    by_vocab = {"vocab": vocab} if vocab else {}  # Mistral formats have their own vocabulary
    if kind == "sft":
        enc = templates.encode_chat(row["messages"], template, train_on=train_on, **by_vocab)
        return {"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}
    prompt_ids, chosen_ids, rejected_ids = templates.encode_preference(
        row["prompt"], row["chosen"], row["rejected"], template, **by_vocab
    )
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids}


def example_length(example: dict) -> int:
    if "input_ids" in example:
        return len(example["input_ids"])
    return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))


def mix(pool: list, weight: float, rng: random.Random) -> list:
    """round(weight x len(pool)) rows: every row int(weight) times, plus a seeded subset."""
    whole = int(weight)
    extra = sorted(rng.sample(range(len(pool)), round((weight - whole) * len(pool))))
    return pool * whole + [pool[i] for i in extra]


def build_stage(cfg: DictConfig, kind: str, template: str, vocab: str | None,
                decontaminator: cleaning.Decontaminator) -> tuple[list[dict], dict, list]:
    """(examples, report, rejects) of one stage, every row read accounted for."""
    stage = cfg[kind].data
    dedup = cleaning.Deduplicator(cfg.data.dedup, cfg.data.near_dup_threshold)
    budget = stage.limit
    examples, rejects, per_source, per_file = [], [], {}, {}
    for index, src in enumerate(stage_sources(cfg, kind)):
        result = sources.load_source(src, kind, on_error=cfg.data.on_error, fmt=stage.format)
        rows = list(zip(result.rows, result.origins))
        if budget is not None:  # rows past the limit are never used, so not counted as read
            rows, budget = rows[:budget], max(0, budget - len(rows))
        counts = dict.fromkeys(COUNTS, 0)
        counts.update(read=len(rows) + len(result.rejects), rejected=len(result.rejects))
        rejects += result.rejects
        pool = []
        for row, (file, row_no, word) in rows:
            text = cleaning.row_text(row, kind)
            reason = decontaminator.check(text)
            counter = "decontaminated"
            if reason is None:
                reason, counter = dedup.check(text, f"{file}, {word} {row_no}"), "deduplicated"
            if reason is None:
                try:
                    example = encode_row(row, kind, template, vocab, cfg.template.train_on)
                except ValueError as err:  # a row that validation let through but the format cannot hold
                    if cfg.data.on_error == "raise":
                        raise UserError(f"{file}, {word} {row_no}: cannot encode with {template}: {err}",
                                        hint=sources.SKIP_HINT) from None
                    counts["rejected"] += 1
                    rejects.append(sources.Reject(file, row_no, "<row>", f"cannot encode with {template}: {err}", row))
                    continue
                length = example_length(example)
                if length <= stage.max_length:
                    pool.append(example)
                    continue
                reason, counter = f"{length} tokens > max_length {stage.max_length}", "too_long"
            counts[counter] += 1
            rejects.append(sources.Reject(file=file, row=row_no, field="<row>", reason=reason, raw=row))
        counts["kept"] = len(pool)
        chosen = mix(pool, src.weight, random.Random(f"{cfg.seed}:{kind}:{index}:{src.label}"))
        examples += chosen
        label = src.label if src.label not in per_source else f"{src.label} #{index + 1}"
        per_source[label] = {**counts, "weight": src.weight, "examples": len(chosen)}
        per_file.update(result.per_file)
    if not examples:
        raise UserError(f"{kind}: no usable rows in {[s.label for s in stage_sources(cfg, kind)]} "
                        f"(see the rejects above, or the report's counts)")
    report = {k: sum(c[k] for c in per_source.values()) for k in COUNTS}
    report.update(examples=len(examples), per_source=per_source, per_file=per_file)
    report.update(_token_stats(kind, examples))
    for counts in [report, *per_source.values()]:
        assert counts["read"] == sum(counts[k] for k in COUNTS[1:]), counts  # nothing dropped silently
    return examples, report, rejects


def _token_stats(kind: str, examples: list[dict]) -> dict:
    lengths = [example_length(e) for e in examples]
    if kind == "sft":
        total = sum(lengths)
        trained = sum(sum(e["assistant_masks"]) for e in examples)
        stats = {"tokens": total, "length": _length_stats(lengths), "trained_tokens": trained}
    else:
        # DPO trains on the completions: chosen and rejected, each after the shared prompt.
        # `tokens` counts prompt + chosen (one sequence per pair), `pair_tokens` all three.
        total = sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        trained = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in examples)
        stats = {
            "tokens": sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) for e in examples),
            "pair_tokens": total, "length": _length_stats(lengths), "trained_tokens": trained,
            "prompt_length": _length_stats([len(e["prompt_ids"]) for e in examples]),
            "chosen_length": _length_stats([len(e["chosen_ids"]) for e in examples]),
            "rejected_length": _length_stats([len(e["rejected_ids"]) for e in examples]),
        }
    stats["trained_fraction"] = round(trained / total, 4) if total else 0.0
    return stats


def _save(examples: list[dict], out: Path) -> None:
    from datasets import Dataset

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(examples).save_to_disk(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def write_histogram(lengths: dict[str, list[int]], max_lengths: dict[str, int], path: Path) -> None:
    """One panel per stage: examples per token length, with the max_length cut-off."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 3.5), squeeze=False)
    for ax, (kind, values) in zip(axes[0], lengths.items()):
        ax.hist(values, bins=min(50, max(1, len(set(values)))), color="#4c72b0")
        ax.axvline(max_lengths[kind], color="#c44e52", linestyle="--", label=f"max_length {max_lengths[kind]}")
        what = "prompt + longer completion" if kind == "dpo" else "input_ids"
        ax.set(title=f"{kind}: {len(values)} examples", xlabel=f"tokens ({what})", ylabel="examples")
        ax.legend(loc="upper right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    tmp.replace(path)


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
    template, vocab = template_and_vocab(cfg)
    inputs = cache_inputs(cfg, template, vocab)
    if runs.check_done(cfg, "data", inputs):
        return
    runs.write_stage_config(cfg, "data")
    tokenizer = build_hf_tokenizer(template, vocab)
    tokenizer.save_pretrained(Path(cfg.run_dir) / "tokenizer")
    decontaminator = cleaning.Decontaminator(list(cfg.data.decontaminate.files), cfg.data.decontaminate.ngram)
    report, rejects, lengths = {"template": template, "vocab": vocab or template}, [], {}
    if decontaminator.files:
        report["decontaminate"] = {"files": decontaminator.files, "prompts": decontaminator.prompts,
                                   "ngram": decontaminator.n}
    for kind in ("sft", "dpo"):
        if not stage_sources(cfg, kind):
            continue
        examples, stage_report, stage_rejects = build_stage(cfg, kind, template, vocab, decontaminator)
        if kind == "sft" and stage_report["trained_tokens"] == 0:
            raise UserError("sft: the dataset has zero trained tokens; check template.train_on")
        report[kind] = stage_report
        rejects += stage_rejects
        lengths[kind] = [example_length(e) for e in examples]
        _save(examples, out / kind)
        r = stage_report
        extra = "".join(
            f", {name} {r[key]}" for key, name in (("deduplicated", "duplicates"), ("decontaminated", "contaminated"))
            if r[key] or (key == "deduplicated" and cfg.data.dedup != "none")
            or (key == "decontaminated" and decontaminator.files)
        )
        mixed = f"; {r['examples']} examples after weights" if r["examples"] != r["kept"] else ""
        log.info("data/%s: read %d, kept %d, rejected %d%s, too long %d%s; %d tokens",
                 kind, r["read"], r["kept"], r["rejected"], extra, r["too_long"], mixed, r["tokens"])
        if kind == "sft" and cfg.data.show:
            show_examples(examples, tokenizer, cfg.data.show)
    sources.write_rejects(rejects, out / "rejects.jsonl")
    if lengths:
        write_histogram(lengths, {k: cfg[k].data.max_length for k in lengths}, out / HISTOGRAM)
        report["histogram"] = HISTOGRAM
    runs.write_json(out / "report.json", report)
    runs.finish_stage(cfg, "data", {"template": template, "report": report}, inputs)
