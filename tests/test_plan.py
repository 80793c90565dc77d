"""`plan`: parameter counts on the meta device against the closed form, steps, memory formula."""

from __future__ import annotations

import math

import pytest
from transformers import MistralConfig

from mistral_tune.stages import plan
from mistral_tune.config import compose


def closed_form_mistral(c) -> int:
    """Every weight of a Mistral decoder, written out: embeddings, lm_head, per layer q/k/v/o, the
    SwiGLU MLP and two RMSNorms, and the final norm."""
    h, i, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    attn = h * h + 2 * h * kv + h * h
    return 2 * V * h + L * (attn + 3 * h * i + 2 * h) + h


def test_mistral_7b_lora_r16_all_linear_matches_closed_form(tmp_path):
    cfg = compose(["model=mistral_7b_v0_1", "peft=lora", "peft.r=16", "peft.target_modules=all-linear",
                   f"run_dir={tmp_path}"])
    config, source = plan.model_config(cfg)
    assert "MistralConfig() defaults" in source and config.vocab_size == 32000
    counts = plan.count_parameters(plan.meta_model(config, cfg, "lora"), "lora")
    assert counts["base"] == closed_form_mistral(MistralConfig()) == 7_241_732_096
    # LoRA: A (r x in) + B (out x r) on q, k, v, o, gate, up, down of every layer.
    h, i, kv, r = 4096, 14336, 1024, 16
    expected = 32 * r * ((h + h) + 2 * (h + kv) + (h + h) + 3 * (h + i))
    assert counts["trainable"] == counts["adapter"] == plan.lora_closed_form(config, 16) == expected == 41_943_040


def test_full_training_counts_every_parameter(tmp_path):
    cfg = compose([f"run_dir={tmp_path}"])  # the tiny model, trained fully
    config, _ = plan.model_config(cfg)
    counts = plan.count_parameters(plan.meta_model(config, cfg, "none"), "none")
    assert counts["trainable"] == counts["total"] == closed_form_mistral(config)


def test_qlora_quantizes_the_linear_layers_but_lm_head(tmp_path):
    cfg = compose(["experiment=zephyr_7b_beta_qlora", f"run_dir={tmp_path}"])
    config, _ = plan.model_config(cfg)
    counts = plan.count_parameters(plan.meta_model(config, cfg, "qlora"), "qlora")
    c = MistralConfig()
    assert counts["quantized"] == counts["base"] - 2 * c.vocab_size * c.hidden_size - (2 * c.num_hidden_layers + 1) * c.hidden_size


def test_steps_follow_transformers_counting(tmp_path):
    cfg = compose([f"run_dir={tmp_path}", "sft.trainer.per_device_train_batch_size=16",
                   "sft.trainer.gradient_accumulation_steps=3", "sft.trainer.num_train_epochs=2"])
    s = plan.steps(1000, cfg, "sft", num_gpus=4)
    assert s["per_epoch"] == math.ceil(math.ceil(1000 / 64) / 3) and s["total"] == 2 * s["per_epoch"]
    assert s["global_batch"] == 16 * 3 * 4


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_zero3_memory_shards_with_gpus_and_warns_when_it_cannot_fit(tmp_path, gpus):
    cfg = compose(["experiment=zephyr_7b_beta_full", f"plan.num_gpus={gpus}", "plan.sft_rows=1000",
                   f"run_dir={tmp_path}"])
    p = plan.build_plan(cfg)
    assert p["launcher"]["zero"] == 3 and p["launcher"]["num_gpus"] == gpus
    parts = p["stages"]["sft"]["memory"]["parts"]
    total_params = p["counts"]["total"]
    # ZeRO-3: 2 + 2 + 16 bytes per parameter, all sharded over the GPUs.
    assert parts["weights"] + parts["gradients"] + parts["optimizer"] == pytest.approx(20 * total_params / gpus)
    assert p["deepspeed"] is not None
    text = plan.render(p, cfg)
    assert ("will not fit" in text) == (parts["total"] / plan.GiB > cfg.plan.gpu_memory_gb)
    if gpus == 1:
        assert "will not fit" in text


@pytest.mark.parametrize(("fraction", "warned"), [(0.8, False), (0.95, True), (0.986, True)])
def test_plan_warns_under_ten_percent_headroom(tmp_path, fraction, warned):
    """78.9 of 80 GiB "fits" on paper, not in practice."""
    cfg = compose(["experiment=zephyr_7b_beta_full", "plan.num_gpus=16", "plan.sft_rows=1000", f"run_dir={tmp_path}"])
    total = plan.build_plan(cfg)["stages"]["sft"]["memory"]["parts"]["total"] / plan.GiB
    cfg.plan.gpu_memory_gb = total / fraction
    text = plan.render(plan.build_plan(cfg), cfg)
    assert ("sft fits only just" in text) == warned
    assert "will not fit" not in text
    if warned:
        assert f"{100 * (1 - fraction):.1f}% headroom < 10%" in text
    else:
        assert f"sft: fits ({total:.1f} of" in text


def test_plan_reads_the_built_data(tmp_path, capsys):
    from mistral_tune.cli import run_command

    cfg = compose([f"run_dir={tmp_path}", "sft.data.limit=40", "dpo.data.limit=20"])
    run_command("plan", cfg, [])  # the CLI builds the data the plan counts
    assert (tmp_path / "data" / "sft" / "report.json").exists() and (tmp_path / "data" / "dpo" / "report.json").exists()
    p = plan.build_plan(cfg)
    assert p["stages"]["sft"]["steps"]["rows"] == 40 and p["stages"]["dpo"]["steps"]["rows"] == 20


def test_num_machines_splits_the_gpus_into_nodes_for_deepspeeds_estimate(tmp_path):
    """launcher.num_processes=16 over launcher.num_machines=4: DeepSpeed's own estimator with 4
    nodes of 4 GPUs (its offload estimate depends on the split); steps count all 16 processes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cfg = compose(["experiment=zephyr_7b_beta_full", "launcher=zero3_offload", "launcher.num_processes=16",
                   "launcher.num_machines=4", "launcher.main_process_ip=10.0.0.1", "plan.sft_rows=1000",
                   f"run_dir={tmp_path}"])
    p = plan.build_plan(cfg)
    assert p["launcher"]["num_machines"] == 4 and p["launcher"]["num_gpus"] == 16
    c = p["counts"]
    _, expected, _ = estimate_zero3_model_states_mem_needs(c["total"], c["largest_layer"], 4, 4,
                                                           cpu_offload=True, cpu_offload_params=True)
    assert p["deepspeed"] == expected
    assert p["stages"]["sft"]["steps"]["global_batch"] % 16 == 0
    assert "16 GPU(s) on 4 machines" in plan.render(p, cfg)
