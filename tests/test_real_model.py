"""A real (local) checkpoint gets real defaults: its own format, LoRA, the Zephyr recipe's values,
a max_length from its context; the tiny model keeps its demo defaults (issue 11)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import load_from_disk

from mistral_tune import cli
from mistral_tune.config import compose
from mistral_tune.errors import UserError
from mistral_tune.formats import templates
from mistral_tune.formats.chat_format import ChatFormat
from mistral_tune.formats.tokenizer import build_hf_tokenizer
from mistral_tune.runs import RunDir
from tests.helpers import tiny_mistral

WORDS = ("the model reads a long answer about rivers mountains history music and code while "
         "every sentence keeps going with ordinary words of many kinds").split()


def make_checkpoint(folder: Path, template: str = "mistral_v3", context: int = 32768) -> Path:
    """A tiny MistralForCausalLM with the full vocabulary of `template`, saved with the HF
    tokenizer converted from mistral-common's file: a stand-in for a local Mistral checkpoint."""
    tok = build_hf_tokenizer(template)
    model = tiny_mistral(vocab_size=len(tok), sliding_window=None, max_position_embeddings=context)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


def long_chats(path: Path, n: int = 20, seed: int = 0) -> Path:
    """n ordinary chats of 300-1500 words (two or three turns each)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            total = rng.randint(300, 1500)
            turns = rng.choice([1, 2])
            messages = []
            for t in range(turns):
                words = total // turns
                messages.append({"role": "user", "content": f"Question {i}.{t}: " + " ".join(rng.choices(WORDS, k=words // 5))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=words - words // 5))})
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture(scope="module")
def v3_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "mistral-v3-local")


def test_a_local_checkpoint_gets_the_real_defaults(v3_checkpoint, tmp_path):
    chats = long_chats(tmp_path / "chats.jsonl")
    cfg = compose([f"model.name_or_path={v3_checkpoint}", f"sft.data.files=[{chats}]", "logger=none"])
    assert ChatFormat.resolve(cfg) == ChatFormat("mistral_v3", "mistral_v3")
    assert cfg.model.default_peft == "lora" and cfg.peft.method == "auto"
    # configs/model/pretrained.yaml: the Zephyr QLoRA recipe's values, none of tiny.yaml's
    assert cfg.sft.trainer.learning_rate == 2.0e-4 and cfg.sft.trainer.num_train_epochs == 1
    assert cfg.sft.trainer.lr_scheduler_type == "cosine" and cfg.sft.trainer.warmup_steps == 0.1
    assert cfg.dpo.trainer.learning_rate == 5.0e-6 and cfg.dpo.trainer.beta == 0.01
    assert cfg.sft.data.max_length == 4096  # min(32768 positions, max_length_cap 4096)
    assert cfg.dpo.data.max_length == 256  # dpo still reads the bundled pairs
    # full fine-tuning takes the full recipes' rates
    full = compose([f"model.name_or_path={v3_checkpoint}", "peft=none"])
    assert full.sft.trainer.learning_rate == 2.0e-5 and full.dpo.trainer.learning_rate == 5.0e-7
    # a short context caps max_length below the cap
    short = make_checkpoint(tmp_path / "short", context=1024)
    assert compose([f"model.name_or_path={short}", f"sft.data.files=[{chats}]"]).sft.data.max_length == 1024


def test_the_tiny_model_keeps_its_demo_defaults():
    cfg = compose([])
    assert cfg.model.name_or_path is None and cfg.model.default_peft == "none"
    assert cfg.sft.trainer.learning_rate == 3.0e-3 and cfg.sft.trainer.num_train_epochs == 8
    assert cfg.sft.data.max_length == 256 and cfg.dpo.data.max_length == 256
    assert ChatFormat.resolve(cfg) == ChatFormat("mistral_v1", "mistral_v1")


def test_bundled_max_length_does_not_apply_to_user_data(tmp_path):
    chats = long_chats(tmp_path / "chats.jsonl", n=2)
    cfg = compose([f"sft.data.files=[{chats}]"])
    assert cfg.sft.data.max_length == 2048  # the tiny model's max_position_embeddings
    assert cfg.dpo.data.max_length == 256  # still the bundled pairs
    assert compose([f"sft.data.files=[{chats}]", "sft.data.max_length=300"]).sft.data.max_length == 300


@pytest.mark.parametrize("template", ["mistral_v1", "mistral_v3", "mistral_v7"])
def test_the_vocabulary_is_read_from_the_checkpoint(template, tmp_path):
    ckpt = make_checkpoint(tmp_path / template, template)
    cfg = compose([f"model.name_or_path={ckpt}"])
    assert ChatFormat.resolve(cfg) == ChatFormat(template, template)
    chatml = compose([f"model.name_or_path={ckpt}", "template=chatml"])
    assert ChatFormat.resolve(chatml) == ChatFormat("chatml", template)  # chatml over the checkpoint's ids


def test_a_template_of_another_vocabulary_is_refused(v3_checkpoint):
    cfg = compose([f"model.name_or_path={v3_checkpoint}", "template=mistral_v1"])
    with pytest.raises(UserError, match="mistral_v1 vocabulary.*has the mistral_v3 vocabulary"):
        ChatFormat.resolve(cfg)


def test_tekken_and_foreign_vocabularies_are_refused(tmp_path):
    tekken = tmp_path / "tekken"
    tekken.mkdir()
    (tekken / "tekken.json").write_text("{}")
    with pytest.raises(UserError, match="Tekken"):
        ChatFormat.resolve(compose([f"model.name_or_path={tekken}"]))
    # a v3-sized vocabulary whose pieces are not mistral-common's
    other = make_checkpoint(tmp_path / "other", "mistral_v3")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "▁the", "▁of"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="differ from mistral-common"):
        ChatFormat.resolve(compose([f"model.name_or_path={other}"]))


def test_uncached_hub_id_says_so_without_downloading():
    cfg = compose(["model.name_or_path=nobody-here/not-a-model-xyz"])
    assert cfg.model.default_peft == "lora" and cfg.sft.trainer.learning_rate == 2.0e-4
    with pytest.raises(UserError, match="not in the Hugging Face cache"):
        ChatFormat.resolve(cfg)


def test_long_chats_on_a_local_v3_checkpoint_all_kept_and_trained(v3_checkpoint, tmp_path, caplog):
    chats = long_chats(tmp_path / "chats.jsonl")
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"model.name_or_path={v3_checkpoint}", f"sft.data.files=[{chats}]",
            "logger=none", "stages=[sft]", "sft.trainer.max_steps=2", "sft.trainer.per_device_train_batch_size=2",
            "sft.trainer.gradient_accumulation_steps=1", "sft.trainer.activation_checkpointing=false",
            ]
    with caplog.at_level("INFO", logger="mistral_tune"):
        assert cli.main(["sft", *args]) == 0
    rd = RunDir(run)
    report = json.loads((rd.data("sft") / "report.json").read_text())
    assert report["read"] == 20 and report["kept"] == 20 and report["too_long"] == 0, report
    assert report["template"] == "mistral_v3" and report["length"]["max"] > 1000
    assert json.loads(rd.chat_format.read_text()) == {"template": "mistral_v3", "vocab": "mistral_v3"}
    metrics = json.loads((rd.stage("sft") / "manifest.json").read_text())
    assert metrics["model"]["adapters"], "LoRA: the stage leaves an adapter on the checkpoint"
    assert metrics["model"]["base"] == str(v3_checkpoint)
    assert (rd.stage("sft") / "adapter_config.json").exists()
    log = caplog.text
    assert "resolved defaults" in log and "mistral_v3" in log and "[INST] is a control token" in log
    # the stage trained the v3 ids: the dataset's first row equals mistral-common's encoding
    row = json.loads(chats.read_text().splitlines()[0])
    first = load_from_disk(str(rd.dataset("sft")))[0]["input_ids"]
    assert first == templates.encode_chat(row["messages"], "mistral_v3").input_ids


# --- eval on the user's own data: a seeded held-out split, decontaminated against training ------


def short_chats(path: Path, n: int, repeats: int = 0) -> Path:
    """n chats with distinct questions; the first `repeats` questions are asked twice (other replies)."""
    rows = [{"messages": [{"role": "user", "content": f"Tell me fact number {i} about rivers."},
                          {"role": "assistant", "content": f"Fact {i}: rivers carry water {i % 7} ways."}]}
            for i in range(n)]
    rows += [{"messages": [rows[i]["messages"][0], {"role": "assistant", "content": f"Another reply {i}."}]}
             for i in range(repeats)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prefs(path: Path, n: int) -> Path:
    rows = [{"prompt": f"Which river is number {i}?", "chosen": f"River {i}.", "rejected": "No idea."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_data_is_split_for_eval_and_decontaminated(tmp_path):
    chats = short_chats(tmp_path / "chats.jsonl", 200, repeats=200)  # every question asked twice
    pairs = prefs(tmp_path / "pairs.jsonl", 120)
    run = tmp_path / "run"
    args = [f"run_dir={run}", f"sft.data.files=[{chats}]", f"dpo.data.files=[{pairs}]", "logger=none"]
    assert cli.main(["data", *args]) == 0
    rd = RunDir(run)
    report = json.loads((rd.data("sft") / "report.json").read_text())
    held = [json.loads(line) for line in (rd.data("sft") / "eval.jsonl").read_text().splitlines()]
    assert len(held) == 10 == report["held_out"]["rows"]  # 5% of 200 distinct prompts
    # each held-out question's two rows (the held-out one and the other reply) left training
    assert report["decontaminated"] == 20 and report["kept"] == 380 and report["read"] == 400
    held_questions = {r["messages"][0]["content"] for r in held}
    rejects = [json.loads(line) for line in (rd.data("sft") / "rejects.jsonl").read_text().splitlines()]
    assert len([r for r in rejects if "held out for evaluation" in r["reason"]]) == 20
    from mistral_tune.formats.tokenizer import load_tokenizer

    tok = load_tokenizer(rd.tokenizer)
    trained_text = "\n".join(tok.decode(r["input_ids"]) for r in load_from_disk(str(rd.dataset("sft"))))
    assert not any(q in trained_text for q in held_questions)  # no held-out prompt trains
    # seeded: the same split again, another seed another split
    again = tmp_path / "again"
    assert cli.main(["data", f"run_dir={again}", *args[1:]]) == 0
    assert (RunDir(again).data("sft") / "eval.jsonl").read_text() == (rd.data("sft") / "eval.jsonl").read_text()
    other = tmp_path / "other"
    assert cli.main(["data", f"run_dir={other}", *args[1:], "seed=7"]) == 0
    assert (RunDir(other).data("sft") / "eval.jsonl").read_text() != (rd.data("sft") / "eval.jsonl").read_text()
    # preference pairs: 6 of 120 held out, readable by eval as pairs
    assert json.loads((rd.data("dpo") / "report.json").read_text())["held_out"]["rows"] == 6
    from mistral_tune.stages import evaluate
    from mistral_tune.stages.data import eval_files

    cfg = compose(args)
    assert eval_files(cfg, "sft") == ([str(rd.data("sft") / "eval.jsonl")], "held_out")
    data = evaluate.load_eval_data(cfg, ChatFormat.load(rd, "test"))
    assert len(data["loss"]) == 10 and len(data["pairs"]) == 12 and data["prompts"] == []  # no generation


def test_bundled_eval_files_only_with_bundled_data(tmp_path):
    from mistral_tune.stages.data import eval_files

    cfg = compose([])
    assert [Path(f).name for f in eval_files(cfg, "sft")[0]] == ["eval_sft.jsonl"]
    assert [Path(f).name for f in eval_files(cfg, "dpo")[0]] == ["eval_dpo.jsonl"]
    tools = compose(["template=mistral_v3", "sft.data.files=[data/tools_sft.jsonl]"])
    assert [Path(f).name for f in eval_files(tools, "sft")[0]] == ["eval_tools.jsonl"]  # its own held-out chats
    both = compose(["template=mistral_v3", "sft.data.files=[data/sft.jsonl,data/tools_sft.jsonl]"])
    assert [Path(f).name for f in eval_files(both, "sft")[0]] == ["eval_sft.jsonl", "eval_tools.jsonl"]
    chats = short_chats(tmp_path / "c.jsonl", 3)
    mine = compose([f"sft.data.files=[{chats}]", f"run_dir={tmp_path / 'r'}"])
    assert eval_files(mine, "sft") == ([], "none")  # not built yet / too small: never the bundled set
    assert compose([f"sft.data.files=[{chats}]", "eval.files=[x.jsonl]"]).eval.files == ["x.jsonl"]


def test_small_user_data_is_not_split(tmp_path):
    chats = long_chats(tmp_path / "chats.jsonl", n=20)
    run = tmp_path / "run"
    assert cli.main(["data", f"run_dir={run}", f"sft.data.files=[{chats}]", "stages=[sft]", "logger=none"]) == 0
    report = json.loads((RunDir(run).data("sft") / "report.json").read_text())
    assert report["kept"] == 20 and "held_out" not in report
    assert not (RunDir(run).data("sft") / "eval.jsonl").exists()


def test_pipeline_on_user_data_evaluates_the_split_and_cards_it(tmp_path):
    """Local v1 checkpoint, chatml, user chats: eval on the held-out split (perplexity, no task
    score), a card with the base model's license and no mistral-common claim for chatml."""
    ckpt = make_checkpoint(tmp_path / "ckpt", "mistral_v1", context=512)
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a base model\n")
    chats = short_chats(tmp_path / "chats.jsonl", 120)
    run = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run}", f"model.name_or_path={ckpt}", "template=chatml",
                     f"sft.data.files=[{chats}]", "stages=[sft]", "logger=none", "sft.trainer.max_steps=2",
                     "sft.trainer.activation_checkpointing=false", "eval.batch_size=8"]) == 0
    rd = RunDir(run)
    results = json.loads((rd.stage("eval") / "results.json").read_text())
    assert set(results) == {"base", "sft"}
    for r in results.values():
        assert r["eval_loss"] > 0 and r["perplexity"] > 1 and "task_score" not in r
    card_text = (rd.merged / "README.md").read_text()
    assert "license: apache-2.0" in card_text and "token-exact" not in card_text
    assert "sft/eval.jsonl (held-out split of the training data)" in card_text
    assert "task_score`:" not in card_text and "chats.jsonl" in card_text


def test_a_stage_may_train_its_own_adapter_shape():
    from mistral_tune.training.modeling import lora_config

    cfg = compose(["experiment=zephyr_7b_beta_qlora"])
    assert (lora_config(cfg, "sft").r, lora_config(cfg, "sft").lora_alpha) == (16, 16)  # sft/config_qlora.yaml
    assert (lora_config(cfg, "dpo").r, lora_config(cfg, "dpo").lora_alpha) == (128, 128)  # dpo/config_qlora.yaml
    with pytest.raises(UserError, match="dpo.peft: unknown key"):
        lora_config(compose(["+dpo.peft.rank=8"]), "dpo")
