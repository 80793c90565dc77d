"""KTO's examples from the built rows: each pair becomes one desirable and one undesirable example.

The data engine builds KTO rows as it builds DPO pairs (`prompt_ids`, `chosen_ids`,
`rejected_ids`), an unpaired row leaving its other side empty, so that reading, cleaning,
length checks, mixture weights and the report count rows as the user wrote them. This turns the
built dataset into TRL's unpaired layout: `prompt_ids`, `completion_ids`, `label` (true:
desirable), in a seeded random order.

The order matters more than for the other stages: TRL 1.16's KTOTrainer reads its data in order
(train_sampling_strategy="sequential"), because its KL term pairs each prompt with the
completion of the row before it in the batch. Left as built, a pair's two halves would sit side
by side (the KL term would then score a prompt against its own reply), and TRL's own
`unpair_preference_dataset` puts every desirable row before every undesirable one (batches of one
label only).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path


def unpair_rows(rows: dict[str, list]) -> dict[str, list]:
    """A batch of built KTO rows (columns prompt_ids/chosen_ids/rejected_ids) as unpaired
    examples: the chosen side of a row (if any) with label True, then its rejected side with False."""
    out = {"prompt_ids": [], "completion_ids": [], "label": []}
    for prompt, chosen, rejected in zip(rows["prompt_ids"], rows["chosen_ids"], rows["rejected_ids"]):
        for completion, label in ((chosen, True), (rejected, False)):
            if completion:
                out["prompt_ids"].append(prompt)
                out["completion_ids"].append(completion)
                out["label"].append(label)
    return out


def unpair(dataset_dir: Path, seed: int) -> dict:
    """Rewrite the built KTO rows at `dataset_dir` as shuffled unpaired examples; the counts for
    the report: {"desirable", "undesirable", "pairs_split"}."""
    from datasets import load_from_disk

    rows = load_from_disk(str(dataset_dir))
    pairs = sum(1 for c, r in zip(rows["chosen_ids"], rows["rejected_ids"]) if c and r)
    examples = rows.map(unpair_rows, batched=True, remove_columns=rows.column_names)
    order = list(range(len(examples)))
    random.Random(f"{seed}:kto:order").shuffle(order)
    examples = examples.select(order).flatten_indices()
    tmp = dataset_dir.with_name(dataset_dir.name + ".unpaired")
    shutil.rmtree(tmp, ignore_errors=True)
    examples.save_to_disk(str(tmp))
    desirable = sum(examples["label"])
    counts = {"desirable": desirable, "undesirable": len(examples) - desirable, "pairs_split": pairs}
    del rows, examples  # memory-mapped from dataset_dir
    shutil.rmtree(dataset_dir)
    tmp.rename(dataset_dir)
    return counts
