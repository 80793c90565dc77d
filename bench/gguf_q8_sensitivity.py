"""Where a q8_0 GGUF's logit error comes from, on a run's merged model.

    python bench/gguf_q8_sensitivity.py RUN_DIR [--max-new-tokens 16]

llama.cpp (llama-cpp-python) on q8_0 files that keep some tensors f16, as llama-quantize's
--output-tensor-type / --token-embedding-type do: none (our export), output.weight (lm_head),
token_embd.weight, both. Each file is written to RUN_DIR/export/q8_sensitivity/ and compared with
RUN_DIR/merged by mistral_tune.formats.gguf_verify.compare on the prompts of bench/gguf_check.py.

Then the two parts of llama.cpp's error apart, in transformers (float32 compute, no llama.cpp):
every matrix's weights through the Q8_0 round trip (gguf's quantizer, bit-exact with ggml's), and
every nn.Linear's input through it, as llama.cpp's CPU matmul quantizes the activations to Q8_0
before a dot product with Q8_0 weights (ggml-cpu: vec_dot_type of Q8_0 is Q8_0; F16 weights take
f16 activations). Prints one JSON object per variant, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
KEEP = {"q8_0": (), "q8_0, output f16": ("output.weight",), "q8_0, token_embd f16": ("token_embd.weight",),
        "q8_0, output + token_embd f16": ("output.weight", "token_embd.weight")}


def q8_round_trip(a: np.ndarray) -> np.ndarray:
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    return gguf.quants.dequantize(gguf.quants.quantize(a, q8), q8).reshape(a.shape)


def simulated(hf_folder: Path, prompts, max_new_tokens: int, weights: bool, activations: bool) -> dict:
    """Greedy replies and logits of the HF model with Q8_0 weights and/or Q8_0 matmul inputs
    against the plain HF model, on the prompts that fit in the window (as compare does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)

    def load():
        return AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32, local_files_only=True).eval()

    ref, model = load(), load()
    with torch.no_grad():
        for p in model.parameters():
            if weights and p.ndim == 2:  # embeddings, projections and lm_head, as in the q8_0 file
                p.copy_(torch.from_numpy(q8_round_trip(p.numpy())))
    if activations:
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.register_forward_pre_hook(
                    lambda _m, args: (torch.from_numpy(q8_round_trip(args[0].numpy().astype(np.float32))),))
    window = ref.config.sliding_window or ref.config.max_position_embeddings
    eos, used, greedy, max_diff, positions, argmax = tok.eos_token_id, 0, 0, 0.0, 0, 0
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if len(ids) + max_new_tokens > window:
            continue
        used += 1
        replies = []
        with torch.no_grad():
            for m in (ref, model):
                out = m.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=tok.pad_token_id)
                replies.append(out[0, len(ids):].tolist())
            seq = torch.tensor([ids + replies[0]])
            a, b = ref(seq).logits[0].numpy(), model(seq).logits[0].numpy()
        greedy += replies[0] == replies[1]
        max_diff = max(max_diff, float(np.abs(a - b).max()))
        positions += len(a)
        argmax += int((a.argmax(-1) == b.argmax(-1)).sum())
    return {"prompts": used, "greedy_equal": greedy, "max_abs_logit_diff": max_diff, "positions": positions,
            "argmax_equal": argmax}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eval-file", default=str(REPO / "data" / "eval_sft.jsonl"))
    parser.add_argument("--threads", type=int, default=1,
                        help="llama.cpp threads (1: a tiny model gains nothing from more, and on a loaded "
                             "machine its threads spin waiting for each other)")
    args = parser.parse_args()

    from mistral_tune.formats import gguf as gguf_format
    from mistral_tune.formats.gguf_verify import compare, eval_prompts

    run_dir = Path(args.run_dir)
    hf_folder = run_dir / "merged"
    chats = eval_prompts(Path(args.eval_file))
    prompts = chats + [c[:1] for c in chats if len(c) > 1]  # as bench/gguf_check.py
    out = run_dir / "export" / "q8_sensitivity"
    out.mkdir(parents=True, exist_ok=True)
    template = gguf_format.read_chat_template(hf_folder)
    template = gguf_format.strip_generation_markers(template) if template else None
    rows = {}
    for name, keep in KEEP.items():
        start = time.perf_counter()
        path = out / f"{'-'.join(['q8_0', *[k.split('.')[0] for k in keep]])}.gguf"
        gguf_format.write_gguf(hf_folder, path, "q8_0", path.stem, template, f16_tensors=keep)
        f = compare(path, hf_folder, prompts, max_new_tokens=args.max_new_tokens, n_threads=args.threads)
        rows[name] = {"bytes": path.stat().st_size, "seconds": round(time.perf_counter() - start, 1),
                      **{k: f[k] for k in ("prompts", "max_abs_logit_diff", "max_top2_gap_diff", "positions",
                                           "argmax_equal", "greedy_equal", "greedy_misses")}}
        print(json.dumps({name: rows[name]}), flush=True)
    for name, w, a in (("transformers, Q8_0 weights", True, False), ("transformers, Q8_0 activations", False, True),
                       ("transformers, Q8_0 weights + activations", True, True)):
        start = time.perf_counter()
        rows[name] = {**simulated(hf_folder, prompts, args.max_new_tokens, w, a),
                      "seconds": round(time.perf_counter() - start, 1)}
        print(json.dumps({name: rows[name]}), flush=True)
    print("\n| variant | size | max \\|logit diff\\| | same argmax | greedy replies equal |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        size = f"{r['bytes'] / 1e6:.1f} MB" if "bytes" in r else "-"
        print(f"| {name} | {size} | {r['max_abs_logit_diff']:.3f} | {r['argmax_equal']} / {r['positions']} "
              f"| {r['greedy_equal']} / {r['prompts']} |")


if __name__ == "__main__":
    main()
