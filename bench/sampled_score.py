"""What sampling finds on the held-out chats, per model: greedy task score, mean@k and pass@k.

    python bench/sampled_score.py RUN_DIR [--temperature 0.7] [--k 8] MODEL_DIR [MODEL_DIR ...]

RUN_DIR gives the held-out prompts (eval's, as `mistral-tune eval` builds them for that run) and the
tokenizer; each MODEL_DIR is a full model folder (run_dir/sft, run_dir/rounds/3/dpo, merged).
Samples are drawn as the pairs stage draws them (temperature, then pairs.InverseCDFSampling), seeded,
and scored with eval's checker. bench/results/pairs.md uses it to ask whether on-policy DPO moved
the sampled distribution on new prompts, not only the greedy answer.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper

    from mistral_tune.config import compose
    from mistral_tune.formats.chat_format import ChatFormat
    from mistral_tune.formats.tokenizer import load_tokenizer
    from mistral_tune.runs import RunDir
    from mistral_tune.stages.evaluate import generate, generate_samples, load_eval_data, score
    from mistral_tune.stages.pairs import InverseCDFSampling

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cfg = compose([f"run_dir={args.run_dir}", "logger=none"])
    run_dir = RunDir.of(cfg)
    tok = load_tokenizer(run_dir.tokenizer)
    prompts = load_eval_data(cfg, ChatFormat.load(run_dir, "eval"))["prompts"]
    k = args.k

    def right(p, ids) -> bool:
        return score(p["user"], p["reference"], tok.decode(ids, skip_special_tokens=True), p["task"])[1]

    print(f"{len(prompts)} held-out prompts, temperature {args.temperature}, k={k}")
    for path in args.models:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        greedy = generate(model, [p["ids"] for p in prompts], tok.pad_token_id, tok.eos_token_id,
                          args.max_new_tokens, 64)
        gen = GenerationConfig(do_sample=False, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id,
                               eos_token_id=tok.eos_token_id, bos_token_id=None)
        torch.manual_seed(args.seed)
        flat = generate_samples(model, [p["ids"] for p in prompts for _ in range(k)], gen, 64 * k,
                                logits_processor=LogitsProcessorList([TemperatureLogitsWarper(args.temperature),
                                                                      InverseCDFSampling()]))
        ok = [right(prompts[i // k], s[0]) for i, s in enumerate(flat)]
        per = [ok[i * k:(i + 1) * k] for i in range(len(prompts))]
        print(f"{path}: greedy {statistics.fmean(right(p, g) for p, g in zip(prompts, greedy)):.3f}  "
              f"mean@{k} {statistics.fmean(ok):.3f}  pass@{k} {statistics.fmean(any(x) for x in per):.3f}", flush=True)


if __name__ == "__main__":
    main()
