"""Read user data files for SFT and DPO, normalise every row, and account for every bad one.

Every row read is either kept (normalised) or rejected with its file, row, field and reason:
frameworks that drop malformed rows without a count train on less data than the user thinks.

Normalised rows:
  sft: {"messages": [{"role", "content"}, ...]}  optional leading system, then user/assistant
       strictly alternating, ending with assistant.
  dpo: {"prompt": [messages ending with user], "chosen": str, "rejected": str}
  kto: the same, a pair or one side of one: an unpaired row (prompt, completion, label) is
       {"prompt", "chosen": completion, "rejected": None} when label is true (desirable), else
       {"prompt", "chosen": None, "rejected": completion}; the data stage splits pairs later.

Tool use (OpenAI layout, `messages` and preference rows only): a row's `tools` ([{"type":
"function", "function": {"name", "description", "parameters"}}], or that list as JSON text)
ride on the first message, `messages[0]["tools"]` (`prompt[0]["tools"]`), so that whatever
passes a conversation on passes its tools too. An assistant turn may carry `tool_calls`
([{"id", "type": "function", "function": {"name", "arguments"}}]; content null or "" for a
call-only turn; arguments a JSON object, or its text, normalised to JSON text); it is then
followed by one {"role": "tool", "tool_call_id", "content"} result per call, after which the
assistant (or the user) goes on. A DPO prompt may end with tool results, and chosen/rejected
may be a tool-call turn ({"role": "assistant", "content", "tool_calls"} instead of a string).
Call ids are 9 letters or digits (the rule of Mistral's v3/v7 formats, the only ones that encode
tools), function names are among the row's tools.

Formats (`fmt`, or detected per row when "auto"):
  sft: messages (OpenAI), sharegpt (conversations/from/value), alpaca (instruction/input/output),
       prompt_completion (prompt/completion strings, or messages)
  dpo: preference (prompt + chosen/rejected: strings, or conversations ending with the assistant
       reply as in UltraFeedback-binarized; the prompt may then be omitted)
  kto: unpaired (prompt/completion/label, TRL's unpaired preference layout: label a JSON bool)
       or preference (a pair, read as for dpo: one desirable and one undesirable reply)

Row numbers are 1-based: the line number for .jsonl, the record index otherwise (for .csv the
header is not counted). Message positions inside a field are 0-based, as in `messages[2].role`.

A `Source` is one entry of `<stage>.data.sources`: local files/folders/globs, or a Hugging Face
Hub dataset id read with `datasets.load_dataset(path, name=, split=, revision=)`, with its own
format and column renames ({old: new}, applied before format detection).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from mistral_tune.errors import UserError

EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
ARROW = ".arrow"  # the data files of a datasets.save_to_disk folder (given as the folder, or one by one)
SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
# One DPO layout: prompt + chosen/rejected, each of chosen/rejected a string or a message list
# (UltraFeedback-binarized: the full conversation whose last message is the assistant reply).
DPO_FORMATS = ("preference",)
KTO_FORMATS = ("unpaired", "preference")
ROLES = ("system", "user", "assistant")
_OPENAI_ROLES = {r: r for r in (*ROLES, "tool")}  # tool results: OpenAI layout only
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant",
                  "user": "user", "assistant": "assistant"}
# Auto-detection, checked in order: a row is in the first format whose columns it has (non-null).
_SFT_DETECT = (("messages", ("messages",)), ("sharegpt", ("conversations",)),
               ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")))
SKIP_HINT = "fix the row, or set data.on_error=skip to skip bad rows (each is counted and reported)"
# CSV cells can only hold text; these columns may hold a JSON-encoded message list.
_LIST_COLUMNS = ("messages", "conversations", "prompt", "chosen", "rejected", "completion")
_FUNCTION_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # mistral-common's rule for function names
_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")  # mistral-common's rule for v3/v7 tool call ids


@dataclass
class Reject:
    file: str
    row: int
    field: str
    reason: str
    raw: object  # the original row, or the line text when it was not JSON


@dataclass
class LoadResult:
    rows: list[dict]
    rejects: list[Reject]
    read: int  # == len(rows) + len(rejects)
    per_file: dict[str, dict]  # file -> {"read", "kept", "rejected"}
    origins: list[tuple[str, int, str]] = field(default_factory=list)  # (file, row, "line"|"row") per row


@dataclass
class Source:
    """One data source of a stage (the plain form of schema.SourceConfig)."""

    path: str
    split: str | None = None
    name: str | None = None
    revision: str | None = None
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    streaming: bool = False  # hub only: read rows as they download (datasets' IterableDataset)

    @property
    def is_hub(self) -> bool:
        return is_hub_id(self.path)

    @property
    def label(self) -> str:
        """How reports and rejects name the source."""
        if not self.is_hub:
            return str(self.path)
        subset = f"[{self.name}]" if self.name else ""
        revision = f"@{self.revision}" if self.revision else ""
        return f"hub:{self.path}{subset}:{self.split or 'train'}{revision}"


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_hub_id(path: str) -> bool:
    """A Hub dataset id: not a local path, no glob, no data file extension, `org/name` shaped."""
    spec = os.path.expanduser(os.fspath(path))
    return (
        not os.path.exists(spec)
        and not any(c in spec for c in "*?[")
        and not spec.lower().endswith(EXTENSIONS)
        and _HUB_ID.fullmatch(spec) is not None
    )


class _RowError(Exception):
    def __init__(self, field: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def load_rows(
    files: list[str], kind: str, on_error: str = "raise", fmt: str = "auto", columns: dict | None = None
) -> LoadResult:
    """Read, detect the format of, and normalise every row of `files` (files, folders or globs)."""
    _check_arguments(kind, on_error, fmt)
    result = LoadResult(rows=[], rejects=[], read=0, per_file={})
    for path in expand_files(files):
        rows = _read_file(path, columns or {})
        tabular = path.suffix.lower() in (".parquet", ".csv", ARROW)  # every row has every column
        where = "line" if path.suffix.lower() == ".jsonl" else "row"
        _consume(result, str(path), where, rows, kind, on_error, fmt, columns or {}, tabular)
    return result


def load_source(src: Source, kind: str, on_error: str = "raise", fmt: str = "auto") -> LoadResult:
    """Every row of one source; the source's own format, if set, overrides `fmt`."""
    result = LoadResult(rows=[], rejects=[], read=0, per_file={})
    for item in iter_source(src, kind, on_error, fmt, result.per_file):
        if isinstance(item, Reject):
            result.rejects.append(item)
        else:
            result.rows.append(item[0])
            result.origins.append(item[1])
    result.read = len(result.rows) + len(result.rejects)
    return result


def iter_source(src: Source, kind: str, on_error: str, fmt: str, per_file: dict) -> Iterator:
    """The rows of one source as they are read: (normalised row, (file, row, "line"|"row")) or a
    Reject; `per_file` counts each file's rows as they go. Nothing is held: a 200k-row source
    streams through in constant memory."""
    fmt = fmt if src.format == "auto" else src.format
    if not src.is_hub:
        hub_only = [k for k in ("split", "name", "revision") if getattr(src, k) is not None]
        if src.streaming:
            hub_only.append("streaming")
        if hub_only:
            raise UserError(f"source {src.path!r} is a local path: {', '.join(hub_only)} apply to Hub datasets only")
        _check_arguments(kind, on_error, fmt)
        for path in expand_files([src.path]):
            tabular = path.suffix.lower() in (".parquet", ".csv")  # every row has every column
            where = "line" if path.suffix.lower() == ".jsonl" else "row"
            yield from _iter_rows(per_file, str(path), where, _read_file(path, src.columns), kind, on_error, fmt,
                                  src.columns, tabular)
        return
    _check_arguments(kind, on_error, fmt)
    dataset = load_hub_dataset(src)
    rows = ((i, row, _renamed(row, src.columns)) for i, row in enumerate(dataset, 1))
    yield from _iter_rows(per_file, src.label, "row", rows, kind, on_error, fmt, src.columns, tabular=True)


_HUB_DATASETS: dict[tuple, Any] = {}  # one load per process: the cache key and the build both need it


def load_hub_dataset(src: Source):
    """`datasets.load_dataset(path, name=, split=, revision=)`, as a UserError when it fails."""
    key = (src.path, src.name, src.split or "train", src.revision, src.streaming)
    if key not in _HUB_DATASETS:
        import datasets

        # streaming only when asked: a stubbed or older loader need not know the keyword
        stream = {"streaming": True} if src.streaming else {}
        try:
            dataset = datasets.load_dataset(src.path, name=src.name, split=src.split or "train", revision=src.revision,
                                            **stream)
        except Exception as err:  # offline, unknown id, bad split or subset: datasets raises many types
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"cannot load Hub dataset {src.label}: {first}",
                hint="check the id, split, name and revision; a local path that does not exist is read as a Hub id",
            ) from None
        if not isinstance(dataset, datasets.IterableDataset if src.streaming else datasets.Dataset):
            raise UserError(f"Hub dataset {src.label} did not load as one split (got {type(dataset).__name__})")
        _HUB_DATASETS[key] = dataset
    return _HUB_DATASETS[key]


def hub_fingerprint(src: Source) -> str:
    """What a Hub source's rows depend on, by content, for the build cache: the loaded dataset's
    fingerprint, or for a streamed source (nothing downloaded yet) the hash that `datasets` gives
    its builder from the resolved data files of the repository commit, with the subset and split."""
    if not src.streaming:
        return load_hub_dataset(src)._fingerprint
    import hashlib

    import datasets

    try:
        builder = datasets.load_dataset_builder(src.path, name=src.name, revision=src.revision)
    except Exception as err:  # offline, unknown id, bad subset: datasets raises many types
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"cannot load Hub dataset {src.label}: {first}",
                        hint="check the id, split, name and revision") from None
    if not builder.hash:
        raise UserError(f"Hub dataset {src.label}: datasets gives no content hash for it, so a cached build "
                        "could go stale", hint="set streaming: false for this source")
    key = f"{builder.config_id}:{builder.hash}:{src.split or 'train'}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_arguments(kind: str, on_error: str, fmt: str) -> None:
    if kind not in ("sft", "dpo", "kto", "prompts"):
        raise UserError(f"unknown data kind {kind!r}; expected 'sft', 'dpo' or 'kto'")
    if on_error not in ("raise", "skip"):
        raise UserError(f"unknown data.on_error={on_error!r}; expected 'raise' or 'skip'")
    formats = {"dpo": DPO_FORMATS, "kto": KTO_FORMATS}.get(kind, SFT_FORMATS)
    if fmt != "auto" and fmt not in formats:
        raise UserError(f"unknown {kind} data format {fmt!r}; expected 'auto' or one of {', '.join(formats)}")


def _consume(result: LoadResult, name: str, where: str, rows, kind: str, on_error: str, fmt: str,
             columns: dict, tabular: bool) -> None:
    """Normalise (row number, raw, value) triples of one file into `result`, counting each."""
    for item in _iter_rows(result.per_file, name, where, rows, kind, on_error, fmt, columns, tabular):
        result.read += 1
        if isinstance(item, Reject):
            result.rejects.append(item)
        else:
            result.rows.append(item[0])
            result.origins.append(item[1])


def _iter_rows(per_file: dict, name: str, where: str, rows, kind: str, on_error: str, fmt: str,
               columns: dict, tabular: bool) -> Iterator:
    """(normalised row, origin) or Reject for each (row number, raw, value) of one file, counted in
    per_file[name] as they go."""
    counts = per_file[name] = {"read": 0, "kept": 0, "rejected": 0}
    seen_columns: set[str] = set()
    for row_no, raw, value in rows:
        if isinstance(raw, dict):
            seen_columns.update(map(str, raw))
            if tabular and counts["read"] == 0:
                _check_renames(name, columns, seen_columns)  # a misspelt column fails at once
        counts["read"] += 1
        try:
            if isinstance(value, _RowError):
                raise value
            row = _normalise(value, kind, fmt)
        except _RowError as err:
            if on_error == "raise":
                unseen = [old for old in columns if old not in seen_columns]
                note = f" (no row so far has the column(s) to rename: {', '.join(unseen)})" if unseen else ""
                raise UserError(f"{name}, {where} {row_no}, field {err.field}: {err.reason}{note}", hint=SKIP_HINT) from None
            counts["rejected"] += 1
            yield Reject(name, row_no, err.field, err.reason, raw)
            continue
        counts["kept"] += 1
        yield row, (name, row_no, where)
    if counts["read"]:
        _check_renames(name, columns, seen_columns)


def _check_renames(name: str, columns: dict, seen: set[str]) -> None:
    missing = [old for old in columns if old not in seen]
    if missing:
        found = ", ".join(sorted(seen)) or "none"
        raise UserError(f"{name}: columns to rename not found: {', '.join(missing)} (columns: {found})")


def _renamed(row: object, columns: dict) -> object:
    """The row with its columns renamed {old: new}, or a _RowError when a rename would overwrite."""
    if not columns or not isinstance(row, dict):
        return row
    out = dict(row)
    for old, new in columns.items():
        if old not in row:
            continue
        if _get(row, new) is not None and new not in columns:
            return _RowError(old, f"renaming column {old!r} to {new!r} would overwrite the row's own {new!r}")
        out.pop(old)
    for old, new in columns.items():
        if old in row:
            out[new] = row[old]
    return out


def write_rejects(rejects: list[Reject], path: str | os.PathLike) -> None:
    """Write one JSON object per line: {file, row, field, reason, raw}."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rejects:
            f.write(reject_line(r))


def reject_line(r: Reject) -> str:
    """One line of rejects.jsonl."""
    line = json.dumps(asdict(r), ensure_ascii=False, default=str)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:  # the raw row holds a lone surrogate: keep it escaped
        line = json.dumps(asdict(r), default=str)
    return line + "\n"


def expand_files(files: list[str]) -> list[Path]:
    """Files as given, folders as their supported files (recursive, sorted), globs sorted."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not files:
        raise UserError("no data files given")
    out: list[Path] = []
    seen: set[Path] = set()
    for given in map(os.fspath, files):
        spec = os.path.expanduser(given)
        if any(c in spec for c in "*?["):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise UserError(f"no files match {given!r}")
            paths = [p for m in matches for p in (_folder_files(Path(m)) if os.path.isdir(m) else [Path(m)])]
        elif os.path.isdir(spec):
            paths = _saved_dataset_files(Path(spec)) or _folder_files(Path(spec))
            if not paths:
                raise UserError(f"folder {given!r} holds no {'/'.join(EXTENSIONS)} files")
        elif os.path.exists(spec):
            paths = [Path(spec)]
        else:
            raise UserError(f"data file not found: {given!r}")
        for p in paths:
            if p.suffix.lower() not in (*EXTENSIONS, ARROW):
                raise UserError(f"unsupported data file extension {p.suffix!r}: {str(p)!r} "
                                f"(supported: {', '.join(EXTENSIONS)}, and save_to_disk folders)")
            # Reading a file twice would silently duplicate its rows.
            if p.resolve() in seen:
                raise UserError(f"data file listed twice: {str(p)!r}")
            seen.add(p.resolve())
            out.append(p)
    return out


def _saved_dataset_files(folder: Path) -> list[Path] | None:
    """The .arrow files, in order, of a `datasets` save_to_disk folder: a Dataset, or the train
    split (or only split) of a DatasetDict. None for any other folder (its state.json and
    dataset_info.json must not be read as data files)."""
    if (folder / "dataset_dict.json").exists():
        try:
            splits = json.loads((folder / "dataset_dict.json").read_text())["splits"]
        except (ValueError, KeyError) as e:
            raise UserError(f"{folder}/dataset_dict.json is damaged ({e})") from None
        if "train" not in splits and len(splits) != 1:
            raise UserError(f"{folder}: a saved DatasetDict with splits {', '.join(splits)} and no 'train'",
                            hint=f"give one split's folder, e.g. {folder / splits[0]}")
        folder = folder / ("train" if "train" in splits else splits[0])
    state = folder / "state.json"
    if not (state.exists() and (folder / "dataset_info.json").exists()):
        return None
    try:
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{state} is damaged ({e})") from None
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise UserError(f"{folder}: saved dataset file {missing[0]} is missing")
    return [folder / n for n in names]


def _folder_files(folder: Path) -> list[Path]:
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and p.suffix.lower() in EXTENSIONS and not any(s.startswith(".") for s in rel):
            found.append(p)
    return found


# ---------------------------------------------------------------- readers: (row, raw, value)

def read_records(path: str | os.PathLike) -> Iterator[tuple[int, object, object]]:
    """(row number, raw, value) of every record of one file; value is an Exception for a bad one."""
    return _read_file(Path(path), {})


def _read_file(path: Path, columns: dict) -> Iterator[tuple[int, object, object]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":  # renamed before cells are parsed, so a renamed column holds messages too
        return _read_csv(path, columns)
    rows = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet, ARROW: _read_arrow}[suffix](path)
    return ((n, raw, value if isinstance(value, _RowError) else _renamed(value, columns)) for n, raw, value in rows)


def _read_jsonl(path: Path):
    with open(path, "rb") as f:
        for line_no, data in enumerate(f, 1):
            if line_no == 1 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                raw = data.decode("utf-8", "replace").rstrip("\r\n")
                yield line_no, raw, _RowError("<json>", "line is not valid UTF-8")
                continue
            text = text.rstrip("\r\n")
            if not text.strip():
                continue  # blank lines are not rows
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                yield line_no, text, _RowError("<json>", f"invalid JSON: {e.msg} at column {e.colno}")
                continue
            yield line_no, value, value


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one JSON value per line: JSON Lines, as datasets' to_json writes
            yield from _read_jsonl(path)
            return
        raise UserError(f"{path}: not a valid JSON file ({e})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a valid JSON file ({e})") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of rows, or an object holding one list")
    for i, row in enumerate(data, 1):
        yield i, row, row


def _read_parquet(path: Path):
    import pyarrow.parquet as pq

    try:  # a record batch at a time: a 200k-row file never sits in memory as Python objects
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield i, row, row
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: cannot read parquet file ({e})") from None


def _read_arrow(path: Path):
    from datasets import Dataset

    try:
        ds = Dataset.from_file(str(path), in_memory=False)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise UserError(f"{path}: cannot read the saved dataset file ({e})") from None
    for i, row in enumerate(ds, 1):
        yield i, row, row


def _read_csv(path: Path, columns: dict):
    csv.field_size_limit(sys.maxsize)  # long conversations exceed the 128 KiB default
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                return
            for i, cells in enumerate(reader, 1):
                if not cells:
                    continue
                raw = dict(zip(header, cells))
                if len(cells) != len(header):
                    yield i, cells, _RowError("<row>", f"row has {len(cells)} cells, header has {len(header)}")
                    continue
                value = _renamed(raw, columns)
                if not isinstance(value, _RowError):
                    value = {k: _cell(k, v) for k, v in value.items()}
                yield i, raw, value
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text (byte {e.start}); CSV files must be UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{path}: cannot parse CSV ({e})") from None


def _cell(column: str, text: str) -> Any:
    if column == "label" and text.strip().lower() in ("true", "false"):  # KTO's label: CSV holds only text
        return text.strip().lower() == "true"
    if column in _LIST_COLUMNS and text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list) and all(isinstance(m, dict) for m in value):
            return value
    return text


# ---------------------------------------------------------------- normalisers

def _normalise(row: object, kind: str, fmt: str) -> dict:
    if not isinstance(row, dict):
        raise _RowError("<row>", f"row is not an object (got {_type(row)})")
    if kind == "kto":
        return _unpaired(row, fmt)
    if kind == "dpo":
        if fmt == "auto" and not _has(row, "prompt", "chosen", "rejected"):
            raise _unknown(row, "prompt/chosen/rejected (preference pairs)")
        prompt, (chosen, rejected) = _prompt_and_replies(row, ("chosen", "rejected"))
        if _stripped([_as_message(chosen)]) == _stripped([_as_message(rejected)]):
            raise _RowError("rejected", "chosen and rejected are identical")
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if kind == "prompts" and fmt in ("auto", "messages") and _has(row, "messages"):
        # Prompts to sample from (pairs.prompts_files): a chat may end with the user's turn.
        messages = _messages(row, "messages", "role", "content", _OPENAI_ROLES)
        _check_order(messages, "messages", "role", ("user", "assistant"))
        return {"messages": _with_tools(messages, _tools(row), "messages")}
    if kind == "prompts" and fmt == "auto" and isinstance(_get(row, "prompt"), str) and not _has(row, "completion"):
        return {"messages": [{"role": "user", "content": _text(row, "prompt")}]}

    if fmt == "auto":
        fmt = next((name for name, keys in _SFT_DETECT if _has(row, *keys)), None)
        if fmt is None:
            raise _unknown(row, "messages (OpenAI), conversations (ShareGPT), "
                                "instruction/input/output (Alpaca), prompt/completion")
    if fmt == "messages":
        messages = _messages(row, "messages", "role", "content", _OPENAI_ROLES)
        _check_order(messages, "messages", "role", "assistant")
        return {"messages": _with_tools(messages, _tools(row), "messages")}
    if _get(row, "tools") is not None:  # the other layouts have no tool calls to go with them
        raise _RowError("tools", f"tools are read with the messages (OpenAI) layout only, not {fmt}")
    if fmt == "sharegpt":
        messages = _messages(row, "conversations", "from", "value", SHAREGPT_ROLES)
        _check_order(messages, "conversations", "from", "assistant")
        return {"messages": messages}
    if fmt == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = _get(row, "input")
        if extra is not None and not isinstance(extra, str):
            raise _RowError("input", f"content must be a string, got {_type(extra)}")
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}
    prompt, (completion,) = _prompt_and_replies(row, ("completion",))
    return {"messages": prompt + [_as_message(completion)]}


def _unpaired(row: dict, fmt: str) -> dict:
    """A KTO row: a preference pair (kept whole; the data stage makes it one desirable and one
    undesirable example) or an unpaired reply with its bool label."""
    if fmt == "preference" or (fmt == "auto" and _has(row, "chosen") and _has(row, "rejected")):
        return _normalise(row, "dpo", "auto" if fmt == "auto" else "preference")
    if fmt == "auto" and not (_has(row, "completion") and _get(row, "label") is not None):
        raise _unknown(row, "prompt/completion/label (unpaired) or prompt/chosen/rejected (pairs)")
    label = _get(row, "label")
    if label is None:
        raise _RowError("label", "missing field 'label' (true: a desirable reply, false: an undesirable one)")
    if not isinstance(label, bool):  # "false" or 0 read as true would train the opposite preference
        raise _RowError("label", f"must be a JSON boolean (true or false), got {_show(label)}")
    prompt, (completion,) = _prompt_and_replies(row, ("completion",))
    return {"prompt": prompt, "chosen": completion if label else None, "rejected": None if label else completion}


def _prompt_and_replies(row: dict, names: tuple[str, ...]) -> tuple[list[dict], list[str | dict]]:
    """The prompt messages and the reply of each field in `names`: its text, or its assistant
    message when it calls tools.

    A reply is a string, or a conversation whose last message is the assistant reply; the
    conversation before it must agree with `prompt` and with the other replies' conversations.
    """
    prefixes, replies = [], []
    tools = _tools(row)
    for name in names:
        value = _get(row, name)
        if value is None:
            if name in ("chosen", "rejected"):
                raise _RowError(name, f"missing {name!r}: a preference pair needs both chosen and rejected")
            raise _RowError(name, f"missing field {name!r}")
        if isinstance(value, list):
            msgs = _messages(row, name, "role", "content", _OPENAI_ROLES)
            _check_call_names(msgs, name, tools)
            # Either the reply alone ([assistant]) or the whole conversation ending with it.
            if msgs[-1]["role"] != "assistant":
                raise _RowError(name, f"conversation must end with an assistant message, not {msgs[-1]['role']}")
            if len(msgs) > 1:
                _check_order(msgs, name, "role", "assistant")
                prefixes.append((name, msgs[:-1]))
            replies.append(msgs[-1] if msgs[-1].get("tool_calls") else msgs[-1]["content"])
        else:
            replies.append(_text(row, name))
    for (_, first), (name, other) in zip(prefixes, prefixes[1:]):
        if _stripped(first) != _stripped(other):
            raise _RowError(name, "chosen and rejected disagree before the last assistant message")
    prefix = prefixes[0][1] if prefixes else None

    value = _get(row, "prompt")
    if value is None:
        if prefix is None:  # no prompt column and no conversation to take it from
            raise _RowError("prompt", "missing field 'prompt'")
        return _with_tools(prefix, tools, prefixes[0][0]), replies
    if isinstance(value, list):
        prompt = _messages(row, "prompt", "role", "content", _OPENAI_ROLES)
        _check_order(prompt, "prompt", "role", ("user", "tool"))
        agrees = prefix is None or _stripped(prompt) == _stripped(prefix)
    else:
        text = _text(row, "prompt")
        prompt = prefix or [{"role": "user", "content": text}]
        agrees = prefix is None or prefix[-1]["content"].strip() == text.strip()
    if not agrees:
        raise _RowError("prompt", "prompt disagrees with conversation")
    return _with_tools(prompt, tools, "prompt"), replies


def _messages(row: dict, field: str, role_key: str, content_key: str, roles: dict[str, str]) -> list[dict]:
    value = _get(row, field)
    if value is None:
        raise _RowError(field, f"missing field {field!r}")
    if not isinstance(value, list):
        raise _RowError(field, f"must be a list of messages, got {_type(value)}")
    if not value:
        raise _RowError(field, "empty conversation")
    out = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise _RowError(where, f"message is not an object (got {_type(m)})")
        role = m.get(role_key)
        if role is None:
            raise _RowError(f"{where}.{role_key}", f"missing field {role_key!r}")
        if not isinstance(role, str) or role not in roles:
            raise _RowError(f"{where}.{role_key}", f"unknown role {_show(role)}; expected one of {', '.join(roles)}")
        if roles[role] == "tool":
            out.append({"role": "tool", "tool_call_id": _call_id(m, "tool_call_id", where),
                        "content": _text(m, content_key, where=f"{where}.{content_key}")})
        elif roles[role] == "assistant" and _get(m, "tool_calls") is not None:
            out.append(_tool_call_turn(m, where, content_key))
        else:
            out.append({"role": roles[role], "content": _text(m, content_key, where=f"{where}.{content_key}")})
    return out


def _tool_call_turn(m: dict, where: str, content_key: str) -> dict:
    """An assistant message with tool_calls; its content may be null or empty."""
    calls = _get(m, "tool_calls")
    if not isinstance(calls, list) or not calls:
        raise _RowError(f"{where}.tool_calls", f"must be a non-empty list of tool calls, got {_show(calls)}")
    content = _get(m, content_key)
    if content is None or (isinstance(content, str) and not content.strip()):
        content = ""  # a call-only turn (OpenAI writes null or "")
    else:
        content = _text(m, content_key, where=f"{where}.{content_key}")
    out, seen = [], set()
    for j, call in enumerate(calls):
        at = f"{where}.tool_calls[{j}]"
        if not isinstance(call, dict):
            raise _RowError(at, f"tool call is not an object (got {_type(call)})")
        if _get(call, "type") not in (None, "function"):
            raise _RowError(f"{at}.type", f"unknown tool call type {_show(call['type'])}; expected 'function'")
        call_id = _call_id(call, "id", at)
        if call_id in seen:
            raise _RowError(f"{at}.id", f"tool call id {call_id!r} appears twice in one turn")
        seen.add(call_id)
        function = _get(call, "function")
        if not isinstance(function, dict):
            raise _RowError(f"{at}.function", f"must be an object with name and arguments, got {_type(function)}")
        name = _function_name(function, f"{at}.function.name")
        arguments = _json_object(_get(function, "arguments"), f"{at}.function.arguments", "arguments")
        out.append({"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}})
    return {"role": "assistant", "content": content, "tool_calls": out}


def _call_id(obj: dict, key: str, where: str) -> str:
    value = _get(obj, key)
    if value is None:
        raise _RowError(f"{where}.{key}", f"missing field {key!r}")
    if not isinstance(value, str) or not _CALL_ID.fullmatch(value):
        raise _RowError(f"{where}.{key}", f"tool call ids are 9 letters or digits in Mistral's formats, "
                                          f"got {_show(value)}")
    return value


def _function_name(obj: dict, where: str) -> str:
    name = _get(obj, "name")
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        raise _RowError(where, f"function names are 1-64 letters, digits, '_' or '-', got {_show(name)}")
    return name


def _from_json_text(value: object, where: str, what: str) -> object:
    """`value` parsed when it is JSON text (CSV cells, some Hub datasets), else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise _RowError(where, f"{what} is not valid JSON: {e.msg} at column {e.colno}") from None


def _json_object(value: object, where: str, what: str) -> dict:
    """A JSON object given as an object or as its JSON text."""
    value = _from_json_text(value, where, what)
    if not isinstance(value, dict):
        raise _RowError(where, f"{what} must be a JSON object, got {_type(value)}")
    return value


def _tools(row: dict) -> list[dict] | None:
    """The row's function definitions, normalised as mistral-common writes them, or None."""
    value = _from_json_text(_get(row, "tools"), "tools", "tools")
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise _RowError("tools", f"must be a list of tools, got {_type(value)}")
    out = []
    for i, tool in enumerate(value):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _RowError(at, f"tool is not an object (got {_type(tool)})")
        if _get(tool, "type") not in (None, "function"):
            raise _RowError(f"{at}.type", f"unknown tool type {_show(tool['type'])}; expected 'function'")
        function = _get(tool, "function")
        if not isinstance(function, dict):
            raise _RowError(f"{at}.function", f"must be an object with name, description, parameters, "
                                              f"got {_type(function)}")
        name = _function_name(function, f"{at}.function.name")
        if any(t["function"]["name"] == name for t in out):
            raise _RowError(f"{at}.function.name", f"two tools are named {name!r}")
        description = _get(function, "description")
        if description is not None and not isinstance(description, str):
            raise _RowError(f"{at}.function.description", f"must be a string, got {_type(description)}")
        parameters = _get(function, "parameters")
        parameters = {} if parameters is None else _json_object(parameters, f"{at}.function.parameters", "parameters")
        out.append({"type": "function",
                    "function": {"name": name, "description": description or "", "parameters": parameters}})
    return out


def _with_tools(messages: list[dict], tools: list[dict] | None, field: str) -> list[dict]:
    """`messages` with the row's tools on the first message, once every call names one of them."""
    _check_call_names(messages, field, tools)
    if tools:
        messages[0] = {**messages[0], "tools": tools}
    return messages


def _check_call_names(messages: list[dict], field: str, tools: list[dict] | None) -> None:
    names = [t["function"]["name"] for t in tools or []]
    for i, m in enumerate(messages):
        for j, call in enumerate(m.get("tool_calls") or []):
            name = call["function"]["name"]
            if name not in names:
                known = f"the row's tools are {', '.join(names)}" if names else "the row has no tools"
                raise _RowError(f"{field}[{i}].tool_calls[{j}].function.name", f"calls {name!r}, but {known}")


def _as_message(reply: str | dict) -> dict:
    return reply if isinstance(reply, dict) else {"role": "assistant", "content": reply}


def _check_order(msgs: list[dict], field: str, role_key: str, last: str | tuple[str, ...]) -> None:
    """Optional leading system, then user and assistant alternating; an assistant turn with
    tool calls is followed by one tool result per call (by id), then the assistant or the user."""
    lasts = (last,) if isinstance(last, str) else last
    start = 1 if msgs[0]["role"] == "system" else 0
    expected, pending, calls_at = ("user",), set(), None
    for i in range(start, len(msgs)):
        role = msgs[i]["role"]
        if role not in expected:
            if role == "system":
                reason = "roles out of order: a system message is only allowed first"
            elif pending:
                reason = (f"roles out of order: expected a tool result for each call of {field}[{calls_at}] "
                          f"(missing: {', '.join(sorted(pending))}), got {role}")
            elif role == "tool":
                reason = "roles out of order: a tool result must answer a call of the assistant turn before it"
            else:
                reason = f"roles out of order: expected {' or '.join(expected)}, got {role}"
            raise _RowError(f"{field}[{i}].{role_key}", reason)
        if role == "tool":
            call_id = msgs[i]["tool_call_id"]
            if call_id not in pending:
                raise _RowError(f"{field}[{i}].tool_call_id",
                                f"{call_id!r} answers no unanswered call of {field}[{calls_at}]")
            pending.discard(call_id)
        elif role == "assistant" and msgs[i].get("tool_calls"):
            pending, calls_at = {c["id"] for c in msgs[i]["tool_calls"]}, i
        if role == "user":
            expected = ("assistant",)
        elif role == "assistant":
            expected = ("tool",) if pending else ("user",)
        else:
            expected = ("tool",) if pending else ("assistant", "user")
    if msgs[-1]["role"] not in lasts:
        ends = f"{'an' if lasts[0] == 'assistant' else 'a'} {' or '.join(lasts)}"
        raise _RowError(field, f"conversation must end with {ends} message, not {msgs[-1]['role']}")
    if pending and msgs[-1]["role"] == "tool":
        raise _RowError(field, f"the calls of {field}[{calls_at}] miss their results: {', '.join(sorted(pending))}")


def _text(obj: dict, key: str, where: str | None = None) -> str:
    where = where or key
    value = _get(obj, key)
    if value is None:
        raise _RowError(where, f"missing field {key!r}")
    if not isinstance(value, str):
        raise _RowError(where, f"content must be a string, got {_type(value)}")
    if not value.strip():
        raise _RowError(where, "empty content")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in JSON): no tokenizer takes it
        raise _RowError(where, f"content is not valid Unicode (lone surrogate at character {e.start})") from None
    return value


def _stripped(messages: list[dict]) -> list[tuple]:
    return [(m["role"], m["content"].strip(), json.dumps(m.get("tool_calls")), m.get("tool_call_id"))
            for m in messages]


def _get(obj: dict, key: str) -> Any:
    # Parquet and CSV give every row every column: a null there means the field is absent.
    value = obj.get(key)
    return None if isinstance(value, float) and value != value else value


def _has(row: dict, *keys: str) -> bool:
    return any(_get(row, k) is not None for k in keys)


def _unknown(row: dict, expected: str) -> _RowError:
    columns = ", ".join(sorted(map(str, row))) or "none"
    return _RowError("<row>", f"unknown format: columns found: {columns}; expected {expected}")


def _type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
