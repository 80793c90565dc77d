"""The `data` stage: sources -> validated rows -> cleaned, templated, tokenized, masked examples.

One build per training stage's dataset, each keyed on its own inputs: run_dir/data/<stage>/
(`sft`, `dpo`, `orpo`) holds dataset/ (datasets.save_to_disk; chat rows carry `input_ids` and
`assistant_masks`, preference rows `prompt_ids`, `chosen_ids`, `rejected_ids`, TRL's names),
report.json that accounts for every input row, rejects.jsonl (every row not used, with its
reason), length_histogram.png, config.yaml and manifest.json. Giving one stage new data rebuilds
that stage's data alone. The first build fixes the run's chat format (run_dir/data/format.json)
and writes run_dir/tokenizer; later builds must agree with it.

The CLI builds what a command needs before the command runs (`ensure`); the `data` command
builds the data of every stage in `stages=[...]` that has data configured.

The user's own data (not the bundled files) loses a seeded `eval.split_fraction` of its prompts
to data/<stage>/eval.jsonl (ordinary rows, read by eval); training rows starting with a held-out
prompt, or sharing an n-gram with a long one, count as decontaminated (`split_eval`, `HeldOut`).

Per dataset, in order: each source is read and validated (rejected), rows past `limit` are not
read, rows overlapping evaluation prompts are dropped (decontaminated), then duplicates of
earlier rows (deduplicated), then rows over max_length tokens (too_long). Per stage and per
source: kept + rejected + deduplicated + decontaminated + too_long = read. The mixture then
takes round(weight x kept) examples of each source (weight < 1: a seeded random subset;
weight > 1: every row int(weight) times plus a seeded subset for the fraction).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import random
import shutil
import statistics
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mistral_tune import runs
from mistral_tune.datasets import cleaning, sources
from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from mistral_tune.formats import tokenizer as hf_tokenizer
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.stages import DATA_LAYOUT

log = logging.getLogger("mistral_tune")

COUNTS = ("read", "kept", "rejected", "deduplicated", "decontaminated", "too_long")
HISTOGRAM = "length_histogram.png"
EVAL_ROWS = "eval.jsonl"  # the held-out split of the user's own rows (split_eval), read by eval
MIN_HELD_OUT = 5  # fewer held-out rows measure nothing and cost a small dataset its rows: no split


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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


def cache_inputs(cfg: DictConfig, kind: str, fmt: ChatFormat) -> dict:
    """What the built data depends on, by content: data file bytes (Hub datasets: their datasets
    fingerprint), the tokenizer file, the template and Jinja code, and the cleaning settings. A
    changed tokenizer or template can never reuse a stale build (a Mistral run once reused
    another tokenizer's cache and trained at loss ~10)."""
    files, hub, weighted = {}, {}, False
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
        "format": asdict(fmt),
        "tokenizer": _file_digest(fmt.tokenizer_file()),
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


def encode_row(row: dict, layout: str, fmt: ChatFormat, train_on: str) -> dict:
    if layout == "sft":
        enc = fmt.encode_chat(row["messages"], train_on=train_on)
        return {"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}
    prompt_ids, chosen_ids, rejected_ids = fmt.encode_preference(row["prompt"], row["chosen"], row["rejected"])
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


def build_stage(cfg: DictConfig, kind: str, fmt: ChatFormat,
                decontaminator: cleaning.Decontaminator) -> tuple[list[dict], dict, list]:
    """(examples, report, rejects) of one stage's dataset, every row read accounted for."""
    stage = cfg[kind].data
    layout = DATA_LAYOUT[kind]
    dedup = cleaning.Deduplicator(cfg.data.dedup, cfg.data.near_dup_threshold)
    budget = stage.limit
    examples, rejects, per_source, per_file = [], [], {}, {}
    for index, src in enumerate(stage_sources(cfg, kind)):
        result = sources.load_source(src, layout, on_error=cfg.data.on_error, fmt=stage.format)
        rows = list(zip(result.rows, result.origins))
        if budget is not None:  # rows past the limit are never used, so not counted as read
            rows, budget = rows[:budget], max(0, budget - len(rows))
        counts = dict.fromkeys(COUNTS, 0)
        counts.update(read=len(rows) + len(result.rejects), rejected=len(result.rejects))
        rejects += result.rejects
        pool = []
        for row, (file, row_no, word) in rows:
            text = cleaning.row_text(row, layout)
            reason = decontaminator.check(text)
            counter = "decontaminated"
            if reason is None:
                reason, counter = dedup.check(text, f"{file}, {word} {row_no}"), "deduplicated"
            if reason is None:
                try:
                    example = encode_row(row, layout, fmt, cfg.template.train_on)
                except ValueError as err:  # a row that validation let through but the format cannot hold
                    if cfg.data.on_error == "raise":
                        raise UserError(f"{file}, {word} {row_no}: cannot encode with {fmt.template}: {err}",
                                        hint=sources.SKIP_HINT) from None
                    counts["rejected"] += 1
                    rejects.append(sources.Reject(file, row_no, "<row>", f"cannot encode with {fmt.template}: {err}", row))
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
    report.update(_token_stats(layout, examples))
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


def write_histogram(kind: str, lengths: list[int], max_length: int, path: Path) -> None:
    """Examples per token length, with the max_length cut-off."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(lengths, bins=min(50, max(1, len(set(lengths)))), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    what = "prompt + longer completion" if DATA_LAYOUT[kind] == "dpo" else "input_ids"
    ax.set(title=f"{kind}: {len(lengths)} examples", xlabel=f"tokens ({what})", ylabel="examples")
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


def show_pairs(examples: list[dict], tokenizer, n: int) -> None:
    """Print preference pairs: the prompt, then each completion (all of it trained) in [[...]]."""
    for e in examples[:n]:
        print("prompt:   " + tokenizer.decode(e["prompt_ids"]).replace("\n", "\\n"))
        print("chosen:   [[" + tokenizer.decode(e["chosen_ids"]).replace("\n", "\\n") + "]]")
        print("rejected: [[" + tokenizer.decode(e["rejected_ids"]).replace("\n", "\\n") + "]]")
        print("-" * 40)


def show_built(run_dir: RunDir, kind: str, n: int) -> None:
    """`data.show=N`: the first N examples of the built dataset on disk, as the trainer reads them."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(run_dir.dataset(kind)))
    examples = [dataset[i] for i in range(min(n, len(dataset)))]
    print(f"data/{kind}: the first {len(examples)} of {len(dataset)} examples (trained tokens in [[...]])")
    show = show_examples if DATA_LAYOUT[kind] == "sft" else show_pairs
    show(examples, load_tokenizer(run_dir.tokenizer), n)


def has_data(cfg: DictConfig, kind: str) -> bool:
    return bool(cfg[kind].data.files or cfg[kind].data.sources)


def run(cfg: DictConfig) -> Path:
    """`mistral-tune data`: the datasets of every stage in `stages=[...]` that has data configured."""
    kinds = [k for k in cfg.stages if has_data(cfg, k)]
    if not kinds:
        raise UserError(f"data: none of stages={list(cfg.stages)} has data files or sources configured")
    for kind in kinds:
        ensure(cfg, kind)
    return RunDir.of(cfg).data_root


def ensure(cfg: DictConfig, kind: str) -> dict:
    """The manifest of `kind`'s dataset, built first on rank 0 unless a build of the same inputs
    is there; other ranks wait for it."""
    if runs.is_main_process():
        build(cfg, kind)
    runs.wait_for_everyone()
    return runs.require_manifest(cfg, runs.data_stage(kind), kind)


def fix_chat_format(cfg: DictConfig, run_dir: RunDir) -> ChatFormat:
    """The run's chat format: written by the first build with run_dir/tokenizer, and every later
    build must resolve to the same one (one run_dir, one format: its models share a tokenizer)."""
    fmt = ChatFormat.resolve(cfg)
    fixed = ChatFormat.load(run_dir, "data") if run_dir.chat_format.exists() else None
    if fixed not in (None, fmt) and not cfg.force:
        raise UserError(f"{run_dir.root} was built with template {fixed.template} ({fixed.vocab} vocabulary), "
                        f"this config resolves to {fmt.template} ({fmt.vocab})",
                        hint="use a new run_dir=..., or force=true to rebuild in place")
    if fixed != fmt or not (run_dir.tokenizer / "tokenizer_config.json").exists():
        fmt.hf_tokenizer().save_pretrained(run_dir.tokenizer)
        fmt.save(run_dir)
    return fmt


class HeldOut:
    """The stage's decontaminator, plus the prompts held out for evaluation: a training row that
    starts with a held-out prompt (the held-out row itself, another reply to it) or shares an
    n-gram with a long one is dropped and counted as decontaminated. No held-out prompt trains."""

    def __init__(self, base: cleaning.Decontaminator, prompts: list[str], where: str):
        self.base, self.where, self.prefixes = base, where, prompts
        self.extra = cleaning.Decontaminator([], base.n)
        for prompt in prompts:
            if len(cleaning.words(prompt)) >= base.n:  # short prompts are matched by prefix only
                self.extra.add_prompt(prompt, where)

    def check(self, text: str) -> str | None:
        for prompt in self.prefixes:
            if text == prompt or text.startswith(prompt + "\n"):
                return f"its prompt is held out for evaluation ({self.where})"
        reason = self.extra.check(text)
        return f"{reason} (held out for evaluation)" if reason else self.base.check(text)

    def __getattr__(self, name):  # files, prompts, n: the configured decontamination's
        return getattr(self.base, name)


def _prompt_text(row: dict, layout: str) -> str:
    """The prompt of a row as `cleaning.row_text` renders it: a chat up to its first user turn,
    a pair's prompt messages."""
    if layout == "sft":
        messages = row["messages"]
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0)
        return cleaning.row_text({"messages": messages[:first_user + 1]}, "sft")
    return cleaning.row_text({"messages": row["prompt"]}, "sft")


def split_eval(cfg: DictConfig, kind: str) -> tuple[list[dict], list[str]]:
    """(held-out rows, their prompts): a seeded eval.split_fraction of the distinct prompts of the
    user's own rows (one row each, at most eval.max_samples); none for the bundled data, which
    ships its own held-out files. The rows are read here, before `build_stage` reads them again
    for training, so the split does not depend on how that loop reads or filters."""
    from mistral_tune.config import is_bundled

    fraction = cfg.eval.split_fraction
    if not 0 <= fraction < 1:
        raise UserError(f"eval.split_fraction={fraction} must be in [0, 1)")
    if fraction == 0 or is_bundled(cfg, kind):
        return [], []
    layout = DATA_LAYOUT[kind]
    first: dict[str, dict] = {}  # prompt -> its first row, in reading order
    for src in stage_sources(cfg, kind):
        for row in sources.load_source(src, layout, on_error="skip", fmt=cfg[kind].data.format).rows:
            first.setdefault(_prompt_text(row, layout), row)
    prompts = list(first)
    n = min(round(fraction * len(prompts)), cfg.eval.max_samples)
    if n < MIN_HELD_OUT:
        log.info("data/%s: %d prompts: %s of them is under %d rows, none held out for eval "
                 "(give eval.files=[...] for an evaluation)", kind, len(prompts), fraction, MIN_HELD_OUT)
        return [], []
    held = sorted(random.Random(f"{cfg.seed}:eval:{kind}").sample(range(len(prompts)), n))
    return [first[prompts[i]] for i in held], [prompts[i] for i in held]


def build(cfg: DictConfig, kind: str) -> None:
    if kind not in DATA_LAYOUT:
        raise UserError(f"no data for stage {kind!r}; training stages: {', '.join(DATA_LAYOUT)}")
    if not has_data(cfg, kind):
        raise UserError(f"{kind} needs training rows: {kind}.data.files and {kind}.data.sources are empty",
                        hint=f"set {kind}.data.files=[your.jsonl]")
    run_dir = RunDir.of(cfg)
    fmt = fix_chat_format(cfg, run_dir)
    stage, out = runs.data_stage(kind), run_dir.data(kind)
    inputs = cache_inputs(cfg, kind, fmt)
    inputs["eval_split"] = {"fraction": cfg.eval.split_fraction, "max_samples": cfg.eval.max_samples,
                            "seed": cfg.seed}
    if runs.check_done(cfg, stage, inputs):
        if cfg.data.show:  # a finished build is shown as it is, never rebuilt for it
            show_built(run_dir, kind, cfg.data.show)
        return
    runs.write_stage_config(cfg, stage)
    decontaminator = cleaning.Decontaminator(list(cfg.data.decontaminate.files), cfg.data.decontaminate.ngram)
    held_rows, held_prompts = split_eval(cfg, kind)
    eval_path = out / EVAL_ROWS
    eval_path.unlink(missing_ok=True)
    report = {"template": fmt.template, "vocab": fmt.vocab}
    if held_rows:
        decontaminator = HeldOut(decontaminator, held_prompts, f"{kind}/{EVAL_ROWS}")
        runs.atomic_write_text(eval_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held_rows))
        report["held_out"] = {"rows": len(held_rows), "file": EVAL_ROWS, "fraction": cfg.eval.split_fraction,
                              "note": "held-out rows and training rows sharing their prompts are counted "
                                      "as decontaminated"}
    if decontaminator.files:
        report["decontaminate"] = {"files": decontaminator.files, "prompts": decontaminator.prompts,
                                   "ngram": decontaminator.n}
    examples, stage_report, rejects = build_stage(cfg, kind, fmt, decontaminator)
    if DATA_LAYOUT[kind] == "sft" and stage_report["trained_tokens"] == 0:
        raise UserError(f"{kind}: the dataset has zero trained tokens; check template.train_on")
    report.update(stage_report)
    _save(examples, run_dir.dataset(kind))
    r = stage_report
    extra = "".join(
        f", {name} {r[key]}" for key, name in (("deduplicated", "duplicates"), ("decontaminated", "contaminated"))
        if r[key] or (key == "deduplicated" and cfg.data.dedup != "none")
        or (key == "decontaminated" and decontaminator.files)
    )
    mixed = f"; {r['examples']} examples after weights" if r["examples"] != r["kept"] else ""
    log.info("data/%s: read %d, kept %d, rejected %d%s, too long %d%s; %d tokens",
             kind, r["read"], r["kept"], r["rejected"], extra, r["too_long"], mixed, r["tokens"])
    if held_rows:
        log.info("data/%s: %d rows held out for eval (eval.split_fraction %s) in %s; training rows sharing "
                 "their prompts dropped", kind, len(held_rows), cfg.eval.split_fraction, eval_path)
    sources.write_rejects(rejects, out / "rejects.jsonl")
    write_histogram(kind, [example_length(e) for e in examples], cfg[kind].data.max_length, out / HISTOGRAM)
    report["histogram"] = HISTOGRAM
    runs.write_json(out / "report.json", report)
    runs.finish_stage(cfg, stage, {"format": asdict(fmt), "report": report}, inputs)
    if cfg.data.show:
        show_built(run_dir, kind, cfg.data.show)
