"""The `eval` stage: the base model and every trained stage's model side by side on held-out data.

For each model present in run_dir (rebuilt from its manifest, adapters merged):

- `eval_loss`, `perplexity`: mean NLL of the trained tokens (template.train_on, as in training) of
  the held-out chats (`eval.files`), token-weighted, and its exp.
- `task_score`: greedy generation on each held-out chat's last user turn (the earlier turns given
  with their reference replies), scored by `tasks.check` when the question is one of the bundled
  tasks, else by exact match with the reference reply (whitespace stripped; `tool_answer` when the
  reply follows tool results). Chats with tool calls add one probe per tool-calling turn
  (`tool_call`, on the user's held-out rows too): the generation must be [TOOL_CALLS] and the
  same calls, names and arguments (`score_call`). Fraction right over all probes, and per task;
  `tool_call_well_formed`: the calls parse and name the right functions, arguments aside.
- `preferred_rate`: on the same greedy replies to bundled task questions, the fraction that keep
  the bundled rule (`tasks.follows_rule`: the answer alone, no chatter after it), right or wrong;
  what DPO on the bundled pairs is for (`tasks.RULE`). Absent where no prompt is a bundled task.
- `preference_accuracy`, `logp_margin`: on held-out pairs (`eval.pref_files`), the fraction where
  the model's log-probability of the chosen completion (summed over its tokens) beats the
  rejected one's, and the mean difference. The same definition for every model, so the column
  compares base, SFT and DPO.
- `reward_accuracy`, `reward_margin`: DPO's implicit reward r = beta * (logp_model - logp_ref)
  with ref = the model the stage started from (the stage before it in `stages=[...]`, else base):
  SFT for DPO (the reference DPO trained against, so these are the held-out counterparts of TRL's
  rewards/accuracies and rewards/margins), base for SFT or ORPO, none for base (null). beta is
  dpo.trainer.beta.

Writes run_dir/eval/results.json ({"base": {...}, "sft": {...}, "dpo": {...}}), prints a table,
logs W&B tables, writes the merged model's card (mistral_tune.card), and the manifest last.

`eval.harness=[task, ...]`: lm-evaluation-harness on each model while it is loaded, and on merged
(mistral_tune/evaluation/harness.py, run_dir/eval/harness.json); not part of eval's fingerprint, so
on a finished eval only the harness's missing results run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mistral_tune import card, runs
from mistral_tune.datasets import sources, tasks
from mistral_tune.errors import UserError
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import load_tokenizer
from mistral_tune.runs import RunDir
from mistral_tune.stages import rounds
from mistral_tune.stages.data import eval_files
from mistral_tune.training import tracking
from mistral_tune.training.modeling import load_policy

log = logging.getLogger("mistral_tune")

def _names(cfg: DictConfig) -> list[str]:
    """The models a run makes, in order: base, each stage, each DPO round after the first."""
    return ["base", *cfg.stages, *(rounds.name(r) for r in range(2, rounds.count(cfg) + 1))]


def references(cfg: DictConfig) -> dict[str, str]:
    """{model: the model it started from}: the stage (or DPO round) before it, else base."""
    order = _names(cfg)
    return {stage: order[i] for i, stage in enumerate(order[1:])}


def model_refs(cfg: DictConfig) -> dict[str, dict]:
    """{name: {"base": path, "adapters": [...]}} of the models to evaluate, in pipeline order."""
    run_dir = RunDir.of(cfg)
    refs = {}
    if (run_dir.base / "config.json").exists():
        refs["base"] = {"base": str(run_dir.base), "adapters": []}
    elif cfg.model.name_or_path:
        refs["base"] = {"base": str(cfg.model.name_or_path), "adapters": []}
    for stage in cfg.stages:
        manifest = runs.read_manifest(cfg, stage)
        if manifest:
            refs[stage] = manifest["model"]
    refs.update({name: manifest["model"] for name, manifest in rounds.finished(cfg).items()})
    names = _names(cfg)
    wanted = names if cfg.eval.models is None else list(cfg.eval.models)
    unknown = set(wanted) - set(names)
    if unknown:
        raise UserError(f"eval.models: unknown model(s) {sorted(unknown)}; choose from {', '.join(names)}")
    refs = {k: v for k, v in refs.items() if k in wanted}
    if not refs:
        raise UserError(
            f"eval: nothing to evaluate in {cfg.run_dir} (no base model, no finished {' or '.join(cfg.stages)} stage)",
            hint=f"run `mistral-tune pipeline run_dir={cfg.run_dir}` first",
        )
    return refs


def load_eval_data(cfg: DictConfig, fmt: ChatFormat) -> dict:
    """Held-out chats (loss sequences and generation prompts) and preference pairs, encoded.
    Generation (task_score) runs on the bundled chats and on files the user names, not on the
    held-out split of the user's rows: exact match on long free-form replies measures nothing."""
    max_len, n = cfg.sft.data.max_length, cfg.eval.max_samples
    chat_files, chat_kind = eval_files(cfg, "sft")
    pair_files, pair_kind = eval_files(cfg, "dpo")
    chats = sources.load_rows(chat_files, "sft", on_error=cfg.data.on_error).rows if chat_files else []
    pairs = sources.load_rows(pair_files, "dpo", on_error=cfg.data.on_error).rows if pair_files else []
    loss_seqs, prompts, calls = [], [], []
    for row in chats[:n]:
        messages = row["messages"]
        enc = fmt.encode_chat(messages, train_on=cfg.template.train_on)
        if len(enc.input_ids) > max_len:
            continue  # as in training: never truncated
        loss_seqs.append((enc.input_ids, enc.assistant_masks))
        # Every tool-calling turn, given the chat before it: the calls must come out exactly (on
        # the user's held-out rows too: a call has one right form, unlike a free-form reply).
        for i, m in enumerate(messages):
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls.append({"ids": fmt.encode_prompt(messages[:i]), "user": last_user(messages[:i]),
                              "reference": [_call(c) for c in m["tool_calls"]]})
        if chat_kind == "held_out" or messages[-1].get("tool_calls"):
            continue  # a chat that ends on a call: its calls are probed above
        prompt = messages[:-1]  # up to the last user turn (or tool result), earlier replies the reference ones
        prompts.append({"ids": fmt.encode_prompt(prompt), "user": last_user(prompt), "messages": prompt,
                        "reference": messages[-1]["content"],
                        "task": "tool_answer" if prompt[-1]["role"] == "tool" else None})
    pref_seqs = []
    pref_len = cfg[next((s for s in cfg.stages if s != "sft"), "dpo")].data.max_length
    for row in pairs[:n]:
        p, c, r = fmt.encode_preference(row["prompt"], row["chosen"], row["rejected"])
        if len(p) + max(len(c), len(r)) > pref_len:
            continue
        pref_seqs += [(p + c, [0] * len(p) + [1] * len(c)), (p + r, [0] * len(p) + [1] * len(r))]
    return {"loss": loss_seqs, "prompts": prompts, "calls": calls, "pairs": pref_seqs,
            "files": {"chats": chat_files, "chats_kind": chat_kind, "pairs": pair_files, "pairs_kind": pair_kind}}


@torch.no_grad()
def sequence_logps(model, seqs: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(sum of log p(token) over the masked tokens, their count) of each sequence. Right padding:
    a token's prediction comes from the position before it, so the mask shifts by one."""
    out = []
    device = model.device
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, (seq, m) in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            attn[i, :len(seq)] = 1
            mask[i, :len(seq)] = torch.tensor(m, dtype=torch.bool)
        hidden = model.get_decoder()(input_ids=ids.to(device), attention_mask=attn.to(device)).last_hidden_state
        # Logits only where a token is scored: the full (batch, length, vocab) tensor is most of
        # the time and memory of this pass (the same saving as the lean SFT loss).
        trained = mask[:, 1:].to(device)
        logits = model.get_output_embeddings()(hidden[:, :-1][trained]).float()
        targets = ids[:, 1:].to(device)[trained]
        logp = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        row = torch.arange(len(chunk), device=device)[:, None].expand_as(trained)[trained]
        sums = torch.zeros(len(chunk), device=device).index_add_(0, row, logp)
        for s, c in zip(sums.tolist(), trained.sum(-1).tolist()):
            out.append((s, int(c)))
    return out


@torch.no_grad()
def generate(model, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Greedy completions, cut before EOS."""
    from transformers import GenerationConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                           eos_token_id=eos_id, bos_token_id=None)
    return [samples[0] for samples in generate_samples(model, prompts, gen, batch_size)]


@torch.no_grad()
def generate_samples(model, prompts: list[list[int]], gen, batch_size: int, logits_processor=None) -> list[list[list[int]]]:
    """gen.num_return_sequences completions per prompt (GenerationConfig `gen`, and generate's
    `logits_processor`), each cut before EOS. Prompts are batched by length and left-padded, so
    batching changes no prompt's input."""
    pad_id, eos_id, k = gen.pad_token_id, gen.eos_token_id, gen.num_return_sequences or 1
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[list[int]]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            attn[row, width - len(prompts[i]):] = 1
        new = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device),
                             generation_config=gen, logits_processor=logits_processor)[:, width:].tolist()
        for row, i in enumerate(idx):  # generate returns each prompt's samples consecutively
            for tokens in new[row * k:(row + 1) * k]:
                out[i].append(tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens)
    return out


def last_user(messages: list[dict]) -> str:
    return next(m["content"] for m in reversed(messages) if m["role"] == "user")


def _call(call: dict) -> tuple[str, object]:
    """(function name, arguments as data) of an OpenAI-layout tool call: what must match."""
    return call["function"]["name"], json.loads(call["function"]["arguments"])


def score(user: str, reference: str, answer: str, task: str | None = None) -> tuple[str, bool]:
    """(task, right?): the bundled task's checker where the question is one, else exact match
    (`task` names it, e.g. tool_answer: the reply after the tool results)."""
    if task is None:
        try:
            return tasks.task_of(user), tasks.check(user, answer)
        except ValueError:
            task = "other"
    return task, answer.strip() == reference.strip()


# Tokens generated for a tool-calling turn: one calculator call is 40 with its EOS, two are 79.
TOOL_CALL_TOKENS = 128


def score_call(ids: list[int], reference: list[tuple[str, object]], tokenizer) -> tuple[str, bool, bool]:
    """A generated tool-calling turn (token ids, EOS cut) against the reference calls: (its text,
    right, well-formed). Right: the [TOOL_CALLS] token, then a JSON list whose (name, arguments)
    pairs equal the reference's, in order; the call ids are not compared (they are random).
    Well-formed: the same, but only the function names must match (the form is learnt, the
    arguments maybe not)."""
    marker = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    if marker not in ids:
        return "", False, False
    text = tokenizer.decode(ids[ids.index(marker) + 1:], skip_special_tokens=True).strip()
    try:
        made = [(c["name"], c["arguments"]) for c in json.loads(text)]
    except (ValueError, TypeError, KeyError):
        return text, False, False
    return text, made == reference, [name for name, _ in made] == [name for name, _ in reference]


def evaluate_model(model, data: dict, tokenizer, cfg: DictConfig) -> tuple[dict, list[tuple[float, int]]]:
    """Metrics of one model, and its per-sequence log-probs of the preference completions."""
    model.eval()
    pad, eos, bs = tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.eval.batch_size
    result: dict = {}
    if data["loss"]:
        stats = sequence_logps(model, data["loss"], bs, pad)
        nll, count = -sum(s for s, _ in stats), sum(c for _, c in stats)
        result["eval_loss"] = nll / count
        result["perplexity"] = math.exp(min(result["eval_loss"], 700))
        result["eval_tokens"] = count
    pair_logps = sequence_logps(model, data["pairs"], bs, pad) if data["pairs"] else []
    if pair_logps:
        diffs = [pair_logps[i][0] - pair_logps[i + 1][0] for i in range(0, len(pair_logps), 2)]
        result["preference_accuracy"] = sum(d > 0 for d in diffs) / len(diffs)
        result["logp_margin"] = sum(diffs) / len(diffs)
    per_task: dict[str, list[int]] = {}
    samples, well_formed, rule = [], [], []
    if data["prompts"]:
        completions = generate(model, [p["ids"] for p in data["prompts"]], pad, eos, cfg.eval.max_new_tokens, bs)
        for prompt, ids in zip(data["prompts"], completions):
            answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
            task, right = score(prompt["user"], prompt["reference"], answer, prompt.get("task"))
            per_task.setdefault(task, []).append(int(right))
            follows = None if prompt.get("task") else tasks.follows_rule(prompt["user"], answer)
            if follows is not None:
                rule.append(int(follows))
            if len(samples) < cfg.eval.show:
                samples.append({"prompt": prompt["user"], "reference": prompt["reference"],
                                "generation": answer, "correct": right})
    if data["calls"]:
        completions = generate(model, [c["ids"] for c in data["calls"]], pad, eos, TOOL_CALL_TOKENS, bs)
        for i, (call, ids) in enumerate(zip(data["calls"], completions)):
            text, right, formed = score_call(ids, call["reference"], tokenizer)
            per_task.setdefault("tool_call", []).append(int(right))
            well_formed.append(int(formed))
            if i == 0 and cfg.eval.show:  # one tool call among the samples shown
                samples.append({"prompt": call["user"], "reference": json.dumps(call["reference"]),
                                "generation": text, "correct": right})
    if well_formed:  # not a task: a call with the right names, arguments not compared
        result["tool_call_well_formed"] = sum(well_formed) / len(well_formed)
    if per_task:
        result["task_score"] = sum(map(sum, per_task.values())) / sum(map(len, per_task.values()))
        result["task_scores"] = {t: sum(v) / len(v) for t, v in sorted(per_task.items())}
        result["samples"] = samples
    if rule:
        result["preferred_rate"] = sum(rule) / len(rule)
    return result, pair_logps


def add_rewards(results: dict, logps: dict, beta: float | dict[str, float], reference: dict[str, str]) -> None:
    """DPO's implicit reward beta * (logp_model - logp_ref), chosen minus rejected, per pair; `beta`
    one for all models or {model: beta} (the beta its stage trained with)."""
    for name, ref in reference.items():
        if name not in results:
            continue
        model_beta = beta[name] if isinstance(beta, dict) else beta
        results[name]["reference"] = ref if ref in logps and logps[name] else None
        if results[name]["reference"] is None:
            results[name]["reward_accuracy"] = results[name]["reward_margin"] = None
            continue
        pol, rl = logps[name], logps[ref]
        margins = [model_beta * ((pol[i][0] - rl[i][0]) - (pol[i + 1][0] - rl[i + 1][0])) for i in range(0, len(pol), 2)]
        results[name]["reward_accuracy"] = sum(m > 0 for m in margins) / len(margins)
        results[name]["reward_margin"] = sum(margins) / len(margins)
    if "base" in results:
        results["base"].update(reference=None, reward_accuracy=None, reward_margin=None)


COLUMNS = ("task_score", "preferred_rate", "eval_loss", "perplexity", "preference_accuracy", "reward_accuracy", "reward_margin")


def table(results: dict) -> str:
    """The side-by-side table (also in the model card)."""
    head = ["model", *COLUMNS]
    rows = [head]
    for name, r in results.items():
        rows.append([name, *(_fmt(r.get(c)) for c in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def _beta(cfg: DictConfig, stage: str = "dpo") -> float:
    """The beta `stage` trains with (`dpo` for DPO rounds, `kto`), TRL's default when unset."""
    trainer = cfg[stage].trainer
    if OmegaConf.is_missing(trainer, "beta"):
        from trl import DPOConfig, KTOConfig

        return {"kto": KTOConfig}.get(stage, DPOConfig).__dataclass_fields__["beta"].default
    return float(trainer.beta)


def _betas(cfg: DictConfig, names) -> dict[str, float]:
    """Each model's reward beta: KTO's for the kto model, DPO's for the others (for SFT or ORPO
    rows, which have no such beta, a scale only)."""
    return {name: _beta(cfg, "kto" if name == "kto" else "dpo") for name in names}


def _inputs(cfg: DictConfig, refs: dict) -> dict:
    files = {}
    for path in sources.expand_files([*eval_files(cfg, "sft")[0], *eval_files(cfg, "dpo")[0]]):
        files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    stages = {s: (runs.read_manifest(cfg, s) or {}).get("fingerprint") for s in (*cfg.stages, "merge")}
    stages.update({name: m["fingerprint"] for name, m in rounds.finished(cfg).items()})
    return {"models": refs, "stages": stages, "files": files}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run(cfg: DictConfig) -> Path:
    out = runs.stage_dir(cfg, "eval")
    if not runs.is_main_process():
        return out  # evaluation runs in one process
    refs = model_refs(cfg)
    inputs = _inputs(cfg, refs)
    if runs.check_done(cfg, "eval", inputs):
        if cfg.eval.harness:  # not part of eval's fingerprint: only the harness's missing results run
            _harness_only(cfg, refs)
        return out
    runs.write_stage_config(cfg, "eval")
    run_dir = RunDir.of(cfg)
    fmt = ChatFormat.load(run_dir, "eval")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    data = load_eval_data(cfg, fmt)
    if not (data["loss"] or data["pairs"]):
        raise UserError("eval: no held-out data; set eval.files=[...] and/or eval.pref_files=[...]",
                        hint="or keep eval.split_fraction > 0 so the data stage holds out some of your rows")

    start = time.perf_counter()
    results, logps = {}, {}
    bench = _harness(cfg, refs, data, tokenizer)
    with tracking.tracked(cfg, "eval") as report_to:
        for i, (name, ref) in enumerate(refs.items()):
            model = load_policy(cfg, ref, inference=True).to(_device())
            results[name], logps[name] = evaluate_model(model, data, tokenizer, cfg)
            results[name]["model"] = ref
            if bench and name in bench.models:  # while the model is loaded
                bench.evaluate(name, model, tokenizer, f"{i + 1}/{len(refs)}")
            del model
        add_rewards(results, logps, _betas(cfg, results), references(cfg))
        runtime = time.perf_counter() - start - (sum(bench.timings.values()) if bench else 0)  # eval's own
        if report_to:
            _log_wandb(results)
        if bench:
            bench.evaluate_rest(tokenizer, lambda ref: load_policy(cfg, ref, inference=True).to(_device()), tuple(refs))
            summary = bench.finish(report_to)
    runs.write_json(out / "results.json", results)
    counts = {"chats": len(data["loss"]), "prompts": len(data["prompts"]), "tool_calls": len(data["calls"]),
              "pairs": len(data["pairs"]) // 2}
    calls = f", {counts['tool_calls']} tool calls" if counts["tool_calls"] else ""
    print(f"eval: {counts['prompts']} held-out prompts{calls}, {counts['pairs']} held-out pairs "
          f"({runtime:.1f}s; {out / 'results.json'})")
    print(table(results))
    if bench:
        print(summary)
    card_path = card.write_card(cfg, results, table(results))
    if card_path:
        log.info("eval: model card in %s", card_path)
    runs.finish_stage(cfg, "eval", {"results": str(out / "results.json"), "counts": counts, "files": data["files"],
                                    "runtime": round(runtime, 3), "beta": _betas(cfg, results),
                                    "merge": inputs["stages"]["merge"]}, inputs)
    return out


def _harness(cfg: DictConfig, refs: dict, data: dict, tokenizer):
    """lm-eval beside eval (mistral_tune/evaluation/harness.py), prepared; None without eval.harness."""
    if not cfg.eval.harness:
        return None
    from mistral_tune.evaluation.harness import Harness

    bench = Harness(cfg, refs)
    bench.prepare(data["prompts"], tokenizer)
    return bench


def _harness_only(cfg: DictConfig, refs: dict) -> None:
    """eval is up to date and eval.harness asks for results: run only those missing, rewrite the card."""
    run_dir = RunDir.of(cfg)
    log.info("eval: results.json is up to date (reused); running only the harness's missing results")
    tokenizer = load_tokenizer(run_dir.tokenizer)
    bench = _harness(cfg, refs, load_eval_data(cfg, ChatFormat.load(run_dir, "eval")), tokenizer)
    with tracking.tracked(cfg, "eval") as report_to:
        bench.evaluate_rest(tokenizer, lambda ref: load_policy(cfg, ref, inference=True).to(_device()))
        summary = bench.finish(report_to)
    print(summary)
    results = json.loads((runs.stage_dir(cfg, "eval") / "results.json").read_text())
    card.write_card(cfg, results, table(results))


def _log_wandb(results: dict) -> None:
    import wandb

    columns = ["model", *COLUMNS]
    metrics = wandb.Table(columns=columns, data=[[n, *(r.get(c) for c in COLUMNS)] for n, r in results.items()])
    samples = wandb.Table(columns=["model", "prompt", "reference", "generation", "correct"],
                          data=[[n, s["prompt"], s["reference"], s["generation"], s["correct"]]
                                for n, r in results.items() for s in r.get("samples", [])])
    flat = {f"eval/{n}/{c}": r[c] for n, r in results.items() for c in COLUMNS if r.get(c) is not None}
    wandb.log({"eval/results": metrics, "eval/samples": samples, **flat})
    wandb.run.summary.update(flat)
