"""The pairs stage under `torchrun --nproc_per_node 2` (gloo on CPU): run by tests/test_pairs.py.

argv: RUN_DIR. Rank 0 writes RUN_DIR/gather.json (what _shard_and_gather returned) and the stage's
files; every rank runs the stage on its shard of the prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # launched as a script: tests/ is on sys.path, the repo root is not
    sys.path.insert(0, str(REPO))

from mistral_tune import runs  # noqa: E402
from mistral_tune.stages import pairs  # noqa: E402
from tests.test_pairs import _cfg, _prepare  # noqa: E402

run_dir = Path(sys.argv[1])
cfg = _cfg(run_dir, "pairs.reward=tests.test_pairs:length_reward", "pairs.temperature=2.0")
if runs.is_main_process():
    _prepare(cfg)
runs.wait_for_everyone()
gathered = pairs._shard_and_gather(list(range(7)), lambda shard, rank: [[x, rank] for x in shard])
if runs.is_main_process():
    (run_dir / "gather.json").write_text(json.dumps(gathered))
pairs.run(cfg)
