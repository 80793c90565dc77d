"""An Ollama Modelfile for an exported GGUF: FROM, the chat format as a Go template, stops, params.

Ollama renders prompts with its own Go templates (`.Messages`, each with `.Role` and `.Content`),
not with the Jinja template in the GGUF. `GO_TEMPLATES` writes each of our chat formats
(mistral_tune/formats/templates.py) in that language, rendering the same text as the Jinja
template for chats of an optional leading system message and user/assistant turns (tests render
both, the Go one with Go's text/template, and compare).

One difference on purpose: no `<s>`. Ollama's tokenizer adds BOS itself (the GGUF says
add_bos_token), so a template that writes it gives a double BOS. Not rendered: v3/v7's
stripping of trailing spaces from earlier replies (Go templates have no rstrip) and tool use.
Newlines are written as `{{ "\\n" }}` so that no template whitespace leaks into the prompt.
"""

from __future__ import annotations

# Scan the messages once: the leading system prompt (if any), the last user turn, the last role.
_SCAN = ('{{- $system := "" }}{{- $last := -1 }}{{- $lastRole := "" }}'
         '{{- range $i, $m := .Messages }}'
         '{{- if and (eq $i 0) (eq $m.Role "system") }}{{ $system = $m.Content }}{{ end }}'
         '{{- if eq $m.Role "user" }}{{ $last = $i }}{{ end }}{{ $lastRole = $m.Role }}'
         '{{- end }}')

GO_TEMPLATES = {
    # v1: the system prompt joins the FIRST user turn; [INST] is text; " reply</s>".
    "mistral_v1": _SCAN + '{{- $first := true }}'
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "user" }}[INST] {{ if and $first $system }}{{ $system }}{{ "\\n\\n" }}{{ end }}'
    '{{ $m.Content }} [/INST]{{ $first = false }}'
    '{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{ end }}'
    '{{- end }}',
    # v3: the system prompt joins the LAST user turn; [INST]/[/INST] are control tokens.
    "mistral_v3": _SCAN +
    '{{- range $i, $m := .Messages }}'
    '{{- if eq $m.Role "user" }}[INST]{{ if and (eq $i $last) $system }}{{ $system }}{{ "\\n\\n" }}{{ end }}'
    '{{ $m.Content }}[/INST]'
    '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}'
    '{{- end }}',
    # v7: the system prompt is its own [SYSTEM_PROMPT] block.
    "mistral_v7": _SCAN +
    '{{- range $i, $m := .Messages }}'
    '{{- if and (eq $i 0) (eq $m.Role "system") }}[SYSTEM_PROMPT]{{ $m.Content }}[/SYSTEM_PROMPT]'
    '{{- else if eq $m.Role "user" }}[INST]{{ $m.Content }}[/INST]'
    '{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>{{ end }}'
    '{{- end }}',
    # chatml over a Mistral vocabulary: markers are text, an assistant turn ends <|im_end|></s>.
    "chatml": _SCAN +
    '{{- range $i, $m := .Messages }}{{ if $i }}{{ "\\n" }}{{ end }}'
    '{{- if eq $m.Role "assistant" }}<|im_start|>assistant{{ "\\n" }}{{ $m.Content }}<|im_end|></s>'
    '{{- else }}<|im_start|>{{ $m.Role }}{{ "\\n" }}{{ $m.Content }}<|im_end|>{{ end }}'
    '{{- end }}{{ if ne $lastRole "assistant" }}{{ "\\n" }}<|im_start|>assistant{{ "\\n" }}{{ end }}',
    # zephyr: every message ends with </s>.
    "zephyr": _SCAN +
    '{{- range $i, $m := .Messages }}{{ if $i }}{{ "\\n" }}{{ end }}'
    '<|{{ $m.Role }}|>{{ "\\n" }}{{ $m.Content }}</s>'
    '{{- end }}{{ if ne $lastRole "assistant" }}{{ "\\n" }}<|assistant|>{{ "\\n" }}{{ end }}',
}

# Strings that end a reply besides the GGUF's EOS (Ollama stops at EOS by itself too).
STOPS = {"mistral_v1": ["</s>", "[INST]"], "mistral_v3": ["</s>", "[INST]"], "mistral_v7": ["</s>", "[INST]"],
         "chatml": ["</s>", "<|im_end|>"], "zephyr": ["</s>", "<|user|>"]}


def modelfile(gguf_name: str, template: str | None, num_ctx: int, note: str | None = None) -> str:
    """The Modelfile text: FROM the GGUF beside it (Ollama resolves the path from the Modelfile's
    folder), the chat format, its stop strings and the context Ollama should allocate."""
    lines = ["# Ollama Modelfile written by mistral_tune: ollama create NAME -f THIS_FILE", f"FROM ./{gguf_name}", ""]
    if note:
        lines += [f"# {line}" for line in note.splitlines()] + [""]
    if template in GO_TEMPLATES:
        lines += [f'TEMPLATE """{GO_TEMPLATES[template]}"""', ""]
        lines += [f'PARAMETER stop "{s}"' for s in STOPS[template]]
    else:
        lines += [f"# no chat format known for template {template!r}: Ollama sends the prompt as it is"]
    lines += [f"PARAMETER num_ctx {num_ctx}", ""]
    return "\n".join(lines)
