"""lm-evaluation-harness beside eval (eval.harness): the bundled task registers offline; its prompts
are, through lm-eval's own HF model class, exactly the ids eval generates from (one BOS); its target
is what eval's checker accepts and lm-eval's exact_match agrees with that checker answer by answer;
a hub task without its dataset offline is one line; the harness keys stay out of eval's
fingerprint. The end-to-end check against task_score on a trained model is extended."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mistral_tune import runs
from mistral_tune.config import compose
from mistral_tune.datasets import tasks
from mistral_tune.errors import UserError
from mistral_tune.evaluation import harness, report
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from mistral_tune.stages import evaluate
from tests.helpers import tiny_mistral, wandb_run_summary


def need_lm_eval():
    """lm-eval is installed by CI (scripts/install_lm_eval.sh): there a missing one is a failure."""
    if importlib.util.find_spec("lm_eval") is None:
        if os.environ.get("CI"):
            pytest.fail("lm_eval is not installed: CI runs scripts/install_lm_eval.sh first")
        pytest.skip("lm_eval not installed (pip install -e '.[eval]')")


def eval_prompts(tmp_path, template: str = "mistral_v1", n: int = 40) -> list[dict]:
    """eval's own generation prompts (load_eval_data) for the bundled held-out chats."""
    cfg = compose([f"run_dir={tmp_path}", "logger=none", f"eval.max_samples={n}", f"template={template}"])
    fmt = ChatFormat.resolve(cfg)
    return evaluate.load_eval_data(cfg, fmt)["prompts"], fmt


def write_rows(tmp_path, rows) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_accepted_answer_is_the_one_evals_checker_accepts(tmp_path):
    prompts, _ = eval_prompts(tmp_path, n=200)
    rng = random.Random(0)
    assert len(prompts) == 200
    for p in prompts:
        target = harness.accepted_answer(p)
        task, right = evaluate.score(p["user"], p["reference"], target, p.get("task"))
        assert right, (p["user"], target)
        assert not evaluate.score(p["user"], p["reference"], tasks.wrong_answer(task, p["user"], rng), p.get("task"))[1]
    # not a bundled question: the reference reply, whitespace-stripped as eval compares it
    other = {"user": "Name a colour.", "reference": " Blue \n", "task": None}
    assert harness.accepted_answer(other) == "Blue" and evaluate.score(other["user"], other["reference"], "Blue")[1]


def test_bundled_task_registers_offline_from_the_package_folder(tmp_path, monkeypatch):
    need_lm_eval()
    prompts, _ = eval_prompts(tmp_path, n=12)
    rows = harness.bundled_rows(prompts, build_hf_tokenizer("mistral_v1"))
    manager = harness.task_manager(False, str(write_rows(tmp_path, rows)))
    assert harness.BUNDLED in manager.all_tasks
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    task = manager.load([harness.BUNDLED])["tasks"][harness.BUNDLED]
    assert task.config.output_type == "generate_until" and task.config.generation_kwargs["do_sample"] is False
    assert [m["metric"] for m in task.config.metric_list] == ["exact_match"]
    docs = list(task.test_docs())
    assert [d["target"] for d in docs] == [r["target"] for r in rows]
    # the context lm-eval builds is the rendered prompt, untouched (no delimiter, no stripping)
    assert task.fewshot_context(docs[0], 0) == rows[0]["prompt"]


@pytest.mark.parametrize("template", ["mistral_v1", "mistral_v3", "mistral_v7", "chatml"])
def test_prompts_through_lm_evals_hflm_are_evals_ids_with_one_bos(tmp_path, template):
    need_lm_eval()
    from lm_eval.models.huggingface import HFLM

    prompts, fmt = eval_prompts(tmp_path, template, n=40)
    tok = build_hf_tokenizer(template, fmt.vocab)
    rows = harness.bundled_rows(prompts, tok)
    assert any(len(p["messages"]) > 1 for p in prompts)  # earlier turns and system prompts are in there
    lm = HFLM(pretrained=tiny_mistral(vocab_size=len(tok)), tokenizer=tok, batch_size=4)
    bos = tok.bos_token_id
    for row, p in zip(rows, prompts):
        ids = lm.tok_batch_encode([row["prompt"]])[0][0].tolist()
        assert ids == p["ids"], (template, row["prompt"])
        assert ids[0] == bos and ids.count(bos) == 1
        assert lm.tok_encode(row["prompt"]) == p["ids"]  # the length lm-eval sorts by
    # the pitfall the check guards: the rendered prompt holds <s>, a tokenizer adding its own gives two
    doubled = tok(rows[0]["prompt"])["input_ids"]
    assert doubled[:2] == [bos, bos]
    # batched as lm-eval batches them (left-padded): each row still ends with exactly eval's ids
    ids, mask = lm.tok_batch_encode([r["prompt"] for r in rows[:8]])
    for row_ids, row_mask, p in zip(ids.tolist(), mask.tolist(), prompts[:8]):
        assert [t for t, m in zip(row_ids, row_mask) if m] == p["ids"]


def test_lm_evals_exact_match_agrees_with_evals_checker(tmp_path):
    """lm-eval's metric and filters (not our checker) on known answers: right, right with spaces
    around, wrong, empty, and right with chatter after it (the bundled rule broken, still right); the
    mean equals eval's score of the same answers."""
    need_lm_eval()
    import lm_eval
    from lm_eval.api.model import LM

    prompts, _ = eval_prompts(tmp_path, n=40)
    rows = harness.bundled_rows(prompts, build_hf_tokenizer("mistral_v1"))
    rng = random.Random(1)
    answers = {}
    for i, (row, p) in enumerate(zip(rows, prompts)):
        answers[row["prompt"]] = [row["target"], f"  {row['target']}\n", tasks.wrong_answer(row["task"], p["user"], rng),
                                  "", row["target"] + ".", row["target"] + "\nHope this helps!"][i % 6]

    class Answers(LM):
        def generate_until(self, requests, disable_tqdm=False):
            self.kwargs = requests[0].args[1]
            return [answers[r.args[0]] for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    lm = Answers()
    res = lm_eval.simple_evaluate(model=lm, tasks=[harness.BUNDLED], task_manager=harness.task_manager(
        False, str(write_rows(tmp_path, rows))), gen_kwargs={"max_gen_toks": 16})
    ours = [evaluate.score(p["user"], p["reference"], answers[r["prompt"]].strip(), p.get("task"))[1]
            for r, p in zip(rows, prompts)]
    got = harness._metrics(res["results"][harness.BUNDLED])["exact_match,answer_line"]
    assert got["value"] == pytest.approx(sum(ours) / len(ours)) and 0 < got["value"] < 1
    assert got["stderr"] > 0
    assert lm.kwargs["max_gen_toks"] == 16 and lm.kwargs["do_sample"] is False


def test_hub_task_without_its_dataset_offline_is_one_line(tmp_path, monkeypatch, caplog):
    """A task whose dataset is on the Hub and not cached, offline: skipped with one line, no
    traceback (a task of our own naming an absent hub dataset: lm-eval's index of its own tasks
    takes seconds to build; the extended test runs arc_easy through the CLI)."""
    need_lm_eval()
    import datasets
    from lm_eval.tasks import TaskManager

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "hubtask.yaml").write_text(
        "task: hubtask\ndataset_path: mistral-tune-tests/not-a-dataset\ntest_split: test\n"
        "output_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\ngeneration_kwargs: {until: [], do_sample: false}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with harness.hub_mode() as offline:
        assert offline
        with caplog.at_level(logging.WARNING, logger="mistral_tune"):
            loaded, skipped = harness.load_tasks(["hubtask"], TaskManager(include_path=str(tmp_path / "t"),
                                                                           include_defaults=False), offline)
    assert loaded == {} and skipped == {"hubtask": "needs its dataset; it is not in the cache"}
    assert [r.getMessage() for r in caplog.records] == ["harness: task hubtask needs its dataset; it is not in the cache: skipped"]


def test_missing_lm_eval_is_a_user_error(monkeypatch):
    import importlib.metadata

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", absent)
    with pytest.raises(UserError, match=r"lm-evaluation-harness.*not installed"):
        harness.check_tasks([harness.BUNDLED])


def test_harness_keys_stay_out_of_evals_fingerprint(tmp_path):
    plain = compose([f"run_dir={tmp_path}", "logger=none"])
    asked = compose([f"run_dir={tmp_path}", "logger=none", "eval.harness=[mistral_tune_bundled]", "eval.harness_limit=5"])
    assert runs.stage_key(plain, "eval") == runs.stage_key(asked, "eval")
    other = compose([f"run_dir={tmp_path}", "logger=none", "eval.max_new_tokens=8"])
    assert runs.stage_key(plain, "eval") != runs.stage_key(other, "eval")


def test_table_and_card_lines_from_a_record(tmp_path):
    record = {"lm_eval": "0.4.13", "skipped": {"arc_easy": "needs its dataset; it is not in the cache"}, "models": {
        "sft": {"tasks": {harness.BUNDLED: {"metrics": {"exact_match,none": {"value": 0.425, "stderr": 0.035}},
                                             "subtasks": {}, "samples": 200}}},
        "dpo": {"tasks": {harness.BUNDLED: {"metrics": {"exact_match,none": {"value": 0.43, "stderr": 0.035}},
                                             "subtasks": {}, "samples": 200}}}}}
    text = report.table(record)
    assert text.splitlines()[0].split() == ["task", "metric", "sft", "dpo"]
    assert "0.425 ± 0.035" in text and "0.430 ± 0.035" in text
    out = tmp_path / "eval"
    out.mkdir()
    (out / report.RESULTS).write_text(json.dumps(record))
    card = "\n".join(report.card_lines(tmp_path))
    assert "lm-evaluation-harness" in card and "0.430 ± 0.035" in card and "`arc_easy` needs its dataset" in card
    (entry,) = report.model_index_results(tmp_path)  # no merged model in the record: the last one
    assert entry["dataset"]["name"] == harness.BUNDLED and entry["metrics"][0]["value"] == 0.43


def test_stored_results_of_a_model_since_redone_or_gone_are_dropped(tmp_path):
    """harness.json keeps results across runs (only missing ones are computed): those of a stage
    redone since, or of a model no longer in the run, must not stay to be published as this run's."""
    need_lm_eval()
    cfg = compose([f"run_dir={tmp_path}", "logger=none", "eval.harness=[mistral_tune_bundled]",
                   "eval.harness_models=[sft]"])
    for stage, key in (("sft", "s1"), ("dpo", "d1"), ("merge", "m1")):
        runs.write_json(runs.stage_dir(cfg, stage) / runs.MANIFEST, {"stage": stage, "fingerprint": key})
    refs = {"sft": {"base": "b", "adapters": ["a"]}}
    bench = harness.Harness(cfg, refs)

    def entry(name, ref, key):
        return {"identity": runs.fingerprint({"model": ref, "stage": key}), "model": ref,
                "tasks": {harness.BUNDLED: {"metrics": {"exact_match,none": {"value": 0.4}}}}}

    merged = {"base": str(tmp_path / "merged"), "adapters": []}
    bench.record["models"] = {
        "sft": entry("sft", refs["sft"], "s1"),        # current (and in harness_models)
        "dpo": entry("dpo", {"base": "x"}, "d0"),       # dpo redone since (d0 -> d1)
        "merged": entry("merged", merged, "m1"),        # current, though not asked for this time
        "orpo": entry("orpo", {"base": "y"}, "o1"),     # no orpo stage in this run
    }
    assert list(bench._snapshot()["models"]) == ["sft", "merged"]


@pytest.mark.extended
def test_harness_exact_match_equals_task_score_on_a_trained_model(tmp_path):
    """A short real pipeline, then `eval eval.harness=[mistral_tune_bundled,arc_easy]` offline: the
    eval results are reused (not recomputed), lm-eval's exact_match equals task_score for every
    model, arc_easy is one line and the command exits 0; a rerun computes nothing."""
    need_lm_eval()
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    short = ["sft.trainer.max_steps=300", "dpo.trainer.max_steps=10", "eval.max_samples=60"]
    run = lambda *args: subprocess.run([sys.executable, "-m", "mistral_tune", *args, f"run_dir={tmp_path / 'run'}", *short],
                                       capture_output=True, text=True, env=env)
    proc = run("pipeline", "logger=none")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results_file = tmp_path / "run" / "eval" / "results.json"
    before = results_file.stat().st_mtime_ns
    proc = run("eval", "eval.harness=[mistral_tune_bundled,arc_easy]", "logger=wandb")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("task arc_easy needs its dataset; it is not in the cache") == 1
    assert "eval: results.json is up to date (reused)" in proc.stderr
    assert results_file.stat().st_mtime_ns == before
    results = json.loads(results_file.read_text())
    record = json.loads((tmp_path / "run" / "eval" / "harness.json").read_text())
    assert list(record["models"]) == ["base", "sft", "dpo", "merged"]
    for name in ("sft", "dpo"):
        entry = record["models"][name]["tasks"][harness.BUNDLED]
        assert entry["samples"] == 60 and entry["prompt_mismatches"] == 0
        assert abs(entry["metrics"]["exact_match,answer_line"]["value"] - results[name]["task_score"]) <= 0.01, (name, entry, results[name])
    assert results["sft"]["task_score"] >= 0.05  # answers some: the comparison means something (150 steps gave 0.017 once the held-out questions were new)
    merged = record["models"]["merged"]["tasks"][harness.BUNDLED]["metrics"]["exact_match,answer_line"]["value"]
    assert merged == record["models"]["dpo"]["tasks"][harness.BUNDLED]["metrics"]["exact_match,answer_line"]["value"]
    assert record["skipped"] == {"arc_easy": "needs its dataset; it is not in the cache"}
    card = (tmp_path / "run" / "merged" / "README.md").read_text()
    assert "lm-evaluation-harness" in card and harness.BUNDLED in card
    logged = wandb_run_summary(next((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")))
    assert any(f"harness/dpo/{harness.BUNDLED}/exact_match,answer_line" in h for h in logged["history"])
    again = run("eval", "eval.harness=[mistral_tune_bundled]", "logger=none")
    assert again.returncode == 0 and "up to date, reused" in again.stderr
    assert json.loads((tmp_path / "run" / "eval" / "harness.json").read_text())["models"] == record["models"]
    typo = run("eval", "eval.harness=[arc_eazy]", "logger=none")
    assert typo.returncode == 2 and "did you mean 'arc_easy'" in typo.stderr


def test_hub_style_task_through_the_chat_template_few_shot_as_turns(tmp_path):
    """What a hub task gets for a trained model: lm-eval renders the few-shot examples as chat turns
    with the run tokenizer's template, one BOS, through the HFLM on our model (a local JSON
    dataset stands in for the Hub one)."""
    need_lm_eval()
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"q": f"What is {i} + 1?", "a": f"{i} + 1 = {i + 1}"}) + "\n" for i in range(6)))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "qa.yaml").write_text(
        f"task: qa\ndataset_path: json\ndataset_kwargs: {{data_files: {{test: {data}}}}}\ntest_split: test\n"
        "fewshot_split: test\nnum_fewshot: 2\noutput_type: generate_until\ndoc_to_text: q\ndoc_to_target: a\n"
        "generation_kwargs: {until: [], do_sample: false, max_gen_toks: 3}\n"
        "metric_list:\n  - {metric: exact_match, aggregation: mean, higher_is_better: true}\n")
    tok = build_hf_tokenizer("mistral_v1")
    lm = HFLM(pretrained=tiny_mistral(vocab_size=len(tok)), tokenizer=tok, batch_size=2)
    manager = TaskManager(include_path=str(tmp_path / "t"), include_defaults=False)
    loaded, skipped = harness.load_tasks(["qa"], manager, offline=False)
    assert not skipped
    done, samples = harness.run_lm_eval(lm, loaded, manager=manager, limit=2, num_fewshot=None, chat_template=True,
                                        log_samples=True)
    assert done["qa"]["samples"] == 2 and "exact_match,none" in done["qa"]["metrics"]
    fmt = ChatFormat("mistral_v1", "mistral_v1")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for s in samples["qa"]:
        context = s["arguments"][0][0]
        assert context.startswith("<s>[INST]") and context.count("[INST]") == 3 and context.endswith("[/INST]")
        # the ids lm-eval feeds the model are those of the same conversation encoded as eval would
        shots = sorted((r for r in rows if f"[INST] {r['q']} [/INST]" in context and r["q"] != s["doc"]["q"]),
                       key=lambda r: context.index(r["q"]))
        turns = [m for r in shots for m in ({"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]})]
        ids = lm.tok_batch_encode([context])[0][0].tolist()
        assert len(shots) == 2 and ids == fmt.encode_prompt([*turns, {"role": "user", "content": s["doc"]["q"]}])
        assert ids.count(tok.bos_token_id) == 1
