"""Sources written by `datasets` itself: to_json (JSON Lines in a .json file) and save_to_disk."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from mistral_tune.datasets.sources import expand_files, load_rows
from mistral_tune.errors import UserError

ROWS = [{"messages": [{"role": "user", "content": f"Hi {i}"}, {"role": "assistant", "content": f"Hello {i}!"}]}
        for i in range(5)]
PAIRS = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]


def expected(rows):
    """The same rows read from an ordinary .jsonl file: the reference."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ref.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_rows([str(path)], "dpo" if "chosen" in rows[0] else "sft").rows


def test_json_file_holding_json_lines(tmp_path):
    path = tmp_path / "train.json"
    Dataset.from_list(ROWS).to_json(path)  # datasets writes JSON Lines, whatever the extension
    assert path.read_text().count("\n") == len(ROWS)
    assert load_rows([str(path)], "sft").rows == expected(ROWS)


def test_json_list_file_still_read_and_broken_json_still_refused(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS))
    assert load_rows([str(tmp_path / "list.json")], "sft").rows == expected(ROWS)
    (tmp_path / "broken.json").write_text('[{"messages": ')
    with pytest.raises(UserError, match="not a valid JSON file"):
        load_rows([str(tmp_path / "broken.json")], "sft")


def test_save_to_disk_folder(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(tmp_path / "saved", num_shards=2)
    files = expand_files([str(tmp_path / "saved")])
    assert [p.suffix for p in files] == [".arrow", ".arrow"]  # never state.json / dataset_info.json
    assert load_rows([str(tmp_path / "saved")], "sft").rows == expected(ROWS)  # in order, both shards


def test_save_to_disk_dataset_dict_reads_train(tmp_path):
    DatasetDict({"test": Dataset.from_list(PAIRS[:1]), "train": Dataset.from_list(PAIRS)}).save_to_disk(tmp_path / "dd")
    assert load_rows([str(tmp_path / "dd")], "dpo").rows == expected(PAIRS)


def test_save_to_disk_dataset_dict_without_train_is_one_line(tmp_path):
    DatasetDict({"a": Dataset.from_list(PAIRS), "b": Dataset.from_list(PAIRS)}).save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match="splits a, b and no 'train'") as err:
        load_rows([str(tmp_path / "dd")], "dpo")
    assert str(tmp_path / "dd" / "a") in err.value.hint
