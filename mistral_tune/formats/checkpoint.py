"""What a pretrained checkpoint says about itself: its Mistral vocabulary and its context length.

A run on `model.name_or_path=<folder or cached hub id>` takes its chat format and its default
max_length from here, so a v0.3 checkpoint never trains with the v1 format (or a tiny model's
demo lengths). Read from the files a HF Mistral checkpoint folder holds:

- ``tekken.json``: Tekken (Mistral NeMo, Small 3, ...). mistral-common reads it, but our formats
  and exported tokenizers are built on SentencePiece files: refused, with a clear message.
- ``tokenizer.model.v1|v3|v7`` (mistral-common's own names, shipped next to the HF files by
  v0.3 and Large 2411): the version is the suffix.
- ``tokenizer.json``: v7 holds ``[SYSTEM_PROMPT]`` as a control token, v3 holds ``[INST]`` as
  one, v1 (32000 pieces) has neither (its ``[INST]`` is plain text).
- ``tokenizer.model`` alone: byte-identical to one of mistral-common's files, or its control
  pieces decide as above.
- ``config.json``: ``vocab_size`` must cover the vocabulary; ``max_position_embeddings`` is the
  context.

Whatever the evidence, the pieces must be those of mistral-common's file for that version (the
one every stage encodes with): a checkpoint with another vocabulary is refused, never trained
with ids that mean something else to it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from mistral_tune.errors import UserError
from mistral_tune.formats.templates import TEMPLATES, mistral_tokenizer_file

SIZES = {"mistral_v1": 32000, "mistral_v3": 32768, "mistral_v7": 32768}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    vocab: str | None  # mistral_v1 | mistral_v3 | mistral_v7; None: the folder holds no tokenizer
    evidence: str  # which file said so, for the log
    context: int | None  # max_position_embeddings, None when config.json does not say


def locate(name_or_path: str, revision: str | None = None) -> Path | None:
    """The local folder of a checkpoint: the path itself, or a hub id's snapshot in the HF cache
    (never downloaded here). None when neither exists."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith(".") or name_or_path.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision, local_files_only=True))
    except Exception:  # not cached (or not a valid id): the caller says what to do
        return None


def inspect_checkpoint(name_or_path: str, revision: str | None = None) -> Checkpoint:
    """The checkpoint's Mistral vocabulary and context, or a UserError saying why not."""
    folder = locate(name_or_path, revision)
    if folder is None:
        raise UserError(
            f"cannot read the vocabulary of model.name_or_path={name_or_path!r}: not a local folder, "
            "and not in the Hugging Face cache (nothing is downloaded to guess it)",
            hint="download it first (hf download ...), or set template=mistral_v1|mistral_v3|mistral_v7")
    return _inspect(str(folder.resolve()))


@lru_cache(maxsize=8)
def _inspect(folder_name: str) -> Checkpoint:
    folder = Path(folder_name)
    config = _read_json(folder / "config.json") or {}
    vocab, evidence, pieces = _detect(folder)
    size = SIZES.get(vocab, 0)
    model_vocab = config.get("vocab_size")
    if vocab and model_vocab is not None and model_vocab < size:
        raise UserError(f"{folder}: config.json vocab_size {model_vocab} is smaller than the {vocab} vocabulary "
                        f"({size} tokens, {evidence})")
    if vocab and pieces is not None:
        _check_pieces(folder, vocab, pieces)
    context = config.get("max_position_embeddings")
    return Checkpoint(folder, vocab, evidence, int(context) if context else None)


def _detect(folder: Path) -> tuple[str | None, str, dict[str, int] | None]:
    """(vocab or None without tokenizer files, evidence, {piece: id} from tokenizer.json or None)."""
    if (folder / "tekken.json").exists():
        raise UserError(
            f"{folder} has a Tekken tokenizer (tekken.json): mistral_tune's chat formats and exported "
            "tokenizers are built on Mistral's SentencePiece vocabularies (v1, v3, v7) and cannot "
            "train this model exactly yet")
    for version in ("v7", "v3", "v1"):
        f = folder / f"tokenizer.model.{version}"
        if f.exists():
            return f"mistral_{version}", f"{f.name}", _hf_pieces(folder)
    pieces = _hf_pieces(folder)
    if pieces is not None:
        vocab = _vocab_from_pieces(pieces, set(_hf_special(folder)))
        if vocab is None:
            raise UserError(f"{folder}/tokenizer.json ({len(pieces)} pieces) is not a Mistral v1, v3 or v7 "
                            "vocabulary", hint="set template=... only for a checkpoint with one of those")
        return vocab, f"tokenizer.json: {_why(vocab, len(pieces))}", pieces
    sp_file = folder / "tokenizer.model"
    if sp_file.exists():
        digest = _digest(sp_file)
        for name in TEMPLATES:
            if digest == _digest(mistral_tokenizer_file(name)):
                return name, "tokenizer.model: identical to mistral-common's file", None
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_file))
        sp_pieces = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
        control = {p for p, i in sp_pieces.items() if sp.is_control(i)}
        vocab = _vocab_from_pieces(sp_pieces, control)
        if vocab is None:
            raise UserError(f"{sp_file} ({len(sp_pieces)} pieces) is not a Mistral v1, v3 or v7 vocabulary")
        return vocab, f"tokenizer.model: {_why(vocab, len(sp_pieces))}", sp_pieces
    return None, "no tokenizer file (tokenizer.json, tokenizer.model[.vN], tekken.json)", None


def _vocab_from_pieces(pieces: dict[str, int], special: set[str]) -> str | None:
    if "[SYSTEM_PROMPT]" in special and len(pieces) == SIZES["mistral_v7"]:
        return "mistral_v7"
    if "[INST]" in special and len(pieces) == SIZES["mistral_v3"]:
        return "mistral_v3"
    if "[INST]" not in special and len(pieces) == SIZES["mistral_v1"]:
        return "mistral_v1"
    return None


def _why(vocab: str, n: int) -> str:
    return {"mistral_v7": f"{n} pieces, [SYSTEM_PROMPT] is a control token",
            "mistral_v3": f"{n} pieces, [INST] is a control token",
            "mistral_v1": f"{n} SentencePiece pieces, [INST] is plain text"}[vocab]


def _check_pieces(folder: Path, vocab: str, pieces: dict[str, int]) -> None:
    """The checkpoint's piece -> id map must be mistral-common's for `vocab`."""
    reference = _reference_pieces(vocab)
    differ = [p for p, i in pieces.items() if reference.get(p) != i]
    if differ or len(pieces) != len(reference):
        raise UserError(f"{folder}: the tokenizer looks like {vocab} but {len(differ)} of its {len(pieces)} pieces "
                        f"differ from mistral-common's {vocab} file (e.g. {differ[:3]})",
                        hint="mistral_tune encodes with mistral-common's files; this checkpoint needs its own tokenizer")


@lru_cache(maxsize=None)
def _reference_pieces(vocab: str) -> dict[str, int]:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    sp = MistralTokenizer.from_file(str(mistral_tokenizer_file(vocab))).instruct_tokenizer.tokenizer
    model = sp._model
    return {model.id_to_piece(i): i for i in range(model.get_piece_size())}


def _hf_pieces(folder: Path) -> dict[str, int] | None:
    data = _read_json(folder / "tokenizer.json")
    if data is None:
        return None
    pieces = dict((data.get("model") or {}).get("vocab") or {})
    for t in data.get("added_tokens", []):
        pieces.setdefault(t["content"], t["id"])
    return pieces


def _hf_special(folder: Path) -> list[str]:
    data = _read_json(folder / "tokenizer.json") or {}
    return [t["content"] for t in data.get("added_tokens", []) if t.get("special")]


def _read_json(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


@lru_cache(maxsize=None)
def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
