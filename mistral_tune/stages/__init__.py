"""The stages of a run, each a module with a plain `run(cfg) -> Path` that reads top to bottom.

Training stages are listed in the config (`stages=[sft,dpo]`, `stages=[orpo]`, `stages=[sft,kto]`); each trains from
the model the stage before it in the list left (the first from the base model). A new algorithm
is one module here, one config group (configs/<name>_trainer/) and one entry below: the row
layout its data is validated and encoded as (datasets/sources.py: "sft" chats, "dpo"
preference pairs, "kto" unpaired replies with a label, or pairs split into two).
"""

DATA_LAYOUT = {"sft": "sft", "dpo": "dpo", "orpo": "dpo", "kto": "kto"}
