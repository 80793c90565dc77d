"""`mistral-tune chat run_dir=DIR`: talk to the merged model through its chat template.

Reads user turns from the terminal (`/reset` starts over, `/exit` or Ctrl-D ends), or, when stdin
is not a terminal, one user turn per line of one conversation, so it can be scripted:

    echo "What is 2 plus 3?" | mistral-tune chat run_dir=runs/default

Replies stream to stdout token by token (transformers' TextStreamer); logs go to stderr. The
prompt is built by the chat template saved with the model (run_dir/merged carries the exact
template used in training), so what is served here is what was trained.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune.errors import UserError
from mistral_tune.preflight import check_model
from mistral_tune.runs import RunDir

log = logging.getLogger("mistral_tune")


def model_path(cfg: DictConfig) -> str:
    if cfg.model.name_or_path:
        check_model(str(cfg.model.name_or_path), cfg.model.revision)
        return str(cfg.model.name_or_path)
    merged = RunDir.of(cfg).merged
    if not merged.exists():
        raise UserError(f"chat needs a merged model in {merged}, found none",
                        hint=f"run `mistral-tune pipeline run_dir={cfg.run_dir}` (or `merge`), or give model.name_or_path=...")
    check_model(str(merged), key="run_dir/merged")
    return str(merged)


def user_turns(interactive: bool) -> Iterator[str]:
    if not interactive:
        for line in sys.stdin:
            if line.strip():
                yield line.rstrip("\n")
        return
    while True:
        try:
            line = input("\nyou> ")
        except EOFError:
            print()
            return
        if line.strip():
            yield line


def load(path: str, cfg: DictConfig):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mistral_tune.training.modeling import resolve_dtype

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if not tokenizer.chat_template:
        raise UserError(f"{path} has no chat template in its tokenizer",
                        hint="chat with a model trained here (run_dir/merged), or an instruct model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(cfg), use_safetensors=True,
                                                 trust_remote_code=cfg.model.trust_remote_code)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, tokenizer


def reply(model, tokenizer, messages: list[dict], cfg: DictConfig, streamer) -> str:
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    sample = cfg.chat.temperature > 0
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=cfg.chat.max_new_tokens,
            do_sample=sample,
            temperature=cfg.chat.temperature if sample else None,
            top_p=cfg.chat.top_p if sample else None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=streamer,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run(cfg: DictConfig) -> Path | None:
    from transformers import TextStreamer

    path = model_path(cfg)
    model, tokenizer = load(path, cfg)
    if cfg.chat.temperature > 0:
        import torch

        torch.manual_seed(cfg.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {path} (/reset starts over, /exit or Ctrl-D ends)", file=sys.stderr)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    start = [{"role": "system", "content": cfg.chat.system}] if cfg.chat.system else []
    messages = list(start)
    for text in user_turns(interactive):
        if interactive and text.strip() in ("/exit", "/quit"):
            break
        if interactive and text.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": text})
        if interactive:
            print("assistant> ", end="", flush=True)
        answer = reply(model, tokenizer, messages, cfg, streamer)  # the streamer prints it, then a newline
        messages.append({"role": "assistant", "content": answer})
    return None
