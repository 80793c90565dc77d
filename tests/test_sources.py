"""Every row read is kept or rejected with file, row, field and reason: nothing dropped silently."""

from __future__ import annotations

import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mistral_tune.errors import UserError
from mistral_tune.datasets.sources import Reject, load_rows, write_rejects


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


GOOD_SFT = {"messages": msgs(("user", "Hi"), ("assistant", "Hello!"))}
GOOD_DPO = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
EXPECTED_SFT = {"messages": msgs(("user", "Hi"), ("assistant", "Hello!"))}


def write_jsonl(path, rows):
    """Rows are objects (dumped) or str (written as the raw line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def write_csv(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([v if isinstance(v, str) else json.dumps(v) for v in (r.get(c, "") for c in columns)])
    return str(path)


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_json(path, rows):
    path.write_text(json.dumps(rows), encoding="utf-8")
    return str(path)


def check_counts(result):
    assert result.read == len(result.rows) + len(result.rejects)
    for counts in result.per_file.values():
        assert counts["read"] == counts["kept"] + counts["rejected"]
    assert sum(c["read"] for c in result.per_file.values()) == result.read


def reject_of(tmp_path, row, kind="sft", fmt="auto"):
    """Load [good, row] from a .jsonl file in skip mode and return the one reject (line 2)."""
    good = GOOD_SFT if kind == "sft" else GOOD_DPO
    path = write_jsonl(tmp_path / "data.jsonl", [good, row])
    result = load_rows([path], kind, on_error="skip", fmt=fmt)
    check_counts(result)
    assert len(result.rows) == 1 and len(result.rejects) == 1
    r = result.rejects[0]
    assert (r.file, r.row, r.raw) == (path, 2, json.loads(row) if isinstance(row, str) else row)
    return r.field, r.reason


# ---------------------------------------------------------------- SFT formats

SFT_INPUTS = {
    "messages": {"messages": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"))},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                                   {"from": "gpt", "value": "Hello!"}]},
    "alpaca": {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
    "prompt_completion": {"prompt": "Hi", "completion": "Hello!"},
}
SFT_OUTPUTS = {
    "messages": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
    "sharegpt": msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")),
    "alpaca": msgs(("user", "Translate.\n\nBonjour"), ("assistant", "Hello")),
    "prompt_completion": msgs(("user", "Hi"), ("assistant", "Hello!")),
}


@pytest.mark.parametrize("writer", [write_jsonl, write_json, write_parquet, write_csv])
@pytest.mark.parametrize("fmt", list(SFT_INPUTS))
def test_sft_formats_from_every_file_type(tmp_path, fmt, writer):
    ext = {write_jsonl: "jsonl", write_json: "json", write_parquet: "parquet", write_csv: "csv"}[writer]
    path = writer(tmp_path / f"data.{ext}", [SFT_INPUTS[fmt], SFT_INPUTS[fmt]])
    for forced in ("auto", fmt):
        result = load_rows([path], "sft", fmt=forced)
        assert result.rows == [{"messages": SFT_OUTPUTS[fmt]}] * 2
        assert result.rejects == [] and result.read == 2
        assert result.per_file == {path: {"read": 2, "kept": 2, "rejected": 0}}


def test_mixed_formats_detected_per_row(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", list(SFT_INPUTS.values()))
    assert load_rows([path], "sft").rows == [{"messages": m} for m in SFT_OUTPUTS.values()]


def test_alpaca_without_input_and_multi_turn_openai(tmp_path):
    rows = [{"instruction": "Say hi.", "input": "", "output": "Hi"},
            {"instruction": "Say hi.", "output": "Hi"},
            {"messages": msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d"))}]
    result = load_rows([write_jsonl(tmp_path / "a.jsonl", rows)], "sft")
    assert result.rows[0] == result.rows[1] == {"messages": msgs(("user", "Say hi."), ("assistant", "Hi"))}
    assert result.rows[2]["messages"][3] == {"role": "assistant", "content": "d"}


def test_extra_message_keys_and_columns_are_dropped(tmp_path):
    row = {"id": 7, "messages": [{"role": "user", "content": "Hi", "name": "bob"},
                                 {"role": "assistant", "content": "Hello!", "weight": 1}]}
    assert load_rows([write_jsonl(tmp_path / "a.jsonl", [row])], "sft").rows == [EXPECTED_SFT]


BAD_SFT = [
    pytest.param(["not", "an", "object"], "<row>", "row is not an object (got list)", id="not-object"),
    pytest.param('"just text"', "<row>", "row is not an object (got string)", id="string-row"),
    pytest.param({"text": "hi", "id": 1}, "<row>",
                 "unknown format: columns found: id, text; expected messages (OpenAI), conversations (ShareGPT), "
                 "instruction/input/output (Alpaca), prompt/completion", id="unknown-format"),
    pytest.param({}, "<row>", "unknown format: columns found: none; expected messages (OpenAI), conversations "
                 "(ShareGPT), instruction/input/output (Alpaca), prompt/completion", id="empty-object"),
    pytest.param({"messages": "Hi"}, "messages", "must be a list of messages, got string", id="messages-not-list"),
    pytest.param({"messages": []}, "messages", "empty conversation", id="empty-conversation"),
    pytest.param({"messages": ["Hi", "Hello"]}, "messages[0]", "message is not an object (got string)",
                 id="message-not-object"),
    pytest.param({"messages": [{"content": "Hi"}, {"role": "assistant", "content": "x"}]}, "messages[0].role",
                 "missing field 'role'", id="missing-role"),
    pytest.param({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "messages[0].content",
                 "missing field 'content'", id="missing-content"),
    pytest.param({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]},
                 "messages[0].content", "missing field 'content'", id="null-content"),
    pytest.param({"messages": msgs(("user", "Hi"), ("function", "42"))}, "messages[1].role",
                 "unknown role 'function'; expected one of system, user, assistant, tool", id="unknown-role"),
    pytest.param({"messages": msgs(("user", "Hi"), ("user", "Hi again"), ("assistant", "x"))}, "messages[1].role",
                 "roles out of order: expected assistant, got user", id="user-user"),
    pytest.param({"messages": msgs(("assistant", "x"), ("user", "Hi"), ("assistant", "y"))}, "messages[0].role",
                 "roles out of order: expected user, got assistant", id="starts-with-assistant"),
    pytest.param({"messages": msgs(("user", "Hi"), ("system", "s"), ("assistant", "x"))}, "messages[1].role",
                 "roles out of order: a system message is only allowed first", id="late-system"),
    pytest.param({"messages": msgs(("user", "Hi"), ("assistant", "x"), ("user", "more"))}, "messages",
                 "conversation must end with an assistant message, not user", id="ends-with-user"),
    pytest.param({"messages": msgs(("system", "s"))}, "messages",
                 "conversation must end with an assistant message, not system", id="only-system"),
    pytest.param({"messages": msgs(("user", "Hi"), ("assistant", ""))}, "messages[1].content", "empty content",
                 id="empty-content"),
    pytest.param({"messages": msgs(("user", " \n\t"), ("assistant", "x"))}, "messages[0].content", "empty content",
                 id="whitespace-content"),
    pytest.param({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                               {"role": "assistant", "content": "x"}]},
                 "messages[0].content", "content must be a string, got list", id="content-parts"),
    pytest.param({"messages": msgs(("user", "Hi"), ("assistant", 42))}, "messages[1].content",
                 "content must be a string, got number", id="content-number"),
    pytest.param({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "x"}]},
                 "conversations[1].from", "unknown role 'bot'; expected one of system, human, gpt, user, assistant",
                 id="sharegpt-unknown-role"),
    pytest.param({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}]},
                 "conversations[1].value", "empty content", id="sharegpt-empty"),
    pytest.param({"conversations": [{"from": "gpt", "value": "x"}]}, "conversations[0].from",
                 "roles out of order: expected user, got assistant", id="sharegpt-order"),
    pytest.param({"instruction": "Do it."}, "output", "missing field 'output'", id="alpaca-no-output"),
    pytest.param({"input": "x", "output": "y"}, "instruction", "missing field 'instruction'",
                 id="alpaca-no-instruction"),
    pytest.param({"instruction": "Do it.", "output": "  "}, "output", "empty content", id="alpaca-empty-output"),
    pytest.param({"instruction": "Do it.", "input": 3, "output": "y"}, "input",
                 "content must be a string, got number", id="alpaca-input-number"),
    pytest.param({"prompt": "Hi"}, "completion", "missing field 'completion'", id="no-completion"),
    pytest.param({"completion": "Hello"}, "prompt", "missing field 'prompt'", id="no-prompt"),
    pytest.param({"prompt": "Hi", "completion": ["Hello"]}, "completion[0]", "message is not an object (got string)",
                 id="completion-bad-list"),
    pytest.param({"prompt": "", "completion": "Hello"}, "prompt", "empty content", id="empty-prompt"),
]


@pytest.mark.parametrize("row, field, reason", BAD_SFT)
def test_bad_sft_rows_are_rejected_with_field_and_reason(tmp_path, row, field, reason):
    assert reject_of(tmp_path, row) == (field, reason)


def test_long_unknown_role_is_shortened_on_one_line(tmp_path):
    field, reason = reject_of(tmp_path, {"messages": msgs(("user\n" + "x" * 100, "Hi"), ("assistant", "x"))})
    assert field == "messages[0].role" and "\n" not in reason and len(reason) < 120


@pytest.mark.parametrize("fmt, field", [("alpaca", "instruction"), ("sharegpt", "conversations"),
                                        ("prompt_completion", "completion"), ("messages", "messages")])
def test_forced_format_reports_missing_fields(tmp_path, fmt, field):
    rows = [SFT_INPUTS[fmt], {"messages": [], "prompt": "Hi", "instruction": None}]
    result = load_rows([write_jsonl(tmp_path / "d.jsonl", rows)], "sft", on_error="skip", fmt=fmt)
    assert len(result.rows) == 1
    expected = "empty conversation" if fmt == "messages" else f"missing field {field!r}"
    assert [(r.row, r.field, r.reason) for r in result.rejects] == [(2, field, expected)]


# ---------------------------------------------------------------- DPO

def ultrafeedback(prompt="What is 2+2?", chosen="4", rejected="5"):
    return {"prompt": prompt, "prompt_id": "abc",
            "chosen": msgs(("user", "What is 2+2?"), ("assistant", chosen)),
            "rejected": msgs(("user", "What is 2+2?"), ("assistant", rejected)),
            "messages": msgs(("user", "What is 2+2?"), ("assistant", chosen)),
            "score_chosen": 9.0, "score_rejected": 2.0}


def test_dpo_layouts(tmp_path):
    rows = [
        GOOD_DPO,
        ultrafeedback(),
        # explicit prompt as messages, replies as a lone assistant message (TRL conversational)
        {"prompt": msgs(("system", "Be exact."), ("user", "2+2?")),
         "chosen": msgs(("assistant", "4")), "rejected": msgs(("assistant", "5"))},
        # implicit prompt: taken from the shared conversation
        {"chosen": msgs(("user", "2+2?"), ("assistant", "4")), "rejected": msgs(("user", "2+2?"), ("assistant", "5"))},
        # multi-turn conversation with a string prompt equal to the last user turn
        {"prompt": "And 3+3?",
         "chosen": msgs(("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "6")),
         "rejected": msgs(("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?"), ("assistant", "7"))},
    ]
    result = load_rows([write_jsonl(tmp_path / "p.jsonl", rows)], "dpo")
    assert result.rejects == []
    assert result.rows == [
        {"prompt": msgs(("user", "Hi")), "chosen": "Hello!", "rejected": "Go away."},
        {"prompt": msgs(("user", "What is 2+2?")), "chosen": "4", "rejected": "5"},
        {"prompt": msgs(("system", "Be exact."), ("user", "2+2?")), "chosen": "4", "rejected": "5"},
        {"prompt": msgs(("user", "2+2?")), "chosen": "4", "rejected": "5"},
        {"prompt": msgs(("user", "2+2?"), ("assistant", "4"), ("user", "And 3+3?")), "chosen": "6", "rejected": "7"},
    ]


@pytest.mark.parametrize("writer", [write_json, write_parquet, write_csv])
def test_ultrafeedback_from_parquet_csv_json(tmp_path, writer):
    path = writer(tmp_path / f"uf.{writer.__name__.removeprefix('write_')}", [ultrafeedback(), ultrafeedback()])
    result = load_rows([path], "dpo", fmt="preference")
    assert result.rows == [{"prompt": msgs(("user", "What is 2+2?")), "chosen": "4", "rejected": "5"}] * 2


BAD_DPO = [
    pytest.param(GOOD_SFT, "<row>", "unknown format: columns found: messages; expected prompt/chosen/rejected "
                 "(preference pairs)", id="sft-row-in-dpo"),
    pytest.param({"prompt": "Hi", "rejected": "x"}, "chosen",
                 "missing 'chosen': a preference pair needs both chosen and rejected", id="no-chosen"),
    pytest.param({"prompt": "Hi", "chosen": "x", "rejected": None}, "rejected",
                 "missing 'rejected': a preference pair needs both chosen and rejected", id="null-rejected"),
    pytest.param({"chosen": "x", "rejected": "y"}, "prompt", "missing field 'prompt'", id="no-prompt"),
    pytest.param({"prompt": "Hi", "chosen": "Same.", "rejected": "Same. "}, "rejected",
                 "chosen and rejected are identical", id="identical"),
    pytest.param({"prompt": "Hi", "chosen": "", "rejected": "y"}, "chosen", "empty content", id="empty-chosen"),
    pytest.param({"prompt": "Hi", "chosen": 1, "rejected": "y"}, "chosen", "content must be a string, got number",
                 id="number-chosen"),
    pytest.param(ultrafeedback(prompt="What is 3+3?"), "prompt", "prompt disagrees with conversation",
                 id="prompt-string-disagrees"),
    pytest.param({"prompt": msgs(("user", "Other")), "chosen": msgs(("user", "Q"), ("assistant", "a")),
                  "rejected": msgs(("user", "Q"), ("assistant", "b"))}, "prompt",
                 "prompt disagrees with conversation", id="prompt-list-disagrees"),
    pytest.param({"prompt": "Q", "chosen": msgs(("user", "Q"), ("assistant", "a")),
                  "rejected": msgs(("user", "Other"), ("assistant", "b"))}, "rejected",
                 "chosen and rejected disagree before the last assistant message", id="prefixes-disagree"),
    pytest.param({"prompt": "Q", "chosen": msgs(("user", "Q")), "rejected": "b"}, "chosen",
                 "conversation must end with an assistant message, not user", id="chosen-ends-with-user"),
    pytest.param({"prompt": "Q", "chosen": msgs(("user", "Q"), ("assistant", "a"), ("assistant", "b")),
                  "rejected": "b"}, "chosen[2].role", "roles out of order: expected user, got assistant",
                 id="chosen-out-of-order"),
    pytest.param({"prompt": "Q", "chosen": msgs(("user", "Q"), ("bot", "a")), "rejected": "b"}, "chosen[1].role",
                 "unknown role 'bot'; expected one of system, user, assistant, tool", id="chosen-unknown-role"),
    pytest.param({"prompt": msgs(("user", "Q"), ("assistant", "a")), "chosen": "x", "rejected": "y"}, "prompt",
                 "conversation must end with a user or tool message, not assistant", id="prompt-ends-with-assistant"),
    pytest.param({"prompt": msgs(("user", "")), "chosen": "x", "rejected": "y"}, "prompt[0].content",
                 "empty content", id="prompt-empty-content"),
    pytest.param({"prompt": "Q", "chosen": msgs(("user", "Q"), ("assistant", "same")),
                  "rejected": msgs(("user", "Q"), ("assistant", "same"))}, "rejected",
                 "chosen and rejected are identical", id="identical-conversations"),
]


@pytest.mark.parametrize("row, field, reason", BAD_DPO)
def test_bad_dpo_rows_are_rejected_with_field_and_reason(tmp_path, row, field, reason):
    assert reject_of(tmp_path, row, kind="dpo") == (field, reason)


# ---------------------------------------------------------------- row numbers and accounting

def test_jsonl_line_numbers_count_blank_lines_and_bad_json(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(GOOD_SFT), "", '{"messages": [', "   ", json.dumps(GOOD_SFT), "[1, 2]", "{'single': 1}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = load_rows([str(path)], "sft", on_error="skip")
    check_counts(result)
    assert result.read == 5 and len(result.rows) == 2
    assert [(r.row, r.field, r.reason, r.raw) for r in result.rejects] == [
        (3, "<json>", "invalid JSON: Expecting value at column 15", '{"messages": ['),
        (6, "<row>", "row is not an object (got list)", [1, 2]),
        (7, "<json>", "invalid JSON: Expecting property name enclosed in double quotes at column 2", "{'single': 1}"),
    ]


def test_jsonl_bom_crlf_and_invalid_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    line = json.dumps(GOOD_SFT).encode()
    path.write_bytes(b"\xef\xbb\xbf" + line + b"\r\n" + b'{"x": "\xff"}\r\n' + line + b"\r\n")
    result = load_rows([str(path)], "sft", on_error="skip")
    assert result.rows == [EXPECTED_SFT, EXPECTED_SFT]
    assert [(r.row, r.field, r.reason) for r in result.rejects] == [(2, "<json>", "line is not valid UTF-8")]
    json.dumps(result.rejects[0].raw)  # still serialisable


def test_parquet_csv_json_rows_are_1_based_records(tmp_path):
    bad = {"prompt": "Hi", "completion": ""}
    rows = [{"prompt": "Hi", "completion": "Hello!"}, bad, {"prompt": "Hi", "completion": "Hello!"}]
    for writer, ext in [(write_parquet, "parquet"), (write_csv, "csv"), (write_json, "json")]:
        path = writer(tmp_path / f"d.{ext}", rows)
        result = load_rows([path], "sft", on_error="skip")
        check_counts(result)
        assert [(r.file, r.row, r.field, r.reason, r.raw) for r in result.rejects] == [
            (path, 2, "completion", "empty content", bad)]


def test_csv_ragged_row_and_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"Line one\nline two",Hello\nHi,Hello,extra\n', encoding="utf-8")
    result = load_rows([str(path)], "sft", on_error="skip")
    assert result.rows == [{"messages": msgs(("user", "Line one\nline two"), ("assistant", "Hello"))}]
    assert [(r.row, r.field, r.reason, r.raw) for r in result.rejects] == [
        (2, "<row>", "row has 3 cells, header has 2", ["Hi", "Hello", "extra"])]


def test_csv_message_cell_that_is_not_json(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('messages\n"[{""role"": ""user"""\n', encoding="utf-8")
    result = load_rows([str(path)], "sft", on_error="skip")
    assert [(r.row, r.field, r.reason) for r in result.rejects] == [
        (1, "messages", "must be a list of messages, got string")]


def test_per_file_counts_across_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD_SFT, {"bad": 1}, GOOD_SFT])
    b = write_parquet(tmp_path / "b.parquet", [{"prompt": "Hi", "completion": "Hello!"}])
    c = write_json(tmp_path / "c.json", {"data": [{"instruction": "x"}, {"instruction": "x", "output": "y"}]})
    result = load_rows([a, b, c], "sft", on_error="skip")
    check_counts(result)
    assert result.per_file == {a: {"read": 3, "kept": 2, "rejected": 1}, b: {"read": 1, "kept": 1, "rejected": 0},
                               c: {"read": 2, "kept": 1, "rejected": 1}}
    assert [(r.file, r.row) for r in result.rejects] == [(a, 2), (c, 1)]
    assert len(result.rows) == 4 and result.read == 6


# ---------------------------------------------------------------- raise mode

def test_raise_mode_names_file_row_field_reason_and_hint(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_SFT, "", {"messages": msgs(("user", "Hi"), ("robot", "x"))}])
    with pytest.raises(UserError) as info:
        load_rows([path], "sft")
    text = str(info.value)
    assert text.splitlines() == [
        f"{path}, line 3, field messages[1].role: unknown role 'robot'; expected one of system, user, assistant, tool",
        "hint: fix the row, or set data.on_error=skip to skip bad rows (each is counted and reported)"]
    assert info.value.hint and "data.on_error=skip" in info.value.hint


def test_raise_mode_says_row_for_non_jsonl(tmp_path):
    path = write_parquet(tmp_path / "p.parquet", [GOOD_DPO, {"prompt": "Hi", "chosen": "a", "rejected": "a"}])
    with pytest.raises(UserError, match=r"p\.parquet, row 2, field rejected: chosen and rejected are identical"):
        load_rows([path], "dpo", on_error="raise")


def test_raise_mode_on_bad_json(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ["{oops"])
    with pytest.raises(UserError, match=r"t\.jsonl, line 1, field <json>: invalid JSON"):
        load_rows([path], "sft")


# ---------------------------------------------------------------- file expansion

def test_folder_reads_supported_files_sorted_recursively(tmp_path):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    write_jsonl(folder / "b.jsonl", [GOOD_SFT])
    write_jsonl(folder / "a.jsonl", [GOOD_SFT])
    write_parquet(folder / "sub" / "c.parquet", [GOOD_SFT])
    write_jsonl(folder / ".hidden" / "x.jsonl", [{"junk": 1}])
    (folder / "README.md").write_text("not data")
    result = load_rows([str(folder)], "sft")
    expected = [folder / "a.jsonl", folder / "b.jsonl", folder / "sub" / "c.parquet"]
    assert list(result.per_file) == [str(p) for p in expected]
    assert result.read == 3 and result.rows == [EXPECTED_SFT] * 3


def test_glob_input(tmp_path):
    for name in ("x2.jsonl", "x1.jsonl", "y.jsonl"):
        write_jsonl(tmp_path / name, [GOOD_SFT])
    result = load_rows([str(tmp_path / "x*.jsonl")], "sft")
    assert list(result.per_file) == [str(tmp_path / "x1.jsonl"), str(tmp_path / "x2.jsonl")]


@pytest.mark.parametrize("case, pattern", [
    ("missing", r"data file not found: '.*nope\.jsonl'"),
    ("no-match", r"no files match '.*zz\*\.jsonl'"),
    ("extension", r"unsupported data file extension '\.txt': '.*notes\.txt'"),
    ("glob-extension", r"unsupported data file extension '\.txt'"),
    ("empty-folder", r"folder '.*empty' holds no \.jsonl/\.json/\.parquet/\.csv files"),
    ("twice", r"data file listed twice: '.*a\.jsonl'"),
    ("none", r"no data files given"),
])
def test_file_errors_name_the_path(tmp_path, case, pattern):
    write_jsonl(tmp_path / "a.jsonl", [GOOD_SFT])
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    files = {"missing": [str(tmp_path / "nope.jsonl")], "no-match": [str(tmp_path / "zz*.jsonl")],
             "extension": [str(tmp_path / "notes.txt")], "glob-extension": [str(tmp_path / "*")],
             "empty-folder": [str(tmp_path / "empty")],
             "twice": [str(tmp_path / "a.jsonl"), str(tmp_path / "*.jsonl")], "none": []}[case]
    with pytest.raises(UserError, match=pattern):
        load_rows(files, "sft")


def test_bad_json_file_and_bad_arguments(tmp_path):
    (tmp_path / "bad.json").write_text('{"a": [1], "b": [2]}')
    with pytest.raises(UserError, match=r"bad\.json: expected a JSON list of rows"):
        load_rows([str(tmp_path / "bad.json")], "sft")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(UserError, match=r"broken\.json: not a valid JSON file"):
        load_rows([str(tmp_path / "broken.json")], "sft")
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD_SFT])
    with pytest.raises(UserError, match="unknown data kind 'rm'"):
        load_rows([path], "rm")
    with pytest.raises(UserError, match="unknown data.on_error='drop'"):
        load_rows([path], "sft", on_error="drop")
    with pytest.raises(UserError, match="unknown dpo data format 'alpaca'"):
        load_rows([path], "dpo", fmt="alpaca")


# ---------------------------------------------------------------- rejects file

def test_write_rejects_one_json_object_per_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD_SFT, "{bad", {"messages": []}])
    result = load_rows([path], "sft", on_error="skip")
    out = tmp_path / "out" / "rejects.jsonl"
    write_rejects(result.rejects, out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert lines == [
        {"file": path, "row": 2, "field": "<json>", "reason": "invalid JSON: Expecting property name enclosed in "
         "double quotes at column 2", "raw": "{bad"},
        {"file": path, "row": 3, "field": "messages", "reason": "empty conversation", "raw": {"messages": []}},
    ]
    assert isinstance(result.rejects[0], Reject)


def test_user_error_hint_is_second_line():
    assert str(UserError("bad value")) == "bad value"
    assert str(UserError("bad value", hint="use 3")) == "bad value\nhint: use 3"


# --- sources: renames, Hub ids ------------------------------------------------------------------

from mistral_tune.datasets.sources import Source, is_hub_id, load_source  # noqa: E402


@pytest.mark.parametrize("writer", [write_jsonl, write_csv, write_parquet, write_json])
def test_column_renames_before_detection(tmp_path, writer):
    rows = [{"dialog": msgs(("user", "Hi"), ("assistant", "Hello!")), "note": "x"}]
    path = writer(tmp_path / f"f.{writer.__name__.split('_')[1]}", rows)
    result = load_source(Source(path=path, columns={"dialog": "messages"}), "sft")
    assert result.rows == [EXPECTED_SFT]
    with pytest.raises(UserError, match="to rename.*: dialogue"):
        load_source(Source(path=path, columns={"dialogue": "messages"}), "sft")


def test_rename_that_would_overwrite_is_a_reject(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [GOOD_SFT, {**GOOD_SFT, "dialog": GOOD_SFT["messages"]}])
    result = load_source(Source(path=path, columns={"dialog": "messages"}), "sft", on_error="skip")
    assert len(result.rows) == 1 and result.rejects[0].field == "dialog" and "overwrite" in result.rejects[0].reason


def test_source_format_overrides_the_stage_format(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"instruction": "Hi", "output": "Hello!", "messages": "not a list"}])
    assert load_source(Source(path=path, format="alpaca"), "sft", fmt="messages").rows == [EXPECTED_SFT]


def test_hub_ids_and_labels(tmp_path):
    (tmp_path / "local").mkdir()
    assert is_hub_id("HuggingFaceH4/ultrachat_200k") and is_hub_id("squad")
    assert not is_hub_id(str(tmp_path / "local")) and not is_hub_id("a/b.jsonl") and not is_hub_id("data/*.json")
    assert Source("org/x", split="test", name="en", revision="abc").label == "hub:org/x[en]:test@abc"
    assert Source("org/x").label == "hub:org/x:train"


def test_lone_surrogate_is_a_reject_and_rejects_file_stays_utf8(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a\\ud800"}, {"role": "assistant", "content": "b"}]}\n')
    result = load_rows([str(path)], "sft", on_error="skip")
    assert result.rejects[0].field == "messages[0].content" and "surrogate" in result.rejects[0].reason
    write_rejects(result.rejects, tmp_path / "rejects.jsonl")
    assert json.loads((tmp_path / "rejects.jsonl").read_text(encoding="utf-8"))["row"] == 1


def test_csv_that_is_not_utf8_is_a_user_error(tmp_path):
    path = tmp_path / "f.csv"
    path.write_bytes(b"messages\n\xff\xfe\n")
    with pytest.raises(UserError, match="not valid UTF-8"):
        load_rows([str(path)], "sft")
