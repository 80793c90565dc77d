"""Mistral instruct formats for training, token-exact against `mistral-common`.

`mistral-common` is Mistral's reference implementation of its chat formats, and the
tokenizer files it ships (in ``mistral_common/data``) are the real ones of the models:

- ``mistral_v1``: Mistral-7B-Instruct v0.1/v0.2. ``[INST]``/``[/INST]`` are *plain text*
  (encoded by SentencePiece together with the user turn); the system prompt is folded
  into the first user turn.
- ``mistral_v3``: Mistral-7B-Instruct v0.3. ``[INST]``/``[/INST]`` are control tokens
  (ids 3, 4); the system prompt is folded into the *last* user turn; assistant content
  loses its trailing spaces.
- ``mistral_v7``: as v3, but the system prompt is its own ``[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]``
  block where it stands in the conversation.

Tool use (v3 and v7 only; `TOOL_TEMPLATES`). Conversations in OpenAI layout: assistant turns
with ``tool_calls`` ([{"id", "type": "function", "function": {"name", "arguments": JSON text}}]),
``{"role": "tool", "tool_call_id", "content"}`` results, and the function definitions on the
first message, ``messages[0]["tools"]`` (where `mistral_tune.datasets.sources` puts a row's
``tools``, so every caller that passes a conversation passes its tools too). mistral-common
writes the tools as ``[AVAILABLE_TOOLS][...][/AVAILABLE_TOOLS]`` before the last user turn, a
call as ``[TOOL_CALLS][{"name", "arguments", "id"}]</s>``, and a result as
``[TOOL_RESULTS]{"content", "call_id"}[/TOOL_RESULTS]`` (v3) or
``[TOOL_RESULTS]{id}[TOOL_CONTENT]{content}[/TOOL_RESULTS]`` (v7). v3 cannot hold text and calls
in one assistant turn; v7 writes the text, then the calls. Calls (and their EOS) are trained
like any assistant turn; results and the tools list are not. Tool conversations also go
through mistral-common's request validator (finetuning mode: tool call ids of 9 letters or
digits, function names, JSON-schema parameters). v1, chatml and zephyr have no tool format:
they refuse such conversations (ValueError) instead of dropping the tools.

We never re-implement these rules. `encode_chat` walks the conversation exactly like
``InstructTokenizer.encode_instruct`` does, calling mistral-common's own per-message
encoders, so that it can record which token span came from which message (for the loss
mask). It then checks its concatenation against ``encode_instruct`` itself: if a future
mistral-common changes the loop, we fail loudly instead of training on a wrong format.

Each message is encoded by its own SentencePiece call, so text that looks like a control
token (``"[INST]"``, ``"</s>"``) inside message content is always plain text: a user cannot
inject control tokens through data.

Two more formats, for users of the alignment-handbook, have no mistral-common reference, so
they are defined here (`TEXT_TEMPLATES`), over the vocabulary of a Mistral tokenizer file
(``vocab=``, default that of mistral_v1, the Mistral-7B-v0.1 base of Zephyr-7B-beta). Their
markers are *plain text* in every Mistral vocabulary (no token is added: that would resize
the pretrained embeddings); BOS and EOS are the vocabulary's own control tokens:

- ``zephyr`` (HuggingFaceH4/zephyr-7b-beta's template)::

      <s><|system|>\n{system}</s>\n<|user|>\n{user}</s>\n<|assistant|>\n{reply}</s>

  every message ends with EOS, as in Zephyr; the generation prompt is ``\n<|assistant|>\n``.
- ``chatml``::

      <s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{reply}<|im_end|></s>

  ``<|im_end|>`` is text here, so every *assistant* turn is closed by ``<|im_end|>`` and then
  EOS: generation stops at EOS with the ordinary generation config. The generation prompt is
  ``\n<|im_start|>assistant\n``.

Both differ from the HF Jinja templates they mirror in one place only: the newline that HF
writes after every message is written *between* messages, so a training sequence ends with
the EOS of its last reply (nothing follows EOS in generation). The ids are defined as those
of `tokenizer.build_hf_tokenizer` on the rendered text: the text between control tokens is
one SentencePiece call each (with its dummy prefix, so ``</s>\n`` gives ``</s> ▁ \n``). Content
is encoded as text, never as control tokens, even when it contains ``</s>``. Trained: the
reply, (chatml) its ``<|im_end|>``, and its EOS. A reply starts after a newline, which
SentencePiece never merges with anything (no piece holds ``\n``; it is a byte token), so
the mask boundary is a token boundary; `_encode_text` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import mistral_common
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest, InstructRequest
from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

# template name -> tokenizer file inside mistral_common/data
TEMPLATES: dict[str, str] = {
    "mistral_v1": "tokenizer.model.v1",
    "mistral_v3": "mistral_instruct_tokenizer_240323.model.v3",
    "mistral_v7": "mistral_instruct_tokenizer_241114.model.v7",
}

# Formats with a tool-use encoding in mistral-common (v1 has none; chatml/zephyr are ours).
TOOL_TEMPLATES = ("mistral_v3", "mistral_v7")

# HF-style formats defined here (no mistral-common reference), over a Mistral vocabulary.
TEXT_TEMPLATES = ("chatml", "zephyr")
ALL_TEMPLATES = (*TEMPLATES, *TEXT_TEMPLATES)
DEFAULT_VOCAB = "mistral_v1"  # Mistral-7B-v0.1, the base of Zephyr-7B-beta

# "assistant": every assistant turn (content + its EOS) is trained.
# "last_assistant": only the final assistant turn (content + its EOS).
# "all": every token except the leading BOS (nothing predicts the first token).
TRAIN_ON = ("assistant", "last_assistant", "all")

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    assistant_masks: list[int]  # 1 on trained tokens, 0 elsewhere; same length as input_ids


def vocab_of(template: str, vocab: str | None = None) -> str:
    """The Mistral format whose tokenizer file gives `template` its ids (itself for Mistral formats)."""
    if template in TEMPLATES:
        if vocab not in (None, template):
            raise ValueError(f"{template} has its own vocabulary; vocab={vocab!r} applies to {TEXT_TEMPLATES} only")
        return template
    if template in TEXT_TEMPLATES:
        vocab = vocab or DEFAULT_VOCAB
        if vocab not in TEMPLATES:
            raise ValueError(f"Unknown vocab {vocab!r}; expected one of {sorted(TEMPLATES)}")
        return vocab
    raise ValueError(f"Unknown template {template!r}; expected one of {sorted(ALL_TEMPLATES)}")


def mistral_tokenizer_file(template: str, vocab: str | None = None) -> Path:
    """Path of the SentencePiece file for `template`, inside the installed mistral-common."""
    return Path(mistral_common.__file__).parent / "data" / TEMPLATES[vocab_of(template, vocab)]


@lru_cache(maxsize=None)
def mistral_tokenizer(template: str) -> MistralTokenizer:
    """The reference tokenizer for `template` (loading it parses a 500 kB protobuf: cache it)."""
    return MistralTokenizer.from_file(str(mistral_tokenizer_file(template)))


def encode_chat(messages: list[dict], template: str, train_on: str = "assistant", vocab: str | None = None,
                verify: bool = True) -> Encoded:
    """Training sequence of a conversation ending with an assistant turn, with its loss mask.

    `input_ids` equals mistral-common's ``encode_instruct`` of the same conversation: one
    BOS, every assistant turn closed by EOS. The EOS of a trained turn is trained too, or
    the model never learns to stop. Tool results and the tools list are never trained
    (except with train_on="all"). verify=False skips the self-check against a second, reference
    encoding (half the time of a Mistral format); the data stage checks a sample of rows instead.
    """
    if train_on not in TRAIN_ON:
        raise ValueError(f"Unknown train_on {train_on!r}; expected one of {TRAIN_ON}")
    _check_messages(messages, template, last_roles=("assistant",), vocab=vocab)
    if template in TEXT_TEMPLATES:
        return _encode_text(messages, template, vocab_of(template, vocab), train_on, generation_prompt=False)
    spans = _encode_spans(messages, template, ValidationMode.finetuning, verify)
    input_ids = [tok for _, span in spans for tok in span]

    last_assistant = max(i for i, (role, _) in enumerate(spans) if role == "assistant")
    masks: list[int] = []
    for i, (role, span) in enumerate(spans):
        if train_on == "all":
            trained = role != "bos"
        elif train_on == "last_assistant":
            trained = i == last_assistant
        else:
            trained = role == "assistant"
        masks.extend([int(trained)] * len(span))
    return Encoded(input_ids=input_ids, assistant_masks=masks)


def encode_prompt(messages: list[dict], template: str, vocab: str | None = None) -> list[int]:
    """Generation prompt of a conversation ending with a user turn (or, v3/v7, tool results).

    Mistral formats have no assistant header: the prompt ends with ``[/INST]`` (or
    ``[/TOOL_RESULTS]``) and the model's reply starts right after it. chatml and zephyr end
    with their assistant header.
    """
    _check_messages(messages, template, last_roles=("user", "tool"), vocab=vocab)
    if template in TEXT_TEMPLATES:
        return _encode_text(messages, template, vocab_of(template, vocab), "assistant", generation_prompt=True).input_ids
    request = _instruct_request(messages, template, ValidationMode.test)
    return list(mistral_tokenizer(template).instruct_tokenizer.encode_instruct(request).tokens)


def encode_preference(
    prompt_messages: list[dict], chosen: str | dict, rejected: str | dict, template: str, vocab: str | None = None,
    verify: bool = True,
) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids) for DPO.

    `chosen` and `rejected` are reply texts, or assistant messages (a tool-call reply:
    ``{"role": "assistant", "content": "", "tool_calls": [...]}``). ``prompt_ids + chosen_ids``
    is exactly the training sequence of the conversation ``prompt_messages + [chosen reply]``
    (same for rejected), and each completion ends with EOS. Raises ValueError if the prompt is
    not a token prefix of both, instead of silently cutting the sequences somewhere else.
    """
    prompt_ids = encode_prompt(prompt_messages, template, vocab=vocab)
    completions = []
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        message = reply if isinstance(reply, dict) else {"role": "assistant", "content": reply}
        full = encode_chat([*prompt_messages, message], template, vocab=vocab, verify=verify).input_ids
        if full[: len(prompt_ids)] != prompt_ids:
            raise ValueError(f"{template}: the prompt is not a token prefix of prompt + {name}")
        completion = full[len(prompt_ids) :]
        if not completion or completion[-1] != _eos_id(vocab_of(template, vocab)):
            raise ValueError(f"{template}: the {name} completion does not end with EOS")
        completions.append(completion)
    return prompt_ids, completions[0], completions[1]


def uses_tools(messages: list[dict]) -> bool:
    """Whether a conversation has tools, tool calls or tool results (anything only v3/v7 encode)."""
    return bool(messages and messages[0].get("tools")) or any(
        m.get("role") == "tool" or m.get("tool_calls") for m in messages
    )


# --- internals -----------------------------------------------------------------------


def _check_messages(messages: list[dict], template: str, last_roles: tuple[str, ...], vocab: str | None = None) -> None:
    """Cheap structural checks; full validation is the data module's (and, for tool
    conversations, mistral-common's validator's) job."""
    vocab_of(template, vocab)
    if not messages:
        raise ValueError("Empty conversation")
    if uses_tools(messages) and template not in TOOL_TEMPLATES:
        # Encoding the text alone would train on a conversation the model never sees at inference.
        raise ValueError(f"{template} has no tool-use format (tools, tool calls, tool results); "
                         f"use {' or '.join(TOOL_TEMPLATES)}")
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role not in ROLES or not isinstance(content, str):
            raise ValueError(f"Expected {{'role': {'|'.join(ROLES)}, 'content': str}}, got {message!r}")
        if role == "assistant" and not content and not message.get("tool_calls"):
            # mistral-common refuses empty assistant turns; say so in our terms
            raise ValueError("Assistant message with empty content")
        if role == "assistant" and content and message.get("tool_calls") and template == "mistral_v3":
            raise ValueError("mistral_v3 cannot hold text and tool calls in one assistant turn (mistral_v7 can)")
    if messages[-1]["role"] not in last_roles:
        raise ValueError(f"Conversation must end with a {' or '.join(map(repr, last_roles))} message, "
                         f"got {messages[-1]['role']!r}")


def _eos_id(template: str) -> int:
    return mistral_tokenizer(template).instruct_tokenizer.tokenizer.eos_id


def _mistral_message(m: dict):
    """One message of ours (OpenAI layout, normalised by the data module) as mistral-common's."""
    role = m["role"]
    if role == "assistant":
        calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"], arguments=c["function"]["arguments"]))
                 for c in m.get("tool_calls") or []]
        return AssistantMessage(content=m["content"] or None, tool_calls=calls or None)
    if role == "tool":
        return ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"])
    return (SystemMessage if role == "system" else UserMessage)(content=m["content"])


def _instruct_request(messages: list[dict], template: str, mode: ValidationMode) -> InstructRequest:
    """The InstructRequest that mistral-common's own ``encode_chat_completion`` would build.

    Its normalizer decides, per version, where the system prompt goes (folded into a user
    turn for v1/v3, kept as a message for v7) and how tool call arguments and v3 tool results
    are re-serialised: we reuse it rather than restate it. Tool conversations also pass its
    validator (`mode`), which holds the rules on tool call ids and function names.
    """
    tokenizer = mistral_tokenizer(template)
    tools = [Tool.from_openai(t) for t in messages[0].get("tools") or []]
    request = ChatCompletionRequest(messages=[_mistral_message(m) for m in messages], tools=tools or None)
    if uses_tools(messages):
        try:
            request = get_validator(tokenizer.version, mode).validate_request(request)
        except MistralCommonException as err:
            raise ValueError(f"mistral-common refuses this tool conversation: {err}") from None
    normalizer = get_normalizer(tokenizer.version, None)
    return normalizer.from_chat_completion_request(request)


def _encode_spans(messages: list[dict], template: str, mode: ValidationMode,
                  verify: bool = True) -> list[tuple[str, list[int]]]:
    """[(role, token span)] in order, starting with ("bos", [BOS]); tool results are ("tool", ...).

    Mirrors the loop of ``InstructTokenizerBase.encode_instruct`` (mistral-common 1.13),
    calling the same per-message encoders with the same arguments.
    """
    instruct = mistral_tokenizer(template).instruct_tokenizer
    request = _instruct_request(messages, template, mode)
    first_user, last_user = instruct.find_first_last_user(request)

    spans: list[tuple[str, list[int]]] = [("bos", list(instruct.start()))]
    for idx, msg in enumerate(request.messages):
        if isinstance(msg, UserMessage):
            tokens, _, _ = instruct.encode_user_message(
                msg,
                request.available_tools,
                idx == last_user,
                idx == first_user,
                system_prompt=request.system_prompt,
                force_img_first=True,
                settings=request.settings,
            )
            spans.append(("user", list(tokens)))
        elif isinstance(msg, ToolMessage):
            tokens, _, _ = instruct.encode_tool_message(msg, idx < last_user)
            spans.append(("tool", list(tokens)))
        elif isinstance(msg, AssistantMessage):
            tokens = instruct.encode_assistant_message(message=msg, is_before_last_user_message=idx < last_user)
            spans.append(("assistant", list(tokens)))
        elif isinstance(msg, SystemMessage):
            tokens, _ = instruct.encode_system_message(msg)
            spans.append(("system", list(tokens)))
        else:  # the normalizer only produces the message types we gave it
            raise TypeError(f"Unexpected message type {type(msg).__name__}")

    # Self-check: the spans must add up to the reference encoding, id for id.
    reference = instruct.encode_instruct(request).tokens if verify else None
    if verify and [tok for _, span in spans for tok in span] != list(reference):
        raise RuntimeError(
            f"{template}: per-message encoding disagrees with mistral-common's encode_instruct; "
            "its message loop has changed, update _encode_spans"
        )
    return spans


# --- chatml and zephyr ----------------------------------------------------------------


def _text_parts(messages: list[dict], template: str, generation_prompt: bool) -> list[tuple[int, str | int]]:
    """[(message index or -1 for headers, text or the EOS marker 2)] of the rendered conversation."""
    parts: list[tuple[int, str | int]] = []
    for i, m in enumerate(messages):
        sep = "\n" if i else ""  # between messages, not after the last: a sequence ends with EOS
        if template == "zephyr":
            parts += [(-1, f"{sep}<|{m['role']}|>\n"), (i, m["content"]), (i, _EOS)]
        else:  # chatml: <|im_end|> is text; EOS closes assistant turns so generation stops
            parts += [(-1, f"{sep}<|im_start|>{m['role']}\n"), (i, m["content"]), (i, "<|im_end|>")]
            if m["role"] == "assistant":
                parts.append((i, _EOS))
    if generation_prompt:
        parts.append((-1, "\n<|assistant|>\n" if template == "zephyr" else "\n<|im_start|>assistant\n"))
    return parts


_EOS = 2  # marker in _text_parts for the vocabulary's EOS token (id 2 in every Mistral file)


def _encode_text(messages: list[dict], template: str, vocab: str, train_on: str, generation_prompt: bool) -> Encoded:
    sp = mistral_tokenizer(vocab).instruct_tokenizer.tokenizer
    assert sp.eos_id == _EOS and sp.bos_id == 1
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-2)

    def trained(owner: int) -> bool:
        if train_on == "all":
            return True
        if owner < 0 or messages[owner]["role"] != "assistant":
            return False
        return train_on == "assistant" or owner == last_assistant

    input_ids, masks = [sp.bos_id], [0]  # nothing predicts BOS
    chunk: list[tuple[str, bool]] = []  # text between control tokens: one SentencePiece call

    def flush() -> None:
        text = "".join(t for t, _ in chunk)
        ids = sp.encode(text, bos=False, eos=False) if text else []
        flags = [False] * len(ids)
        offset, done = 0, 0
        for i, (piece, flag) in enumerate(chunk):
            if i and flag != chunk[i - 1][1]:
                # The mask changes here; it is always right after a newline, which no piece merges
                # with, so the ids of the text before it are a prefix of the chunk's ids.
                head = sp.encode(text[:offset], bos=False, eos=False)
                if ids[: len(head)] != head:
                    raise RuntimeError(f"{template}: a trained span does not start on a token boundary")
                flags[done:len(head)] = [chunk[i - 1][1]] * (len(head) - done)
                done = len(head)
            offset += len(piece)
        if chunk:
            flags[done:] = [chunk[-1][1]] * (len(ids) - done)
        input_ids.extend(ids)
        masks.extend(map(int, flags))
        chunk.clear()

    for owner, piece in _text_parts(messages, template, generation_prompt):
        if piece == _EOS:
            flush()
            input_ids.append(sp.eos_id)
            masks.append(int(trained(owner)))
        elif piece:
            chunk.append((piece, trained(owner)))
    flush()
    return Encoded(input_ids=input_ids, assistant_masks=masks)
