"""llama.cpp against transformers on a run's exported GGUF files.

    python bench/gguf_check.py RUN_DIR [--quants f16 q8_0 q4_k_m] [--max-new-tokens 16]

For each quantization, `mistral-tune export run_dir=RUN_DIR export.quant=Q` (skipped when already
exported), then llama-cpp-python loads DIR/export/<name>-<Q>.gguf and mistral_tune.formats.gguf_verify
compares it with RUN_DIR/merged on the held-out chats (data/eval_sft.jsonl: each chat cut before
its last reply, and its first user turn alone), keeping those whose prompt + reply fit in the
model's sliding window: logits at every position of prompt and HF's greedy reply (max |diff|,
argmax agreement), greedy replies token for token (each miss with HF's top-2 margin where the
replies part), and the GGUF's chat template rendered by llama-cpp-python and tokenized by llama.cpp
against the HF tokenizer's ids. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--quants", nargs="+", default=["f16", "q8_0", "q4_k_m"])
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--eval-file", default=str(REPO / "data" / "eval_sft.jsonl"))
    args = parser.parse_args()

    from mistral_tune.formats.gguf_verify import compare, eval_prompts

    run_dir = Path(args.run_dir)
    chats = eval_prompts(Path(args.eval_file))
    prompts = chats + [c[:1] for c in chats if len(c) > 1]
    report = {}
    for quant in args.quants:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mistral_tune", "export", f"run_dir={run_dir}", f"export.quant={quant}"],
                       check=True)
        export_s = time.perf_counter() - start
        files = json.loads((run_dir / "export" / "manifest.json").read_text())["files"]
        manifest = next(f for f in files.values() if f["quant"] == quant)
        start = time.perf_counter()
        figures = compare(run_dir / "export" / manifest["gguf"], run_dir / "merged", prompts,
                          max_new_tokens=args.max_new_tokens)
        report[quant] = {"file": manifest["gguf"], "bytes": manifest["bytes"], "tensor_types": manifest["tensor_types"],
                         "export_s": round(export_s, 1), "compare_s": round(time.perf_counter() - start, 1), **figures}
        print(json.dumps({quant: report[quant]}), flush=True)  # each as it is done
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
