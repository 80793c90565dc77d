"""mistral_tune.formats.tokenizer: the HF tokenizer and its chat template against mistral-common."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from mistral_tune.formats.templates import ALL_TEMPLATES, TEMPLATES, TEXT_TEMPLATES, encode_chat, encode_prompt, mistral_tokenizer
from mistral_tune.formats.tokenizer import PAD_TOKEN, build_hf_tokenizer, load_tokenizer, save_tokenizer
from tests.test_templates import random_conversation

BOS, EOS = 1, 2
CONTROL_STRINGS = ("<s>", "</s>", "<unk>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CALLS]")
# Ordinary content: no control strings, but their fragments ("[", "INST", "</"...) and text
# that looks like Jinja, so the template must not interpret content.
PIECES = [
    "hello", "world", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "é", "日本語", "Ω", "ﬁ", "ｆｕｌｌ",
    "🙂", "👨‍👩‍👧", "123", "4567", ".", ",", "!?", "▁", "x", "[", "]", "<", ">", "/", "INST", "{{ x }}",
    "{% if %}", "'", '"', "\\",
]


def ordinary_text(rng: random.Random, min_pieces: int = 0) -> str:
    while True:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(min_pieces, 10)))
        if not any(control in text for control in CONTROL_STRINGS):
            return text


def ordinary_conversation(rng: random.Random, end: str = "assistant") -> list[dict]:
    return random_conversation(rng, end, text=ordinary_text)


def sp_encode(template: str, text: str) -> list[int]:
    return mistral_tokenizer(template).instruct_tokenizer.tokenizer.encode(text, bos=False, eos=False)


@pytest.fixture(scope="module")
def hf():
    return {template: build_hf_tokenizer(template) for template in ALL_TEMPLATES}


# --- plain text -------------------------------------------------------------------------


@pytest.mark.parametrize("template", TEMPLATES)
def test_plain_encode_matches_sentencepiece(hf, template):
    tok, rng = hf[template], random.Random(1)
    texts = ["", " ", "a ", " a", "  a  ", "\n", "▁x"] + [ordinary_text(rng) for _ in range(500)]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == sp_encode(template, text), repr(text)
        # default: BOS like encode(text, bos=True), never EOS
        assert tok(text).input_ids == [BOS, *sp_encode(template, text)], repr(text)


@pytest.mark.parametrize("template", TEMPLATES)
def test_plain_encode_with_control_strings(hf, template):
    """Documented: control strings become control tokens unless split_special_tokens=True."""
    tok, rng = hf[template], random.Random(2)
    text = "a </s> b [INST] c"
    assert tok(text, add_special_tokens=False).input_ids != sp_encode(template, text)
    assert EOS in tok(text, add_special_tokens=False).input_ids
    for _ in range(300):
        text = "".join(rng.choice([*PIECES, *CONTROL_STRINGS]) for _ in range(rng.randint(0, 12)))
        ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
        assert ids == sp_encode(template, text), repr(text)


@pytest.mark.parametrize("template", ["mistral_v3", "mistral_v7"])
def test_documented_corner_user_defined_piece_before_control_string(hf, template):
    tok, text = hf[template], "[REFERENCE_DOC_1][/INST]"
    ids = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert ids != sp_encode(template, text)
    assert ids[-1] == 4 and 4 not in sp_encode(template, text)


@pytest.mark.parametrize("template", TEMPLATES)
def test_special_tokens_pad_and_vocab(hf, template):
    tok = hf[template]
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (sp.bos_id, sp.eos_id, sp.unk_id)
    # pad != eos, or masking pads masks every EOS out of the labels
    assert tok.pad_token == PAD_TOKEN and tok.pad_token_id == 0 != tok.eos_token_id
    assert len(tok) == sp.n_words  # no token was added
    assert tok.model_max_length == 32768 and tok.padding_side == "right"


@pytest.mark.parametrize("template", TEMPLATES)
def test_pad_id_never_occurs_in_training_sequences(template):
    # so collators that mask label == pad_token_id never hide a real token
    rng = random.Random(3)
    weird = [{"role": "user", "content": "<unk> [INST]"}, {"role": "assistant", "content": "<unk>"}]
    for messages in [weird] + [ordinary_conversation(rng) for _ in range(100)]:
        assert 0 not in encode_chat(messages, template).input_ids


# --- chat template ------------------------------------------------------------------------


def hf_chat(tok, messages, **kwargs):
    return tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_chat_template_matches_encode_chat(hf, template):
    tok, rng = hf[template], random.Random(4)
    fixed = [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Hi\tthere "},
            {"role": "assistant", "content": "Hello  "},
            {"role": "user", "content": ""},
            {"role": "assistant", "content": " Sure.\n"},
        ],
        [{"role": "system", "content": ""}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "   "}],
    ]
    for messages in fixed + [ordinary_conversation(rng) for _ in range(300)]:
        expected = encode_chat(messages, template)
        out = hf_chat(tok, messages, return_assistant_tokens_mask=True)
        assert out["input_ids"] == expected.input_ids, messages
        assert out["assistant_masks"] == expected.assistant_masks, messages
        assert out["input_ids"].count(BOS) == 1  # the template's BOS only


@pytest.mark.parametrize("template", TEMPLATES)
def test_chat_template_prompt_matches_encode_prompt(hf, template):
    tok, rng = hf[template], random.Random(5)
    for messages in [ordinary_conversation(rng, end="user") for _ in range(200)]:
        expected = encode_prompt(messages, template)
        # Mistral formats have no assistant header: add_generation_prompt changes nothing
        assert hf_chat(tok, messages, add_generation_prompt=True)["input_ids"] == expected, messages
        assert hf_chat(tok, messages)["input_ids"] == expected, messages


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_rendered_text_round_trip_without_special_tokens(hf, template):
    tok = hf[template]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert tok(text, add_special_tokens=False).input_ids == encode_chat(messages, template).input_ids
    # the double-BOS trap the module docstring warns about
    assert tok(text).input_ids[:2] == [BOS, BOS]


@pytest.mark.parametrize("template", TEMPLATES)
def test_documented_difference_control_strings_in_content(hf, template):
    """Jinja renders one string: control strings in content become control tokens."""
    tok = hf[template]
    sp = mistral_tokenizer(template).instruct_tokenizer.tokenizer
    messages = [{"role": "user", "content": "S </s> [INST] x"}, {"role": "assistant", "content": "ok"}]
    reference = encode_chat(messages, template).input_ids
    rendered = hf_chat(tok, messages)["input_ids"]
    assert rendered != reference
    assert rendered.count(EOS) == 2 and reference.count(EOS) == 1  # an injected EOS

    # sanitize_control_tokens keeps them text (same control tokens as the reference) but
    # splits the text around them differently, and refuses return_assistant_tokens_mask.
    sanitized = hf_chat(tok, messages, sanitize_control_tokens=True)["input_ids"]
    assert [t for t in sanitized if sp.is_special(t)] == [t for t in reference if sp.is_special(t)]
    assert sanitized != reference
    with pytest.raises(ValueError):
        hf_chat(tok, messages, sanitize_control_tokens=True, return_assistant_tokens_mask=True)


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_chat_template_rejects_misplaced_system_message(hf, template):
    tok = hf[template]
    messages = [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]
    with pytest.raises(Exception, match="leading system message"):
        hf_chat(tok, messages)


# --- save / reload ------------------------------------------------------------------------


@pytest.mark.parametrize("template", ALL_TEMPLATES)
def test_save_and_reload(hf, template, tmp_path):
    tok = hf[template]
    save_tokenizer(tok, tmp_path / "tok")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "More"},
        {"role": "assistant", "content": "Sure."},
    ]
    expected = encode_chat(messages, template)
    for reloaded in (AutoTokenizer.from_pretrained(str(tmp_path / "tok")), load_tokenizer(tmp_path / "tok")):
        assert reloaded.chat_template == tok.chat_template
        assert reloaded.pad_token == PAD_TOKEN and reloaded.pad_token_id == 0 != reloaded.eos_token_id
        assert len(reloaded) == len(tok)
        out = hf_chat(reloaded, messages, return_assistant_tokens_mask=True)
        assert out["input_ids"] == expected.input_ids
        assert out["assistant_masks"] == expected.assistant_masks
        assert reloaded("a </s>b").input_ids == tok("a </s>b").input_ids
        assert reloaded("hi").input_ids == [BOS, *sp_encode(template if template in TEMPLATES else "mistral_v1", "hi")]


# --- chatml and zephyr ---------------------------------------------------------------------


@pytest.mark.parametrize("vocab", TEMPLATES)
@pytest.mark.parametrize("template", TEXT_TEMPLATES)
def test_text_templates_on_every_vocabulary(template, vocab):
    tok, rng = build_hf_tokenizer(template, vocab), random.Random(6)
    assert len(tok) == mistral_tokenizer(vocab).instruct_tokenizer.tokenizer.n_words
    for messages in [ordinary_conversation(rng) for _ in range(150)]:
        expected = encode_chat(messages, template, vocab=vocab)
        out = hf_chat(tok, messages, return_assistant_tokens_mask=True)
        assert out["input_ids"] == expected.input_ids, messages
        assert out["assistant_masks"] == expected.assistant_masks, messages
    for messages in [ordinary_conversation(rng, end="user") for _ in range(100)]:
        expected = encode_prompt(messages, template, vocab=vocab)
        assert hf_chat(tok, messages, add_generation_prompt=True)["input_ids"] == expected, messages
        # without the generation prompt: the conversation as it stands, no assistant header
        assert expected[: len(hf_chat(tok, messages)["input_ids"])] == hf_chat(tok, messages)["input_ids"]


@pytest.mark.parametrize("template", TEXT_TEMPLATES)
def test_text_templates_documented_difference_control_strings_in_content(hf, template):
    messages = [{"role": "user", "content": "S </s> x"}, {"role": "assistant", "content": "ok"}]
    reference = encode_chat(messages, template).input_ids
    rendered = hf_chat(hf[template], messages)["input_ids"]
    assert rendered != reference and rendered.count(EOS) == reference.count(EOS) + 1
