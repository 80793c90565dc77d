"""mistral_tune against plain TRL: same model, same data, same seed, each configuration in its own process.

    python bench/run.py --hidden-size 256 --layers 4 --sft-data data/sft.jsonl --dpo-data data/dpo.jsonl --steps 30

1. The data stage (`mistral_tune.stages.data`) builds the pre-tokenized SFT and DPO datasets from the files, and a
   Mistral-architecture model (vocab 32000, Mistral v1 tokenizer) is initialised from --seed. Both are
   cached in --workdir, keyed on the model arguments (the data build is content-keyed by the stage).
2. Every configuration trains in a fresh subprocess (`--worker NAME`), so its peak RSS is its own.
   Both sides get the same hyperparameters: the default pipeline's `sft.trainer`/`dpo.trainer`
   (built by `mistral_tune.training.trainers.trl_args`), with only batch size and step count set here.
   mistral_tune's rows are built by the functions the stages call (`mistral_tune.training.trainers`:
   `build_sft_trainer`, `build_dpo_trainer` with `dpo_reference`'s choice); TRL's rows use
   `trl.SFTTrainer`/`trl.DPOTrainer` unchanged.
   - SFT: both sides get the pre-tokenized `input_ids`/`assistant_masks` dataset (the same ids).
   - DPO: mistral_tune gets its pre-tokenized `prompt_ids`/`chosen_ids`/`rejected_ids`; TRL gets the
     conversational prompt/chosen/rejected rows and our HF tokenizer, whose chat template renders the
     same ids (checked: the worker counts rows whose ids differ, printed as `id mismatches`).
3. The first --warmup steps are not timed. The machine's GEMM peak (fp32 `torch.mm` on CPU, bf16 on
   CUDA, 2048^2, best of 10) is measured in this run; MFU = model FLOPs/s over that peak, with FLOPs
   per token from `trl.trainer.utils.compute_flops_per_token` (3 x forward, LM head on every token) for
   the policy and 1 x forward for the reference (none when it is precomputed).

Writes bench/results/latest.md and latest.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (stage, side, peft, extra overrides). "<mode>/trl" is what a plain TRL user gets: TRL's
# trainer on a model loaded as transformers loads it (SDPA attention), batches padded.
SDPA = "model.attn_implementation=sdpa"
NO_LIGER = "use_liger_kernel=false"
PLAIN = [SDPA, NO_LIGER]
CONFIGS = {
    "sft/trl": ("sft", "trl", "none", ["sft.trainer.padding_free=false", *PLAIN]),
    "sft/trl padding_free": ("sft", "trl", "none", ["sft.trainer.padding_free=true", *PLAIN]),
    "sft/mistral_tune": ("sft", "mistral_tune", "none", []),
    "dpo-full/trl": ("dpo", "trl", "none", PLAIN),
    "dpo-full/mistral_tune": ("dpo", "mistral_tune", "none", []),
    "dpo-lora/trl": ("dpo", "trl", "lora", PLAIN),
    "dpo-lora/mistral_tune": ("dpo", "mistral_tune", "lora", []),
    # not in the default run (--configs all): reference log-probs computed before training, and (full)
    # no reference model kept: the dpo.py change proposed with `precompute_ref_log_probs: true`
    "dpo-full/mistral_tune precompute": ("dpo", "mistral_tune", "none", ["++dpo.trainer.precompute_ref_log_probs=true"]),
    "dpo-lora/mistral_tune precompute": ("dpo", "mistral_tune", "lora", ["++dpo.trainer.precompute_ref_log_probs=true"]),
}
# CUDA only (flex_attention trains only on CUDA in torch 2.13; Liger's kernels are Triton). "best":
# the fastest TRL has to offer there: flex_attention's block mask, padding-free where TRL 1.16
# supports it (SFT; its DPO padding_free "falls back to standard padding"). Liger's layer kernels
# are rows of their own, not in the default run: with flex_attention on an H100 neither TRL's nor
# our SFT finished 8 steps with them (bench/results/gpu.md).
FLEX = "model.attn_implementation=flex_attention"
LIGER = "use_liger_kernel=true"
GPU_CONFIGS = {
    "sft/trl best": ("sft", "trl", "none", ["sft.trainer.padding_free=true", FLEX, NO_LIGER]),
    "sft/trl best + liger": ("sft", "trl", "none", ["sft.trainer.padding_free=true", FLEX, LIGER]),
    "sft/mistral_tune liger": ("sft", "mistral_tune", "none", [LIGER]),
    "dpo-full/trl best": ("dpo", "trl", "none", [FLEX, NO_LIGER]),
    "dpo-lora/trl best": ("dpo", "trl", "lora", [FLEX, NO_LIGER]),
    # LoRA SFT, for the 7B shape (--shape mistral-7b)
    "sft-lora/trl": ("sft", "trl", "lora", ["sft.trainer.padding_free=false", *PLAIN]),
    "sft-lora/trl best": ("sft", "trl", "lora", ["sft.trainer.padding_free=true", FLEX, NO_LIGER]),
    "sft-lora/mistral_tune": ("sft", "mistral_tune", "lora", []),
}
CONFIGS.update(GPU_CONFIGS)
DEFAULT_CONFIGS = [name for name in CONFIGS if "precompute" not in name and name not in GPU_CONFIGS]
DEFAULT_GPU_CONFIGS = ["sft/trl", "sft/trl best", "sft/mistral_tune", "dpo-full/trl", "dpo-full/trl best",
                       "dpo-full/mistral_tune", "dpo-lora/trl", "dpo-lora/trl best", "dpo-lora/mistral_tune"]
# Mistral-7B's layer shape (v0.1: 32 heads of 128, 8 KV heads, window 4096), --layers of them
SHAPES = {"mistral-7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, sliding_window=4096, max_position_embeddings=32768)}


def stage_overrides(stage: str, extra: list[str]) -> list[str]:
    """`use_liger_kernel=...` in a configuration is a trainer argument of its own stage."""
    return [f"{stage}.trainer.{o}" if o.startswith("use_liger_kernel=") else o for o in extra]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--sft-data", default=str(REPO / "data" / "sft.jsonl"))
    p.add_argument("--dpo-data", default=str(REPO / "data" / "dpo.jsonl"))
    p.add_argument("--max-length", type=int, default=None, help="sft/dpo.data.max_length (default: the config's)")
    p.add_argument("--steps", type=int, default=30, help="SFT steps per configuration")
    p.add_argument("--dpo-steps", type=int, default=10, help="DPO steps per configuration")
    p.add_argument("--batch-size", type=int, default=16, help="SFT rows per step")
    p.add_argument("--dpo-batch-size", type=int, default=8, help="DPO pairs per step")
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--configs", default=None,
                   help=f"comma-separated subset, or 'all' (default: {', '.join(DEFAULT_CONFIGS)}; on CUDA "
                        f"{', '.join(DEFAULT_GPU_CONFIGS)}); known: {', '.join(CONFIGS)}")
    p.add_argument("--shape", choices=sorted(SHAPES), default=None,
                   help="a real model's layer shape (--layers of them) instead of --hidden-size's tiny one")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every worker (default: torch's)")
    p.add_argument("--config-timeout", type=float, default=None,
                   help="seconds one configuration may take; past it, it is a failed row and the next one starts")
    p.add_argument("--set", action="append", default=[], metavar="OVERRIDE",
                   help="extra Hydra override for every configuration, e.g. --set +sft.trainer.group_by_length=true")
    p.add_argument("--workdir", default=str(REPO / "bench" / "work"))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "latest"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one configuration
    args = p.parse_args(argv)
    if args.warmup >= min(args.steps, args.dpo_steps):
        p.error("--warmup must be smaller than --steps and --dpo-steps")
    if args.configs is None:
        import torch

        args.configs = ",".join(DEFAULT_GPU_CONFIGS if torch.cuda.is_available() else DEFAULT_CONFIGS)
    args.configs = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}; known: {', '.join(CONFIGS)}")
    return args


def model_dir(args) -> Path:
    shape = args.shape or f"h{args.hidden_size}"
    return Path(args.workdir) / f"{shape}-l{args.layers}-seed{args.seed}"


def overrides(args, extra: list[str] = ()) -> list[str]:
    """The pipeline's own config (tiny model shape scaled to --hidden-size), bench sizes on top."""
    h = args.hidden_size
    heads = max(1, h // 32)  # head_dim 32 and GQA 2:1, as in configs/model/tiny.yaml
    out = [
        f"run_dir={model_dir(args)}", "logger=none", "force=true", f"seed={args.seed}",
        f"sft.data.files=[{Path(args.sft_data).resolve()}]", f"dpo.data.files=[{Path(args.dpo_data).resolve()}]",
        f"model.init_seed={args.seed}", f"model.config.num_hidden_layers={args.layers}",
    ]
    shape = SHAPES[args.shape] if args.shape else dict(
        hidden_size=h, intermediate_size=3 * h, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=32)
    out += [f"model.config.{k}={v}" for k, v in shape.items()]
    if args.max_length:
        out += [f"sft.data.max_length={args.max_length}", f"dpo.data.max_length={args.max_length}"]
    for stage, steps, batch in (("sft", args.steps, args.batch_size), ("dpo", args.dpo_steps, args.dpo_batch_size)):
        t = f"{stage}.trainer"
        out += [f"{t}.max_steps={steps}", f"{t}.per_device_train_batch_size={batch}",
                f"{t}.gradient_accumulation_steps=1", f"{t}.save_strategy=no", f"{t}.logging_steps={steps}",
                f"++{t}.disable_tqdm=true"]
    return out + list(args.set) + list(extra)


# ----------------------------------------------------------------------------------------------------
# parent: prepare, launch workers, report


def prepare(args) -> None:
    """Data stage and random base model, in this process (workers only load them)."""
    from mistral_tune.config import compose
    from mistral_tune.runs import RunDir
    from mistral_tune.stages import data
    from mistral_tune.training.modeling import ensure_base
    from mistral_tune.formats.tokenizer import load_tokenizer

    cfg = compose(overrides(args))
    data.run(cfg)
    ensure_base(cfg, load_tokenizer(RunDir.of(cfg).tokenizer))


def gemm_peak() -> dict:
    """Best of 10 square matmuls (fp32 on CPU, bf16 on CUDA): the machine's practical FLOP/s ceiling."""
    import torch

    cuda = torch.cuda.is_available()
    dtype, device, n = (torch.bfloat16, "cuda", 8192) if cuda else (torch.float32, "cpu", 2048)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    best = float("inf")
    for i in range(12):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if cuda:
            torch.cuda.synchronize()
        if i >= 2:
            best = min(best, time.perf_counter() - t)
    return {"flops": 2 * n**3 / best, "what": f"{str(dtype).split('.')[-1]} torch.mm {n}x{n} on {device}, best of 10",
            "threads": torch.get_num_threads()}


def machine() -> dict:
    import torch
    import transformers
    import trl

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_worker(args, name: str, argv: list[str]) -> dict:
    result_file = Path(args.workdir) / "results" / (name.replace("/", "_").replace(" ", "_") + ".json")
    result_file.parent.mkdir(parents=True, exist_ok=True)
    result_file.unlink(missing_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
           "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "BENCH_RESULT": str(result_file)}
    t = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--worker", name], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=args.config_timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        print(f"bench: configuration {name!r} timed out after {args.config_timeout:g} s; output tail:\n"
              + "\n".join(out.splitlines()[-15:]), flush=True)
        return failed_row(name, f"no result in {args.config_timeout:g} s (--config-timeout)")
    if proc.returncode != 0 or not result_file.exists():
        # one failed configuration (a kernel missing on this machine, out of memory) must not cost the others
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        print(f"bench: configuration {name!r} failed (exit {proc.returncode}):\n{tail}", flush=True)
        last = next((line for line in reversed(proc.stdout.splitlines()) if line.strip()), "")
        return failed_row(name, f"exit {proc.returncode}: {last[:120]}")
    result = json.loads(result_file.read_text())
    result["wall_s"] = round(time.perf_counter() - t, 1)
    return result


def failed_row(name: str, why: str) -> dict:
    """The result of a configuration that gave none: a table row saying why."""
    return {"stage": CONFIGS[name][0], "side": CONFIGS[name][1], "failed": why}


def rate_key(r: dict) -> str:
    return "pairs_per_s" if r["stage"] == "dpo" else "tokens_per_s"


def memory_mb(r: dict) -> float:
    """Peak GPU memory on CUDA (what limits a GPU run), else the worker's peak RSS."""
    return r.get("peak_cuda_mb") or r["peak_rss_mb"]


def add_derived(results: dict, peak: dict) -> None:
    """MFU; speed against TRL's default row of the mode (`<mode>/trl`: padded, SDPA) and against TRL's
    best, the fastest TRL row of the mode in this run; memory against that best row."""
    for name, r in results.items():
        if "failed" in r:
            continue
        mode = name.split("/")[0]
        r["mfu"] = r["model_flops_per_s"] / peak["flops"]
        trl = {n: x for n, x in results.items() if n.split("/")[0] == mode and x.get("side") == "trl"
               and "failed" not in x}
        if f"{mode}/trl" in trl:
            r["speedup_default"] = r[rate_key(r)] / trl[f"{mode}/trl"][rate_key(r)]
        if trl:
            best = max(trl, key=lambda n: trl[n][rate_key(trl[n])])
            r["trl_best"] = best
            r["speedup"] = r[rate_key(r)] / trl[best][rate_key(r)]
            r["rss_ratio"] = memory_mb(r) / memory_mb(trl[best])


def table(results: dict) -> str:
    cuda = any("peak_cuda_mb" in r for r in results.values())
    memory = "peak GPU memory (MB)" if cuda else "peak RSS (MB)"
    head = (f"| configuration | non-pad tokens/s | pairs/s | step time (s) | {memory} | MFU | "
            "speed vs TRL default | speed vs TRL best | memory vs TRL best | setup (s) |")
    lines = [head, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name, r in results.items():
        if "failed" in r:
            lines.append(f"| {name} | failed: {r['failed']} |  |  |  |  |  |  |  |  |")
            continue
        pairs = f"{r['pairs_per_s']:.2f}" if r["stage"] == "dpo" else ""
        cells = [f"{r[k]:.2f}x" if k in r else "" for k in ("speedup_default", "speedup", "rss_ratio")]
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {pairs} | {r['step_s']:.3f} | {memory_mb(r):.0f} | "
                     f"{100 * r['mfu']:.1f}% | {' | '.join(cells)} | {r['setup_s']:.1f} |")
    return "\n".join(lines)


def report(args, raw: list[str], info: dict, peak: dict, results: dict) -> str:
    """Derive MFU and ratios (in place) and write the table and the JSON for the results so far
    (rewritten after every configuration, so a run cut short still leaves what it measured);
    returns the text printed at the end."""
    add_derived(results, peak)
    text = table(results)
    dpo_checks = {n: r["id_mismatches"] for n, r in results.items() if "id_mismatches" in r}
    notes = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info.get('gpu', 'no GPU')}; torch {info['torch']}, "
        f"transformers {info['transformers']}, trl {info['trl']}; {info['date']}; load average at start "
        f"{info['load_average'][0]:.1f}.",
        f"GEMM peak {peak['flops'] / 1e9:.0f} GFLOP/s ({peak['what']}, {peak['threads']} threads).",
        f"Model: Mistral architecture, {f'{args.shape} layer shape' if args.shape else f'hidden {args.hidden_size}'}, "
        f"{args.layers} layers, vocab 32000, seed "
        f"{args.seed}; SFT {args.steps} steps x {args.batch_size} rows, DPO {args.dpo_steps} steps x "
        f"{args.dpo_batch_size} pairs; first {args.warmup} steps not timed"
        + (f"; extra overrides {args.set}" if args.set else "") + (f"; {args.threads} threads" if args.threads else "")
        + ".",
    ]
    if dpo_checks:
        notes.append("DPO rows whose TRL-tokenized ids differ from mistral_tune's: "
                     + ", ".join(f"{n} {v}" for n, v in dpo_checks.items()) + ".")
    missing = [n for n in args.configs if n not in results]
    if missing:
        notes.append(f"Not measured yet: {', '.join(missing)}.")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/run.py " + " ".join(raw)
    out.with_suffix(".md").write_text(f"```\n{command}\n```\n\n{text}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"command": command, "machine": info, "gemm_peak": peak, "args": {k: v for k, v in vars(args).items()},
         "results": results}, indent=2) + "\n")
    return text + "\n\n" + "\n".join(notes)


def main(argv=None) -> dict:
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw)
    if args.worker:
        return worker(args, args.worker)
    t0 = time.perf_counter()
    prepare(args)
    peak = gemm_peak()
    info = machine()
    print(f"bench: {info['cpu']}, {info['cores']} cores ({info.get('gpu', 'no GPU')}); load average "
          f"{info['load_average'][0]:.1f}; GEMM peak {peak['flops'] / 1e9:.0f} GFLOP/s ({peak['what']})", flush=True)
    results = {}
    for name in args.configs:
        results[name] = run_worker(args, name, raw)
        r = results[name]
        report(args, raw, info, peak, results)
        if "failed" in r:
            continue
        print(f"bench: {name}: {r['tokens_per_s']:.0f} non-pad tokens/s"
              + (f", {r['pairs_per_s']:.2f} pairs/s" if r["stage"] == "dpo" else "")
              + f", {r['step_s']:.3f} s/step, peak RSS {r['peak_rss_mb']:.0f} MB"
              + (f", peak GPU memory {r['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in r else "")
              + f" ({r['wall_s']:.0f} s)", flush=True)
    peak_after = gemm_peak()  # the machine may be shared: keep the better of two measurements
    if peak_after["flops"] > peak["flops"]:
        peak = peak_after
    text = report(args, raw, info, peak, results)
    failed = [n for n, r in results.items() if "failed" in r]
    print("\n" + text)
    if failed:
        print(f"bench: {len(failed)} configuration(s) failed: {', '.join(failed)}")
    print(f"bench: wrote {Path(args.out).with_suffix('.md')} and .json in {time.perf_counter() - t0:.0f} s")
    return results


# ----------------------------------------------------------------------------------------------------
# worker: one configuration, one process


def trl_dpo_rows(path: str):
    """The preference rows as TRL's conversational prompt/chosen/rejected, validated by our own reader."""
    from datasets import Dataset

    from mistral_tune.datasets import sources

    rows = sources.load_source(sources.Source(path=path), "dpo").rows
    return Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def worker(args, name: str) -> dict:
    t_start = time.perf_counter()
    import torch
    from datasets import load_from_disk
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl.trainer.utils import compute_flops_per_token

    from mistral_tune.runs import RunDir
    from mistral_tune.config import compose
    from mistral_tune.training.modeling import load_model, lora_config
    from mistral_tune.formats.tokenizer import load_tokenizer
    from mistral_tune.training.trainers import build_dpo_trainer, build_sft_trainer, dpo_reference, trl_args

    if args.threads:
        torch.set_num_threads(args.threads)
    stage, side, peft, extra = CONFIGS[name]
    cfg = compose(overrides(args, [f"peft={peft}", *stage_overrides(stage, extra)]))
    run_dir = RunDir.of(cfg)
    out = Path(args.workdir) / "scratch" / name.replace("/", "_").replace(" ", "_")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    model = load_model(str(run_dir.base), cfg)
    ours = load_from_disk(str(run_dir.dataset(stage)))
    clock = []

    class Clock(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            clock.append((time.perf_counter(), state.num_input_tokens_seen))

    t_import = time.perf_counter() - t_start
    t0 = time.perf_counter()
    peft_config = lora_config(cfg) if peft != "none" else None
    if stage == "sft" and side == "mistral_tune":
        trainer = build_sft_trainer(cfg, model, tokenizer, ours, out, [], peft_config=peft_config, callbacks=[Clock()])
    elif stage == "sft":
        trainer = SFTTrainer(model=model, args=trl_args(cfg, "sft", SFTConfig, out, []), train_dataset=ours,
                             processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    else:
        if side == "mistral_tune":  # the dpo stage's reference choice (the bench's policy is the base)
            ref, _ = dpo_reference(cfg, peft, lambda: load_model(str(run_dir.base), cfg))
            trainer = build_dpo_trainer(cfg, model, ref, tokenizer, ours, out, [], peft_config=peft_config,
                                        callbacks=[Clock()])
        else:  # TRL's default: it loads the reference itself (full) or disables the adapter (LoRA)
            dargs = trl_args(cfg, "dpo", DPOConfig, out, [])
            trainer = DPOTrainer(model=model, args=dargs, train_dataset=trl_dpo_rows(args.dpo_data),
                                 processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()])
    setup = time.perf_counter() - t0
    trainer.train()
    warm = args.warmup
    (t_a, tok_a), (t_b, tok_b) = clock[warm - 1], clock[-1]
    steps = len(clock) - warm
    elapsed = t_b - t_a
    tokens = int(tok_b - tok_a)
    # FLOPs: policy 3 x forward per token, reference 1 x forward unless precomputed (same for both sides)
    lengths = [len(r) for r in ours["input_ids"]] if stage == "sft" else \
        [len(p) + (len(c) + len(r)) / 2 for p, c, r in zip(ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"])]
    flops_per_token = compute_flops_per_token(model.config, round(sum(lengths) / len(lengths)))
    precompute = stage == "dpo" and trainer.args.precompute_ref_log_probs
    if stage == "dpo" and not precompute:
        flops_per_token *= 4 / 3
    result = {
        "stage": stage, "side": side, "peft": peft, "steps_timed": steps,
        "step_s": elapsed / steps, "tokens_per_s": tokens / elapsed,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "model_flops_per_s": flops_per_token * tokens / elapsed, "flops_per_token": flops_per_token,
        "setup_s": setup, "import_and_load_s": t_import, "threads": torch.get_num_threads(),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if stage == "dpo":
        result["pairs_per_s"] = args.dpo_batch_size * steps / elapsed
        result["precompute_ref_log_probs"] = bool(precompute)
        if side == "trl":  # did TRL's chat-template tokenization give the ids our data stage gave?
            theirs = trainer.train_dataset
            result["id_mismatches"] = sum(
                (a, b, c) != (x, y, z) for a, b, c, x, y, z in zip(
                    theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"],
                    ours["prompt_ids"], ours["chosen_ids"], ours["rejected_ids"])
            ) + abs(len(theirs) - len(ours))
    if torch.cuda.is_available():
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    Path(os.environ.get("BENCH_RESULT", out / "result.json")).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    done = main()  # a worker's own result, or the parent's results by configuration
    sys.exit(1 if "stage" not in done and any("failed" in r for r in done.values()) else 0)
