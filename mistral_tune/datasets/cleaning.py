"""Duplicate removal and decontamination against evaluation prompts: deterministic, counted.

Both work on words: lowercase runs of letters and digits (``\\w+``), so that case, punctuation
and whitespace never hide a copy.

- Exact duplicates: same words in the same order (roles included, per message).
- Near duplicates: MinHash over word 5-gram sets finds candidates (64 fixed hash functions, 16
  LSH bands of 4), and a candidate counts only if the exact Jaccard similarity of the two 5-gram
  sets reaches the threshold. Nothing is random: the hash functions come from a fixed seed and
  the first occurrence (in source order) is the one kept.
- Decontamination: a training row is contaminated when it contains an n-gram (default 13 words,
  as in GPT-3's analysis) of an evaluation prompt, anywhere in its text. An evaluation prompt
  shorter than n words must appear whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import tempfile
import unicodedata
from array import array
from pathlib import Path

import numpy as np

from mistral_tune.datasets import sources
from mistral_tune.errors import UserError

DEDUP_MODES = ("none", "exact", "near")
SHINGLE = 5  # words per near-duplicate shingle
NUM_PERM, BANDS = 64, 16
_PRIME = (1 << 31) - 1
_rng = random.Random(0)  # fixed: the same rows are duplicates on every run and machine
_A = np.array([_rng.randrange(1, _PRIME) for _ in range(NUM_PERM)], dtype=np.uint64)
_B = np.array([_rng.randrange(0, _PRIME) for _ in range(NUM_PERM)], dtype=np.uint64)
_WORD = re.compile(r"\w+")
# Where evaluation files keep their prompts, tried in order (after messages/conversations).
PROMPT_COLUMNS = ("prompt", "question", "instruction", "problem", "input", "turns", "text")


def words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def row_text(row: dict, kind: str) -> str:
    """All the text of a normalised row, each message prefixed by its role."""
    messages = row["messages"] if kind == "sft" else row["prompt"]
    text = "\n".join(f"{m['role']}: {_message_text(m)}" for m in messages)
    if kind in ("dpo", "kto"):  # kto: an unpaired row has one of the two (sources._unpaired)
        text += "".join(f"\n{name}: {_message_text(r) if isinstance(r, dict) else r}"
                        for name, r in (("chosen", row["chosen"]), ("rejected", row["rejected"])) if r is not None)
    return text


def _message_text(m: dict) -> str:
    """Content and (tool use) the calls: rows differing only in a call's arguments are not
    duplicates. The tools list stays out: rows sharing long tool definitions would look alike."""
    calls = m.get("tool_calls")
    return f"{m['content']} {json.dumps(calls, ensure_ascii=False)}" if calls else m["content"]


class Deduplicator:
    """`check(text)` returns why `text` duplicates an earlier one, or None and remembers it.

    Memory per kept row stays small and flat, whatever the row's length: a 16-byte digest, where
    it was seen, and in near mode one dict entry per LSH band (keyed by the band's hash: a hash
    collision only adds a candidate, which the exact Jaccard then rejects). The rows' words go to a
    temporary file and are read back only for a candidate, so the similarity is exact, as before.
    """

    def __init__(self, mode: str, threshold: float):
        if mode not in DEDUP_MODES:
            raise UserError(f"unknown data.dedup={mode!r}; expected one of {', '.join(DEDUP_MODES)}")
        if not 0.0 < threshold <= 1.0:
            raise UserError(f"data.near_dup_threshold={threshold} must be in (0, 1]")
        self.mode, self.threshold = mode, threshold
        self.exact: dict[bytes, int] = {}  # digest -> index in self.where
        self.where: list[str] = []  # where each remembered row was first seen
        self.buckets: dict[int, int | list[int]] = {}  # band hash -> index (or indices) in self.where
        self.offsets = array("Q", [0])  # near mode: the words of row i are texts[offsets[i]:offsets[i + 1]]
        self.texts = tempfile.TemporaryFile() if mode == "near" else None

    def check(self, text: str, where: str) -> str | None:
        if self.mode == "none":
            return None
        tokens = words(text)
        joined = " ".join(tokens).encode()
        digest = hashlib.blake2b(joined, digest_size=16).digest()
        if digest in self.exact:
            return f"duplicate of {self.where[self.exact[digest]]}"
        index = len(self.where)
        if self.mode == "near":
            shingles = _shingles(tokens)
            keys = _band_keys(shingles)
            seen: set[int] = set()
            for key in keys:
                found = self.buckets.get(key, ())
                for i in (found,) if isinstance(found, int) else found:
                    if i in seen:
                        continue
                    seen.add(i)
                    other = _shingles(self._words(i))
                    similarity = len(shingles & other) / len(shingles | other)
                    if similarity >= self.threshold:
                        return f"near duplicate (Jaccard {similarity:.2f}) of {self.where[i]}"
            for key in keys:
                found = self.buckets.get(key)
                if found is None:
                    self.buckets[key] = index
                elif isinstance(found, int):
                    self.buckets[key] = [found, index]
                else:
                    found.append(index)
            self.texts.write(joined)
            self.offsets.append(self.offsets[-1] + len(joined))
        self.exact[digest] = index
        self.where.append(where)
        return None

    def _words(self, i: int) -> list[str]:
        self.texts.flush()
        start, stop = self.offsets[i], self.offsets[i + 1]
        return os.pread(self.texts.fileno(), stop - start, start).decode().split(" ")


def _shingles(tokens: list[str]) -> frozenset:
    if len(tokens) <= SHINGLE:
        return frozenset([" ".join(tokens)])
    return frozenset(" ".join(tokens[i:i + SHINGLE]) for i in range(len(tokens) - SHINGLE + 1))


def _band_keys(shingles: frozenset) -> list[int]:
    """One 64-bit key per band of the MinHash signature (hash() of an int tuple is the same in every
    process and run: only str and bytes hashes are salted)."""
    hashes = np.array(
        sorted(int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") % _PRIME for s in shingles),
        dtype=np.uint64,
    )
    signature = ((_A[:, None] * hashes[None, :] + _B[:, None]) % _PRIME).min(axis=1)
    rows = NUM_PERM // BANDS
    return [hash((b, *signature[b * rows:(b + 1) * rows].tolist())) for b in range(BANDS)]


class Decontaminator:
    """`check(text)` returns which evaluation prompt `text` overlaps, or None."""

    def __init__(self, files: list[str], ngram: int):
        if ngram < 1:
            raise UserError(f"data.decontaminate.ngram={ngram} must be at least 1")
        self.n = ngram
        self.grams: dict[str, str] = {}  # n-gram (or whole short prompt) -> where it comes from
        self.short_lengths: set[int] = set()
        self.prompts = 0
        self.files = [str(p) for p in sources.expand_files(files)] if files else []
        for path in self.files:
            for where, prompt in _eval_prompts(Path(path)):
                self._add(words(prompt), where)

    def _add(self, tokens: list[str], where: str) -> None:
        if not tokens:
            return
        self.prompts += 1
        if len(tokens) < self.n:
            self.short_lengths.add(len(tokens))
            self.grams.setdefault(" ".join(tokens), where)
            return
        for i in range(len(tokens) - self.n + 1):
            self.grams.setdefault(" ".join(tokens[i:i + self.n]), where)

    def add_prompt(self, prompt: str, where: str) -> None:
        """One more evaluation prompt (a held-out row's), given as text."""
        self._add(words(prompt), where)

    def check(self, text: str) -> str | None:
        if not self.grams:
            return None
        tokens = words(text)
        for n in sorted({self.n, *self.short_lengths}):
            for i in range(len(tokens) - n + 1):
                gram = " ".join(tokens[i:i + n])
                if gram in self.grams:
                    shown = gram if len(gram) <= 60 else gram[:57] + "..."
                    return f"contains {n} words of the evaluation prompt at {self.grams[gram]}: {shown!r}"
        return None


def _eval_prompts(path: Path):
    """(where, prompt text) of every prompt in an evaluation file."""
    for row_no, raw, value in sources.read_records(path):
        where = f"{path}, {'line' if path.suffix.lower() == '.jsonl' else 'row'} {row_no}"
        if isinstance(value, Exception) or not isinstance(value, dict):
            raise UserError(f"{where}: evaluation rows must be JSON objects with a prompt"
                            f"{'' if not isinstance(value, Exception) else f' ({value})'}")
        texts = _prompt_texts(value)
        if texts is None:
            columns = ", ".join(sorted(map(str, value))) or "none"
            raise UserError(f"{where}: no prompt found (columns: {columns}); expected messages, conversations "
                            f"or one of {', '.join(PROMPT_COLUMNS)}")
        for text in texts:
            yield where, text


def _prompt_texts(row: dict) -> list[str] | None:
    for key in ("messages", "conversations"):
        value = row.get(key)
        if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
            return [str(m.get("content", m.get("value", ""))) for m in value
                    if m.get("role", m.get("from")) in ("user", "human")]
    for key in PROMPT_COLUMNS:
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            return [value]
        if isinstance(value, list) and value:
            return [m if isinstance(m, str) else str(m.get("content", "")) for m in value
                    if isinstance(m, str) or (isinstance(m, dict) and m.get("role", "user") == "user")]
    return None
