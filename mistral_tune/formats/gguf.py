"""A Hugging Face Mistral checkpoint as one GGUF file (llama.cpp, Ollama, LM Studio).

llama.cpp runs Mistral models as its `llama` architecture. The file is written with the `gguf`
package (llama.cpp's own writer library): its `GGUFWriter`, its tensor-name map for
`MODEL_ARCH.LLAMA` and its Q8_0 quantizer. What the package does not do for us, and why:

- Q/K layout. HF's Mistral applies rotary embeddings to the two halves of each head
  (`rotate_half`: dim i pairs with dim i + head_dim/2); llama.cpp's `llama` architecture pairs
  neighbouring dims (2i, 2i + 1). The rows of q_proj and k_proj are reordered per head so that
  llama.cpp's rotation of the permuted projection equals HF's rotation of the original
  (`to_llama_rope_layout`; tests/test_export.py checks it against transformers' own rotary code).
- The vocabulary. `gguf.vocab.SentencePieceVocab` marks SentencePiece's user-defined pieces as
  normal ones (its source says so); v3 and v7 have 20-22 of them (`[REFERENCE_DOC_1]`, ...),
  which HF and mistral-common keep whole. SentencePiece's piece types are the GGUF token types
  (normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6), so the pieces, scores and
  types are read from the SentencePiece file directly.
- The chat template is the run's own (tokenizer_config / chat_template.jinja of the folder),
  without HF's `{% generation %}` markers: they only mark the loss mask for
  `return_assistant_tokens_mask`, render nothing, and llama-cpp-python's Jinja environment
  rejects the unknown tag. The rendered text is identical (tested).

q4_k_m is not done here: llama.cpp's own quantizer (stages/export.py, through llama-cpp-python)
makes it from the f16 file.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral_tune.errors import UserError
from mistral_tune.preflight import adapter_base

log = logging.getLogger("mistral_tune")

# The quantizations we write. q4_k_m goes through llama.cpp's quantizer (stages/export.py).
QUANTS = ("f16", "q8_0", "q4_k_m")
PYTHON_QUANTS = ("f16", "q8_0")

_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")


@dataclass(frozen=True)
class Hparams:
    """What llama.cpp needs to know about the network, read from config.json."""

    n_layers: int
    hidden: int
    ffn: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tied: bool
    sliding_window: int | None


@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int
    add_space_prefix: bool
    source: str  # which file the pieces came from
    specials: dict[str, int] = field(default_factory=dict)


def strip_generation_markers(template: str) -> str:
    """The chat template without HF's `{% generation %}`/`{% endgeneration %}` tags (they render
    nothing; runtimes other than transformers do not know them)."""
    return _GENERATION_TAG.sub("", template)


def check_source(folder: Path, key: str = "export.model") -> dict:
    """config.json of a Mistral-architecture model folder, or a one-line UserError."""
    if not folder.exists():
        raise UserError(f"{key}={folder} does not exist")
    if not folder.is_dir():
        raise UserError(f"{key}={folder} is a file; give the model's folder (e.g. run_dir/merged)")
    if (folder / "adapter_config.json").exists():
        base = adapter_base(folder)
        raise UserError(f"{key}={folder} holds a LoRA/PEFT adapter, not a model"
                        + (f" (its base: {base})" if base else "")
                        + "; export the merged model instead (mistral-tune merge writes run_dir/merged)")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise UserError(f"{key}={folder} is not a model folder: no config.json (export run_dir/merged, or a HF Mistral folder)")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise UserError(f"{config_path} is not valid JSON ({err})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    archs = config.get("architectures") or [] if isinstance(config, dict) else []
    if model_type != "mistral" or (archs and archs != ["MistralForCausalLM"]):
        raise UserError(f"{key}={folder} is a {model_type or 'unknown'} model ({', '.join(archs) or 'no architectures'}): "
                        "GGUF export takes Mistral-architecture checkpoints (model_type mistral, MistralForCausalLM) only")
    if not list(folder.glob("*.safetensors")):
        raise UserError(f"{key}={folder} has no *.safetensors weights")
    return config


def read_hparams(folder: Path) -> Hparams:
    from transformers import MistralConfig

    c = MistralConfig.from_pretrained(str(folder), local_files_only=True)
    rope = dict(getattr(c, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":  # llama.cpp would need the scaling written too; we do not map it yet
        raise UserError(f"{folder}: rope_type {rope_type!r} is not supported by the GGUF export (default RoPE only)")
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is None:
        raise UserError(f"{folder}/config.json gives no rope_theta")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if getattr(c, "hidden_act", "silu") != "silu":
        raise UserError(f"{folder}: hidden_act {c.hidden_act!r}; llama.cpp's llama architecture computes SiLU")
    return Hparams(
        n_layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
        n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads or c.num_attention_heads,
        head_dim=head_dim, context=c.max_position_embeddings, rope_theta=float(theta),
        rms_eps=float(c.rms_norm_eps), vocab_size=c.vocab_size, tied=bool(c.tie_word_embeddings),
        sliding_window=c.sliding_window,
    )


def to_llama_rope_layout(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the output rows of a q/k projection, head by head, from HF's rotate-half layout
    (dims i and i + d/2 rotate together) to llama.cpp's interleaved one (dims 2i and 2i + 1):
    row i of a head moves to 2i, row i + d/2 to 2i + 1."""
    rows = weight.shape[0]
    d = rows // n_heads
    halves = weight.reshape(n_heads, 2, d // 2, *weight.shape[1:])  # [head, half, i, ...]
    return np.swapaxes(halves, 1, 2).reshape(weight.shape)  # [head, i, half, ...]: 2i + half


def read_vocab(folder: Path, hp: Hparams) -> Vocab:
    """The SentencePiece vocabulary of the folder's tokenizer, pieces checked against
    mistral-common's file for its version (formats/checkpoint.py), with scores and types."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    from mistral_tune.formats.checkpoint import inspect_checkpoint
    from mistral_tune.formats.templates import mistral_tokenizer_file

    checkpoint = inspect_checkpoint(str(folder))
    if checkpoint.vocab is None:
        raise UserError(f"{folder} holds no tokenizer (tokenizer.json or tokenizer.model): the GGUF needs one")
    # The folder's pieces equal mistral-common's file (inspect_checkpoint checked id for id), whose
    # scores drive llama.cpp's SentencePiece merges; tokenizer.json has no scores.
    sp_file = mistral_tokenizer_file(checkpoint.vocab)
    proto = sp_model.ModelProto()
    proto.ParseFromString(sp_file.read_bytes())
    tokens = [p.piece.encode("utf-8") for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(p.type) for p in proto.pieces]  # SentencePiece's enum is GGUF's TokenType
    if hp.vocab_size < len(tokens):
        raise UserError(f"{folder}: config.json vocab_size {hp.vocab_size} < the tokenizer's {len(tokens)} pieces")
    for i in range(len(tokens), hp.vocab_size):  # embedding rows beyond the tokenizer: never produced
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(5)  # unused
    tok = _hf_tokenizer(folder)
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else ids["<unk>"]
    return Vocab(tokens=tokens, scores=scores, types=types, bos=ids["<s>"], eos=ids["</s>"], unk=ids["<unk>"],
                 pad=pad, add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
                 source=f"{checkpoint.vocab} ({sp_file.name}, {checkpoint.evidence})")


def _hf_tokenizer(folder: Path):
    if not ((folder / "tokenizer.json").exists() or (folder / "tokenizer_config.json").exists()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def read_chat_template(folder: Path) -> str | None:
    """The folder's chat template (as transformers loads it), None when it has none."""
    tok = _hf_tokenizer(folder)
    template = getattr(tok, "chat_template", None) if tok is not None else None
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template


def _tensors(folder: Path):
    """(name, float32 numpy array) of every weight, shard by shard (bf16 read through torch)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists()
              else sorted(p.name for p in folder.glob("*.safetensors")))
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name).float().numpy()


def _storage(name: str, array: np.ndarray, quant: str, f16_tensors: tuple[str, ...] = ()):
    """(data, raw_dtype or None) of one tensor: norms stay float32 (llama.cpp computes them in
    f32 and they are tiny); matrices f16, or Q8_0 where rows divide into its 32-value blocks,
    except those named in `f16_tensors`."""
    import gguf

    if array.ndim == 1:
        return array.astype(np.float32), None
    if (quant == "q8_0" and name not in f16_tensors
            and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0):
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def write_gguf(folder: Path, out: Path, quant: str, name: str, chat_template: str | None,
               f16_tensors: tuple[str, ...] = ()) -> dict:
    """Write `folder` (a checked Mistral HF folder) to the GGUF file `out` (the caller renames it
    into place). Returns what was written, for the manifest. `f16_tensors`: GGUF tensor names kept
    f16 in a q8_0 file, as llama-quantize's --output-tensor-type / --token-embedding-type do
    (bench/gguf_q8_sensitivity.py measures what each costs and gains; the export keeps none)."""
    import gguf

    if quant not in PYTHON_QUANTS:
        raise ValueError(f"write_gguf writes {PYTHON_QUANTS}, not {quant}")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file INFO lines are noise in our log
    hp = read_hparams(folder)
    vocab = read_vocab(folder, hp)
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA]
    writer = gguf.GGUFWriter(str(out), arch, use_temp_file=True)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    writer.add_feed_forward_length(hp.ffn)
    writer.add_head_count(hp.n_heads)
    writer.add_head_count_kv(hp.n_kv_heads)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)
    if hp.sliding_window:  # informational: the llama architecture does not read it
        writer.add_sliding_window(hp.sliding_window)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("llama")  # llama.cpp's SentencePiece tokenizer
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    writer.add_unk_token_id(vocab.unk)
    writer.add_pad_token_id(vocab.pad)
    # The HF tokenizer prepends BOS to plain text, never EOS; our chat templates write the BOS
    # themselves, so a runtime must tokenize a rendered chat without adding another (as
    # llama.cpp's and Ollama's chat paths do for templates that start with bos_token).
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if chat_template:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    written: dict[str, str] = {}
    seen = set()
    for hf_name, array in _tensors(folder):
        if hf_name.endswith("rotary_emb.inv_freq"):  # recomputed by every runtime from rope_theta
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"{folder}: tensor {hf_name} has no llama.cpp counterpart (not a plain Mistral model?)")
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = to_llama_rope_layout(array, hp.n_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = to_llama_rope_layout(array, hp.n_kv_heads)
        if hf_name == "lm_head.weight" and hp.tied:
            continue  # llama.cpp reuses token_embd when `output` is absent
        data, raw = _storage(gguf_name, array, quant, f16_tensors)
        writer.add_tensor(gguf_name, data, raw_dtype=raw)
        written[gguf_name] = (raw or (gguf.GGMLQuantizationType.F16 if data.dtype == np.float16
                                      else gguf.GGMLQuantizationType.F32)).name
        seen.add(hf_name)
    expected = 2 + 9 * hp.n_layers + (0 if hp.tied else 1)  # embed, norm, (head), 9 per block
    unknown = set(f16_tensors) - set(written)
    if unknown:
        raise ValueError(f"f16_tensors names no tensor of the file: {sorted(unknown)}")
    if len(written) != expected:
        raise UserError(f"{folder}: {len(written)} weight tensors mapped, expected {expected} for a "
                        f"{hp.n_layers}-layer Mistral model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    types: dict[str, int] = {}
    for t in written.values():
        types[t] = types.get(t, 0) + 1
    return {"hparams": hp.__dict__, "vocab": vocab.source, "tensor_types": types, "tensors": len(written),
            "chat_template": bool(chat_template)}
