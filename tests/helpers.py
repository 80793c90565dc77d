"""Small shared builders for tests: tiny real Mistral architectures, no network."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import MistralConfig, MistralForCausalLM


def tiny_mistral(vocab_size: int = 512, sliding_window: int | None = 8, seed: int = 0, **overrides):
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=sliding_window,
        max_position_embeddings=256,
    )
    config = MistralConfig(**{**fields, **overrides})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return MistralForCausalLM(config).eval()


def random_examples(n: int, vocab_size: int = 512, seed: int = 0, min_len: int = 12, max_len: int = 30) -> list[dict]:
    """Pre-tokenized rows like the data stage's: BOS first, a prompt span untrained, the rest trained."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = [1] + torch.randint(3, vocab_size, (length - 1,), generator=g).tolist()
        prompt = int(torch.randint(2, length - 2, (1,), generator=g))
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def read_wandb_records(path) -> list:
    """Records of an offline W&B run file (run-*.wandb). wandb 0.31 ships no Python reader (its
    core is Go), so this parses the LevelDB-log framing itself: a 7-byte ':W&B' header, then 32 KiB
    blocks of chunks with a 7-byte header (crc32c, little-endian length, type FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run_summary(path) -> dict:
    """{'config': {key: json}, 'history': [{key: json}], 'run': Record.run} of an offline run."""
    import json

    out = {"config": {}, "history": [], "run": None}
    for r in read_wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = r.run
            for item in r.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
    return out


def data_reports(run_dir) -> dict:
    """The run's data builds as one dict: {"template", "vocab", <stage>: report.json of data/<stage>}."""
    data_root = Path(run_dir) / "data"
    out = json.loads((data_root / "format.json").read_text())
    for report in sorted(data_root.glob("*/report.json")):
        out[report.parent.name] = json.loads(report.read_text())
    return out
