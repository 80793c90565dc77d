"""The `data` stage: sources -> validated rows -> cleaned, templated, tokenized, masked examples.

One build per training stage's dataset, each keyed on its own inputs: run_dir/data/<stage>/
(`sft`, `dpo`, `orpo`, `kto`) holds dataset/ (datasets.save_to_disk; chat rows carry `input_ids` and
`assistant_masks`, preference rows `prompt_ids`, `chosen_ids`, `rejected_ids`, KTO's unpaired
examples `prompt_ids`, `completion_ids`, `label`: TRL's names),
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
earlier rows (deduplicated), then rows over max_length tokens (too_long; with data.overlong=
truncate a chat is cut after its last whole assistant turn that fits, and counted as truncated).
Per stage and per source: kept + rejected + deduplicated + decontaminated + too_long = read. The
rows stream through in chunks (mistral_tune.datasets.build), tokenized on data.num_proc processes. The mixture then
takes round(weight x kept) examples of each source (weight < 1: a seeded random subset;
weight > 1: every row int(weight) times plus a seeded subset for the fraction).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import random
import shutil
import statistics
import time
from array import array
from dataclasses import asdict
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mistral_tune import runs
from mistral_tune.datasets import build as build_engine
from mistral_tune.datasets import cleaning, sources, unpaired
from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from mistral_tune.formats import tokenizer as hf_tokenizer
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.stages import DATA_LAYOUT
from mistral_tune.config import DATA_DIR, is_bundled

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
            hub[src.label] = sources.hub_fingerprint(src)
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
            "decontaminate": {str(p): _file_digest(p) for p in sources.expand_files(_decontaminate_files(cfg, kind))}
            if _decontaminate_files(cfg, kind) else {},
            "ngram": decontaminate.ngram,
            "overlong": cfg.data.overlong,
            "max_drop_fraction": cfg.data.max_drop_fraction,
        },
        # only weighted mixtures and KTO's example order (datasets/unpaired.py) are random
        "seed": cfg.seed if weighted or DATA_LAYOUT[kind] == "kto" else None,
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


def _check_row_settings(cfg: DictConfig) -> int:
    """data.overlong, data.max_drop_fraction and data.num_proc checked; the number of processes."""
    if cfg.data.overlong not in build_engine.OVERLONG:
        raise UserError(f"unknown data.overlong={cfg.data.overlong!r}; expected one of {', '.join(build_engine.OVERLONG)}")
    if not 0.0 <= cfg.data.max_drop_fraction <= 1.0:
        raise UserError(f"data.max_drop_fraction={cfg.data.max_drop_fraction} must be in [0, 1]")
    num_proc = cfg.data.num_proc or build_engine.default_num_proc()
    if num_proc < 1:
        raise UserError(f"data.num_proc={cfg.data.num_proc} must be at least 1 (or null: the cores available)")
    return num_proc


def build_stage(cfg: DictConfig, kind: str, fmt: ChatFormat, decontaminator: cleaning.Decontaminator,
                dataset_dir: Path, rejects_path: Path) -> tuple[dict, list[int]]:
    """(report, example lengths) of one stage's dataset, every row read accounted for. The rows
    stream through (datasets.build): the dataset is written to dataset_dir and every row not used
    to rejects_path as they go, both put in place only when the whole build succeeded."""
    stage = cfg[kind].data
    layout = DATA_LAYOUT[kind]
    num_proc = _check_row_settings(cfg)
    truncating = cfg.data.overlong == "truncate" and layout == "sft"
    dedup = cleaning.Deduplicator(cfg.data.dedup, cfg.data.near_dup_threshold)
    encoder = build_engine.Encoder(fmt, layout, cfg.template.train_on, stage.max_length, cfg.data.overlong)

    def clean(row: dict, origin: tuple) -> tuple[str, str] | None:
        file, row_no, word = origin
        text = cleaning.row_text(row, layout)
        reason = decontaminator.check(text)
        if reason is not None:
            return reason, "decontaminated"
        reason = dedup.check(text, f"{file}, {word} {row_no}")
        return None if reason is None else (reason, "deduplicated")

    rejects_path.parent.mkdir(parents=True, exist_ok=True)
    parts_dir = dataset_dir.with_name(dataset_dir.name + ".parts")
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    rejects_tmp = rejects_path.with_name(rejects_path.name + ".tmp")
    budget, finished, per_file = stage.limit, [], {}
    with open(rejects_tmp, "w", encoding="utf-8") as rejects_file:
        reject = lambda r: rejects_file.write(sources.reject_line(r))  # noqa: E731
        done = build_engine.take_encoded(cfg.data.on_error, fmt.template, stage.max_length, reject)
        with build_engine.Tokenizers(encoder, num_proc, done) as tokenizers:
            for index, src in enumerate(stage_sources(cfg, kind)):
                counts = dict.fromkeys(COUNTS, 0) | ({"truncated": 0} if truncating else {})
                run = build_engine.SourceRun(counts, build_engine.ArrowPart(parts_dir / f"{index}.arrow", encoder.schema),
                                             {name: array("q") for name in build_engine.stat_names(layout)})
                rows = sources.iter_source(src, layout, cfg.data.on_error, stage.format, per_file)
                taken = build_engine.stream_source(rows, run, tokenizers, clean, reject, budget)
                budget = None if budget is None else budget - taken
                finished.append((index, src, run))

    per_source, pieces, stats = {}, [], {name: [] for name in build_engine.stat_names(layout)}
    for index, src, run in finished:
        kept = run.counts["kept"]
        chosen = mix(list(range(kept)), src.weight, random.Random(f"{cfg.seed}:{kind}:{index}:{src.label}"))
        if chosen:
            pieces.append((run.part.path, chosen, kept))
            for name, values in run.stats.items():
                stats[name] += [values[i] for i in chosen]
        label = src.label if src.label not in per_source else f"{src.label} #{index + 1}"
        per_source[label] = {**run.counts, "weight": src.weight, "examples": len(chosen)}
    if not pieces:
        shutil.rmtree(parts_dir, ignore_errors=True)
        raise UserError(f"{kind}: no usable rows in {[s.label for s in stage_sources(cfg, kind)]} "
                        f"(see the rejects above, or the report's counts)")
    report = {k: sum(c[k] for c in per_source.values()) for k in COUNTS}
    if truncating:
        report["truncated"] = sum(c["truncated"] for c in per_source.values())
    report.update(examples=len(stats["length"]), per_source=per_source, per_file=per_file)
    report.update(_token_stats(layout, stats))
    for counts in [report, *per_source.values()]:
        assert counts["read"] == sum(counts[k] for k in COUNTS[1:]), counts  # nothing dropped silently
    _check_drops(cfg, kind, report)
    build_engine.save_dataset(pieces, dataset_dir)
    shutil.rmtree(parts_dir, ignore_errors=True)
    if layout == "kto":  # each pair -> a desirable and an undesirable example, counted
        report.update(unpaired.unpair(dataset_dir, cfg.seed))
    rejects_tmp.replace(rejects_path)
    return report, stats["length"]


def _check_drops(cfg: DictConfig, kind: str, report: dict) -> None:
    """A dataset that loses more than data.max_drop_fraction of its rows to max_length stops the
    build: training on 3 of 30 rows because the rest were silently too long is the failure."""
    dropped, read, limit = report["too_long"], report["read"], cfg.data.max_drop_fraction
    if read and dropped / read > limit:
        fix = (f"raise {kind}.data.max_length (now {cfg[kind].data.max_length}), "
               + ("set data.overlong=truncate, " if cfg.data.overlong == "drop" and DATA_LAYOUT[kind] == "sft" else "")
               + f"or accept it with data.max_drop_fraction={math.ceil(100 * dropped / read) / 100:.2f}")
        log.warning("data/%s: %d of %d rows (%.1f%%) are longer than max_length %d tokens and were dropped; %s",
                    kind, dropped, read, 100 * dropped / read, cfg[kind].data.max_length, fix)
        raise UserError(f"{kind}: {dropped} of {read} rows are too long (more than data.max_drop_fraction="
                        f"{limit}); {fix}")


def _token_stats(kind: str, stats: dict[str, list[int]]) -> dict:
    """Token counts and length statistics from per-example numbers (datasets.build.stat_names)."""
    lengths = stats["length"]
    if kind == "sft":
        total = sum(lengths)
        trained = sum(stats["trained"])
        out = {"tokens": total, "length": _length_stats(lengths), "trained_tokens": trained}
    elif kind == "kto":
        # One example per side present (a pair gives two): prompt + its completion, the completion trained.
        prompt, chosen, rejected = stats["prompt"], stats["chosen"], stats["rejected"]
        sides = [(c > 0) + (r > 0) for c, r in zip(chosen, rejected)]
        trained = sum(chosen) + sum(rejected)
        total = sum(p * n for p, n in zip(prompt, sides)) + trained
        out = {"tokens": total, "length": _length_stats(lengths), "trained_tokens": trained,
               "prompt_length": _length_stats(prompt),
               "desirable_length": _length_stats([c for c in chosen if c]),
               "undesirable_length": _length_stats([r for r in rejected if r])}
    else:
        # DPO trains on the completions: chosen and rejected, each after the shared prompt.
        # `tokens` counts prompt + chosen (one sequence per pair), `pair_tokens` all three.
        prompt, chosen, rejected = stats["prompt"], stats["chosen"], stats["rejected"]
        total = sum(prompt) + sum(chosen) + sum(rejected)
        trained = sum(chosen) + sum(rejected)
        out = {
            "tokens": sum(prompt) + sum(chosen),
            "pair_tokens": total, "length": _length_stats(lengths), "trained_tokens": trained,
            "prompt_length": _length_stats(prompt),
            "chosen_length": _length_stats(chosen),
            "rejected_length": _length_stats(rejected),
        }
    out["trained_fraction"] = round(trained / total, 4) if total else 0.0
    return out


def write_histogram(kind: str, lengths: list[int], max_length: int, path: Path) -> None:
    """Examples per token length, with the max_length cut-off."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(lengths, bins=min(50, max(1, len(set(lengths)))), color="#4c72b0")
    ax.axvline(max_length, color="#c44e52", linestyle="--", label=f"max_length {max_length}")
    what = "input_ids" if DATA_LAYOUT[kind] == "sft" else "prompt + longer completion"
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


def show_unpaired(examples: list[dict], tokenizer, n: int) -> None:
    """Print KTO examples: the prompt, then the completion (all of it trained) in [[...]] with its label."""
    for e in examples[:n]:
        print("prompt:     " + tokenizer.decode(e["prompt_ids"]).replace("\n", "\\n"))
        print(f"{'desirable' if e['label'] else 'undesirable':<11} [[" +
              tokenizer.decode(e["completion_ids"]).replace("\n", "\\n") + "]]")
        print("-" * 40)


def show_built(run_dir: RunDir, kind: str, n: int) -> None:
    """`data.show=N`: the first N examples of the built dataset on disk, as the trainer reads them."""
    from datasets import load_from_disk

    dataset = load_from_disk(str(run_dir.dataset(kind)))
    examples = [dataset[i] for i in range(min(n, len(dataset)))]
    print(f"data/{kind}: the first {len(examples)} of {len(dataset)} examples (trained tokens in [[...]])")
    show = {"sft": show_examples, "dpo": show_pairs, "kto": show_unpaired}[DATA_LAYOUT[kind]]
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
    is there; other ranks wait for it (other machines of a multi-node job: wait_built)."""
    from mistral_tune.launch import machine_rank

    if machine_rank(cfg) > 0:
        return wait_built(cfg, kind)
    if runs.is_main_process():
        build(cfg, kind)
    runs.wait_for_everyone()
    return runs.require_manifest(cfg, runs.data_stage(kind), kind)


def wait_built(cfg: DictConfig, kind: str, poll_s: float = 2.0) -> dict:
    """Machine rank > 0: wait (launcher.timeout_s at most) until machine rank 0 has built `kind`'s
    dataset from these same inputs: a manifest with this config's fingerprint, not just any
    manifest (an older build in a shared run_dir would otherwise be read while rank 0 rebuilds)."""
    run_dir, stage = RunDir.of(cfg), runs.data_stage(kind)
    timeout = float(cfg.launcher.timeout_s)
    deadline, reason, announced = time.monotonic() + timeout, "", False
    while True:
        try:
            inputs = cache_inputs(cfg, kind, ChatFormat.resolve(cfg))
            inputs["eval_split"] = {"fraction": cfg.eval.split_fraction, "max_samples": cfg.eval.max_samples,
                                    "seed": cfg.seed}
            manifest = runs.read_manifest(cfg, stage)
            if manifest and manifest.get("fingerprint") == runs.stage_key(cfg, stage, inputs):
                log.info("data/%s: machine rank %d reads machine rank 0's build", kind, cfg.launcher.machine_rank)
                return manifest
            reason = "a build from other inputs is there" if manifest else "no build yet"
        except (UserError, OSError, ValueError) as err:  # its inputs not written yet (e.g. pairs.jsonl)
            reason = str(err).splitlines()[0]
        if time.monotonic() > deadline:
            raise UserError(f"machine rank {cfg.launcher.machine_rank}: {run_dir.data(kind)} was not built by machine "
                            f"rank 0 within launcher.timeout_s={timeout:g}s ({reason})",
                            hint="is machine rank 0 running the same command and config, on the same (shared) run_dir?")
        if not announced:
            log.info("data/%s: machine rank %d waiting for machine rank 0 to build it (up to %gs)",
                     kind, cfg.launcher.machine_rank, timeout)
            announced = True
        time.sleep(poll_s)


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

    fraction = cfg.eval.split_fraction
    if not 0 <= fraction < 1:
        raise UserError(f"eval.split_fraction={fraction} must be in [0, 1)")
    if fraction == 0 or is_bundled(cfg, kind):
        return [], []
    layout = DATA_LAYOUT[kind]
    if layout == "kto":  # eval reads held-out chats and pairs; unpaired rows would train nothing and measure nothing
        log.info("data/%s: no eval split of KTO rows (give eval.files=[...] / eval.pref_files=[...])", kind)
        return [], []

    def prompts_and_rows():  # streamed twice: a 200k-row dataset is never held in memory
        for src in stage_sources(cfg, kind):
            for item in sources.iter_source(src, layout, "skip", cfg[kind].data.format, {}):
                if not isinstance(item, sources.Reject):
                    prompt = _prompt_text(item[0], layout)
                    yield hashlib.blake2b(prompt.encode(), digest_size=16).digest(), prompt, item[0]

    position: dict[bytes, int] = {}  # each distinct prompt's place in reading order
    for key, _, _ in prompts_and_rows():
        position.setdefault(key, len(position))
    n = min(round(fraction * len(position)), cfg.eval.max_samples)
    if n < MIN_HELD_OUT:
        log.info("data/%s: %d prompts: %s of them is under %d rows, none held out for eval "
                 "(give eval.files=[...] for an evaluation)", kind, len(position), fraction, MIN_HELD_OUT)
        return [], []
    held = sorted(random.Random(f"{cfg.seed}:eval:{kind}").sample(range(len(position)), n))
    wanted, first = set(held), {}  # place -> (prompt, its first row)
    for key, prompt, row in prompts_and_rows():
        if position[key] in wanted and position[key] not in first:
            first[position[key]] = (prompt, row)
    return [first[i][1] for i in held], [first[i][0] for i in held]


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
    decontaminator = cleaning.Decontaminator(_decontaminate_files(cfg, kind), cfg.data.decontaminate.ngram)
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
    stage_report, lengths = build_stage(cfg, kind, fmt, decontaminator, run_dir.dataset(kind), out / "rejects.jsonl")
    if DATA_LAYOUT[kind] == "sft" and stage_report["trained_tokens"] == 0:
        raise UserError(f"{kind}: the dataset has zero trained tokens; check template.train_on")
    report.update(stage_report)
    r = stage_report
    extra = "".join(
        f", {name} {r[key]}" for key, name in (("deduplicated", "duplicates"), ("decontaminated", "contaminated"))
        if r[key] or (key == "deduplicated" and cfg.data.dedup != "none")
        or (key == "decontaminated" and decontaminator.files)
    )
    mixed = f"; {r['examples']} examples after weights" if r["examples"] != r["kept"] else ""
    truncated = f" (truncated {r['truncated']})" if "truncated" in r else ""
    log.info("data/%s: read %d, kept %d%s, rejected %d%s, too long %d%s; %d tokens",
             kind, r["read"], r["kept"], truncated, r["rejected"], extra, r["too_long"], mixed, r["tokens"])
    if "pairs_split" in r:
        log.info("data/%s: %d desirable and %d undesirable examples (%d pairs split into one of each)",
                 kind, r["desirable"], r["undesirable"], r["pairs_split"])
    if held_rows:
        log.info("data/%s: %d rows held out for eval (eval.split_fraction %s) in %s; training rows sharing "
                 "their prompts dropped", kind, len(held_rows), cfg.eval.split_fraction, eval_path)
    write_histogram(kind, lengths, cfg[kind].data.max_length, out / HISTOGRAM)
    report["histogram"] = HISTOGRAM
    runs.write_json(out / "report.json", report)
    runs.finish_stage(cfg, stage, {"format": asdict(fmt), "report": report}, inputs)
    if cfg.data.show:
        show_built(run_dir, kind, cfg.data.show)


BUNDLED_EVAL = {"sft": "eval_sft.jsonl", "dpo": "eval_dpo.jsonl"}  # data/: held out from the bundled sets
# The held-out file of each bundled training file that has its own (the calculator tool task).
BUNDLED_EVAL_OF = {"tools_sft.jsonl": "eval_tools.jsonl"}


# The bundled training files whose rows are checked against the bundled held-out files' prompts.
# data/make_data.py draws the held-out questions from a part of the question space the training
# files never use (tasks.held_out), so none should match; the build counts it (`decontaminated`).
# (The calculator tool files predate that split and are left as they were.)
HELD_OUT_OF = ("sft.jsonl", "dpo.jsonl")


def _decontaminate_files(cfg: DictConfig, kind: str) -> list[str]:
    """data.decontaminate.files, plus the bundled held-out files when `kind` trains on the bundled
    chats or pairs (on-policy pairs from the bundled prompts too)."""
    files = list(cfg.data.decontaminate.files)
    names = {Path(f).name for f in cfg[kind].data.files or []}
    onpolicy = kind == "dpo" and cfg.pairs.name == "onpolicy" and not cfg.pairs.prompts_files
    if is_bundled(cfg, kind) and (onpolicy or names <= set(HELD_OUT_OF)):
        files += [str(DATA_DIR / name) for name in BUNDLED_EVAL.values()]
    return files


def eval_files(cfg: DictConfig, layout: str) -> tuple[list[str], str]:
    """(held-out files, what they are) of a layout: `eval.files` / `eval.pref_files` when given;
    null: the bundled held-out file when the first stage of that layout trains on the bundled
    data, else that stage's held-out split of the user's rows (data/<stage>/eval.jsonl)."""
    given = cfg.eval.files if layout == "sft" else cfg.eval.pref_files
    if given is not None:
        return list(given), "given"
    # KTO's bundled data is the bundled pairs, so it is evaluated on their held-out pairs
    stage = next((s for s in cfg.stages if has_data(cfg, s) and (DATA_LAYOUT[s] == layout or (
        layout == "dpo" and DATA_LAYOUT[s] == "kto" and is_bundled(cfg, s)))), None)
    if stage is None and layout == "sft":
        # no SFT stage (stages=[orpo], [kto], [dpo]): a preference stage on the bundled pairs is
        # scored on the bundled held-out chats, the same tasks (task score, preferred_rate)
        bundled = [s for s in cfg.stages if has_data(cfg, s) and DATA_LAYOUT[s] != "sft" and is_bundled(cfg, s)
                   and {Path(f).name for f in cfg[s].data.files or []} <= set(HELD_OUT_OF)]
        if bundled:
            return [str(DATA_DIR / BUNDLED_EVAL["sft"])], "bundled"
    if stage is None:
        return [], "none"
    if is_bundled(cfg, stage):
        names = [Path(f).name for f in cfg[stage].data.files or []]
        evals = [BUNDLED_EVAL_OF.get(name, BUNDLED_EVAL[layout]) for name in names] or [BUNDLED_EVAL[layout]]
        return [str(DATA_DIR / name) for name in dict.fromkeys(evals)], "bundled"
    held = RunDir.of(cfg).data(stage) / EVAL_ROWS
    return ([str(held)], "held_out") if held.exists() else ([], "none")


def has_eval_data(cfg: DictConfig) -> bool:
    return any(eval_files(cfg, layout)[0] for layout in ("sft", "dpo"))
