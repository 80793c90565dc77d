"""Hugging Face tokenizers for the Mistral templates, built from mistral-common's own files.

`build_hf_tokenizer(template)` converts the SentencePiece file that `mistral_tune.formats.templates`
uses as its reference (``templates.mistral_tokenizer_file``) into a fast tokenizer and gives
it a Jinja chat template for that Mistral version. Exported checkpoints carry this
tokenizer, so serving renders the format used in training.

What matches mistral-common, id for id (tests/test_tokenizer.py checks each claim):

- ``tok(text, add_special_tokens=False)`` equals ``encode(text, bos=False, eos=False)`` of the
  SentencePiece reference for text without control strings. transformers' generic
  SentencePiece conversion (``TokenizersBackend``) reproduces SentencePiece's dummy prefix
  for every chunk between special tokens, which is what Mistral's formats rely on (each
  message is its own SentencePiece call, so it starts with "▁").
- ``apply_chat_template`` equals ``templates.encode_chat`` (conversations ending with an
  assistant turn) and ``templates.encode_prompt`` (ending with a user turn, with or without
  ``add_generation_prompt``: Mistral formats have no assistant header). With
  ``return_assistant_tokens_mask=True`` the mask equals ``Encoded.assistant_masks`` of
  ``train_on="assistant"``: every assistant turn and its EOS.
- One BOS: the template writes ``bos_token`` and apply_chat_template tokenizes without
  special tokens. ``tok(text)`` with the default ``add_special_tokens=True`` prepends BOS
  like ``encode(text, bos=True)``; so never tokenize a rendered chat with special tokens.

Where it cannot match:

1. Control strings inside message content. The reference encodes each message by itself,
   so ``"[INST]"``, ``"</s>"`` or ``"<s>"`` written by a user stay plain text. A Jinja
   template renders one string, and the tokenizer must parse the control strings it wrote
   back into control tokens, so it cannot tell them from the same strings in content:
   they become control tokens (v1's ``[INST]`` is plain text in the format itself, but
   ``<s>``/``</s>`` still differ): a user can inject an EOS. transformers'
   ``apply_chat_template(..., sanitize_control_tokens=True)`` keeps them text, but it is
   not id-exact either (its markers split the text, e.g. the space before ``"</s>"``
   becomes a token of its own) and it refuses ``return_assistant_tokens_mask``. Plain
   ``tok(text)`` likewise turns control strings into control tokens unless
   ``split_special_tokens=True`` is passed (then it is exact, up to point 2). Training
   data goes through ``templates.encode_chat``, which has none of these problems.
2. Plain-text encoding with ``split_special_tokens=True`` still differs in one corner: a
   control string (e.g. ``"[/INST]"``) that directly follows one of the v3/v7 user-defined
   pieces (``"[REFERENCE_DOC_1]"``...) and ends the text or precedes another such piece
   comes out as the control token. The converted BPE has to look whole words up in its
   vocabulary to emit user-defined pieces whole, and the vocabulary also holds the control
   pieces.
3. Conversation shapes: the Jinja templates accept one optional leading system message and
   string contents only (what `mistral_tune.stages.data` produces); anything else raises. The
   reference also folds later system messages in; we do not need that.
4. Tool use (v3, v7: ``apply_chat_template(messages, tools=tools)``, OpenAI layout). The tools
   list, calls and results render the ids of `templates.encode_chat` with the same mask (calls
   trained, results and tools not), tests/test_tools.py compares them. mistral-common parses and
   re-dumps JSON where Jinja can only copy text: call ``arguments`` given as a mapping are exact,
   given as text they are exact when written as ``json.dumps`` writes them; a v3 tool result is
   exact for plain text, numbers as Python prints them, and JSON in ``json.dumps`` form, not for
   other JSON spellings (``{"a":1}``, ``3.50``, ``1e3``). v1, chatml and zephyr raise on tools.

``chatml`` and ``zephyr`` (defined in `mistral_tune.formats.templates`, over the vocabulary of the
model's Mistral tokenizer) have the same properties: ``apply_chat_template`` equals
``encode_chat``/``encode_prompt`` for ordinary content, with the assistant mask, and point 1
applies to them too (``</s>`` written in content becomes EOS under Jinja). Their
``add_generation_prompt`` appends the assistant header (``\n<|assistant|>\n``,
``\n<|im_start|>assistant\n``), and a conversation rendered without it ends with the EOS
(zephyr: of any message; chatml: of an assistant turn) or ``<|im_end|>``, never with HF's
trailing newline.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from mistral_tune.formats.templates import ALL_TEMPLATES, mistral_tokenizer_file

# Context length the tokenizer warns about; Mistral 7B v0.1-v0.3 and Large 2411 all handle
# 32k positions, and training sequences are cut well below that by `max_length`.
MODEL_MAX_LENGTH = 32768

# pad != eos, or masking pads also masks EOS out of the labels and the model never stops.
# <unk> (id 0) exists in every Mistral SentencePiece file and is never produced by encoding
# (byte fallback covers all text), so a pad can never be confused with real input.
PAD_TOKEN = "<unk>"

# Shared head of every template: split off one optional leading system message.
_SYSTEM_HEAD = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
)
_BAD_ROLE = "{{- raise_exception('Only user/assistant messages may follow the optional leading system message') -}}"


def _no_tools(name: str) -> str:
    """Head of the formats without tool use: refuse tools rather than render without them."""
    return ("{%- if tools or messages|selectattr('tool_calls')|list -%}"
            "{{- raise_exception('" + name + " has no tool-use format; use mistral_v3 or mistral_v7') -}}"
            "{%- endif -%}")


# --- Tool use (v3, v7): the JSON that mistral-common writes, built in Jinja ----------------
# mistral-common json.dumps()es Python objects (", " and ": " separators, non-ASCII kept): so
# does HF's `tojson`. A tool is dumped as {"type", "function": {"name", "description",
# "parameters"}} (description "" and parameters {} when absent).
_AVAILABLE_TOOLS = (
    "{%- set tl = namespace(items=[]) -%}"
    "{%- for tool in tools -%}"
    "{%- set f = tool['function'] -%}"
    "{%- set tl.items = tl.items + [{'type': 'function', 'function': {'name': f['name'], "
    "'description': f['description'] if f['description'] is defined and f['description'] is not none else '', "
    "'parameters': f['parameters'] if f['parameters'] is defined and f['parameters'] is not none else {}}}] -%}"
    "{%- endfor -%}"
    "{{- '[AVAILABLE_TOOLS]' + tl.items|tojson + '[/AVAILABLE_TOOLS]' -}}"
)
# [TOOL_CALLS][{"name", "arguments", "id"}, ...]: arguments given as a mapping are dumped; as a
# string they are written as they are, which is exact when the string is json.dumps() text
# (mistral-common parses and re-dumps it; Jinja cannot parse JSON).
_TOOL_CALLS = (
    "{%- set tc = namespace(items=[]) -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- set args = fn['arguments'] if fn['arguments'] is defined and fn['arguments'] is not none else {} -%}"
    "{%- set item = '{\"name\": ' + fn['name']|tojson + ', \"arguments\": ' + (args if args is string else args|tojson) -%}"
    "{%- if call['id'] is defined and call['id'] and call['id'] != 'null' -%}"
    "{%- set item = item + ', \"id\": ' + call['id']|tojson -%}"
    "{%- endif -%}"
    "{%- set tc.items = tc.items + [item + '}'] -%}"
    "{%- endfor -%}"
    "{{- '[TOOL_CALLS][' + tc.items|join(', ') + ']' -}}"
)
# v3 result: {"content": <the content parsed as JSON if it is JSON, else the string>, "call_id"}.
# Jinja cannot parse JSON, so content that looks like JSON (an object, array or string literal,
# true/false/null, or a number as Python prints it) is written as it is, anything else as a JSON
# string: exact for text, numbers and json.dumps() text.
_V3_TOOL_RESULT = (
    "{%- set c = message['content'] -%}"
    "{%- if c is not string -%}{%- set c = c|tojson -%}"
    "{%- elif c == '' -%}{%- set c = '{}' -%}"
    "{%- elif not (c[:1] in ['{', '[', '\"'] or c in ['true', 'false', 'null'] or "
    "(c not in ['inf', '-inf', 'nan'] and ((c|int|string) == c or (c|float|string) == c))) -%}"
    "{%- set c = c|tojson -%}"
    "{%- endif -%}"
    "{{- '[TOOL_RESULTS]{\"content\": ' + c + ', \"call_id\": ' + message['tool_call_id']|tojson + '}[/TOOL_RESULTS]' -}}"
)
_HAS_CALLS = "message['tool_calls'] is defined and message['tool_calls']"

# v1: [INST]/[/INST] are plain text; the system prompt joins the FIRST user turn. The
# reply is its own SentencePiece call in the reference ("▁" + reply): the space we write
# before it becomes that "▁", and belongs to the reply's first token, hence inside
# {% generation %}.
_V1 = (
    _no_tools("mistral_v1") + _SYSTEM_HEAD + "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.first and system_message -%}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST] ' + message['content'] + ' [/INST]' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
)

# v3: [INST]/[/INST] are control tokens; the system prompt joins the LAST user turn;
# replies lose trailing spaces (mistral-common rstrips them). Tools go before the last user
# turn; an assistant turn holds text or tool calls, not both.
_V3 = (
    _SYSTEM_HEAD + "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and tools -%}" + _AVAILABLE_TOOLS + "{%- endif -%}"
    "{%- if loop.index0 == ns.last_user and system_message -%}"
    "{{- '[INST]' + system_message + '\\n\\n' + message['content'] + '[/INST]' -}}"
    "{%- else -%}"
    "{{- '[INST]' + message['content'] + '[/INST]' -}}"
    "{%- endif -%}"
    "{%- elif message['role'] == 'assistant' and " + _HAS_CALLS + " -%}"
    "{%- if message['content'] -%}"
    "{{- raise_exception('mistral_v3 cannot hold text and tool calls in one assistant turn') -}}"
    "{%- endif -%}"
    "{%- generation -%}" + _TOOL_CALLS + "{{- eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- message['content'].rstrip(' ') + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'tool' -%}" + _V3_TOOL_RESULT +
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
)

# v7: the system prompt is its own [SYSTEM_PROMPT] block (even when empty), right after BOS.
# Tools go before the last user turn; an assistant turn is its text, then its tool calls;
# a result is [TOOL_RESULTS]id[TOOL_CONTENT]content[/TOOL_RESULTS], content as given.
_V7 = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if loop.index0 == ns.last_user and tools -%}" + _AVAILABLE_TOOLS + "{%- endif -%}"
    "{{- '[INST]' + message['content'] + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{%- if message['content'] -%}{{- message['content'].rstrip(' ') -}}{%- endif -%}"
    "{%- if " + _HAS_CALLS + " -%}" + _TOOL_CALLS + "{%- endif -%}"
    "{{- eos_token -}}"
    "{%- endgeneration -%}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS]' + message['tool_call_id'] + '[TOOL_CONTENT]' + message['content'] + '[/TOOL_RESULTS]' -}}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
)

# zephyr (HuggingFaceH4/zephyr-7b-beta): every message ends with EOS; the newline HF writes
# after each message goes between messages here, so a training sequence ends with EOS.
_ZEPHYR = (
    _no_tools("zephyr") + "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|assistant|>\n' -}}{%- generation -%}{{- message['content'] + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'user' or (message['role'] == 'system' and loop.first) -%}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + eos_token -}}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\n<|assistant|>\n' -}}{%- endif -%}"
)

# chatml: <|im_start|>/<|im_end|> are plain text in Mistral vocabularies, so an assistant turn
# is closed by <|im_end|> and then EOS, or generation with eos_token_id would never stop.
_CHATML = (
    _no_tools("chatml") + "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- generation -%}{{- message['content'] + '<|im_end|>' + eos_token -}}{%- endgeneration -%}"
    "{%- elif message['role'] == 'user' or (message['role'] == 'system' and loop.first) -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' -}}"
    "{%- else -%}" + _BAD_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '\n<|im_start|>assistant\n' -}}{%- endif -%}"
)

CHAT_TEMPLATES: dict[str, str] = {
    "mistral_v1": _V1, "mistral_v3": _V3, "mistral_v7": _V7, "chatml": _CHATML, "zephyr": _ZEPHYR,
}
assert CHAT_TEMPLATES.keys() == set(ALL_TEMPLATES), "every template needs its Jinja twin"


def build_hf_tokenizer(template: str, vocab: str | None = None) -> PreTrainedTokenizerBase:
    """Fast HF tokenizer converted from the mistral-common file of `template` (for chatml and
    zephyr: of the Mistral format `vocab`, default mistral_v1), with its chat template."""
    if template not in CHAT_TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; expected one of {sorted(CHAT_TEMPLATES)}")
    with tempfile.TemporaryDirectory() as tmp:
        # transformers converts SentencePiece files named *.model; mistral-common's are *.model.vN
        shutil.copyfile(mistral_tokenizer_file(template, vocab), Path(tmp) / "tokenizer.model")
        # TokenizersBackend, not LlamaTokenizer: LlamaTokenizer rebuilds its pipeline with a
        # "first chunk only" dummy prefix, which turns "</s>▁[INST]" into "</s>[INST]" (v1).
        tok = TokenizersBackend.from_pretrained(
            tmp,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token=PAD_TOKEN,
            add_bos_token=True,
            add_eos_token=False,
            model_max_length=MODEL_MAX_LENGTH,
            padding_side="right",
        )
    # The copied file is gone; tokenizer.json is the full serialization, nothing needs it.
    tok.vocab_file = None
    tok.chat_template = CHAT_TEMPLATES[template]
    return tok


def save_tokenizer(tok: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """Save `tok` (tokenizer.json, config, chat template) so AutoTokenizer reloads it offline."""
    out = Path(out_dir)
    tok.save_pretrained(str(out))
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Reload a tokenizer saved by `save_tokenizer`, from local files only."""
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
