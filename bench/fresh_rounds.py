"""Iterative on-policy DPO with new task prompts in every round: an experiment, not a feature.

    python bench/fresh_rounds.py RUN_DIR ROUNDS [--prompts 900] [hydra overrides ...]

`pairs.rounds` samples every round from the same prompts (pairs.prompts_files, default SFT's); on the
tiny demo that raises the samples' score on those prompts but not on new ones (bench/results/pairs.md,
"Third session"). This asks whether rounds that each see prompts no round saw before do better:
round r samples from a file of --prompts one-turn bundled-task prompts (generator seed 1000 + r,
eval's held-out prompts left out by the pairs stage as always), written next to RUN_DIR. It runs
`mistral-tune pipeline pairs=onpolicy pairs.rounds=ROUNDS` in-process with each round's config given
its own file (a patch of mistral_tune.stages.rounds, hence a script, not a config key).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main() -> None:
    from mistral_tune.config import compose
    from mistral_tune.datasets import tasks
    from mistral_tune.stages import pipeline, rounds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("rounds", type=int)
    parser.add_argument("--prompts", type=int, default=900)
    args, overrides = parser.parse_known_args()

    files = []
    for r in range(1, args.rounds + 1):
        rng = random.Random(1000 + r)
        path = Path(f"{args.run_dir.rstrip('/')}_prompts_{r}.jsonl")
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": tasks.question(rng)[1]}]}) + "\n"
                                for _ in range(args.prompts)))
        files.append(str(path))

    values = rounds._values

    def with_fresh_prompts(cfg, r):
        return {**values(cfg, r), "pairs.prompts_files": [files[r - 1]]}

    rounds._values = with_fresh_prompts
    cfg = compose([f"run_dir={args.run_dir}", "pairs=onpolicy", f"pairs.rounds={args.rounds}",
                   f"pairs.prompts_files=[{files[0]}]", "logger=none", *overrides])
    pipeline.run(cfg, [])


if __name__ == "__main__":
    main()
