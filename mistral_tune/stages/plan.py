"""The `plan` command: what a run will cost, before it runs and without downloading weights.

The model is built on the meta device from its config (no memory, no weights): parameters and
trainable parameters are counted on it, with PEFT's own LoRA layers when peft is lora/qlora.
Steps per epoch come from the data (run_dir/data/report.json, built if missing) or from
`plan.sft_rows`/`plan.dpo_rows`. The per-GPU memory estimate is the formula printed with it
(model states sharded as the launcher's ZeRO stage does, plus activations, logits and a fixed
overhead); for full fine-tuning under ZeRO-2/3 DeepSpeed's own estimator is printed beside it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from mistral_tune import runs
from mistral_tune.config import REPO_ROOT
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.runs import RunDir
from mistral_tune.stages import data
from mistral_tune.training.modeling import lora_config, tiny_config

log = logging.getLogger("mistral_tune")
GiB = 2**30
OVERHEAD_GIB = 1.0  # CUDA context, allocator fragmentation, NCCL buffers: a rough constant
NF4_BYTES = 0.5 + 4 / 64  # 4-bit weights plus one fp32 absmax per 64-weight block (double quant saves most of it)


def model_config(cfg: DictConfig) -> tuple[object, str]:
    """(transformers config, where it came from). Never downloads: a hub id is read from a local
    folder or the local HF cache; a Mistral hub id with neither falls back to MistralConfig()'s
    defaults, which are the Mistral-7B shape, with the vocabulary of the template's tokenizer."""
    from transformers import AutoConfig, MistralConfig

    from mistral_tune.formats.templates import mistral_tokenizer

    template = ChatFormat.resolve(cfg).vocab
    vocab = mistral_tokenizer(template).instruct_tokenizer.tokenizer.n_words
    name = cfg.model.name_or_path
    if not name:
        return tiny_config(cfg, vocab), f"model.config (random init), vocab {vocab} from the {template} tokenizer"
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name, trust_remote_code=cfg.model.trust_remote_code), f"{name}/config.json"
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.model.revision, local_files_only=True)
        return config, f"{name} (local Hugging Face cache)"
    except (OSError, ValueError):
        pass
    config = MistralConfig(vocab_size=vocab)
    return config, (f"MistralConfig() defaults, the 7B shape (no local config for {name} and no download), "
                    f"vocab {vocab} from the {template} tokenizer")


def peft_method(cfg: DictConfig) -> str:
    method = cfg.model.default_peft if cfg.peft.method == "auto" else cfg.peft.method
    if method not in ("none", "lora", "qlora"):
        raise UserError(f"peft.method={method!r} is not one of none, lora, qlora")
    return method  # unlike modeling.resolve_peft, no CUDA needed to plan a QLoRA run


def meta_model(config, cfg: DictConfig, method: str):
    """The model on the meta device, with LoRA layers when training with LoRA/QLoRA."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        if method != "none":
            from peft import get_peft_model

            model = get_peft_model(model, lora_config(cfg))
    return model


def count_parameters(model, method: str) -> dict:
    """base (the model's own), adapter (LoRA), total, trainable, frozen, 4-bit frozen (QLoRA: the
    linear layers but lm_head), largest layer."""
    total = trainable = quantized = largest = adapter = 0
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        n = sum(p.numel() for p in own)
        largest = max(largest, n)
        if method == "qlora" and isinstance(module, torch.nn.Linear) and "lora_" not in name and not name.endswith("lm_head"):
            quantized += sum(p.numel() for p in own if not p.requires_grad)
    for name, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
        adapter += p.numel() if "lora_" in name else 0
    return {"base": total - adapter, "adapter": adapter, "total": total, "trainable": trainable,
            "frozen": total - trainable, "quantized": quantized, "largest_layer": largest}


def lora_closed_form(config, r: int, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")) -> int:
    """LoRA adds A (r x in) and B (out x r) to each adapted linear layer: r * (in + out) each."""
    h, i = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    return config.num_hidden_layers * sum(r * sum(shapes[t]) for t in targets)


def launcher_setup(cfg: DictConfig) -> dict:
    """ZeRO stage and offload from the launcher's accelerate config; 0 without DeepSpeed."""
    num_gpus = cfg.plan.num_gpus or cfg.launcher.num_processes
    # launcher.num_machines splits the GPUs into nodes (DeepSpeed's estimate counts per node);
    # plan.num_gpus without it keeps plan.gpus_per_node.
    machines = cfg.launcher.num_machines if cfg.launcher.num_machines > 1 and not cfg.plan.num_gpus else None
    setup = {"name": cfg.launcher.name, "zero": 0, "offload_optimizer": False, "offload_param": False,
             "num_gpus": num_gpus, "num_machines": machines, "config_file": cfg.launcher.config_file}
    if cfg.launcher.config_file:
        path = Path(cfg.launcher.config_file)
        path = path if path.is_absolute() else REPO_ROOT / path
        if not path.exists():
            raise UserError(f"launcher.config_file={cfg.launcher.config_file!r} does not exist")
        acc = yaml.safe_load(path.read_text()) or {}
        ds = acc.get("deepspeed_config") or {}
        if acc.get("distributed_type") == "DEEPSPEED":
            setup["zero"] = int(ds.get("zero_stage", 0))
            setup["offload_optimizer"] = ds.get("offload_optimizer_device", "none") not in ("none", None)
            setup["offload_param"] = ds.get("offload_param_device", "none") not in ("none", None)
    return setup


def _trainer_value(cfg: DictConfig, stage: str, key: str, default):
    node = cfg[stage].trainer
    return default if OmegaConf.is_missing(node, key) or node[key] is None else node[key]


def steps(rows: int | None, cfg: DictConfig, stage: str, num_gpus: int) -> dict:
    """Optimizer steps per epoch as transformers counts them: ceil(batches per rank / accumulation)."""
    bs = _trainer_value(cfg, stage, "per_device_train_batch_size", 8)
    ga = _trainer_value(cfg, stage, "gradient_accumulation_steps", 1)
    epochs = _trainer_value(cfg, stage, "num_train_epochs", 3.0)
    max_steps = _trainer_value(cfg, stage, "max_steps", -1)
    out = {"batch": bs, "accumulation": ga, "global_batch": bs * ga * num_gpus, "epochs": epochs}
    if rows:
        per_epoch = math.ceil(math.ceil(rows / (bs * num_gpus)) / ga)
        out.update(rows=rows, per_epoch=per_epoch, total=max_steps if max_steps > 0 else math.ceil(per_epoch * epochs))
    return out


def memory(config, counts: dict, cfg: DictConfig, stage: str, method: str, setup: dict, seq: int) -> dict:
    """Per-GPU bytes by part. The formula (printed by `plan`):
    weights   = frozen * w_frozen + trainable * w        (/N under ZeRO-3)
    gradients = trainable * g                           (/N under ZeRO-2, 3)
    optimizer = trainable * o                           (/N under ZeRO-1, 2, 3; 0 when offloaded)
      DeepSpeed (mixed precision): w=2, g=2, o=16 (fp32 master weight, fp32 gradient, Adam m, v);
      otherwise: w=g=dtype bytes, o=2*w (AdamW m, v in the parameter dtype); LoRA adapters are fp32.
    reference = DPO with full training: a frozen copy of the policy (/N under ZeRO-3)
    activations = tokens * (L * h * w + layer) with checkpointing, tokens * L * layer without,
      layer = w * (6h + 2 kv + 4 i) per token; tokens = batch * max_length (* 2 for DPO pairs and KTO rows with their KL rows)
    logits    = tokens * vocab * 4 * 2 (fp32 logits and their gradient; an upper bound)
    overhead  = 1 GiB."""
    n, zero = setup["num_gpus"], setup["zero"]
    dtype = cfg.model.dtype
    w = 2 if dtype in ("bfloat16", "float16") or (dtype == "auto") else 4  # auto: bf16 on the GPUs planned for
    w_frozen_bytes = counts["quantized"] * NF4_BYTES + (counts["frozen"] - counts["quantized"]) * w
    if zero:
        wt, g, o = 2, 2, 16
    elif method == "none":
        wt, g, o = w, w, 2 * w
    else:
        wt, g, o = 4, 4, 8  # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype)
    T = counts["trainable"]
    parts = {
        "weights": (w_frozen_bytes + T * wt) / (n if zero >= 3 else 1),
        "gradients": T * g / (n if zero >= 2 else 1),
        "optimizer": 0 if setup["offload_optimizer"] else T * o / (n if zero >= 1 else 1),
        "reference": (counts["total"] * w / (n if zero >= 3 else 1)) if stage in ("dpo", "kto") and method == "none" else 0,
    }
    if setup["offload_param"] and zero >= 3:
        parts["weights"] = parts["reference"] = 4 * counts["largest_layer"]  # one gathered layer at a time
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    bs = _trainer_value(cfg, stage, "per_device_train_batch_size", 8)
    tokens = bs * seq * (2 if stage in ("dpo", "kto") else 1)  # KTO: each row and its KL (mismatched) row
    layer = w * (6 * h + 2 * kv + 4 * i)
    ckpt = _trainer_value(cfg, stage, "activation_checkpointing", None)
    ckpt = _trainer_value(cfg, stage, "gradient_checkpointing", True) if ckpt is None else ckpt
    parts["activations"] = tokens * (L * h * w + layer) if ckpt else tokens * L * layer
    parts["logits"] = tokens * config.vocab_size * 4 * 2
    parts["overhead"] = OVERHEAD_GIB * GiB
    parts["total"] = sum(parts.values())
    return {"parts": parts, "tokens_per_micro_batch": tokens, "checkpointing": bool(ckpt)}


def deepspeed_estimate(counts: dict, setup: dict, gpus_per_node: int) -> float | None:
    """DeepSpeed's own per-GPU model-states estimate (full fine-tuning, no offload), in bytes."""
    if setup["zero"] not in (2, 3):
        return None
    if setup.get("num_machines"):
        nodes = setup["num_machines"]
        per_node = setup["num_gpus"] // nodes
    else:
        per_node = min(gpus_per_node, setup["num_gpus"])
        nodes = math.ceil(setup["num_gpus"] / per_node)
    if setup["zero"] == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _, gpu, _ = estimate_zero3_model_states_mem_needs(counts["total"], counts["largest_layer"], per_node, nodes,
                                                         cpu_offload=setup["offload_optimizer"],
                                                         cpu_offload_params=setup["offload_param"])
        return gpu
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, gpu = estimate_zero2_model_states_mem_needs(counts["total"], per_node, nodes, cpu_offload=setup["offload_optimizer"])
    return gpu


def data_rows(cfg: DictConfig) -> tuple[dict, str]:
    """{stage: {"rows", "tokens", "mean_length"}} from the data stage, or plan.*_rows."""
    rows = {s: {"rows": cfg.plan[f"{s}_rows"]} for s in ("sft", "dpo") if cfg.plan[f"{s}_rows"]}
    if rows:
        return rows, "plan.sft_rows / plan.dpo_rows"
    kinds = [s for s in cfg.stages if data.has_data(cfg, s)]
    if not kinds:
        return {}, "no data files (sft.data.files=[...], or plan.sft_rows=N plan.dpo_rows=N)"
    out = {}
    for kind in kinds:  # the CLI built them (or found them built from the same inputs)
        report = runs.require_manifest(cfg, runs.data_stage(kind), "plan")["report"]
        out[kind] = {"rows": report["kept"], "tokens": report["tokens"], "mean_length": report["length"]["mean"]}
    return out, f"{RunDir.of(cfg).data_root}/<stage>/report.json"


def build_plan(cfg: DictConfig) -> dict:
    config, source = model_config(cfg)
    method = peft_method(cfg)
    counts = count_parameters(meta_model(config, cfg, method), method)
    setup = launcher_setup(cfg)
    rows, rows_source = data_rows(cfg)
    stages = list(cfg.stages)
    plan = {"config_source": source, "method": method, "counts": counts, "launcher": setup, "rows_source": rows_source,
            "config": config, "stages": {}}
    for stage in stages:
        seq = cfg[stage].data.max_length
        plan["stages"][stage] = {
            "data": rows.get(stage, {}),
            "steps": steps(rows.get(stage, {}).get("rows"), cfg, stage, setup["num_gpus"]),
            "memory": memory(config, counts, cfg, stage, method, setup, seq),
        }
    if method == "none":
        plan["deepspeed"] = deepspeed_estimate(counts, setup, cfg.plan.gpus_per_node)
    return plan


def render(plan: dict, cfg: DictConfig) -> str:
    c, counts, setup = plan["config"], plan["counts"], plan["launcher"]
    out = [f"plan: {cfg.model.name_or_path or 'tiny random model'}"
           + (f" (experiment with launcher={setup['name']})" if setup["name"] != "none" else ""),
           f"  model config: {plan['config_source']}",
           f"  shape: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
           f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, vocab {c.vocab_size}",
           f"  parameters: {counts['base']:,} ({counts['base'] / 1e9:.2f}B)"
           + (f" + {counts['adapter']:,} LoRA" if counts["adapter"] else "")]
    method = {"none": "full fine-tuning", "lora": f"LoRA r={cfg.peft.r} on {_targets(cfg)}",
              "qlora": f"QLoRA (4-bit base) r={cfg.peft.r} on {_targets(cfg)}"}[plan["method"]]
    out.append(f"  trainable: {counts['trainable']:,} ({100 * counts['trainable'] / counts['total']:.2f}%), {method}"
               + (f"; closed form {lora_closed_form(c, cfg.peft.r, _target_list(cfg)):,}" if plan["method"] != "none" and _target_list(cfg) else ""))
    where = f"{setup['config_file']}: DeepSpeed ZeRO-{setup['zero']}" if setup["zero"] else (setup["config_file"] or "one process per GPU")
    offload = [k for k in ("offload_optimizer", "offload_param") if setup[k]]
    out.append(f"  launcher: {setup['name']} ({where}{', ' + ', '.join(offload) if offload else ''}), "
               f"{setup['num_gpus']} GPU(s)"
               + (f" on {setup['num_machines']} machines" if setup.get("num_machines") else "")
               + ("" if cfg.plan.num_gpus else " (launcher.num_processes; plan.num_gpus=N to change)"))
    out.append(f"  data: {plan['rows_source']}")
    for stage, p in plan["stages"].items():
        d, s = p["data"], p["steps"]
        if "rows" in s:
            tokens = f", {d['tokens']:,} tokens (mean {d['mean_length']})" if "tokens" in d else ""
            out.append(f"  {stage}: {s['rows']:,} rows{tokens}; {s['per_epoch']:,} steps/epoch x {s['epochs']} epochs "
                       f"= {s['total']:,} steps (global batch {s['global_batch']} = {s['batch']} x {s['accumulation']} "
                       f"accumulation x {setup['num_gpus']} GPUs)")
        else:
            out.append(f"  {stage}: steps unknown without data; global batch {s['global_batch']}")
    out.append(f"  memory per GPU (GiB), {cfg[next(iter(plan['stages']))].data.max_length}-token rows at the micro-batch size:")
    names = ["weights", "gradients", "optimizer", "reference", "activations", "logits", "overhead", "total"]
    out.append("    " + "".ljust(12) + "".join(s.rjust(9) for s in plan["stages"]))
    for name in names:
        out.append("    " + name.ljust(12) + "".join(f"{p['memory']['parts'][name] / GiB:9.1f}" for p in plan["stages"].values()))
    out.append("  formula: " + memory.__doc__.split("The formula (printed by `plan`):")[1].strip().replace("\n", "\n  "))
    if plan.get("deepspeed") is not None:
        first = next(iter(plan["stages"].values()))["memory"]["parts"]
        ours = sum(first[k] for k in ("weights", "gradients", "optimizer"))
        out.append(f"  DeepSpeed's estimate_zero{setup['zero']}_model_states_mem_needs (model states only): "
                   f"{plan['deepspeed'] / GiB:.1f} GiB per GPU (the formula's weights + gradients + optimizer: "
                   f"{ours / GiB:.1f} GiB)")
    budget = cfg.plan.gpu_memory_gb
    for stage, p in plan["stages"].items():
        total = p["memory"]["parts"]["total"] / GiB
        if total > budget:
            out.append(f"  WARNING: {stage} needs ~{total:.1f} GiB per GPU > plan.gpu_memory_gb={budget:g}: it will not fit; "
                       "use more GPUs, a higher ZeRO stage, offload, LoRA/QLoRA or a smaller micro-batch")
        elif total > (1 - HEADROOM) * budget:
            # Allocator fragmentation, NCCL buffers and the longest packed row are not in the formula.
            out.append(f"  WARNING: {stage} fits only just ({total:.1f} of {budget:g} GiB per GPU, "
                       f"{100 * (budget - total) / budget:.1f}% headroom < {100 * HEADROOM:.0f}%): fragmentation or a "
                       "long batch can still run out of memory; leave room with a smaller micro-batch, more GPUs or offload")
        else:
            out.append(f"  {stage}: fits ({total:.1f} of {budget:g} GiB per GPU)")
    return "\n".join(out)


HEADROOM = 0.10  # the plan warns when the estimate leaves less than this fraction of GPU memory free


def _target_list(cfg: DictConfig) -> tuple[str, ...] | None:
    """The LoRA targets as projection names (all-linear: every linear layer but lm_head)."""
    t = cfg.peft.target_modules
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    names = every if t == "all-linear" else tuple(t) if not isinstance(t, str) else (t,)
    return names if set(names) <= set(every) else None


def _targets(cfg: DictConfig) -> str:
    t = cfg.peft.target_modules
    return t if isinstance(t, str) else ",".join(t)


def run(cfg: DictConfig) -> dict:
    plan = build_plan(cfg)
    print(render(plan, cfg))
    return {k: v for k, v in plan.items() if k != "config"}
