"""The `export` stage: run_dir/merged (or export.model=<HF Mistral folder>) as a GGUF file for
llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

    mistral-tune export run_dir=DIR export.quant=f16|q8_0|q4_k_m
    mistral-tune pipeline export.enabled=true ...      (after merge and eval)

Writes DIR/export/<name>-<quant>.gguf and <name>-<quant>.Modelfile (each under a temporary name,
renamed into place), config.yaml and manifest.json, which lists every exported file with the
source it was made from (keyed by file name). Re-running skips a file made from the same source; a file made from
another source (merge redone since) is an error unless force=true. f16 and q8_0 are written in
Python (formats/gguf.py); q4_k_m is made from the f16 file by llama.cpp's own quantizer through
llama-cpp-python (the `export` extra), which decides the per-tensor types of its Q4_K_M recipe.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.config import fingerprint
from mistral_tune.errors import UserError
from mistral_tune.formats import gguf as gguf_format
from mistral_tune.formats import ollama
from mistral_tune.runs import RunDir

log = logging.getLogger("mistral_tune")

FORMATS = ("gguf",)
EXTRA = "pip install -e '.[export]' (or scripts/install_export.sh, which builds llama-cpp-python from source)"


def check_options(cfg: DictConfig) -> None:
    if cfg.export.format not in FORMATS:
        raise UserError(f"export.format={cfg.export.format!r} is not one of {', '.join(FORMATS)}")
    if cfg.export.quant not in gguf_format.QUANTS:
        raise UserError(f"export.quant={cfg.export.quant!r} is not one of {', '.join(gguf_format.QUANTS)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError(f"GGUF export needs the gguf package: {EXTRA}") from None
    if cfg.export.quant == "q4_k_m":
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise UserError(f"export.quant=q4_k_m needs llama.cpp's quantizer (llama-cpp-python): {EXTRA}") from None


def source_of(cfg: DictConfig) -> tuple[Path, str]:
    """(folder to export, what identifies its content for skip decisions)."""
    run_dir = RunDir.of(cfg)
    if cfg.export.model:
        folder = Path(cfg.export.model).expanduser()
        gguf_format.check_source(folder)
        return folder, _folder_key(folder)
    folder = run_dir.merged
    manifest = runs.read_manifest(cfg, "merge")
    if manifest is None:
        raise UserError(f"export needs a finished merge stage in {folder}, found none: run `mistral-tune pipeline "
                        f"run_dir={cfg.run_dir}` (or merge) first, or give export.model=<HF Mistral folder>")
    gguf_format.check_source(folder, key="run_dir/merged")
    return folder, manifest["fingerprint"]


def _folder_key(folder: Path) -> str:
    """A folder not made by this run: its config and the names, sizes and times of its files."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".model", ".jinja"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def window_note(hp: gguf_format.Hparams) -> str | None:
    """Said once at export and written into the card and the Modelfile: llama.cpp ignores the window."""
    if not hp.sliding_window or hp.sliding_window >= hp.context:
        return None
    return (f"sliding window {hp.sliding_window} < context {hp.context}: llama.cpp runs Mistral as its `llama` "
            f"architecture with full attention, so outputs match transformers only while the sequence fits in "
            f"{hp.sliding_window} tokens (the Modelfile sets num_ctx {hp.sliding_window})")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def quantize_with_llama_cpp(src: Path, dst: Path, ftype: str) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from an f16 GGUF."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[ftype]
    params.nthread = os.cpu_count() or 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed on {src} (status {rc})")


def read_manifest(out: Path) -> dict:
    path = out / runs.MANIFEST
    return json.loads(path.read_text()) if path.exists() else {"stage": "export", "files": {}}


def run(cfg: DictConfig) -> Path:
    check_options(cfg)
    run_dir = RunDir.of(cfg)
    source, source_key = source_of(cfg)
    quant = cfg.export.quant
    name = cfg.export.name or (source.resolve().name if cfg.export.model else run_dir.root.resolve().name)
    out = run_dir.export
    path = out / f"{name}-{quant}.gguf"
    key = fingerprint({"format": cfg.export.format, "quant": quant, "name": name, "source": str(source.resolve()),
                       "source_key": source_key})
    manifest = read_manifest(out)
    entry = manifest["files"].get(path.name)
    if entry and path.exists():
        if entry["fingerprint"] == key:
            log.info("export: %s already made from this model, skipping (force=true to redo)", path)
            return path
        if not cfg.force:
            raise UserError(f"{path} was exported from another model ({entry['source']}, since changed or replaced)",
                            hint="force=true to export it again, or export.name=... for a second file")
    if not runs.is_main_process():
        return path

    hp = gguf_format.read_hparams(source)
    note = window_note(hp)
    if note:
        log.warning("export: %s", note)
    template = gguf_format.read_chat_template(source)
    if template is None:
        log.warning("export: %s has no chat template; the GGUF will have none (llama.cpp falls back to its own guess)",
                    source)
    chat_format = _chat_format(run_dir, template, cfg)
    runs.write_stage_config(cfg, "export")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{path.name}.tmp-{os.getpid()}"
    f16_tmp = out / f".{name}-f16-for-{quant}.tmp-{os.getpid()}"
    try:
        stripped = gguf_format.strip_generation_markers(template) if template else None
        if quant in gguf_format.PYTHON_QUANTS:
            info = gguf_format.write_gguf(source, tmp, quant, name, stripped)
        else:
            info = gguf_format.write_gguf(source, f16_tmp, "f16", name, stripped)
            quantize_with_llama_cpp(f16_tmp, tmp, quant)
            info["tensor_types"] = _tensor_types(tmp)
        os.replace(tmp, path)
    finally:
        for p in (tmp, f16_tmp):
            p.unlink(missing_ok=True)
    num_ctx = min(hp.context, hp.sliding_window or hp.context)
    modelfile = out / f"{name}-{quant}.Modelfile"
    runs.atomic_write_text(modelfile, ollama.modelfile(path.name, chat_format, num_ctx, note))
    seconds = time.perf_counter() - start
    manifest = read_manifest(out)  # re-read: keep the entries of the other files
    manifest["files"][path.name] = {
        "gguf": path.name, "quant": quant, "modelfile": modelfile.name, "bytes": path.stat().st_size, "sha256": _sha256(path),
        "fingerprint": key, "source": str(source), "source_key": source_key, "chat_format": chat_format, "sliding_window_note": note,
        "seconds": round(seconds, 1), **info,
    }
    manifest.update(stage="export", finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    runs.write_json(out / runs.MANIFEST, manifest)
    log.info("export: %s -> %s (%s, %.1f MB, %s, %.1f s); Ollama: ollama create %s -f %s",
             source, path, quant, path.stat().st_size / 1e6,
             ", ".join(f"{n} {t}" for t, n in info["tensor_types"].items()), seconds, name, modelfile)
    from mistral_tune import card

    card.write_card(cfg)  # names the GGUF files (when run_dir/merged exists)
    return path


def _chat_format(run_dir: RunDir, template: str | None, cfg: DictConfig) -> str | None:
    """The format's name for the Modelfile: the run's when exporting its merged model, else the one
    of ours whose Jinja template the folder carries; None for any other template (the Modelfile
    then has none, and says so)."""
    if not cfg.export.model and run_dir.chat_format.exists():
        return json.loads(run_dir.chat_format.read_text())["template"]
    from mistral_tune.formats.tokenizer import CHAT_TEMPLATES

    return next((name for name, text in CHAT_TEMPLATES.items() if text == template), None)


def _tensor_types(path: Path) -> dict[str, int]:
    import gguf

    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
