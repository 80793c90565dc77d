"""The streaming engine of the data stage: rows go from a source's reader through cleaning and
tokenization into an Arrow file, a chunk at a time, so memory stays flat however many rows a
dataset has (the old build held every row and every token in Python lists: ~110 bytes a token).

Reading, validation, decontamination and deduplication run in order in this process (what counts
as a duplicate depends on the rows before it); tokenization, the costly part, runs on `num_proc`
processes, CHUNK rows per task, and the results are taken back in submission order, so the
output is the same for any num_proc, row order included. At most 2 x num_proc + 1 chunks are in
flight: a fast reader never queues the whole dataset in memory.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa

from mistral_tune.datasets.sources import SKIP_HINT, Reject
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat

CHUNK = 256  # rows per tokenization task
# Every VERIFY_EVERY-th row (and the first of each role sequence a process sees) is also encoded
# by mistral-common's own encode_instruct and compared id for id: the per-message encoding can only
# drift from it when mistral-common's message loop changes, which the sample catches at once,
# and skipping the second encoding of every row halves the tokenization time.
VERIFY_EVERY = 64
OVERLONG = ("drop", "truncate")

SFT_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("assistant_masks", pa.list_(pa.int8()))])
DPO_SCHEMA = pa.schema([(name, pa.list_(pa.int32())) for name in ("prompt_ids", "chosen_ids", "rejected_ids")])


def default_num_proc() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Encoder:
    """Encodes chunks of normalised rows; the same object runs in this process or in a worker."""

    fmt: ChatFormat
    layout: str  # "sft", "dpo" or "kto"
    train_on: str
    max_length: int
    overlong: str = "drop"

    def __call__(self, rows: list[dict], first: int) -> tuple[list[tuple], pa.Table]:
        """(outcome per row, table of the kept rows). Outcomes: ("ok", length, truncated, *stats),
        ("long", length) or ("error", message); rows are numbered from `first` in the build."""
        outcomes, columns = [], {name: [] for name in self.schema.names}
        for position, row in enumerate(rows, first):
            verify = position % VERIFY_EVERY == 0 or _first_of_shape(row, self.layout)
            try:
                outcome, example = self.encode(row, verify)
            except ValueError as err:  # a row that validation let through but the format cannot hold
                outcomes.append(("error", str(err)))
                continue
            outcomes.append(outcome)
            if example is not None:
                for name in columns:
                    columns[name].append(example[name])
        return outcomes, pa.Table.from_pydict(columns, schema=self.schema)

    @property
    def schema(self) -> pa.Schema:
        return SFT_SCHEMA if self.layout == "sft" else DPO_SCHEMA

    def encode(self, row: dict, verify: bool = True) -> tuple[tuple, dict | None]:
        if self.layout in ("dpo", "kto"):
            # Pairs are never truncated: cutting the prompt changes what the preference was
            # judged on, and cutting a completion drops its EOS. An over-long pair is dropped.
            # A KTO row is a pair or one side of one: the missing side is stored empty (the data
            # stage then makes each side one example, datasets/unpaired.py).
            sides = (row["chosen"], row["rejected"])
            given = next(reply for reply in sides if reply is not None)
            prompt, chosen, rejected = self.fmt.encode_preference(
                row["prompt"], *(given if reply is None else reply for reply in sides), verify=verify)
            chosen, rejected = ([] if reply is None else ids for ids, reply in zip((chosen, rejected), sides))
            length = len(prompt) + max(len(chosen), len(rejected))
            if length > self.max_length:
                return ("long", length), None
            example = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
            return ("ok", length, False, len(prompt), len(chosen), len(rejected)), example
        enc = self.fmt.encode_chat(row["messages"], train_on=self.train_on, verify=verify)
        truncated = False
        if len(enc.input_ids) > self.max_length:
            shorter = self.truncate(row["messages"], verify) if self.overlong == "truncate" else None
            if shorter is None:
                return ("long", len(enc.input_ids)), None
            enc, truncated = shorter, True
        example = {"input_ids": enc.input_ids, "assistant_masks": enc.assistant_masks}
        return ("ok", len(enc.input_ids), truncated, sum(enc.assistant_masks)), example

    def truncate(self, messages: list[dict], verify: bool):
        """The encoding of the longest prefix of `messages` that ends with an assistant turn (its
        EOS included) and fits max_length, or None when even the first assistant turn does not.
        Each prefix is encoded as a conversation of its own (v3 moves the system prompt to the
        last user turn, so a prefix is not a token prefix of the whole); lengths grow with the
        number of turns, so a binary search finds it."""
        # a reply, not a tool call whose results would be cut off
        ends = [i + 1 for i, m in enumerate(messages[:-1]) if m["role"] == "assistant" and not m.get("tool_calls")]
        best, lo, hi = None, 0, len(ends) - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            enc = self.fmt.encode_chat(messages[:ends[mid]], train_on=self.train_on, verify=verify)
            if len(enc.input_ids) <= self.max_length:
                best, lo = enc, mid + 1
            else:
                hi = mid - 1
        return best


_SHAPES: set[tuple] = set()  # role sequences this process has verified


def _first_of_shape(row: dict, layout: str) -> bool:
    messages = row["messages"] if layout == "sft" else row["prompt"]
    shape = (layout, *(m["role"] for m in messages))
    if shape in _SHAPES:
        return False
    _SHAPES.add(shape)
    return True


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _encode_in_worker(rows: list[dict], first: int):
    return _WORKER(rows, first)


class Tokenizers:
    """Runs an Encoder over chunks on `num_proc` processes (1: in this process), results in order.

    submit(rows, context) queues a chunk; each finished chunk, in submission order, is passed to
    `done(outcomes, table, rows, context)` as soon as it is its turn."""

    def __init__(self, encoder: Encoder, num_proc: int, done: Callable):
        self.encoder, self.num_proc, self.done = encoder, num_proc, done
        self.pending: deque = deque()
        self.position = 0
        self.pool = None
        if num_proc > 1:
            # fork: workers inherit the loaded tokenizers instead of importing everything again
            self.pool = multiprocessing.get_context("fork").Pool(num_proc, _init_worker, (encoder,))

    def submit(self, rows: list[dict], context) -> None:
        first, self.position = self.position, self.position + len(rows)
        if self.pool is None:
            self.done(*self.encoder(rows, first), rows, context)
            return
        self.pending.append((self.pool.apply_async(_encode_in_worker, (rows, first)), rows, context))
        while len(self.pending) > 2 * self.num_proc:
            self._finish_one()

    def drain(self) -> None:
        while self.pending:
            self._finish_one()

    def _finish_one(self) -> None:
        result, rows, context = self.pending.popleft()
        self.done(*result.get(), rows, context)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArrowPart:
    """The kept rows of one source, appended a chunk at a time to an Arrow stream file (the
    format datasets.Dataset.from_file maps)."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema, self.rows = path, schema, 0
        self._sink = self._writer = None

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self._writer is None:
            self._sink = pa.OSFile(str(self.path), "wb")
            self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = None


@dataclass
class SourceRun:
    """One source's share of a build: its counts, the kept rows (in an ArrowPart) and their token
    statistics, one array entry per kept row (lengths, trained or prompt/chosen/rejected tokens)."""

    counts: dict
    part: ArrowPart
    stats: dict[str, array]


def stream_source(rows: Iterator, run: SourceRun, tokenizers: Tokenizers, clean: Callable, reject: Callable,
                  budget: int | None) -> int:
    """Feed one source's rows (normalised row and origin, or a sources.Reject) through `clean`
    (why a row is not used and its counter, or None) into `tokenizers`; returns how many
    normalised rows it read, at most `budget` (rows past it are not read at all). Rejects travel
    with the next chunk, so rejects.jsonl lists them in input order for any num_proc."""
    taken, batch, order = 0, [], []  # order: Rejects and origins (one per row of batch), as read
    for item in rows:
        if budget is not None and taken >= budget:
            break
        run.counts["read"] += 1
        if isinstance(item, Reject):
            run.counts["rejected"] += 1
            order.append(item)
            continue
        taken += 1
        row, origin = item
        found = clean(row, origin)
        if found is not None:
            reason, counter = found
            run.counts[counter] += 1
            order.append(Reject(file=origin[0], row=origin[1], field="<row>", reason=reason, raw=row))
            continue
        batch.append(row)
        order.append(origin)
        if len(batch) == CHUNK:
            tokenizers.submit(batch, (run, order))
            batch, order = [], []
    if batch:
        tokenizers.submit(batch, (run, order))
    tokenizers.drain()
    if not batch:
        for item in order:  # rejects after the last chunk
            reject(item)
    run.part.close()
    return taken


def take_encoded(on_error: str, template: str, max_length: int, reject: Callable) -> Callable:
    """The Tokenizers `done` callback: writes a chunk's kept rows and accounts for the others."""

    def done(outcomes: list[tuple], table: pa.Table, rows: list[dict], context) -> None:
        run, order = context
        run.part.write(table)
        encoded = iter(zip(outcomes, rows))
        for item in order:
            if isinstance(item, Reject):  # a row read before this chunk's rows, not used
                reject(item)
                continue
            (outcome, row), (file, row_no, word) = next(encoded), item
            what = outcome[0]
            if what == "ok":
                run.counts["kept"] += 1
                if outcome[2]:
                    run.counts["truncated"] += 1
                for name, value in zip(run.stats, (outcome[1], *outcome[3:])):
                    run.stats[name].append(value)
            elif what == "long":
                run.counts["too_long"] += 1
                reject(Reject(file, row_no, "<row>", f"{outcome[1]} tokens > max_length {max_length}", row))
            elif on_error == "raise":
                raise UserError(f"{file}, {word} {row_no}: cannot encode with {template}: {outcome[1]}",
                                hint=SKIP_HINT)
            else:
                run.counts["rejected"] += 1
                reject(Reject(file, row_no, "<row>", f"cannot encode with {template}: {outcome[1]}", row))

    return done


def stat_names(layout: str) -> tuple[str, ...]:
    """The per-row statistics an Encoder outcome carries, in order."""
    return ("length", "trained") if layout == "sft" else ("length", "prompt", "chosen", "rejected")


def save_dataset(pieces: list[tuple[Path, list[int], int]], out: Path) -> None:
    """Write what datasets.save_to_disk writes (one Arrow shard, state.json, dataset_info.json) from
    the sources' parts taken at the mixture's row indices, reading each part batch by batch.

    save_to_disk would read the parts through memory maps, and every page it touches then counts
    in the process's resident memory (~150 MB per 30M tokens); plain reads leave it flat."""
    import json
    import shutil
    from dataclasses import asdict

    from datasets import Dataset, Features, config
    from datasets.arrow_writer import ArrowWriter

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shard = "data-00000-of-00001.arrow"
    writer = None
    for path, chosen, kept in pieces:
        with pa.OSFile(str(path)) as source:
            schema = pa.ipc.open_stream(source).schema
        if writer is None:
            writer = ArrowWriter(features=Features.from_arrow_schema(schema), path=str(tmp / shard))
        for table in _taken(path, chosen, kept):
            writer.write_table(table)
    writer.finalize()
    writer.close()
    dataset = Dataset.from_file(str(tmp / shard))  # reads the schema only: for the metadata files
    state = {"_data_files": [{"filename": shard}], "_fingerprint": dataset._fingerprint, "_format_columns": None,
             "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None}
    (tmp / config.DATASET_STATE_JSON_FILENAME).write_text(json.dumps(state, indent=2, sort_keys=True))
    info = asdict(dataset._info)
    (tmp / config.DATASET_INFO_FILENAME).write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2))
    del dataset
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def _batches(path: Path) -> Iterator[pa.RecordBatch]:
    with pa.OSFile(str(path)) as source:
        yield from pa.ipc.open_stream(source)


def _taken(path: Path, chosen: list[int], kept: int) -> Iterator[pa.Table]:
    """The rows of a part at `chosen`, which is (mixture.mix) every row `whole` times, then a sorted
    subset: one pass over the file per repetition, one more for the subset."""
    whole = 0
    while chosen[whole * kept:(whole + 1) * kept] == list(range(kept)) and kept:
        whole += 1
    extra = chosen[whole * kept:]
    assert extra == sorted(extra), "mixture indices: whole repeats, then a sorted subset"
    for _ in range(whole):
        for batch in _batches(path):
            yield pa.Table.from_batches([batch])
    if extra:
        position, at = 0, 0
        for batch in _batches(path):
            stop = position + batch.num_rows
            take = []
            while at < len(extra) and extra[at] < stop:
                take.append(extra[at] - position)
                at += 1
            if take:
                yield pa.Table.from_batches([batch]).take(take)
            position = stop
