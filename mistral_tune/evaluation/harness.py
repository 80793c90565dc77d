"""lm-evaluation-harness beside eval (`eval.harness=[task, ...]`): the field's own scorer on every model.

EleutherAI's lm-eval runs in this process (`lm_eval.simple_evaluate` on an `HFLM` wrapping the model
eval already loaded, the run's tokenizer, `eval.batch_size`, the model's device) on each model eval
scores and on run_dir/merged. Tasks are lm-eval's own (hub datasets, or their local cache) and
`mistral_tune_bundled` (lm_eval_tasks/ next to this file): the held-out chats eval generates from,
written per run to run_dir/eval/harness/mistral_tune_bundled.jsonl, each prompt rendered by the
run tokenizer's chat template (the ids eval generates from; `prompt_mismatches` counts any that
differ) and its target the answer eval's checker accepts, so lm-eval's exact_match and eval's
task_score are two scorers of the same greedy generations (tool-call probes aside: they are
scored by parsing the calls, which exact match cannot).

Results: run_dir/eval/harness.json ({"models": {model: {"tasks": {task: {"metrics": {"metric,filter":
{"value", "stderr"}}, "subtasks", "samples", "key", ...}}}}, "skipped": {task: reason}}), the
bundled task's generations (harness/<model>.samples.jsonl), a table, the model card, W&B. Each
(model, task) is kept under a key of the model, the task's settings and data; a rerun computes
only what is missing or stale, so adding a task to a finished eval runs that task alone. A hub task
whose dataset cannot be had (offline and not cached) is one line and skipped; eval goes on.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from omegaconf import DictConfig

from mistral_tune import runs
from mistral_tune.config import fingerprint, to_container
from mistral_tune.datasets import tasks as bundled_tasks
from mistral_tune.errors import UserError
from mistral_tune.evaluation.report import BUNDLED, RESULTS, log_wandb, table
from mistral_tune.runs import RunDir

log = logging.getLogger("mistral_tune")

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"


# ---------------------------------------------------------------- tasks: install, names, data


def lm_eval_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        raise UserError("eval.harness needs EleutherAI's lm-evaluation-harness, which is not installed",
                        hint='pip install -e ".[eval]" (or scripts/install_lm_eval.sh)') from None


@functools.lru_cache(maxsize=None)
def task_manager(hub: bool, data_file: str | None = None):
    """lm-eval's TaskManager: the bundled task alone (include_path = lm_eval_tasks/, its rows from
    `data_file`), or lm-eval's own tasks (indexing them takes seconds, so only when asked)."""
    from lm_eval.tasks import TaskManager

    if hub:
        return TaskManager()
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_file": data_file})


def check_tasks(names: list[str]) -> None:
    """Before any work: lm-eval installed and every name a task, group or tag it knows."""
    lm_eval_version()
    hub = [n for n in names if n != BUNDLED]
    if not hub:
        return
    known = task_manager(True).all_tasks
    for name in hub:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise UserError(f"eval.harness: lm-eval has no task, group or tag {name!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""),
                            hint="`lm_eval ls tasks` lists them; mistral_tune_bundled is this run's held-out chats")


def accepted_answer(prompt: dict) -> str:
    """The answer eval's `score` accepts for a prompt: the bundled task's correct answer where the
    question is one of them, else the reference reply (both compared whitespace-stripped)."""
    if prompt.get("task") is None:
        try:
            return bundled_tasks.expected(bundled_tasks.task_of(prompt["user"]), prompt["user"])
        except ValueError:
            pass
    return prompt["reference"].strip()


def bundled_rows(prompts: list[dict], tokenizer) -> list[dict]:
    """The task's rows: each eval prompt rendered by the run tokenizer's chat template (BOS written
    by the template), its ids as eval encodes them, and the accepted answer."""
    rows = []
    for p in prompts:
        messages = p["messages"]
        text = tokenizer.apply_chat_template(messages, tools=messages[0].get("tools"), tokenize=False,
                                             add_generation_prompt=True)
        rows.append({"prompt": text, "target": accepted_answer(p), "user": p["user"],
                     "task": p.get("task") or _task_name(p["user"]), "ids": p["ids"]})
    return rows


def _task_name(user: str) -> str:
    try:
        return bundled_tasks.task_of(user)
    except ValueError:
        return "other"


# ---------------------------------------------------------------- the Hub, offline


def _offline_set() -> bool:
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextlib.contextmanager
def hub_mode(probe_timeout: float = 5.0):
    """Yield True when datasets must come from the cache. Not set offline: one quick probe of the
    Hub; unreachable, datasets and huggingface_hub go offline for the harness (else each missing
    dataset is ~25 s of retries and a screen of warnings before the same error)."""
    if _offline_set():
        yield True
        return
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=probe_timeout).close()
        yield False
        return
    except urllib.error.HTTPError:
        yield False  # it answered
        return
    except (urllib.error.URLError, OSError) as err:
        log.info("harness: the Hub (%s) is unreachable (%s): lm-eval tasks use cached datasets only",
                 constants.ENDPOINT, getattr(err, "reason", err))
    import datasets

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def load_tasks(names: list[str], manager, offline: bool) -> tuple[dict, dict[str, str]]:
    """({name: [Task or Group objects]}, {name: why skipped}). Each name is loaded by itself, so
    one task without its dataset skips that task alone."""
    loaded, skipped = {}, {}
    for name in names:
        try:
            with _lm_eval_logging():
                built = manager.load([name])
        except (ConnectionError, FileNotFoundError) as err:  # datasets' offline and not-found errors
            skipped[name] = ("needs its dataset; it is not in the cache" if offline
                             else f"could not load its dataset ({str(err).splitlines()[0][:200]})")
            log.warning("harness: task %s %s: skipped", name, skipped[name])
            continue
        groups, leaves = built.get("groups") or {}, built["tasks"]
        loaded[name] = [groups[name]] if name in groups else list(leaves.values())
    return loaded, skipped


# ---------------------------------------------------------------- running lm-eval


class _Quiet(logging.Filter):
    """lm-eval warns that a model object was passed in and that an instruct model runs without a
    chat template: both are what we mean here."""

    NOISE = ("is not of type `str`", "already-initialized model", "appears to be an instruct",
             "specified through cli",  # gen_kwargs: eval.max_new_tokens, set on purpose
             "Custom kwargs can be passed")  # the bundled task's rows come through its metadata

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


@contextlib.contextmanager
def _lm_eval_logging():
    logger = logging.getLogger("lm_eval")
    level, quiet = logger.level, _Quiet()
    logger.setLevel(logging.WARNING)
    handlers = [h for h in logging.getLogger().handlers + logger.handlers]
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield
    finally:
        logger.setLevel(level)
        for h in handlers:
            h.removeFilter(quiet)


def _metrics(result: dict) -> dict:
    """{"metric,filter": {"value", "stderr"}} of one lm-eval results entry."""
    out = {}
    for key, value in result.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        stderr = result.get(f"{metric}_stderr,{filt}")
        out[key] = {"value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else None}
    return out


def _leaves(items: list) -> list[str]:
    from lm_eval.api.group import Group

    names = []
    for item in items:
        if isinstance(item, Group):
            names += [t.task_name for t in item.get_all_tasks()] + [g.name for g in item.get_all_groups()]
        else:
            names.append(item.task_name)
    return names


def run_lm_eval(lm, items: dict[str, list], *, manager, limit, num_fewshot, chat_template: bool,
                gen_kwargs: dict | None = None, log_samples: bool = False) -> tuple[dict, dict]:
    """simple_evaluate on the loaded tasks: ({name: entry}, {task: lm-eval's logged samples})."""
    import lm_eval

    flat = [obj for objs in items.values() for obj in objs]
    with _lm_eval_logging():  # the caller's too (nested: the level and filters come back in order)
        res = lm_eval.simple_evaluate(model=lm, tasks=flat, task_manager=manager, limit=limit,
                                      num_fewshot=num_fewshot, apply_chat_template=chat_template,
                                      fewshot_as_multiturn=chat_template, gen_kwargs=gen_kwargs,
                                      log_samples=log_samples)
    results, counts = res["results"], res.get("n-samples", {})
    out = {}
    for name, objs in items.items():
        subs = [n for n in _leaves(objs) if n != name and n in results]
        out[name] = {"metrics": _metrics(results.get(name, {})),
                     "subtasks": {n: _metrics(results[n]) for n in subs},
                     "samples": sum(counts.get(n, {}).get("effective", 0) for n in [name, *subs])}
    return out, res.get("samples", {}) if log_samples else {}


# ---------------------------------------------------------------- the harness of one eval run


class Harness:
    """`prepare` once (names, datasets, the bundled rows), `evaluate` each loaded model, `finish`."""

    def __init__(self, cfg: DictConfig, refs: dict[str, dict]):
        self.cfg, self.names = cfg, list(cfg.eval.harness)
        self.out = runs.stage_dir(cfg, "eval")
        self.path = self.out / RESULTS
        self.version = lm_eval_version()
        self.record = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.record.setdefault("models", {})
        self.models = self._models(refs)
        self.identity = {name: fingerprint({"model": ref, "stage": _stage_key(cfg, name)})
                         for name, ref in self.models.items()}
        self.loaded: dict[str, list] = {}
        self.skipped: dict[str, str] = {}
        self.data_file = self.out / "harness" / f"{BUNDLED}.jsonl"
        self.mismatches: int | None = None
        self.timings: dict[str, float] = {}

    def _models(self, refs: dict[str, dict]) -> dict[str, dict]:
        run_dir = RunDir.of(self.cfg)
        every = dict(refs)
        if (run_dir.merged / "config.json").exists() and runs.read_manifest(self.cfg, "merge"):
            every["merged"] = {"base": str(run_dir.merged), "adapters": []}
        wanted = self.cfg.eval.harness_models
        if wanted is None:
            return every
        unknown = set(wanted) - set(every)
        if unknown:
            raise UserError(f"eval.harness_models: {sorted(unknown)} not in this run; choose from {', '.join(every)}")
        return {k: v for k, v in every.items() if k in wanted}

    def prepare(self, prompts: list[dict], tokenizer) -> None:
        check_tasks(self.names)
        if BUNDLED in self.names:
            if not prompts:
                self.skipped[BUNDLED] = "no held-out prompts to generate from (eval.files gives none)"
                log.warning("harness: task %s: %s: skipped", BUNDLED, self.skipped[BUNDLED])
            else:
                rows = bundled_rows(prompts, tokenizer)
                runs.atomic_write_text(self.data_file, "".join(json.dumps(r) + "\n" for r in rows))
                self.loaded.update(load_tasks([BUNDLED], task_manager(False, str(self.data_file)), offline=True)[0])
        hub = [n for n in self.names if n != BUNDLED]
        if hub:
            with hub_mode() as offline:
                loaded, skipped = load_tasks(hub, task_manager(True), offline)
            self.loaded.update(loaded)
            self.skipped.update(skipped)

    def key(self, model: str, task: str, chat: bool) -> str:
        e = self.cfg.eval
        data = {}
        if task == BUNDLED:
            data = {"rows": hashlib.sha256(self.data_file.read_bytes()).hexdigest(), "max_new_tokens": e.max_new_tokens}
        return fingerprint({"model": self.identity[model], "task": task, "limit": e.harness_limit,
                            "num_fewshot": None if task == BUNDLED else e.harness_num_fewshot,
                            "chat_template": chat, "lm_eval": self.version, **data})

    def chat_template(self, model: str) -> bool:
        setting = self.cfg.eval.harness_chat_template
        return model != "base" if setting is None else bool(setting)

    def missing(self, model: str) -> list[str]:
        """The loaded tasks this model has no up-to-date result for."""
        done = self.record["models"].get(model, {}).get("tasks", {})
        chat = self.chat_template(model)
        return [t for t in self.loaded
                if done.get(t, {}).get("key") != self.key(model, t, chat and t != BUNDLED)]

    def evaluate(self, name: str, model, tokenizer, position: str = "") -> None:
        todo = self.missing(name)
        if not todo:
            log.info("harness: %s: %s up to date, reused", name, ", ".join(self.loaded) or "nothing to run")
            return
        from lm_eval.models.huggingface import HFLM

        start = time.perf_counter()
        log.info("harness: %s%s: %s", name, f" ({position})" if position else "", ", ".join(todo))
        with _lm_eval_logging():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.cfg.eval.batch_size)
        entry = self.record["models"].setdefault(name, {})
        if entry.get("identity") != self.identity[name]:  # another model under this name: old results go
            entry.clear()
            entry.update(identity=self.identity[name], model=self.models[name], tasks={})
        e, chat = self.cfg.eval, self.chat_template(name)
        if BUNDLED in todo:
            if self.mismatches is None:
                self.mismatches = _prompt_mismatches(lm, self.data_file)
            done, samples = run_lm_eval(lm, {BUNDLED: self.loaded[BUNDLED]}, manager=task_manager(False, str(self.data_file)),
                                        limit=e.harness_limit, num_fewshot=None, chat_template=False,
                                        gen_kwargs={"max_gen_toks": e.max_new_tokens}, log_samples=True)
            done[BUNDLED].update(prompt_mismatches=self.mismatches)
            self._write_samples(name, samples.get(BUNDLED, []))
            self._store(name, done, chat=False)
        hub = {t: self.loaded[t] for t in todo if t != BUNDLED}
        if hub:
            with hub_mode():
                done, _ = run_lm_eval(lm, hub, manager=task_manager(True), limit=e.harness_limit,
                                      num_fewshot=e.harness_num_fewshot, chat_template=chat)
            self._store(name, done, chat=chat)
        self.timings[name] = time.perf_counter() - start
        log.info("harness: %s done in %.1fs", name, self.timings[name])
        runs.write_json(self.path, self._snapshot())  # a long harness run keeps what it finished

    def _store(self, model: str, done: dict, chat: bool) -> None:
        tasks = self.record["models"][model]["tasks"]
        for task, result in done.items():
            tasks[task] = {**result, "key": self.key(model, task, chat), "chat_template": chat,
                           "limit": self.cfg.eval.harness_limit, "lm_eval": self.version}

    def _write_samples(self, model: str, samples: list[dict]) -> None:
        rows = [{"user": s["doc"]["user"], "target": s["target"], "generation": s["filtered_resps"][0],
                 "exact_match": s.get("exact_match")} for s in samples]
        runs.atomic_write_text(self.out / "harness" / f"{model}.samples.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    def _snapshot(self) -> dict:
        return {"lm_eval": self.version, "models": self._current(), "skipped": self.skipped}

    def _current(self) -> dict:
        """The stored results still of the model that has their name now: those of a stage redone
        since, or of a model no longer in the run, go (the card would publish them as this run's)."""
        keep = {}
        for name, entry in self.record["models"].items():
            identity = self.identity.get(name) or fingerprint({"model": entry.get("model"),
                                                               "stage": _stage_key(self.cfg, name)})
            if entry.get("identity") == identity:
                keep[name] = entry
            else:
                log.info("harness: %s's stored results were of another model; dropped", name)
        return keep

    def evaluate_rest(self, tokenizer, load, done: tuple[str, ...] = ()) -> None:
        """The models not evaluated yet (merged; every model when eval itself was up to date) that
        have a task to run, each loaded by `load(ref)` and let go after."""
        todo = [n for n in self.models if n not in done and self.missing(n)]
        if not self.loaded:
            log.warning("harness: no task to run")
        elif not todo and not done:
            log.info("harness: every result is up to date, reused (%s; delete it to redo)", self.path)
        for i, name in enumerate(todo):
            model = load(self.models[name])
            self.evaluate(name, model, tokenizer, f"{i + 1}/{len(todo)}")
            del model

    def finish(self, report_to: list[str]) -> str:
        """Write harness.json and log W&B; the summary and table to print."""
        record = self._snapshot()
        runs.write_json(self.path, record)
        lines = [f"harness: lm-eval {self.version}, {len(self.loaded)} task(s) on {len(self.models)} model(s) "
                 f"({sum(self.timings.values()):.1f}s; {self.path})"]
        shown = table(record, self.names)
        if shown:
            lines.append(shown)
        if report_to and shown:
            log_wandb(record, self.names)
        return "\n".join(lines)


def _stage_key(cfg: DictConfig, name: str) -> object:
    """What a model under this name was made by: its stage's fingerprint, or the base model's config."""
    if name == "base":
        return to_container(cfg.model)
    manifest = runs.read_manifest(cfg, "merge" if name == "merged" else name)
    if manifest is None:  # DPO rounds >= 2 live in run_dir/rounds/<r>
        from mistral_tune.stages import rounds

        manifest = rounds.finished(cfg).get(name)
    return (manifest or {}).get("fingerprint")


def _prompt_mismatches(lm, data_file: Path) -> int:
    """Rows whose prompt, as lm-eval encodes it, is not the ids eval generates from (0 for the
    Mistral formats: the template writes BOS, lm-eval sees it and adds none)."""
    rows = [json.loads(line) for line in data_file.read_text().splitlines() if line.strip()]
    bad = sum(lm.tok_batch_encode([r["prompt"]])[0][0].tolist() != r["ids"] for r in rows)
    if bad:
        log.warning("harness: %d of %d %s prompts are encoded by lm-eval to other ids than eval's (control "
                    "strings in message content?): those rows are not the same prompts", bad, len(rows), BUNDLED)
    return bad
