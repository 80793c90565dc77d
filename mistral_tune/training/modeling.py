"""Models: the tiny random base, loading checkpoints, PEFT settings, and rebuilding a policy
from a base plus a chain of adapters."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mistral_tune.errors import UserError
from mistral_tune.runs import RunDir, is_main_process, previous_stage, require_manifest, wait_for_everyone

log = logging.getLogger("mistral_tune")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_peft(cfg: DictConfig) -> str:
    method = cfg.peft.method
    method = cfg.model.default_peft if method == "auto" else method
    if method not in ("none", "lora", "qlora"):
        raise UserError(f"peft.method={method!r} is not one of none, lora, qlora")
    if method == "qlora":
        if not torch.cuda.is_available():
            raise UserError(
                "peft=qlora needs a CUDA GPU (bitsandbytes 4-bit); none is available here",
                hint="use peft=lora on this machine",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("peft=qlora needs bitsandbytes", hint="pip install -e '.[gpu]'")
    return method


def resolve_dtype(cfg: DictConfig) -> torch.dtype:
    name = cfg.model.dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise UserError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_attn(cfg: DictConfig, inference: bool = False) -> str:
    """The attention kernel. `auto`: FlashAttention-2 (varlen) on CUDA when flash-attn is installed;
    else flex_attention on CUDA; SDPA on CPU.

    Our batches are padding-free: sequences packed into one row with restarting position_ids.
    transformers turns that into a per-sequence causal, sliding-window mask for every kernel, but
    SDPA receives it as a dense [L, L] mask and pays for the whole pack: on an H200 (hidden 2048 x
    8 layers, 360-1930-token rows) packed SDPA ran 2.5x slower than plain padding, while the same
    packed batch through flex_attention's block mask (blocks between sequences and outside the
    window skipped) ran 5.6x faster than packed SDPA. FlashAttention-2 takes the packed row as
    varlen sequences and the window from config.sliding_window. On CPU, flex_attention is
    forward-only in torch 2.13, so SDPA stays the CPU path.

    `inference` (eval, pairs sampling, merge): padded batches and generation, nothing packed, so
    `auto` skips flex_attention there: its compiled kernel would recompile as the KV cache grows."""
    name = cfg.model.attn_implementation
    cuda = torch.cuda.is_available()
    has_fa2 = importlib.util.find_spec("flash_attn") is not None
    if name == "auto":
        return "flash_attention_2" if cuda and has_fa2 else "flex_attention" if cuda and not inference else "sdpa"
    if name == "flash_attention_2" and not (cuda and has_fa2):
        raise UserError(
            "model.attn_implementation=flash_attention_2 needs CUDA and the flash-attn package",
            hint="use model.attn_implementation=auto (flex_attention on CUDA, sdpa on CPU)",
        )
    return name


def tiny_config(cfg: DictConfig, vocab_size: int):
    from transformers import MistralConfig

    fields = OmegaConf.to_container(cfg.model.config, resolve=True)
    if fields.get("vocab_size") is None:
        fields["vocab_size"] = vocab_size
    try:
        return MistralConfig(**fields, bos_token_id=1, eos_token_id=2)
    except TypeError as err:
        raise UserError(f"model.config: {err}") from None


def ensure_base(cfg: DictConfig, tokenizer) -> str:
    """Path or hub id of the base model. A random tiny base is saved once to run_dir/base, so every
    later stage (DPO, merge, eval) starts from the same weights."""
    if cfg.model.name_or_path:
        path = Path(cfg.model.name_or_path)
        if (path.is_absolute() or str(path).startswith(".")) and not path.exists():
            raise UserError(f"model.name_or_path={cfg.model.name_or_path!r} does not exist")
        return str(cfg.model.name_or_path)
    base = RunDir.of(cfg).base
    if not (base / "config.json").exists() and is_main_process():
        from transformers import MistralForCausalLM

        config = tiny_config(cfg, len(tokenizer))
        torch.manual_seed(cfg.model.init_seed)
        model = MistralForCausalLM(config)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp = base.with_name("base.tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        tmp.rename(base)
        n = sum(p.numel() for p in model.parameters())
        log.info("built a random Mistral-architecture base (%.1fM parameters, seed %d) in %s",
                 n / 1e6, cfg.model.init_seed, base)
    wait_for_everyone()
    return str(base)


def load_model(path: str, cfg: DictConfig, quantize: bool = False, dtype: torch.dtype | None = None,
               inference: bool = False):
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=dtype or resolve_dtype(cfg),
        attn_implementation=resolve_attn(cfg, inference),  # metrics.json records the choice
        trust_remote_code=cfg.model.trust_remote_code,
        use_safetensors=True,  # never unpickle weights
    )
    if cfg.model.revision and path == cfg.model.name_or_path:
        kwargs["revision"] = cfg.model.revision
    if quantize:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=cfg.peft.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=cfg.peft.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load model from {path!r}: {str(err).splitlines()[0]}") from None


STAGE_PEFT_KEYS = ("r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora")


def lora_config(cfg: DictConfig, stage: str | None = None):
    """peft.*, with `<stage>.peft` over it: each stage trains its own adapter, so each may have its
    own rank (Zephyr's QLoRA recipe: r=16 for SFT, r=128 for DPO)."""
    from peft import LoraConfig

    settings = {k: cfg.peft[k] for k in STAGE_PEFT_KEYS}
    if stage is not None:
        extra = OmegaConf.to_container(cfg[stage].peft, resolve=True) if cfg[stage].get("peft") else {}
        unknown = set(extra) - set(STAGE_PEFT_KEYS)
        if unknown:
            raise UserError(f"{stage}.peft: unknown key(s) {sorted(unknown)}; per-stage keys: {', '.join(STAGE_PEFT_KEYS)}")
        settings.update(extra)
    targets = settings["target_modules"]
    if not isinstance(targets, str):
        targets = list(targets)
    return LoraConfig(
        r=settings["r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=targets,
        use_rslora=settings["use_rslora"],
        task_type="CAUSAL_LM",
    )


def load_policy(cfg: DictConfig, model_ref: dict, dtype: torch.dtype | None = None, inference: bool = False):
    """A base model with every adapter of the chain merged in, in full precision (`inference`: for
    eval, sampling or merging, see resolve_attn).

    Merging goes into full-precision weights, never into 4-bit ones (merged QLoRA models lose
    quality when the adapter is folded into quantised weights)."""
    from peft import PeftModel

    model = load_model(model_ref["base"], cfg, dtype=dtype, inference=inference)
    for adapter in model_ref.get("adapters", []):
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model


def start_model(cfg: DictConfig, stage: str, tokenizer) -> tuple[dict, dict | None]:
    """(model_ref, manifest) a training stage starts from: what the stage before it in
    `stages=[...]` left (its manifest must exist), or the base model (manifest None)."""
    previous = previous_stage(cfg, stage)
    if previous is None:
        return {"base": ensure_base(cfg, tokenizer), "adapters": []}, None
    manifest = require_manifest(cfg, previous, stage)
    return manifest["model"], manifest


def load_start(cfg: DictConfig, start: dict, method: str, out: Path):
    """The model a stage trains, from its start ref. For QLoRA a start with adapters is merged
    once in bf16 into out/start_policy and reloaded in 4-bit (adapters are never merged into
    4-bit weights); the stage removes that scratch copy when it finishes."""
    if method != "qlora":
        return load_policy(cfg, start)
    if not start["adapters"]:
        return load_model(start["base"], cfg, quantize=True)
    merged = out / "start_policy"
    if is_main_process() and not (merged / "config.json").exists():
        load_policy(cfg, start, dtype=torch.bfloat16).save_pretrained(merged, safe_serialization=True)
    wait_for_everyone()
    return load_model(str(merged), cfg, quantize=True)


def drop_start_copy(out: Path) -> None:
    """Remove load_start's QLoRA scratch copy once the stage is done (merge rebuilds from refs)."""
    if is_main_process():
        shutil.rmtree(out / "start_policy", ignore_errors=True)


def model_ref_after(stage_out: Path, method: str, previous: dict) -> dict:
    """How to rebuild the model a training stage produced: a base plus the adapters to merge."""
    if method == "none":
        return {"base": str(stage_out), "adapters": []}
    return {"base": previous["base"], "adapters": [*previous.get("adapters", []), str(stage_out)]}
