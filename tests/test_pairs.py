"""The `pairs` stage (pairs=onpolicy): sampling, verifiers, pairing, determinism, and the pairs file
as input of the data stage. A tiny random Mistral base and the real v1 tokenizer; seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mistral_tune.config import compose
from mistral_tune.datasets import tasks
from mistral_tune.errors import UserError
from mistral_tune.runs import RunDir
from mistral_tune.stages import data, pairs

TINY = ["model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=2",
        "model.config.head_dim=8"]


def length_reward(prompt: str, completion: str) -> float:
    """A user reward for the tests (pairs.reward=tests.test_pairs:length_reward)."""
    return float(len(completion))


def bad_reward(prompt: str, completion: str):
    return "good"


def _cfg(run_dir: Path, *extra: str):
    return compose([f"run_dir={run_dir}", "pairs=onpolicy", "stages=[dpo]", "logger=none", *TINY,
                    "pairs.max_prompts=6", "pairs.num_samples=3", "pairs.max_new_tokens=6", *extra])


def _prepare(cfg) -> None:
    """What the pipeline has made before the pairs stage: the chat format and tokenizer."""
    data.fix_chat_format(cfg, RunDir.of(cfg))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_task_checker_scores_right_and_wrong_answers(tmp_path):
    """The default verifier: one point for the right answer (tasks.check), one for the bundled rule
    (tasks.follows_rule: the answer alone, no chatter), each the plain checker's verdict."""
    score, name = pairs.verifier(_cfg(tmp_path))
    replies = ["2 + 3 = 5", "2 + 3 = 6", " 2 + 3 = 5 ", "2 + 3 = 5\nHope this helps!", "2 + 3 = 6\nAnything else?"]
    prompts = [{"messages": [{"role": "user", "content": "What is 2 + 3?"}], "user": "What is 2 + 3?",
                "reference": "2 + 3 = 5"}] * len(replies)
    assert name == "bundled task checker + rule checker"
    assert score(prompts, replies) == [2.0, 1.0, 2.0, 1.0, 0.0]
    assert score(prompts, replies) == [float(tasks.check("What is 2 + 3?", r)) + float(tasks.follows_rule("What is 2 + 3?", r))
                                       for r in replies]
    other = {"messages": [{"role": "user", "content": "Name a colour."}], "user": "Name a colour.", "reference": "Red."}
    assert score([other, other], ["Red.", "Blue."]) == [1.0, 0.0]  # exact match with the reference
    with pytest.raises(UserError, match="not a bundled task"):
        score([{**other, "reference": None}], ["Red."])


def test_best_and_worst_make_a_pair_and_ties_are_counted():
    q = [{"messages": [{"role": "user", "content": f"q{i}"}], "user": f"q{i}", "reference": None} for i in range(3)]
    completions = [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]]
    scores = [[0.0, 1.0, 0.5], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    rows, report = pairs.build_pairs(q, completions, scores)
    assert len(rows) == 1 and report["ties"] == 2 and report["pairs"] == 1
    assert report["ties_by_score"] == {"0": 1, "1": 1}
    assert rows[0]["chosen"][-1] == {"role": "assistant", "content": "b"}
    assert rows[0]["rejected"][-1] == {"role": "assistant", "content": "a"}
    assert rows[0]["chosen"][:-1] == q[0]["messages"] and rows[0]["prompt"] == "q0"
    assert report["score_histogram"] == {"0": 4, "0.5": 1, "1": 4}
    assert report["samples"] == 9 and report["chosen_mean_score"] == 1.0 and report["rejected_mean_score"] == 0.0
    assert report["mean_score"] == pytest.approx(4.5 / 9, abs=1e-4)
    assert report["empty_samples"] == 0 and report["too_few_nonempty"] == 0


def test_greedy_candidate_is_in_every_pair_and_reported():
    """With pairs.greedy the first candidate is the greedy reply: ties go to it, so it is the chosen
    reply when it is right and the rejected one when it is wrong; the report says how often a sample
    beats it (best_of_k_mean_score, greedy_beaten)."""
    q = [{"messages": [{"role": "user", "content": f"q{i}"}], "user": f"q{i}", "reference": None} for i in range(5)]
    completions = [["g0", "a", "b"], ["g1", "c", "d"], ["g2", "e", "f"], ["g3", "h", "i"], ["g4", "j", "k"]]
    scores = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.5, 1.0, 0.0]]
    rows, report = pairs.build_pairs(q, completions, scores, greedy=True)
    assert [(r["chosen"][-1]["content"], r["rejected"][-1]["content"]) for r in rows] == [
        ("a", "g0"), ("g1", "c"), ("j", "g4")]  # g4 is beaten: paired with the best, not the worst
    assert report["greedy_mean_score"] == 0.5 and report["greedy_beaten"] == 2
    assert report["best_of_k_mean_score"] == 0.8 and report["ties"] == 2
    assert "greedy_mean_score" not in pairs.build_pairs(q, completions, scores)[1]
    # an empty sample scoring above the greedy reply (a reward model may) beats nothing: it is never paired
    completions[3] = ["g3", " ", "i"]
    scores[3] = [0.0, 0.9, 0.0]
    assert pairs.build_pairs(q, completions, scores, greedy=True)[1]["greedy_beaten"] == 2


def test_empty_samples_are_scored_but_never_paired():
    """A sample that is EOS at once is a wrong answer, but an empty reply is not a valid chat row:
    the data stage would refuse the pairs file. It is counted and left out of the pairing."""
    q = [{"messages": [{"role": "user", "content": f"q{i}"}], "user": f"q{i}", "reference": None} for i in range(2)]
    rows, report = pairs.build_pairs(q, [["", "x", "y"], ["", " ", "z"]], [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    assert [r["rejected"][-1]["content"] for r in rows] == ["y"] and rows[0]["chosen"][-1]["content"] == "x"
    assert report["empty_samples"] == 3 and report["too_few_nonempty"] == 1 and report["pairs"] == 1


def test_histogram_bins_continuous_scores():
    hist = pairs.histogram([i / 100 for i in range(100)], bins=10)
    assert len(hist) == 10 and sum(hist.values()) == 100 and set(hist.values()) == {10}


def test_prompts_leave_out_the_eval_set_and_repeats(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": "x"}]}
            for u in ("What is 1 + 1?", "What is 1 + 1?", "Held out?", "What is 2 + 2?")]
    chats.write_text("".join(json.dumps(r) + "\n" for r in rows))
    held = tmp_path / "eval.jsonl"
    held.write_text(json.dumps({"messages": [{"role": "user", "content": "Held out?"},
                                             {"role": "assistant", "content": "y"}]}) + "\n")
    cfg = _cfg(tmp_path, f"pairs.prompts_files=[{chats}]", f"eval.files=[{held}]", "eval.pref_files=[]",
               "pairs.max_prompts=null")
    prompts, counts = pairs.load_prompts(cfg)
    assert [p["user"] for p in prompts] == ["What is 1 + 1?", "What is 2 + 2?"]
    assert counts == {"rows": 4, "held_out": 1, "repeated": 1, "tool_call_replies": 0}
    assert prompts[0]["messages"] == [{"role": "user", "content": "What is 1 + 1?"}] and prompts[0]["reference"] == "x"


def test_prompt_only_rows_need_no_reference_reply(tmp_path):
    """A verifier needs no answers: pairs.prompts_files may hold chats that end with the user's
    turn, or bare {"prompt": "..."} rows; a wrong layout is still a clear error."""
    prompts_file = tmp_path / "prompts.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]},
            {"prompt": "Sort these digits: 3, 1, 2"}]
    prompts_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, f"pairs.prompts_files=[{prompts_file}]", "eval.files=[]", "eval.pref_files=[]")
    prompts, counts = pairs.load_prompts(cfg)
    assert [(p["user"], p["reference"]) for p in prompts] == [("What is 3 + 4?", None), ("Sort these digits: 3, 1, 2", None)]
    assert prompts[0]["messages"][0] == {"role": "system", "content": "Be brief."}
    check, _ = pairs.verifier(cfg)
    assert check(prompts, ["3 + 4 = 7", "1, 3, 2"]) == [2.0, 1.0]  # right + rule; wrong, rule kept
    prompts_file.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(UserError, match="line 1"):
        pairs.load_prompts(cfg)


def test_bundled_prompts_exclude_every_eval_prompt(tmp_path):
    prompts, counts = pairs.load_prompts(_cfg(tmp_path, "pairs.max_prompts=null"))
    held = pairs._held_out_users(_cfg(tmp_path))
    assert held and not {p["user"].strip() for p in prompts} & held
    assert counts["rows"] == counts["held_out"] + counts["repeated"] + len(prompts)


def test_sampling_is_seeded_and_batched_like_one_prompt_at_a_time(tmp_path):
    from tests.helpers import tiny_mistral

    model = tiny_mistral(vocab_size=64, sliding_window=None)
    cfg = _cfg(tmp_path, "pairs.num_samples=4", "pairs.max_new_tokens=5", "pairs.batch_size=8")
    prompts = [[1, 5, 6, 7], [1, 9, 10], [1, 11, 12, 13, 14]]
    a = pairs.sample(model, prompts, cfg, pad_id=0, eos_id=2, seed=0)
    b = pairs.sample(model, prompts, cfg, pad_id=0, eos_id=2, seed=0)
    c = pairs.sample(model, prompts, cfg, pad_id=0, eos_id=2, seed=1)
    assert a == b and a != c
    assert [len(per) for per in a] == [4, 4, 4] and all(len(s) <= 5 and 2 not in s for per in a for s in per)
    # Greedy (temperature -> 0) samples must equal the plain unbatched greedy continuation: the
    # left padding and the per-prompt grouping of num_return_sequences are right.
    greedy = pairs.sample(model, prompts, _cfg(tmp_path, "pairs.num_samples=2", "pairs.max_new_tokens=5",
                                               "pairs.temperature=1e-6"), pad_id=0, eos_id=2, seed=0)
    for p, per in zip(prompts, greedy):
        out = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=2)
        plain = out[0, len(p):].tolist()
        plain = plain[:plain.index(2)] if 2 in plain else plain
        assert per == [plain, plain]


def test_inverse_cdf_sampling_draws_from_the_softmax_as_multinomial_does():
    """The sampler behind pairs.sample: token frequencies over many draws equal softmax(logits)
    (those of torch.multinomial, which generate(do_sample=True) uses), a -inf token is never
    drawn, and one token per row is left finite for greedy decoding to pick."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf"), 0.5]])
    probs = logits.softmax(-1)[0]
    rows = 200_000
    torch.manual_seed(0)
    out = pairs.InverseCDFSampling()(None, logits.expand(rows, -1).clone())
    assert torch.isfinite(out).sum(-1).eq(1).all()
    freq = torch.bincount(out.argmax(-1), minlength=6).double() / rows
    torch.manual_seed(0)
    plain = torch.bincount(torch.multinomial(probs.expand(rows, -1), 1)[:, 0], minlength=6).double() / rows
    assert freq[4] == 0
    # 4 standard errors of a frequency over 200k draws is under 0.0045.
    assert torch.allclose(freq, probs.double(), atol=0.0045) and torch.allclose(freq, plain, atol=0.0064)


def test_stage_writes_pairs_the_data_stage_reads_and_is_deterministic(tmp_path):
    outs = []
    for name in ("a", "b"):
        cfg = _cfg(tmp_path / name, "pairs.reward=tests.test_pairs:length_reward", "pairs.temperature=2.0")
        _prepare(cfg)
        out = pairs.run(cfg)
        outs.append((cfg, out))
    (cfg, out), (_, out_b) = outs
    assert (out / "pairs.jsonl").read_bytes() == (out_b / "pairs.jsonl").read_bytes()  # same command, same pairs
    rows, report = _rows(out / "pairs.jsonl"), json.loads((out / "report.json").read_text())
    assert report["prompts"] == 6 and report["samples"] == 18 and report["pairs"] + report["ties"] == 6
    assert report["pairs"] == len(rows) > 0 and report["verifier"] == "function tests.test_pairs:length_reward"
    for row in rows:
        assert row["score_chosen"] == len(row["chosen"][-1]["content"]) > row["score_rejected"] == len(row["rejected"][-1]["content"])
    assert json.loads((out / "manifest.json").read_text())["report"]["pairs"] == len(rows)
    # The dpo data build takes the file like any preference file (configs/pairs/onpolicy.yaml).
    manifest = data.ensure(cfg, "dpo")
    assert manifest["report"]["kept"] == len(rows) and manifest["report"]["rejected"] == 0
    # A rerun reuses the finished stage, a changed sampling setting is not silently reused.
    stamp = (out / "manifest.json").stat().st_mtime_ns
    pairs.run(cfg)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="different config"):
        pairs.run(_cfg(tmp_path / "a", "pairs.reward=tests.test_pairs:length_reward", "pairs.temperature=1.5"))


def test_stage_with_greedy_adds_the_greedy_reply_first(tmp_path):
    """pairs.greedy: each prompt gets num_samples samples plus its greedy reply, which equals eval's
    greedy generation of that prompt."""
    from mistral_tune.formats.chat_format import ChatFormat
    from mistral_tune.formats.tokenizer import load_tokenizer
    from mistral_tune.stages.evaluate import generate
    from mistral_tune.training.modeling import load_policy, start_model

    cfg = _cfg(tmp_path / "run", "pairs.reward=tests.test_pairs:length_reward", "pairs.greedy=true")
    _prepare(cfg)
    out = pairs.run(cfg)
    report = json.loads((out / "report.json").read_text())
    assert report["samples"] == 6 * 4 and report["greedy"] is True
    assert report["greedy_mean_score"] is not None and 0 <= report["greedy_beaten"] <= 6
    run_dir = RunDir.of(cfg)
    tok, fmt = load_tokenizer(run_dir.tokenizer), ChatFormat.load(run_dir, "pairs")
    model = load_policy(cfg, start_model(cfg, "dpo", tok)[0]).eval()
    prompts, _ = pairs.load_prompts(cfg)
    ids = generate(model, [fmt.encode_prompt(q["messages"]) for q in prompts], tok.pad_token_id, tok.eos_token_id,
                   cfg.pairs.max_new_tokens, 2)
    greedy = [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
    for row in _rows(out / "pairs.jsonl"):  # every pair holds the greedy reply of its prompt
        mine = greedy[[q["user"] for q in prompts].index(row["prompt"])]
        assert mine in (row["chosen"][-1]["content"], row["rejected"][-1]["content"])


def test_reward_model_scores_with_its_first_logit(tmp_path):
    from transformers import MistralConfig, MistralForSequenceClassification

    from mistral_tune.formats.tokenizer import load_tokenizer

    cfg = _cfg(tmp_path / "run")
    _prepare(cfg)
    tok = load_tokenizer(RunDir.of(cfg).tokenizer)
    torch.manual_seed(0)
    rm = MistralForSequenceClassification(MistralConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    score, name = pairs.verifier(_cfg(tmp_path / "run", f"pairs.reward_model={tmp_path / 'rm'}", "pairs.batch_size=2"))
    q = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "user": "What is 2 + 3?", "reference": None}
    completions = ["2 + 3 = 5", "2 + 3 = 6", "no idea at all"]
    got = score([q] * 3, completions)
    for c, value in zip(completions, got):  # batched and padded == one at a time, no second BOS
        ids = tok.apply_chat_template([*q["messages"], {"role": "assistant", "content": c}], tokenize=False)
        enc = tok(ids, return_tensors="pt", add_special_tokens=False)
        assert enc["input_ids"][0].tolist().count(tok.bos_token_id) == 1
        with torch.no_grad():
            assert value == pytest.approx(rm(**enc).logits[0, 0].item(), abs=1e-5)
    assert len(set(got)) == 3 and name.startswith("reward model")


def test_bad_rewards_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="both set"):
        pairs.verifier(_cfg(tmp_path, "pairs.reward=a:b", "pairs.reward_model=x"))
    with pytest.raises(UserError, match="cannot import"):
        pairs.verifier(_cfg(tmp_path, "pairs.reward=no_such_module:f"))
    score, _ = pairs.verifier(_cfg(tmp_path, "pairs.reward=tests.test_pairs:bad_reward"))
    with pytest.raises(UserError, match="must return a float"):
        score([{"messages": [], "user": "q", "reference": None}], ["a"])


@pytest.mark.slow
def test_two_processes_shard_the_prompts_and_gather_on_rank_0(tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_launch import _free_port

    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()),
                           str(repo / "tests" / "pairs_driver.py"), str(tmp_path)],
                          capture_output=True, text=True, cwd=repo, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "gather.json").read_text()) == [[i, i % 2] for i in range(7)]
    report = json.loads((tmp_path / "pairs" / "report.json").read_text())
    assert report["prompts"] == 6 and report["samples"] == 18  # every prompt sampled once, on one rank
    prompts, _ = pairs.load_prompts(_cfg(tmp_path))
    order = [p["user"] for p in prompts]
    rows = _rows(tmp_path / "pairs" / "pairs.jsonl")
    assert [order.index(r["prompt"]) for r in rows] == sorted(order.index(r["prompt"]) for r in rows)


def test_a_chat_ending_on_a_tool_result_is_named_and_held_out_by_its_question(tmp_path):
    """The prompt of a chat whose reply follows a tool result is the user's question, not the
    result: that is what the held-out check compares and what the checker scores."""
    call = {"id": "61EqJomTE", "type": "function",
            "function": {"name": "calculator", "arguments": "{\"expression\": \"312 + 8\"}"}}
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {"type": "object"}}}]
    chat = lambda q: {"tools": tools, "messages": [  # noqa: E731
        {"role": "user", "content": q}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "61EqJomTE", "content": "320"},
        {"role": "assistant", "content": "312 + 8 = 320."}]}
    chats, held = tmp_path / "chats.jsonl", tmp_path / "eval.jsonl"
    chats.write_text(json.dumps(chat("312 + 8 = ?")) + "\n" + json.dumps(chat("What is 312 + 8?")) + "\n")
    held.write_text(json.dumps(chat("312 + 8 = ?")) + "\n")
    cfg = _cfg(tmp_path, f"pairs.prompts_files=[{chats}]", f"eval.files=[{held}]", "eval.pref_files=[]",
               "pairs.max_prompts=null")
    prompts, counts = pairs.load_prompts(cfg)
    assert [p["user"] for p in prompts] == ["What is 312 + 8?"] and counts["held_out"] == 1
    assert prompts[0]["messages"][-1]["role"] == "tool" and prompts[0]["reference"] == "312 + 8 = 320."


def test_tool_chats_are_scored_as_eval_scores_them_and_their_pairs_keep_the_tools(tmp_path):
    """On tool data: the reply after a tool result is scored by exact match (as eval's
    tool_answer), not by the bundled checker its question resembles ("What is 120 - 327?" would
    go to `add`, which marks the right reply wrong and "120 + 327 = 447" right); a pairs row keeps
    the row's tools and the tool turns, and reads back through the data stage's loader as the very
    prompt that was sampled; a chat whose reply is a tool call is counted, not sampled."""
    from mistral_tune.datasets import sources

    tools = [{"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic.",
                                               "parameters": {"type": "object"}}}]

    def call(expr):
        return {"id": "61EqJomTE", "type": "function",
                "function": {"name": "calculator", "arguments": json.dumps({"expression": expr})}}

    ends_on_result = {"tools": tools, "messages": [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 120 - 327?"},
        {"role": "assistant", "content": None, "tool_calls": [call("120 - 327")]},
        {"role": "tool", "tool_call_id": "61EqJomTE", "content": "-207"},
        {"role": "assistant", "content": "120 - 327 = -207."}]}
    ends_on_task = {"tools": tools, "messages": [
        {"role": "user", "content": "What is 5 - 2?"},
        {"role": "assistant", "content": None, "tool_calls": [call("5 - 2")]},
        {"role": "tool", "tool_call_id": "61EqJomTE", "content": "3"},
        {"role": "assistant", "content": "5 - 2 = 3."},
        {"role": "user", "content": "Which is larger: 4 or 9?"},
        {"role": "assistant", "content": "The larger number is 9."}]}
    ends_on_call = {"tools": tools, "messages": [
        {"role": "user", "content": "What is 7 * 6?"},
        {"role": "assistant", "content": None, "tool_calls": [call("7 * 6")]}]}
    chats = tmp_path / "tools.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in (ends_on_result, ends_on_task, ends_on_call)))
    cfg = _cfg(tmp_path, f"pairs.prompts_files=[{chats}]", "eval.files=[]", "eval.pref_files=[]",
               "pairs.max_prompts=null")
    prompts, counts = pairs.load_prompts(cfg)
    assert counts["tool_call_replies"] == 1 and [p["user"] for p in prompts] == ["What is 120 - 327?", "Which is larger: 4 or 9?"]
    assert [p["task"] for p in prompts] == ["tool_answer", None]

    score, _ = pairs.verifier(cfg)
    candidates = [["120 - 327 = -207.", "120 + 327 = 447"], ["The larger number is 9.", "The larger number is 4."]]
    scores = [score([q] * 2, c) for q, c in zip(prompts, candidates)]
    assert scores == [[1.0, 0.0], [2.0, 1.0]]  # the reply after a tool result: exact match only, no rule point

    rows, report = pairs.build_pairs(prompts, candidates, scores)
    assert report["pairs"] == 2 and all(r["tools"] == sources.load_rows([chats], "sft").rows[0]["messages"][0]["tools"]
                                        for r in rows)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = sources.load_rows([path], "dpo", on_error="raise").rows
    assert [r["prompt"] for r in loaded] == [q["messages"] for q in prompts]  # tools on the first message, tool turns kept
    assert [(r["chosen"], r["rejected"]) for r in loaded] == [tuple(c) for c in candidates]


def test_a_user_reward_beside_the_command_imports_under_the_console_script(tmp_path):
    """`pairs.reward=my_reward:score` with my_reward.py in the current folder: the `mistral-tune`
    console script does not put that folder on sys.path (python -P runs the same way)."""
    import subprocess
    import sys

    (tmp_path / "my_reward.py").write_text("def score(prompt, completion):\n    return float(len(prompt + completion))\n")
    code = ("import sys; assert '' not in sys.path; from mistral_tune.stages.pairs import _user_function;"
            "print(_user_function('my_reward:score')([{'user': 'ab'}], ['cde']))")
    proc = subprocess.run([sys.executable, "-P", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[5.0]"
