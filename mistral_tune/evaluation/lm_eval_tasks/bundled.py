"""Rows of the `mistral_tune_bundled` lm-eval task (its `custom_dataset`): read from the JSONL file
that `mistral_tune.evaluation.harness` writes for a run, named by the task's metadata `data_file`."""

from __future__ import annotations

import json


def load(data_file: str | None = None, **_metadata):
    import datasets

    if not data_file:
        raise ValueError("mistral_tune_bundled reads a run's held-out chats: run it with `mistral-tune eval "
                         "eval.harness=[mistral_tune_bundled]`, or give lm-eval --metadata "
                         "'{\"data_file\": \"RUN_DIR/eval/harness/mistral_tune_bundled.jsonl\"}'")
    with open(data_file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # In memory, not datasets' JSON builder: nothing is cached under ~/.cache, nothing goes stale.
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
