"""Check an exported GGUF against the HF model it came from, with llama.cpp itself
(llama-cpp-python): the same logits at every position, the same greedy replies, and the GGUF's
chat template giving the same token ids as the HF tokenizer's.

Used by bench/gguf_check.py (the figures in the README) and tests/test_export.py. Only prompts
whose prompt + reply fit in the model's sliding window are compared: llama.cpp's `llama`
architecture attends to the whole context, transformers' Mistral to the window, so beyond it the
two models differ by design.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def eval_prompts(path: Path, limit: int | None = None) -> list[list[dict]]:
    """The held-out chats of a JSONL file (OpenAI messages), each cut before its last reply."""
    out = []
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        out.append(messages)
        if limit and len(out) >= limit:
            break
    return out


def gguf_chat_ids(llm, messages: list[dict]) -> list[int]:
    """The prompt's ids as llama-cpp-python's create_chat_completion makes them: the GGUF's own
    tokenizer.chat_template rendered by its Jinja formatter, tokenized by llama.cpp with special
    tokens parsed, BOS added only when the template did not write one (no double BOS)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    meta = llm.metadata
    vocab = llm._model
    formatter = Jinja2ChatFormatter(template=meta["tokenizer.chat_template"],
                                    eos_token=vocab.token_get_text(vocab.token_eos()),
                                    bos_token=vocab.token_get_text(vocab.token_bos()),
                                    add_generation_prompt=True)
    result = formatter(messages=messages)
    return llm.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)


def llama_greedy(llm, ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy decoding on llama.cpp's logits (argmax each step), stopping after EOS."""
    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        if nxt == eos:
            break
        llm.eval([nxt])
    return out


def compare(gguf_path: Path, hf_folder: Path, prompts: list[list[dict]], max_new_tokens: int = 16,
            logits: bool = True, n_threads: int | None = None) -> dict:
    """Figures of the GGUF against the HF model on `prompts` (those that fit in the window)."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(hf_folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(hf_folder), dtype=torch.float32, local_files_only=True).eval()
    window = getattr(model.config, "sliding_window", None) or model.config.max_position_embeddings
    llm = Llama(model_path=str(gguf_path), n_ctx=min(window, model.config.max_position_embeddings) + 8,
                logits_all=True, n_threads=n_threads or 2, verbose=False, seed=0)
    eos = tok.eos_token_id
    max_diff, positions, argmax_same, template_same, greedy_same, chat_same, used, skipped = 0.0, 0, 0, 0, 0, 0, 0, 0
    max_gap_diff = 0.0
    examples, misses = [], []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        if len(ids) + max_new_tokens > window:
            skipped += 1
            continue
        used += 1
        template_same += gguf_chat_ids(llm, messages) == ids  # also: exactly one BOS, as in ours
        with torch.no_grad():
            hf_out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                    pad_token_id=tok.pad_token_id)
        hf_reply = hf_out[0, len(ids):].tolist()
        llama_reply = llama_greedy(llm, ids, max_new_tokens, eos)
        greedy_same += hf_reply == llama_reply
        # the user's path: llama-cpp-python's chat completion (its handler from the GGUF's template)
        chat = llm.create_chat_completion(messages=messages, temperature=0.0, max_tokens=max_new_tokens, seed=0)
        chat_same += chat["choices"][0]["message"]["content"].strip() == tok.decode(hf_reply, skip_special_tokens=True).strip()
        if logits:  # every position of the prompt and the HF reply
            seq = ids + hf_reply
            with torch.no_grad():
                hf_logits = model(torch.tensor([seq])).logits[0].float().numpy()
            llm.reset()
            llm.eval(seq)
            ll = np.asarray(llm.scores[: len(seq)], dtype=np.float32)
            max_diff = max(max_diff, float(np.abs(ll - hf_logits).max()))
            positions += len(seq)
            argmax_same += int((ll.argmax(-1) == hf_logits.argmax(-1)).sum())
            hf_gap = top2_gap(hf_logits, hf_logits)
            max_gap_diff = max(max_gap_diff, float(np.abs(top2_gap(ll, hf_logits) - hf_gap).max()))
            if llama_reply != hf_reply:  # where it parted, and how close HF's own top two were there
                k = next((i for i, (a, b) in enumerate(zip(llama_reply, hf_reply)) if a != b), len(hf_reply) - 1)
                misses.append({"prompt": messages[-1]["content"], "at_token": k,
                               "hf_top2_margin": round(float(hf_gap[len(ids) - 1 + k]), 4),
                               "hf": tok.decode(hf_reply, skip_special_tokens=True),
                               "llama_cpp": tok.decode(llama_reply, skip_special_tokens=True)})
        if len(examples) < 3:
            examples.append({"prompt": messages[-1]["content"], "hf": tok.decode(hf_reply, skip_special_tokens=True),
                             "llama_cpp": tok.decode(llama_reply, skip_special_tokens=True)})
    llm.close()
    result = {"prompts": used, "skipped_longer_than_window": skipped, "window": window,
              "template_ids_equal": template_same, "greedy_equal": greedy_same,
              "chat_completion_equal": chat_same, "examples": examples}
    if logits:
        result.update(max_abs_logit_diff=max_diff, positions=positions, argmax_equal=argmax_same,
                      max_top2_gap_diff=max_gap_diff, greedy_misses=misses)
    return result


def top2_gap(logits: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per position, logits[a] - logits[b] for `ref`'s top two tokens a > b: a greedy choice flips
    where another model's gap to HF's differs by more than HF's own gap (its margin)."""
    rows = np.arange(len(ref))[:, None]
    top = np.argpartition(ref, -2, axis=-1)[:, -2:]
    top = np.take_along_axis(top, np.argsort(ref[rows, top], axis=-1), axis=-1)  # [second, first]
    return logits[rows[:, 0], top[:, 1]] - logits[rows[:, 0], top[:, 0]]
