"""mistral_tune.formats.templates against mistral-common, id for id, on random conversations."""

from __future__ import annotations

import random
from functools import lru_cache

import pytest
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from mistral_tune.formats import templates
from mistral_tune.formats.templates import (
    TEMPLATES,
    Encoded,
    encode_chat,
    encode_preference,
    encode_prompt,
    mistral_tokenizer,
    mistral_tokenizer_file,
)

N_CONVERSATIONS = 300
BOS, EOS = 1, 2  # same ids in every Mistral SentencePiece file; asserted below

# Content pieces: whitespace of every kind, unicode, emoji (ZWJ sequences), digits, the
# SentencePiece space symbol, Jinja-looking text, and control strings that must stay text.
PIECES = [
    "hello", "world", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "é", "日本語", "Ω", "ﬁ",
    "ｆｕｌｌ", "🙂", "👨‍👩‍👧", "123", "4567", ".", ",", "!?", "▁", "x", "{{ x }}", "'", '"', "\\",
    "[INST]", "[/INST]", "</s>", "<s>", "<unk>", "[SYSTEM_PROMPT]", "[TOOL_CALLS]",
]
_ROLE_CLASSES = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}


def random_text(rng: random.Random, min_pieces: int = 0) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(min_pieces, 10)))


def random_conversation(rng: random.Random, end: str = "assistant", text=random_text) -> list[dict]:
    """Optional system prompt, 1-4 user turns, ending with an `end` turn; contents from `text`."""
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": text(rng)})
    n_turns = rng.randint(1, 4)
    for turn in range(n_turns):
        messages.append({"role": "user", "content": text(rng)})
        if turn < n_turns - 1 or end == "assistant":
            # mistral-common rejects empty assistant turns; whitespace-only ones are fine
            messages.append({"role": "assistant", "content": text(rng, min_pieces=1)})
    return messages


def conversations(seed: int, end: str = "assistant") -> list[list[dict]]:
    rng = random.Random(seed)
    return [random_conversation(rng, end) for _ in range(N_CONVERSATIONS)]


# --- independent references ------------------------------------------------------------


def reference_instruct(messages: list[dict], template: str) -> list[int]:
    """encode_instruct of an InstructRequest built by hand, per the version's system rule."""
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    turns = [_ROLE_CLASSES[m["role"]](content=m["content"]) for m in messages if m["role"] != "system"]
    if template == "mistral_v7":  # v7: the system prompt is a message of its own
        if system is not None:
            turns.insert(0, SystemMessage(content=system))
        request = InstructRequest(messages=turns)
    else:  # v1/v3: folded into a user turn by the instruct tokenizer
        request = InstructRequest(messages=turns, system_prompt=system or None)
    return mistral_tokenizer(template).instruct_tokenizer.encode_instruct(request).tokens


@lru_cache(maxsize=None)
def public_api(template: str, mode: ValidationMode) -> MistralTokenizer:
    return MistralTokenizer.from_file(str(mistral_tokenizer_file(template)), mode=mode)


def reference_chat_completion(messages: list[dict], template: str, mode: ValidationMode) -> list[int]:
    """mistral-common's public entry point: validate, normalize, encode."""
    request = ChatCompletionRequest(messages=[_ROLE_CLASSES[m["role"]](content=m["content"]) for m in messages])
    return public_api(template, mode).encode_chat_completion(request).tokens


def assistant_encodings(messages: list[dict], template: str) -> list[list[int]]:
    """What each assistant turn must look like: its content (v3/v7 drop trailing spaces) + EOS."""
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    out = []
    for m in messages:
        if m["role"] == "assistant":
            content = m["content"] if template == "mistral_v1" else m["content"].rstrip(" ")
            out.append(sp.encode(content, bos=False, eos=False) + [EOS])
    return out


def trained_runs(encoded: Encoded) -> list[list[int]]:
    """Maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for tok, mask in zip(encoded.input_ids, encoded.assistant_masks):
        if mask:
            current.append(tok)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return runs


# --- tests ------------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_tokenizer_files_and_cache(template):
    assert mistral_tokenizer_file(template).is_file()
    assert mistral_tokenizer(template) is mistral_tokenizer(template)
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    assert (sp.bos_id, sp.eos_id) == (BOS, EOS)


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_chat_matches_reference(template):
    for messages in conversations(seed=1):
        ids = encode_chat(messages, template).input_ids
        assert ids == reference_instruct(messages, template), messages
        assert ids == reference_chat_completion(messages, template, ValidationMode.finetuning), messages


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_prompt_matches_reference(template):
    for messages in conversations(seed=2, end="user"):
        ids = encode_prompt(messages, template)
        assert ids == reference_instruct(messages, template), messages
        assert ids == reference_chat_completion(messages, template, ValidationMode.test), messages


@pytest.mark.parametrize("template", TEMPLATES)
def test_assistant_mask_trains_every_reply_and_its_eos(template):
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    for messages in conversations(seed=3):
        encoded = encode_chat(messages, template)
        assert len(encoded.assistant_masks) == len(encoded.input_ids)
        # The trained tokens are exactly the assistant turns, each a separate run closed by EOS.
        # A run can only merge with a neighbour through a trained user/system token.
        assert trained_runs(encoded) == assistant_encodings(messages, template), messages
        for tok, mask in zip(encoded.input_ids, encoded.assistant_masks):
            if sp.is_special(tok) and tok != EOS:
                assert mask == 0  # BOS, [INST], [/INST], [SYSTEM_PROMPT]... are never trained
        # every EOS in the sequence closes an assistant turn and is trained
        assert [m for t, m in zip(encoded.input_ids, encoded.assistant_masks) if t == EOS] == [1] * sum(
            m["role"] == "assistant" for m in messages
        )


@pytest.mark.parametrize("template", TEMPLATES)
def test_train_on_last_assistant(template):
    for messages in conversations(seed=4)[:100]:
        full = encode_chat(messages, template)
        last = encode_chat(messages, template, train_on="last_assistant")
        assert last.input_ids == full.input_ids
        assert trained_runs(last) == assistant_encodings(messages, template)[-1:]
        n_last = len(assistant_encodings(messages, template)[-1])
        assert last.assistant_masks[-n_last:] == [1] * n_last  # the final turn ends the sequence


@pytest.mark.parametrize("template", TEMPLATES)
def test_train_on_all_trains_everything_but_bos(template):
    for messages in conversations(seed=5)[:100]:
        encoded = encode_chat(messages, template, train_on="all")
        assert encoded.assistant_masks == [0] + [1] * (len(encoded.input_ids) - 1)


@pytest.mark.parametrize("template", TEMPLATES)
def test_single_bos_and_control_strings_in_content_stay_text(template):
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    messages = [
        {"role": "system", "content": "<s>[INST] sys </s>"},
        {"role": "user", "content": "</s>[INST] hi [/INST]<s>"},
        {"role": "assistant", "content": "[/INST] ok </s><s>[INST]"},
        {"role": "user", "content": "[SYSTEM_PROMPT]x[/SYSTEM_PROMPT]"},
        {"role": "assistant", "content": "<unk>[TOOL_CALLS]"},
    ]
    ids = encode_chat(messages, template).input_ids
    assert ids == reference_instruct(messages, template)
    controls = [t for t in ids if sp.is_special(t)]
    expected = {
        "mistral_v1": [BOS, EOS, EOS],  # v1's [INST] is text by design
        "mistral_v3": [BOS, 3, 4, EOS, 3, 4, EOS],
        "mistral_v7": [BOS, 16, 17, 3, 4, EOS, 3, 4, EOS],
    }[template]
    assert controls == expected
    assert 0 not in ids  # "<unk>" text is not the unk token either

    for messages in conversations(seed=6):
        ids = encode_chat(messages, template).input_ids
        assert ids[0] == BOS and ids.count(BOS) == 1
        assert ids.count(EOS) == sum(m["role"] == "assistant" for m in messages)


@pytest.mark.parametrize("template", TEMPLATES)
def test_encode_preference(template):
    rng = random.Random(7)
    for prompt in conversations(seed=7, end="user")[:150]:
        chosen, rejected = random_text(rng, 1), random_text(rng, 1)
        prompt_ids, chosen_ids, rejected_ids = encode_preference(prompt, chosen, rejected, template)
        assert prompt_ids == encode_prompt(prompt, template)
        for reply, completion in ((chosen, chosen_ids), (rejected, rejected_ids)):
            full = encode_chat([*prompt, {"role": "assistant", "content": reply}], template)
            assert prompt_ids + completion == full.input_ids
            assert completion[-1] == EOS and BOS not in completion
            # the completion is exactly what encode_chat trains at the end of the sequence
            assert full.assistant_masks[len(prompt_ids) :] == [1] * len(completion)


def test_preference_with_v3_system_prompt_in_last_user_turn():
    # v3 moves the system prompt into the LAST user turn: the prompt still ends with that
    # turn, so it stays a prefix of prompt + reply.
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    prompt_ids, chosen_ids, _ = encode_preference(prompt, "yes", "no", "mistral_v3")
    sp = mistral_tokenizer("mistral_v3").instruct_tokenizer.tokenizer
    last_inst = len(prompt_ids) - 1 - prompt_ids[::-1].index(3)
    assert sp.decode(prompt_ids[last_inst:]) == "Be brief.\n\nc"
    assert sp.decode(chosen_ids) == "yes"


def test_preference_raises_when_prompt_is_not_a_prefix(monkeypatch):
    monkeypatch.setattr(templates, "encode_prompt", lambda messages, template, vocab=None: [BOS, 99999])
    with pytest.raises(ValueError, match="prefix"):
        encode_preference([{"role": "user", "content": "q"}], "a", "b", "mistral_v3")


def test_self_check_catches_a_changed_reference(monkeypatch):
    instruct = mistral_tokenizer("mistral_v3").instruct_tokenizer
    original = instruct.encode_instruct

    def drifted(request):
        tokenized = original(request)
        tokenized.tokens.append(EOS)
        return tokenized

    monkeypatch.setattr(instruct, "encode_instruct", drifted)
    with pytest.raises(RuntimeError, match="encode_instruct"):
        encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "mistral_v3")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "llama3"), "template"),
        (lambda: encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "mistral_v3", vocab="mistral_v1"), "vocab"),
        (lambda: encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chatml", vocab="gpt2"), "vocab"),
        (lambda: encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "mistral_v3", train_on="prompt"), "train_on"),
        (lambda: encode_chat([{"role": "user", "content": "q"}], "mistral_v3"), "end with a 'assistant'"),
        (lambda: encode_prompt([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "mistral_v3"), "end with a 'user'"),
        (lambda: encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], "mistral_v1"), "empty"),
        (lambda: encode_chat([{"role": "function", "content": "q"}, {"role": "assistant", "content": "a"}], "mistral_v1"), "role"),
        (lambda: encode_prompt([], "mistral_v1"), "Empty"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- chatml and zephyr: defined here, checked against their definition ------------------------

TEXT_EXPECTED = {
    # template: (rendered text of [system, user, assistant, user, assistant], generation header)
    "zephyr": ("<|system|>\nS</s>\n<|user|>\nq1</s>\n<|assistant|>\na1</s>\n<|user|>\nq2</s>\n<|assistant|>\na2</s>",
               "\n<|assistant|>\n"),
    "chatml": ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|></s>"
               "\n<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\na2<|im_end|></s>", "\n<|im_start|>assistant\n"),
}


def _text_ids(rendered: str, vocab: str) -> list[int]:
    """The definition: BOS, then each stretch between EOS markers one SentencePiece call."""
    sp = mistral_tokenizer(vocab).instruct_tokenizer.tokenizer
    ids = [BOS]
    chunks = rendered.split("</s>")
    for i, chunk in enumerate(chunks):
        ids += sp.encode(chunk, bos=False, eos=False) if chunk else []
        if i < len(chunks) - 1:
            ids.append(EOS)
    return ids


@pytest.mark.parametrize("vocab", TEMPLATES)
@pytest.mark.parametrize("template", templates.TEXT_TEMPLATES)
def test_text_templates_follow_their_definition(template, vocab):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a2"}]
    rendered, header = TEXT_EXPECTED[template]
    encoded = encode_chat(messages, template, vocab=vocab)
    assert encoded.input_ids == _text_ids(rendered, vocab)
    sp = mistral_tokenizer(vocab).instruct_tokenizer.tokenizer
    closing = "<|im_end|>" if template == "chatml" else ""
    # a reply follows a newline (no dummy prefix): its ids are those after "▁", "\n"
    trained = [sp.encode(f"\na{i}{closing}", bos=False, eos=False)[2:] + [EOS] for i in (1, 2)]
    assert trained_runs(encoded) == trained  # replies (+ <|im_end|>) and their EOS, nothing else
    assert encoded.input_ids[-1] == EOS and encoded.assistant_masks[-1] == 1
    prompt = encode_prompt(messages[:4], template, vocab=vocab)
    assert prompt == _text_ids(rendered[: rendered.index("a2")], vocab)
    assert rendered[: rendered.index("a2")].endswith(header)
    last = encode_chat(messages, template, train_on="last_assistant", vocab=vocab)
    assert trained_runs(last) == trained[-1:]
    everything = encode_chat(messages, template, train_on="all", vocab=vocab)
    assert everything.assistant_masks == [0] + [1] * (len(everything.input_ids) - 1)


@pytest.mark.parametrize("template", templates.TEXT_TEMPLATES)
def test_text_templates_on_random_conversations(template):
    sp = mistral_tokenizer("mistral_v1").instruct_tokenizer.tokenizer
    rng = random.Random(11)
    for messages in conversations(seed=12)[:150]:
        encoded = encode_chat(messages, template)
        assert encoded.input_ids.count(BOS) == 1 and encoded.input_ids[-1] == EOS
        # control strings in content stay text: EOS only where the format puts it
        eos_expected = len(messages) if template == "zephyr" else sum(m["role"] == "assistant" for m in messages)
        assert encoded.input_ids.count(EOS) == eos_expected
        closing = "<|im_end|>" if template == "chatml" else ""
        replies = [m["content"] + closing for m in messages if m["role"] == "assistant"]
        assert trained_runs(encoded) == [sp.encode("\n" + r, bos=False, eos=False)[2:] + [EOS] for r in replies]
        prompt = messages[:-1]
        if prompt[-1]["role"] == "user":
            chosen, rejected = random_text(rng, 1), random_text(rng, 1)
            prompt_ids, chosen_ids, rejected_ids = encode_preference(prompt, chosen, rejected, template)
            assert prompt_ids == encode_prompt(prompt, template)
            assert chosen_ids[-1] == EOS and rejected_ids[-1] == EOS
