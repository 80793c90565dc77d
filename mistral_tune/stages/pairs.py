"""The `pairs` stage (`pairs=onpolicy`): preference pairs from the policy's own samples.

Hand-written rejected replies are guesses at the errors a model makes; on-policy pairs are the
errors it does make (online/iterative DPO, RL from verifiable rewards). After the stage before DPO
(SFT by default), this stage:

1. takes prompts from the SFT training chats (or `pairs.prompts_files`): each chat up to its last
   user turn, the earlier replies the reference ones; prompts of the held-out eval files are left
   out (counted), repeated prompts once;
2. samples `pairs.num_samples` completions per prompt from that policy (batched `generate`,
   temperature/top_p, seeded by `seed`; under a launcher each rank samples a shard and rank 0
   gathers them); with `pairs.greedy`, each prompt's greedy reply (what eval decodes) too;
3. scores each with a verifier: by default the bundled tasks' exact checker (as `eval` scores
   them) plus their rule checker (`tasks.follows_rule`, eval's `preferred_rate`), one point each,
   exact match with the chat's reference reply for other prompts; a user function
   (`pairs.reward=module:function`, called as function(prompt, completion) -> float, prompt the
   last user turn's text), or a reward model (`pairs.reward_model=<path or hub id>`, a
   sequence-classification model, its first logit);
4. pairs the best and the worst scored sample of each prompt (prompts whose samples all tie are
   skipped and counted; with `pairs.greedy` every pair holds the greedy reply) and writes
   run_dir/pairs/pairs.jsonl in the row layout of data/dpo.jsonl, report.json (counts, score
   histogram, chosen/rejected mean score, best-of-k score; with `pairs.greedy` how often a
   sample beats the greedy reply) and
   manifest.json last.

configs/pairs/onpolicy.yaml points dpo.data.files at that file, so DPO's data build reads it like
any preference file. A finished stage with the same config and start model is reused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.datasets import sources, tasks
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.stages.data import eval_files
from mistral_tune.stages.evaluate import generate, generate_samples, last_user
from mistral_tune.stages.evaluate import score as task_score
from mistral_tune.training.modeling import load_policy, start_model

log = logging.getLogger("mistral_tune")

PAIRS_FILE = "pairs.jsonl"


def pairs_file(cfg: DictConfig) -> Path:
    return RunDir.of(cfg).stage("pairs") / PAIRS_FILE


def _prompt_files(cfg: DictConfig) -> list[str]:
    if cfg.pairs.prompts_files:
        return list(cfg.pairs.prompts_files)
    files = [str(f) for f in cfg.sft.data.files] or [s.path for s in cfg.sft.data.sources]
    if not files:
        raise UserError("pairs=onpolicy needs prompts: sft.data is empty",
                        hint="set pairs.prompts_files=[chats.jsonl]")
    return files


def _held_out_users(cfg: DictConfig) -> set[str]:
    """The user turns of the eval files: prompts that must never be trained on."""
    users = set()
    chats, pairs = eval_files(cfg, "sft")[0], eval_files(cfg, "dpo")[0]
    if chats:
        for row in sources.load_rows(list(chats), "sft", on_error="skip").rows:
            users |= {m["content"].strip() for m in row["messages"] if m["role"] == "user"}
    if pairs:
        for row in sources.load_rows(list(pairs), "dpo", on_error="skip").rows:
            users |= {m["content"].strip() for m in row["prompt"] if m["role"] == "user"}
    return users


def load_prompts(cfg: DictConfig) -> tuple[list[dict], dict]:
    """Prompts ({"messages", "user", "reference", "task"}) and counts of those left out
    (held out, repeated, ending on a tool call)."""
    rows = sources.load_rows(_prompt_files(cfg), "prompts", on_error=cfg.data.on_error).rows
    held_out = _held_out_users(cfg)
    prompts, seen = [], set()
    counts = {"rows": len(rows), "held_out": 0, "repeated": 0, "tool_call_replies": 0}
    for row in rows:
        messages = row["messages"]
        if messages[-1].get("tool_calls"):
            # A reply that is a tool call is not sampled: decoding drops [TOOL_CALLS], and a call
            # has its own check (evaluate.score_call), not a reply's. Counted, not paired.
            counts["tool_call_replies"] += 1
            continue
        if messages[-1]["role"] == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
        else:
            reference = None
        user = last_user(messages)  # the question, also when the chat ends on a tool result
        if user.strip() in held_out:
            counts["held_out"] += 1
            continue
        key = json.dumps(messages, sort_keys=True)
        if key in seen:
            counts["repeated"] += 1
            continue
        seen.add(key)
        # The reply after a tool result is scored by exact match, as eval scores it: its question
        # may read like a bundled task ("What is 120 - 327?") whose checker would mark the right
        # reply "120 - 327 = -207." wrong.
        task = "tool_answer" if messages[-1]["role"] == "tool" else None
        prompts.append({"messages": messages, "user": user, "reference": reference, "task": task})
    if cfg.pairs.max_prompts is not None:
        prompts = prompts[:cfg.pairs.max_prompts]
    if not prompts:
        raise UserError(f"pairs: no prompts left from {_prompt_files(cfg)} ({counts})")
    return prompts, counts


@torch.no_grad()
def sample(model, prompts: list[list[int]], cfg: DictConfig, pad_id: int, eos_id: int, seed: int) -> list[list[list[int]]]:
    """`num_samples` sampled completions (token ids, cut before EOS) per prompt. Prompts are
    batched by length and left-padded; the global torch RNG is seeded once, so the same prompts,
    model and seed give the same samples."""
    from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    p = cfg.pairs
    k = p.num_samples
    # Greedy decoding over logits that InverseCDFSampling has reduced to the one token it drew: a
    # sample from softmax(logits / temperature) (top-p first when set), as do_sample=True draws it.
    gen = GenerationConfig(do_sample=False, max_new_tokens=p.max_new_tokens, pad_token_id=pad_id,
                           eos_token_id=eos_id, bos_token_id=None)
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    torch.manual_seed(seed)
    model.eval()
    # Greedy generate returns one sequence per input row: each prompt goes in k times, side by side.
    repeated = [ids for ids in prompts for _ in range(k)]
    flat = generate_samples(model, repeated, gen, p.batch_size * k,
                            logits_processor=LogitsProcessorList([*warpers, InverseCDFSampling()]))
    return [[per[0] for per in flat[i * k:(i + 1) * k]] for i in range(len(prompts))]


class InverseCDFSampling:
    """A logits processor that draws the next token from softmax(scores) and leaves only that
    token finite, so that greedy decoding picks it: one uniform number per row against the
    cumulative distribution. generate(do_sample=True) draws with torch.multinomial, which on CPU
    draws an exponential variate per vocabulary entry: 94 ms per step for 128 rows x 32000
    tokens on this 2-core machine, against 8 ms here (the same distribution: tests/test_pairs.py)."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        cdf = scores.float().softmax(-1).cumsum(-1)
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        # The first token whose cumulative probability exceeds u: never one of probability 0.
        token = torch.searchsorted(cdf, u, right=True)
        token = torch.where(token < cdf.shape[-1], token, scores.argmax(-1, keepdim=True))  # u rounded up to 1
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


def verifier(cfg: DictConfig):
    """score(prompts, completions) -> floats, one per (prompt, completion), and its name."""
    p = cfg.pairs
    if p.reward and p.reward_model:
        raise UserError("pairs.reward and pairs.reward_model are both set; give one")
    if p.reward:
        return _user_function(p.reward), f"function {p.reward}"
    if p.reward_model:
        return _reward_model(cfg, p.reward_model), f"reward model {p.reward_model}"
    def check(prompts, completions):
        values = []
        for q, c in zip(prompts, completions):
            if q["reference"] is None and (q.get("task") or not _is_task(q["user"])):
                raise UserError(f"pairs: prompt {q['user'][:60]!r} is not a bundled task and has no reference reply",
                                hint="score it with pairs.reward=module:function or pairs.reward_model=...")
            value = float(task_score(q["user"], q["reference"] or "", c, q.get("task"))[1])
            # The bundled rule counts as much as the answer: a right bare answer 2, a right answer
            # with chatter or a wrong bare one 1, a wrong one with chatter 0.
            follows = None if q.get("task") else tasks.follows_rule(q["user"], c)
            values.append(value + float(bool(follows)) if follows is not None else value)
        return values

    return check, "bundled task checker + rule checker"


def _is_task(user: str) -> bool:
    try:
        tasks.task_of(user)
        return True
    except ValueError:
        return False


def _user_function(spec: str):
    module, _, name = spec.partition(":")
    # The `mistral-tune` console script does not put the current folder on sys.path (python -m
    # does): without this, my_module.py beside the user's command would not import.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UserError(f"pairs.reward={spec!r}: cannot import it ({err})",
                        hint="give module:function, the module importable from the current folder") from None

    def score(prompts, completions):
        values = []
        for q, c in zip(prompts, completions):
            value = fn(q["user"], c)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"pairs.reward={spec!r} returned {value!r} for {q['user'][:40]!r}; it must return a float")
            values.append(float(value))
        return values

    return score


def _reward_model(cfg: DictConfig, path: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, use_safetensors=True).eval()
    except OSError as err:
        raise UserError(f"pairs.reward_model={path!r}: cannot load it: {str(err).splitlines()[0]}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    @torch.no_grad()
    def score(prompts, completions):
        texts = []
        for q, c in zip(prompts, completions):
            chat = [*q["messages"], {"role": "assistant", "content": c}]
            texts.append(tok.apply_chat_template(chat, tokenize=False) if tok.chat_template
                         else "\n".join(m["content"] for m in chat))
        values = []
        for start in range(0, len(texts), cfg.pairs.batch_size):
            # The chat template already holds BOS: the tokenizer must not add a second one.
            enc = tok(texts[start:start + cfg.pairs.batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=not tok.chat_template)
            values += model(**enc).logits[:, 0].float().tolist()
        return values

    return score


def build_pairs(prompts: list[dict], completions: list[list[str]], scores: list[list[float]],
                greedy: bool = False) -> tuple[list[dict], dict]:
    """Best vs worst sample per prompt; prompts whose samples all score the same are skipped.
    Empty samples (EOS first) are scored but never paired: an empty reply is not a valid chat row
    for the data stage. Prompts left with fewer than two non-empty samples are counted apart.
    With `greedy` the first candidate is the greedy reply and every pair holds it: (best sample,
    greedy reply) when a sample scores above it, else (greedy reply, worst sample).

    The report says how much sampling finds beyond greedy decoding (what eval scores):
    `best_of_k_mean_score` (pass@k for a 0/1 checker) and, with `greedy`, the greedy replies'
    mean score and `greedy_beaten`, the prompts where a sample scores above the greedy reply."""
    rows, ties, chosen, rejected, too_few = [], Counter(), [], [], 0
    for q, texts, values in zip(prompts, completions, scores):
        usable = [i for i, text in enumerate(texts) if text.strip()]
        if len(usable) < 2:
            too_few += 1
            continue
        best = max(usable, key=lambda i: (values[i], -i))  # first of the best
        worst = min(usable, key=lambda i: (values[i], i))  # first of the worst
        if greedy and best != 0 and 0 in usable:
            worst = 0  # a sample beats the greedy reply: that is the pair
        if values[best] == values[worst]:
            ties[values[best]] += 1
            continue
        # Tools ride on the first message in memory (sources._with_tools); a file row holds them
        # in its own `tools` field, which is what the data stage reads back.
        first, *rest = q["messages"]
        tools = first.get("tools")
        messages = [{k: v for k, v in first.items() if k != "tools"}, *rest]
        rows.append({
            # The question's text, as in data/dpo.jsonl; the messages when they end on a tool
            # result (a text prompt must be the conversation's last message).
            "prompt": q["user"] if messages[-1]["role"] == "user" else messages,
            **({"tools": tools} if tools else {}),
            "chosen": [*messages, {"role": "assistant", "content": texts[best]}],
            "rejected": [*messages, {"role": "assistant", "content": texts[worst]}],
            "score_chosen": values[best],
            "score_rejected": values[worst],
        })
        chosen.append(values[best])
        rejected.append(values[worst])
    flat = [v for values in scores for v in values]
    report = {
        "prompts": len(prompts), "samples": len(flat), "pairs": len(rows), "ties": sum(ties.values()),
        "ties_by_score": {f"{v:g}": n for v, n in sorted(ties.items())},  # a checker's 0: all k wrong
        "empty_samples": sum(not text.strip() for texts in completions for text in texts),
        "too_few_nonempty": too_few,
        "score_histogram": histogram(flat), "mean_score": _mean(flat),
        "chosen_mean_score": _mean(chosen), "rejected_mean_score": _mean(rejected),
        "best_of_k_mean_score": _mean([max(values) for values in scores]),
    }
    if greedy:
        report["greedy_mean_score"] = _mean([values[0] for values in scores])
        report["greedy_beaten"] = sum(  # by a sample that could be paired (empty ones never are)
            any(v > values[0] for v, text in zip(values[1:], texts[1:]) if text.strip())
            for texts, values in zip(completions, scores))
    return rows, report


def histogram(values: list[float], bins: int = 10) -> dict[str, int]:
    """Counts per value when there are few distinct values (a checker's 0/1), else per bin."""
    distinct = sorted(set(values))
    if len(distinct) <= bins:
        counts = Counter(values)
        return {f"{v:g}": counts[v] for v in distinct}
    lo, hi = distinct[0], distinct[-1]
    width = (hi - lo) / bins
    counts = Counter(min(int((v - lo) / width), bins - 1) for v in values)
    return {f"[{lo + i * width:.3g}, {lo + (i + 1) * width:.3g})": counts[i] for i in range(bins)}


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def _shard_and_gather(items: list, work) -> list | None:
    """work(items[rank::world]) on every rank, results back in item order on rank 0 (None elsewhere)."""
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    world, rank = state.num_processes, state.process_index
    mine = work(items[rank::world], rank)
    if world == 1:
        return mine
    gathered = [None] * world if rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0)
    if rank != 0:
        return None
    out = [None] * len(items)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def _inputs(cfg: DictConfig, start: dict, previous: dict | None) -> dict:
    files = [*_prompt_files(cfg), *eval_files(cfg, "sft")[0], *eval_files(cfg, "dpo")[0]]
    digests = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sources.expand_files(files)}
    return {"start": previous["fingerprint"] if previous else start, "files": digests}


def run(cfg: DictConfig) -> Path:
    run_dir = RunDir.of(cfg)
    out = run_dir.stage("pairs")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    fmt = ChatFormat.load(run_dir, "pairs")
    start, previous = start_model(cfg, "dpo", tokenizer)  # the policy DPO will start from
    inputs = _inputs(cfg, start, previous)
    if runs.check_done(cfg, "pairs", inputs):
        return out
    runs.write_stage_config(cfg, "pairs")
    t0 = time.perf_counter()
    prompts, counts = load_prompts(cfg)
    # Round r of iterative DPO (pairs.rounds; its start manifest names the round) draws other
    # numbers than round 1 does from the same seed.
    seed = cfg.seed + 1000 * ((previous or {}).get("round", 1) - 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_policy(cfg, start, inference=True).to(device)

    def work(shard, rank):
        encoded = [fmt.encode_prompt(q["messages"]) for q in shard]
        ids = sample(model, encoded, cfg, tokenizer.pad_token_id, tokenizer.eos_token_id, seed + rank)
        if cfg.pairs.greedy:
            greedy = generate(model, encoded, tokenizer.pad_token_id, tokenizer.eos_token_id,
                              cfg.pairs.max_new_tokens, cfg.pairs.batch_size)
            ids = [[g, *per] for g, per in zip(greedy, ids)]
        return [[tokenizer.decode(t, skip_special_tokens=True).strip() for t in per] for per in ids]

    completions = _shard_and_gather(prompts, work)
    del model
    if runs.is_main_process():
        score, name = verifier(cfg)
        flat_q = [q for q, per in zip(prompts, completions) for _ in per]
        flat = score(flat_q, [c for per in completions for c in per])
        k = len(completions[0])  # num_samples, plus the greedy reply with pairs.greedy
        scores = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        rows, report = build_pairs(prompts, completions, scores, greedy=cfg.pairs.greedy)
        if not rows:
            raise UserError(f"pairs: every prompt's {k} samples scored the same ({report['ties']} ties): no pairs",
                            hint="sample more (pairs.num_samples), hotter (pairs.temperature), or use a finer reward")
        report = {"verifier": name, "num_samples": cfg.pairs.num_samples, "greedy": cfg.pairs.greedy,
                  "prompts_read": counts, **report,
                  "runtime": round(time.perf_counter() - t0, 2)}
        runs.atomic_write_text(out / PAIRS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
        runs.write_json(out / "report.json", report)
        log.info("pairs: %d prompts x %d samples (%s): %d pairs, %d ties; mean score %.3f, chosen %.3f, "
                 "rejected %.3f (%.1fs; %s)", report["prompts"], k, name, report["pairs"], report["ties"],
                 report["mean_score"], report["chosen_mean_score"], report["rejected_mean_score"],
                 report["runtime"], out / PAIRS_FILE)
        runs.finish_stage(cfg, "pairs", {"pairs": str(out / PAIRS_FILE), "policy": start, "report": report}, inputs)
    runs.wait_for_everyone()
    return out
