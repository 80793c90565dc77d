"""Tool use (OpenAI layout) for mistral_v3 and mistral_v7, id for id against mistral-common.

Rows go through the data path (a .jsonl file read and validated by `sources.load_rows`, then
`templates.encode_chat` / `encode_preference`) and are compared with mistral-common's public
``encode_chat_completion`` of the raw OpenAI messages and tools (``ChatCompletionRequest.from_openai``),
and with the exported tokenizer's ``apply_chat_template(messages, tools=tools)``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_tune import cli
from mistral_tune.datasets import sources
from mistral_tune.formats import templates
from mistral_tune.formats.templates import encode_chat, encode_preference, mistral_tokenizer_file
from mistral_tune.formats.tokenizer import build_hf_tokenizer

TOOL_TEMPLATES = ("mistral_v3", "mistral_v7")
EOS = 2

CALC = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
NO_DESCRIPTION = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def call(id_: str, name: str, arguments: str | dict) -> dict:
    return {"id": id_, "type": "function", "function": {"name": name, "arguments": arguments}}


def calls(*items, content=None) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": list(items)}


def result(id_: str, content: str) -> dict:
    return {"role": "tool", "tool_call_id": id_, "content": content}


def u(text: str) -> dict:
    return {"role": "user", "content": text}


def a(text: str) -> dict:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "You are a careful assistant. Use tools when they help."}
ADD = call("c1a2b3c4d", "calculator", '{"expression": "17 * 23"}')
PARIS = call("w00000001", "get_weather", {"city": "Paris", "unit": "celsius"})
LONDON = call("w00000002", "get_weather", {"city": "London"})

# (name, tools, messages, exact under the exported Jinja template). The Jinja template cannot parse
# JSON, so arguments (and v3 tool results) written as JSON text not in json.dumps form are the
# documented corner.
CONVERSATIONS = [
    ("single-call", [CALC], [u("What is 17 * 23?"), calls(ADD), result("c1a2b3c4d", "391"), a("17 * 23 = 391.")], True),
    ("system-prompt", [CALC], [SYSTEM, u("What is 17 * 23?"), calls(ADD), result("c1a2b3c4d", "391"),
                               a("It is 391.")], True),
    ("ends-with-call", [CALC], [u("Compute 17 * 23, please."), calls(ADD)], True),
    ("two-tools-json-result", [CALC, WEATHER],
     [u("Weather in Paris?"), calls(PARIS), result("w00000001", '{"temperature": 21, "sky": "clear"}'),
      a("21 °C and clear in Paris.")], True),
    ("parallel-calls", [WEATHER], [u("Paris or London: which is warmer?"), calls(PARIS, LONDON),
                                   result("w00000001", "21"), result("w00000002", "17.5"), a("Paris, by 3.5 degrees.")], True),
    ("parallel-results-reversed", [WEATHER, CALC],
     [SYSTEM, u("Paris and London?"), calls(PARIS, LONDON), result("w00000002", "Cloudy, 17 C"),
      result("w00000001", "Sunny, 21 C"), a("London is cloudy (17 C); Paris is sunny (21 C).")], True),
    ("multi-turn-two-calls", [CALC],
     [u("What is 17 * 23?"), calls(ADD), result("c1a2b3c4d", "391"), a("391."),
      u("And 391 - 1?"), calls(call("c1a2b3c4e", "calculator", '{"expression": "391 - 1"}')),
      result("c1a2b3c4e", "390"), a("390.")], True),
    ("chat-then-tool", [CALC, WEATHER],
     [SYSTEM, u("Hi there!"), a("Hello! How can I help?"), u("Weather in Paris, in celsius."), calls(PARIS),
      result("w00000001", "21"), a("It is 21 °C in Paris.")], True),
    ("tools-but-no-call", [CALC], [u("Say hello."), a("Hello!")], True),
    ("sequential-calls", [CALC, WEATHER],
     [u("Paris temperature in Fahrenheit?"), calls(PARIS), result("w00000001", "21"),
      calls(call("c0000000f", "calculator", '{"expression": "21 * 9 / 5 + 32"}')), result("c0000000f", "69.8"),
      a("About 69.8 °F.")], True),
    ("unicode-text-result", [WEATHER, NO_DESCRIPTION],
     [u("Météo à Zürich ? 🙂"), calls(call("z9y8x7w6v", "get_weather", {"city": "Zürich", "unit": "celsius"})),
      result("z9y8x7w6v", "Ensoleillé, 21 °C — “parfait”"), a("Ensoleillé, 21 °C.")], True),
    ("no-argument-tool", [NO_DESCRIPTION], [u("What time is it?"), calls(call("t1t2t3t4t", "now", {})),
                                            result("t1t2t3t4t", "12:00"), a("It is noon.")], True),
    ("non-canonical-json-results", [CALC],
     [u("What is 1 / 8?"), calls(call("c1a2b3c4d", "calculator", '{"expression":"1/8"}')),
      result("c1a2b3c4d", '{"value":0.125}'), a("0.125")], False),
]
# v7 only: text and tool calls in one assistant turn (v3 refuses it).
CONTENT_AND_CALL = ("content-and-call", [CALC, WEATHER],
                    [SYSTEM, u("What is 17 * 23?"), calls(ADD, content="Let me compute that."),
                     result("c1a2b3c4d", "391"), a("391.")], True)


@lru_cache(maxsize=None)
def reference(template: str, mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(mistral_tokenizer_file(template)), mode=mode)


def mistral_common_ids(messages: list[dict], tools: list[dict], template: str,
                       mode: ValidationMode = ValidationMode.finetuning) -> list[int]:
    request = ChatCompletionRequest.from_openai(messages, tools=tools)
    return reference(template, mode).encode_chat_completion(request).tokens


@lru_cache(maxsize=None)
def hf_tokenizer(template: str):
    return build_hf_tokenizer(template)


def control(template: str, name: str) -> int:
    return reference(template, ValidationMode.finetuning).instruct_tokenizer.tokenizer.get_special_token(name)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def cases(template: str) -> list[tuple]:
    return CONVERSATIONS + ([CONTENT_AND_CALL] if template == "mistral_v7" else [])


def spans_between(ids: list[int], begin: int, end: int) -> list[range]:
    out, start = [], None
    for i, tok in enumerate(ids):
        if tok == begin:
            start = i
        elif tok == end and start is not None:
            out.append(range(start, i + 1))
            start = None
    return out


# --- the data path against mistral-common and the exported template -------------------------------


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_tool_conversations_match_mistral_common_and_the_exported_template(tmp_path, template):
    chosen = cases(template)
    assert len(chosen) >= 13
    path = write_jsonl(tmp_path / "tools.jsonl", [{"tools": tools, "messages": msgs} for _, tools, msgs, _ in chosen])
    loaded = sources.load_rows([str(path)], "sft")
    assert loaded.read == len(chosen) and not loaded.rejects
    calls_id, eos = control(template, "[TOOL_CALLS]"), EOS
    results = (control(template, "[TOOL_RESULTS]"), control(template, "[/TOOL_RESULTS]"))
    tools_block = (control(template, "[AVAILABLE_TOOLS]"), control(template, "[/AVAILABLE_TOOLS]"))
    jinja_exact = 0
    for (name, tools, messages, exact), row in zip(chosen, loaded.rows, strict=True):
        enc = encode_chat(row["messages"], template)
        ids, mask = enc.input_ids, enc.assistant_masks
        assert ids == mistral_common_ids(messages, tools, template), name
        # Calls and their EOS are trained, results and the tools list are not.
        n_calls = sum(1 for m in messages if m.get("tool_calls"))
        assert ids.count(calls_id) == n_calls and all(mask[i] for i, t in enumerate(ids) if t == calls_id), name
        assert all(mask[i] for i, t in enumerate(ids) if t == eos), name
        assert ids.count(tools_block[0]) == 1 and spans_between(ids, *tools_block), name
        for block in spans_between(ids, *results) + spans_between(ids, *tools_block):
            assert not any(mask[i] for i in block), name
        assert len(spans_between(ids, *results)) == sum(m["role"] == "tool" for m in messages), name
        # Trained: exactly the tokens of the assistant turns, as mistral-common encodes each one.
        instruct = reference(template, ValidationMode.finetuning).instruct_tokenizer
        request = reference(template, ValidationMode.finetuning)._instruct_request_normalizer.from_chat_completion_request(
            ChatCompletionRequest.from_openai(messages, tools=tools))
        assistant_tokens = sum(len(instruct.encode_assistant_message(m, False)) for m in request.messages
                               if m.role == "assistant")
        assert sum(mask) == assistant_tokens, name
        # The exported tokenizer renders the same ids and mask at inference.
        hf = hf_tokenizer(template).apply_chat_template(messages, tools=tools, return_dict=True,
                                                        return_assistant_tokens_mask=True)
        if exact:
            assert hf["input_ids"] == ids and hf["assistant_masks"] == mask, name
            jinja_exact += 1
        else:
            assert hf["input_ids"] != ids, name  # the documented corner: JSON text not in json.dumps form
    assert jinja_exact == sum(c[3] for c in chosen)


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_train_on_last_assistant_and_all_with_tools(template):
    _, tools, messages, _ = CONVERSATIONS[6]  # two user turns, each with a call and an answer
    ours = sources._normalise({"tools": tools, "messages": messages}, "sft", "auto")["messages"]
    last = encode_chat(ours, template, train_on="last_assistant")
    every = encode_chat(ours, template, train_on="all")
    default = encode_chat(ours, template)
    assert last.input_ids == every.input_ids == default.input_ids
    assert every.assistant_masks == [0] + [1] * (len(every.input_ids) - 1)
    start = len(templates.encode_prompt(ours[:-1], template))  # the final answer starts after the last result
    assert last.assistant_masks == [0] * start + [1] * (len(last.input_ids) - start)
    assert sum(last.assistant_masks) < sum(default.assistant_masks)


def test_v3_refuses_text_and_calls_in_one_turn():
    _, tools, messages, _ = CONTENT_AND_CALL
    path_rows = sources._normalise({"tools": tools, "messages": messages}, "sft", "auto")
    with pytest.raises(ValueError, match="mistral_v3 cannot hold text and tool calls"):
        encode_chat(path_rows["messages"], "mistral_v3")
    with pytest.raises(Exception, match="mistral_v3 cannot hold text and tool calls"):
        hf_tokenizer("mistral_v3").apply_chat_template(messages, tools=tools)


# --- preference pairs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_preference_pairs_with_tool_prompts_and_tool_call_replies(tmp_path, template):
    pairs = [
        # prompt ends with the tool result; chosen/rejected are final answers
        {"tools": [CALC], "prompt": [SYSTEM, u("What is 17 * 23?"), calls(ADD), result("c1a2b3c4d", "391")],
         "chosen": "17 * 23 = 391.", "rejected": "17 * 23 = 401."},
        # prompt ends with the user; chosen calls the right tool, rejected answers without it
        {"tools": [CALC, WEATHER], "prompt": [u("Weather in Paris?")],
         "chosen": [calls(PARIS)], "rejected": [a("It is probably sunny.")]},
        # both replies call a tool, with different arguments (full conversations, no prompt field)
        {"tools": [WEATHER], "chosen": [u("Weather in London?"), calls(LONDON)],
         "rejected": [u("Weather in London?"), calls(call("w00000002", "get_weather", {"city": "Paris"}))]},
    ]
    loaded = sources.load_rows([str(write_jsonl(tmp_path / "pairs.jsonl", pairs))], "dpo")
    assert not loaded.rejects and len(loaded.rows) == len(pairs)
    for pair, row in zip(pairs, loaded.rows, strict=True):
        prompt_ids, chosen_ids, rejected_ids = encode_preference(row["prompt"], row["chosen"], row["rejected"], template)
        raw_prompt = pair.get("prompt") or pair["chosen"][:-1]
        assert prompt_ids == mistral_common_ids(raw_prompt, pair["tools"], template, ValidationMode.test)
        for name, completion in (("chosen", chosen_ids), ("rejected", rejected_ids)):
            reply = pair[name][-1] if isinstance(pair[name], list) else a(pair[name])
            assert prompt_ids + completion == mistral_common_ids([*raw_prompt, reply], pair["tools"], template)
            assert completion[-1] == EOS
        hf = hf_tokenizer(template).apply_chat_template(raw_prompt, tools=pair["tools"], add_generation_prompt=True,
                                                        return_dict=True)["input_ids"]
        assert hf == prompt_ids


# --- formats without tool use refuse, they never drop -------------------------------------------------


@pytest.mark.parametrize("template", ["mistral_v1", "chatml", "zephyr"])
def test_formats_without_tool_use_refuse_tool_rows(template):
    _, tools, messages, _ = CONVERSATIONS[0]
    row = sources._normalise({"tools": tools, "messages": messages}, "sft", "auto")
    with pytest.raises(ValueError, match=f"{template} has no tool-use format"):
        encode_chat(row["messages"], template)
    tools_only = sources._normalise({"tools": tools, "messages": [u("Hi"), a("Hello")]}, "sft", "auto")
    with pytest.raises(ValueError, match="has no tool-use format"):
        encode_chat(tools_only["messages"], template)
    with pytest.raises(Exception, match="has no tool-use format"):
        hf_tokenizer(template).apply_chat_template(messages, tools=tools)
    with pytest.raises(Exception, match="has no tool-use format"):
        hf_tokenizer(template).apply_chat_template([u("Hi"), a("Hello")], tools=tools)
    with pytest.raises(Exception, match="has no tool-use format"):  # calls without a tools list
        hf_tokenizer(template).apply_chat_template(messages[:2])


def _built(run: Path, name: str):
    """The SFT data build's `name` (report.json, rejects.jsonl, or the dataset's dataset_info.json)."""
    path = run / "data" / "sft" / name
    if not path.exists():
        path = run / "data" / "sft" / "dataset" / name
    assert path.exists(), f"no {name} under {run / 'data' / 'sft'}"
    return path


@pytest.mark.parametrize("template", ["mistral_v1", "chatml", "zephyr"])
def test_data_stage_counts_refused_tool_rows_or_stops_with_one_line(tmp_path, capsys, template):
    rows = [{"tools": t, "messages": m} for _, t, m, _ in CONVERSATIONS[:3]] + [{"messages": [u("Hi"), a("Hello")]}]
    path = write_jsonl(tmp_path / "tools.jsonl", rows)
    args = ["data", f"template={template}", f"sft.data.files=[{path}]", "dpo.data.files=[]", "logger=none"]
    status = cli.main([*args, f"run_dir={tmp_path / 'skip'}", "data.on_error=skip"])
    assert status == 0, capsys.readouterr().err
    report = json.loads(_built(tmp_path / "skip", "report.json").read_text())
    assert (report["read"], report["kept"], report["rejected"]) == (4, 1, 3)
    rejects = [json.loads(line) for line in _built(tmp_path / "skip", "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rejects] == [1, 2, 3]
    assert all(f"{template} has no tool-use format" in r["reason"] for r in rejects)

    capsys.readouterr()
    status = cli.main([*args, f"run_dir={tmp_path / 'raise'}", "data.on_error=raise"])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    error = [line for line in err.splitlines() if "error: " in line]
    assert len(error) == 1 and f"{path}, line 1" in error[0] and "has no tool-use format" in error[0], err


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_data_stage_builds_tool_rows(tmp_path, template):
    from datasets import load_from_disk

    chosen = cases(template)
    path = write_jsonl(tmp_path / "tools.jsonl", [{"tools": t, "messages": m} for _, t, m, _ in chosen])
    status = cli.main(["data", f"run_dir={tmp_path / 'run'}", f"template={template}", f"sft.data.files=[{path}]",
                       "dpo.data.files=[]", "logger=none", "data.dedup=none", "sft.data.max_length=4096"])
    assert status == 0
    built = load_from_disk(str(_built(tmp_path / "run", "dataset_info.json").parent))
    assert len(built) == len(chosen)
    for (name, tools, messages, _), row in zip(chosen, built, strict=True):
        assert row["input_ids"] == mistral_common_ids(messages, tools, template), name


# --- bad rows: one reason per row, naming the field -----------------------------------------------------

GOOD = {"tools": [CALC], "messages": [u("What is 17 * 23?"), calls(ADD), result("c1a2b3c4d", "391"), a("391.")]}


def bad(**change) -> dict:
    row = json.loads(json.dumps(GOOD))
    for key, value in change.items():
        target, *path = key.split("__")
        obj = row
        for part in [target, *path][:-1]:
            obj = obj[int(part)] if isinstance(obj, list) else obj[part]
        last = [target, *path][-1]
        if isinstance(obj, list):
            obj[int(last)] = value
        elif value is ...:
            del obj[last]
        else:
            obj[last] = value
    return row


BAD_ROWS = [
    (bad(messages__1__tool_calls__0__function__arguments="{not json"),
     "messages[1].tool_calls[0].function.arguments", "arguments is not valid JSON: Expecting property name enclosed "
     "in double quotes at column 2"),
    (bad(messages__1__tool_calls__0__function__arguments="[1, 2]"),
     "messages[1].tool_calls[0].function.arguments", "arguments must be a JSON object, got list"),
    (bad(messages__1__tool_calls__0__id="call_1"), "messages[1].tool_calls[0].id",
     "tool call ids are 9 letters or digits in Mistral's formats, got 'call_1'"),
    (bad(messages__1__tool_calls__0__function__name="multiply"), "messages[1].tool_calls[0].function.name",
     "calls 'multiply', but the row's tools are calculator"),
    (bad(tools=None), "messages[1].tool_calls[0].function.name", "calls 'calculator', but the row has no tools"),
    (bad(messages__1__tool_calls=[]), "messages[1].tool_calls", "must be a non-empty list of tool calls, got []"),
    (bad(messages__2__tool_call_id=...), "messages[2].tool_call_id", "missing field 'tool_call_id'"),
    (bad(messages__2__tool_call_id="zzzzzzzzz"), "messages[2].tool_call_id",
     "'zzzzzzzzz' answers no unanswered call of messages[1]"),
    (bad(messages__2__content=""), "messages[2].content", "empty content"),
    (bad(messages__2=a("391.")), "messages[2].role",
     "roles out of order: expected a tool result for each call of messages[1] (missing: c1a2b3c4d), got assistant"),
    (bad(messages__1=result("c1a2b3c4d", "391")), "messages[1].role",
     "roles out of order: a tool result must answer a call of the assistant turn before it"),
    (bad(messages__3=result("c1a2b3c4d", "391")), "messages[3].role",
     "roles out of order: a tool result must answer a call of the assistant turn before it"),
    ({**GOOD, "messages": GOOD["messages"][:3]}, "messages", "conversation must end with an assistant message, not tool"),
    (bad(tools={"type": "function"}), "tools", "must be a list of tools, got object"),
    (bad(tools="[{"), "tools", "tools is not valid JSON: Expecting property name enclosed in double quotes at column 3"),
    (bad(tools__0__function__name="two words"), "tools[0].function.name",
     "function names are 1-64 letters, digits, '_' or '-', got 'two words'"),
    (bad(tools__0__function__parameters="oops"), "tools[0].function.parameters",
     "parameters is not valid JSON: Expecting value at column 1"),
    (bad(tools__0__type="retrieval"), "tools[0].type", "unknown tool type 'retrieval'; expected 'function'"),
    (bad(tools=[CALC, CALC]), "tools[1].function.name", "two tools are named 'calculator'"),
    ({"tools": [CALC], "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
     "tools", "tools are read with the messages (OpenAI) layout only, not sharegpt"),
    (bad(messages__1__tool_calls=[ADD, ADD]), "messages[1].tool_calls[1].id",
     "tool call id 'c1a2b3c4d' appears twice in one turn"),
]


@pytest.mark.parametrize("row, field, reason", BAD_ROWS, ids=[r[1] + ":" + r[2][:30] for r in BAD_ROWS])
def test_bad_tool_rows_are_rejected_with_field_and_reason(tmp_path, row, field, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    result = sources.load_rows([str(path)], "sft", on_error="skip")
    assert len(result.rows) == 1 and [(r.row, r.field, r.reason) for r in result.rejects] == [(2, field, reason)]


def test_tools_given_as_json_text_and_arguments_as_objects_are_normalised(tmp_path):
    row = bad(tools=json.dumps([CALC]), messages__1__tool_calls__0__function__arguments={"expression": "17 * 23"})
    loaded = sources.load_rows([str(write_jsonl(tmp_path / "d.jsonl", [row, GOOD]))], "sft")
    first, second = (r["messages"] for r in loaded.rows)
    assert first == second  # the same conversation, however the row wrote it
    assert first[0]["tools"] == [CALC] and first[1]["content"] == ""
    assert first[1]["tool_calls"][0]["function"]["arguments"] == '{"expression": "17 * 23"}'
    assert templates.uses_tools(first) and not templates.uses_tools([u("Hi"), a("Hello")])


def test_mistral_common_validator_errors_are_value_errors():
    row = sources._normalise(GOOD, "sft", "auto")
    messages = json.loads(json.dumps(row["messages"]))
    messages[0]["tools"][0]["function"]["parameters"] = {"type": "no-such-type"}
    with pytest.raises(ValueError, match="mistral-common refuses this tool conversation: Invalid tool schema"):
        encode_chat(messages, "mistral_v3")


# --- the exported v3 template writes tool results as mistral-common does, within its documented limits ---


@pytest.mark.parametrize("content, exact", [
    ("391", True), ("-17", True), ("0.125", True), ("true", True), ("null", True), ('"quoted"', True),
    ('{"value": 0.125, "unit": "m"}', True), ("[1, 2, 3]", True), ("Sunny, 21 C", True), ("42 apples", True),
    ("007", True), ("inf", True), ("nan", True), ("3.50", False), ('{"value":0.125}', False), ("1e3", False),
])
def test_v3_jinja_tool_results(content, exact):
    messages = [u("Go."), calls(ADD), result("c1a2b3c4d", content), a("Done.")]
    ours = encode_chat(sources._normalise({"tools": [CALC], "messages": messages}, "sft", "auto")["messages"],
                       "mistral_v3").input_ids
    assert ours == mistral_common_ids(messages, [CALC], "mistral_v3")
    jinja = hf_tokenizer("mistral_v3").apply_chat_template(messages, tools=[CALC], return_dict=True)["input_ids"]
    assert (jinja == ours) == exact


def test_bundled_tool_dataset_encodes_within_the_default_max_length():
    path = Path(__file__).resolve().parents[1] / "data" / "tools_sft.jsonl"
    loaded = sources.load_rows([str(path)], "sft")
    assert loaded.read == len(loaded.rows) >= 300 and not loaded.rejects
    assert all(templates.uses_tools(r["messages"]) for r in loaded.rows)
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    for template in TOOL_TEMPLATES:
        for i, (row, original) in enumerate(zip(loaded.rows, raw, strict=True)):
            enc = encode_chat(row["messages"], template)
            assert len(enc.input_ids) <= 256  # the default sft.data.max_length: nothing dropped as too long
            if i % 20 == 0:
                assert enc.input_ids == mistral_common_ids(original["messages"], original["tools"], template)


@pytest.mark.parametrize("template", TOOL_TEMPLATES)
def test_eval_scores_tool_calls_and_the_answer_after_the_results(tmp_path, template, monkeypatch):
    """Eval on the bundled held-out tool chats: one probe per tool-calling turn (scored on the
    calls' names and arguments, not their random ids) and the reply after the results
    (`tool_answer`). A "model" that generates each probe's reference tokens scores 1 everywhere;
    one that changes an argument, drops [TOOL_CALLS] or answers in text scores 0 on those."""
    from mistral_tune.config import compose
    from mistral_tune.formats.chat_format import ChatFormat
    from mistral_tune.runs import RunDir
    from mistral_tune.stages import data, evaluate

    cfg = compose([f"run_dir={tmp_path}", f"template={template}", "sft.data.files=[data/tools_sft.jsonl]",
                   "dpo.data.files=[]", "stages=[sft]", "eval.max_samples=30"])
    data.fix_chat_format(cfg, RunDir.of(cfg))
    fmt = ChatFormat.load(RunDir.of(cfg), "test")
    tok = fmt.hf_tokenizer()
    rows = sources.load_rows([str(Path(__file__).resolve().parents[1] / "data" / "eval_tools.jsonl")], "sft").rows[:30]
    held = evaluate.load_eval_data(cfg, fmt)
    turns = [(r["messages"], i) for r in rows for i, m in enumerate(r["messages"]) if m.get("tool_calls")]
    assert len(held["calls"]) == len(turns) > 20 and len(held["prompts"]) == 30
    assert sum(p["task"] == "tool_answer" for p in held["prompts"]) > 10

    # The reference continuation of every prompt, EOS cut (as generate returns it).
    reference = {}
    for messages, i in turns:
        prompt = fmt.encode_prompt(messages[:i])
        reference[tuple(prompt)] = fmt.encode_chat(messages[:i + 1]).input_ids[len(prompt):-1]
    for r in rows:
        prompt = fmt.encode_prompt(r["messages"][:-1])
        reference[tuple(prompt)] = fmt.encode_chat(r["messages"]).input_ids[len(prompt):-1]

    def replay(model, prompts, pad, eos, max_new_tokens, batch_size):
        return [list(reference[tuple(p)]) for p in prompts]

    monkeypatch.setattr(evaluate, "generate", replay)
    result, _ = evaluate.evaluate_model(torch_stub(), {**held, "loss": [], "pairs": []}, tok, cfg)
    assert result["task_scores"]["tool_call"] == 1.0 and result["task_scores"]["tool_answer"] == 1.0
    assert result["task_score"] == 1.0 and result["tool_call_well_formed"] == 1.0

    ref = held["calls"][0]["reference"]
    ids = reference[tuple(held["calls"][0]["ids"])]
    assert evaluate.score_call(ids, ref, tok)[1:] == (True, True)
    wrong_args = [(name, {"expression": args["expression"] + "1"}) for name, args in ref]
    assert evaluate.score_call(ids, wrong_args, tok)[1:] == (False, True)  # well-formed, not right
    assert evaluate.score_call(ids, [("weather", args) for _, args in ref], tok)[1:] == (False, False)
    marker = tok.convert_tokens_to_ids("[TOOL_CALLS]")
    assert evaluate.score_call([t for t in ids if t != marker], ref, tok)[1:] == (False, False)  # JSON alone is no call
    assert evaluate.score_call(ids[:-3], ref, tok)[1:] == (False, False)  # cut short: no JSON
    other_id = tok.encode(tok.decode(ids, skip_special_tokens=True).replace(
        json.loads(tok.decode(ids[1:], skip_special_tokens=True))[0]["id"], "zzzzzzzzz"), add_special_tokens=False)
    assert evaluate.score_call([marker, *other_id], ref, tok)[1]  # the call id is not compared


def torch_stub():
    class Model:
        def eval(self):
            return self
    return Model()


def test_eval_of_a_chat_ending_on_a_call_probes_the_call_only(tmp_path):
    """A held-out chat whose last turn is a tool call has no reply to compare: its calls are the
    probe, not an empty last reply."""
    from mistral_tune.config import compose
    from mistral_tune.formats.chat_format import ChatFormat
    from mistral_tune.runs import RunDir
    from mistral_tune.stages import data, evaluate

    path = tmp_path / "held.jsonl"
    path.write_text(json.dumps({"tools": [CALC], "messages": [u("What is 2 + 3?"), calls(call("a1b2c3d4e", "calculator", '{"expression": "2 + 3"}'))]}) + "\n")
    cfg = compose([f"run_dir={tmp_path / 'run'}", "template=mistral_v3", f"eval.files=[{path}]", "eval.pref_files=[]"])
    data.fix_chat_format(cfg, RunDir.of(cfg))
    held = evaluate.load_eval_data(cfg, ChatFormat.load(RunDir.of(cfg), "test"))
    assert held["prompts"] == [] and [c["reference"] for c in held["calls"]] == [[("calculator", {"expression": "2 + 3"})]]
    assert held["calls"][0]["user"] == "What is 2 + 3?"
