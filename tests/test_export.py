"""GGUF export (mistral_tune/formats/gguf.py, ollama.py, stages/export.py).

Default suite: the Q/K permutation against transformers' own rotary code, the file's metadata
and tensors read back with the gguf package, the chat template without `{% generation %}`
rendering the same text, the Modelfile's Go template rendered by Go's text/template, the CLI
export (manifest, Modelfile, card, skip on re-run) and bad input as one line with exit 2.
Extended: llama.cpp itself (llama-cpp-python) against transformers on a tiny model trained until
its argmax has clear margins: logits at every position, greedy replies, template ids; q8_0 and
q4_k_m too. Components the tests need (gguf, llama-cpp-python, go) are installed by
scripts/install_export.sh: without them a test skips locally and fails under CI.
"""

from __future__ import annotations

import importlib
import re
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from mistral_tune import cli
from mistral_tune.formats import gguf as gguf_format
from mistral_tune.formats import ollama
from mistral_tune.formats.templates import TEMPLATES, mistral_tokenizer_file
from mistral_tune.formats.tokenizer import CHAT_TEMPLATES, build_hf_tokenizer
from tests.helpers import tiny_mistral

REPO = Path(__file__).resolve().parent.parent


def need(module: str):
    """Import a component CI installs: skip here without it, fail under CI."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed; CI runs scripts/install_export.sh before the tests")
        pytest.skip(f"{module} not installed (scripts/install_export.sh)")


def need_go() -> str:
    go = shutil.which("go")
    if go is None:
        if os.environ.get("CI"):
            pytest.fail("go is not installed; CI runs scripts/install_export.sh before the tests")
        pytest.skip("go not installed (scripts/install_export.sh installs golang-go)")
    return go


def save_folder(model, template: str, folder: Path) -> Path:
    model.save_pretrained(folder, safe_serialization=True)
    build_hf_tokenizer(template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def v1_folder(tmp_path_factory) -> Path:
    model = tiny_mistral(vocab_size=32000, sliding_window=16, max_position_embeddings=64, rope_theta=5000.0)
    return save_folder(model, "mistral_v1", tmp_path_factory.mktemp("hf_v1"))


CHATS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort: 3, 1"},
     {"role": "assistant", "content": "1, 3"}, {"role": "user", "content": "And 9, 4?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"},
     {"role": "user", "content": "Say river twice"}],
]


# --- Q/K layout -------------------------------------------------------------------------------


def _llama_cpp_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """llama.cpp's normal RoPE (the llama architecture): dims (2i, 2i+1) rotate by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = positions[:, None].double() * freqs[None, :]  # [T, d/2]
    cos, sin = torch.cos(angle), torch.sin(angle)
    even, odd = x[..., 0::2].double(), x[..., 1::2].double()
    out = torch.empty_like(x, dtype=torch.float64)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def test_rope_layout_gives_transformers_attention_scores():
    from transformers import MistralConfig
    from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding, apply_rotary_pos_emb

    hidden, heads, kv_heads, d, T, theta = 64, 4, 2, 16, 11, 10000.0
    config = MistralConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d,
                           rope_parameters={"rope_type": "default", "rope_theta": theta})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, hidden, generator=g, dtype=torch.float64)
    wq = torch.randn(heads * d, hidden, generator=g, dtype=torch.float64)
    wk = torch.randn(kv_heads * d, hidden, generator=g, dtype=torch.float64)
    pos = torch.arange(T)

    # transformers: rotate-half RoPE on the original projections
    q = (x @ wq.T).view(T, heads, d).transpose(0, 1)[None]
    k = (x @ wk.T).view(T, kv_heads, d).transpose(0, 1)[None]
    cos, sin = MistralRotaryEmbedding(config)(x[None].float(), pos[None])
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos.double(), sin.double())

    # llama.cpp: interleaved RoPE on the permuted projections
    wq_p = torch.from_numpy(gguf_format.to_llama_rope_layout(wq.numpy(), heads))
    wk_p = torch.from_numpy(gguf_format.to_llama_rope_layout(wk.numpy(), kv_heads))
    q_l = _llama_cpp_rope((x @ wq_p.T).view(T, heads, d).transpose(0, 1), pos, theta)
    k_l = _llama_cpp_rope((x @ wk_p.T).view(T, kv_heads, d).transpose(0, 1), pos, theta)

    group = heads // kv_heads  # GQA: head h reads kv head h // group
    scores_hf = q_hf[0] @ k_hf[0].repeat_interleave(group, 0).transpose(1, 2)
    scores_l = q_l @ k_l.repeat_interleave(group, 0).transpose(1, 2)
    assert torch.allclose(scores_hf.double(), scores_l, atol=1e-4, rtol=1e-5)
    # and the plain permutation is no accident: without it the scores differ
    q_wrong = _llama_cpp_rope((x @ wq.T).view(T, heads, d).transpose(0, 1), pos, theta)
    assert not torch.allclose(scores_hf.double(), q_wrong @ k_l.repeat_interleave(group, 0).transpose(1, 2), atol=1e-2)


# --- the file ---------------------------------------------------------------------------------


def test_gguf_metadata_vocab_and_tensors(v1_folder, tmp_path):
    gguf = need("gguf")
    template = gguf_format.strip_generation_markers(gguf_format.read_chat_template(v1_folder))
    paths = {}
    for quant in ("f16", "q8_0"):
        paths[quant] = tmp_path / f"m-{quant}.gguf"
        gguf_format.write_gguf(v1_folder, paths[quant], quant, "m", template)
    reader = gguf.GGUFReader(str(paths["f16"]))
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (2, 32, 64)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.attention.key_length"]) == (4, 2, 8)
    assert f["llama.context_length"] == 64 and f["llama.rope.freq_base"] == 5000.0
    assert f["llama.rope.dimension_count"] == 8
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["tokenizer.ggml.model"] == "llama"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.unknown_token_id"],
            f["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 0)  # pad is <unk>, never EOS
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_eos_token"] is False
    assert f["tokenizer.chat_template"] == template  # the training template, markers removed
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_tokenizer_file("mistral_v1")))
    tokens, scores, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.scores"], f["tokenizer.ggml.token_type"]
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert scores[1000:1003] == [sp.get_score(i) for i in range(1000, 1003)]
    assert (types[0], types[1], types[2], types[13], types[500]) == (2, 3, 3, 6, 1)  # unk, control x2, byte, normal

    names = {t.name: t for t in reader.tensors}
    assert set(names) == {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in
        ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    from safetensors.torch import load_file

    hf = load_file(str(v1_folder / "model.safetensors"))
    q = hf["model.layers.1.self_attn.q_proj.weight"].numpy()
    want = gguf_format.to_llama_rope_layout(q, 4)
    got = np.asarray(names["blk.1.attn_q.weight"].data).reshape(q.shape)
    assert names["blk.1.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float16).astype(np.float32))
    assert names["blk.1.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    q8 = {t.name: t for t in gguf.GGUFReader(str(paths["q8_0"])).tensors}
    t = q8["blk.1.attn_q.weight"]
    assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
    deq = gguf.quants.dequantize(np.asarray(t.data), gguf.GGMLQuantizationType.Q8_0).reshape(q.shape)
    assert np.abs(deq - want).max() <= np.abs(want).max() / 127 + 1e-6  # one Q8_0 step per block at most


def test_q8_0_keeps_the_named_tensors_f16(v1_folder, tmp_path):
    """f16_tensors (bench/gguf_q8_sensitivity.py's variants): the named tensors are the plain f16
    of the weights, every other matrix gguf's Q8_0 of them byte for byte; a name the file does not
    have is an error, not silently nothing."""
    gguf = need("gguf")
    from safetensors.torch import load_file

    q8 = gguf.GGMLQuantizationType.Q8_0
    path = tmp_path / "m.gguf"
    gguf_format.write_gguf(v1_folder, path, "q8_0", "m", None, f16_tensors=("output.weight",))
    tensors = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    hf = load_file(str(v1_folder / "model.safetensors"))
    assert tensors["output.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data).reshape(32000, 32),
                                  hf["lm_head.weight"].numpy().astype(np.float16))
    for name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                          ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")):
        assert tensors[name].tensor_type == q8
        np.testing.assert_array_equal(np.asarray(tensors[name].data).reshape(-1),
                                      gguf.quants.quantize(hf[hf_name].numpy(), q8).reshape(-1))
    with pytest.raises(ValueError, match="names no tensor of the file: \\['lm_head.weight'\\]"):
        gguf_format.write_gguf(v1_folder, tmp_path / "x.gguf", "q8_0", "m", None, f16_tensors=("lm_head.weight",))


def test_top2_gap_is_the_margin_of_the_reference_top_two():
    from mistral_tune.formats.gguf_verify import top2_gap

    ref = np.array([[0.0, 3.0, 2.5, 1.0], [5.0, 0.0, 0.0, 4.99]])
    other = np.array([[0.0, 2.9, 2.95, 1.0], [5.0, 0.0, 0.0, 4.0]])
    np.testing.assert_allclose(top2_gap(ref, ref), [0.5, 0.01])  # top1 - top2 of the reference
    np.testing.assert_allclose(top2_gap(other, ref), [-0.05, 1.0])  # the same two tokens in another model: flipped, kept


def test_v3_vocab_keeps_control_and_user_defined_pieces(tmp_path):
    """v3's [INST] is a control token and its [REFERENCE_DOC_*]-style pieces user-defined: the GGUF
    must say so, or llama.cpp splits them where HF and mistral-common keep them whole."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model
    from transformers import MistralConfig

    MistralConfig(vocab_size=32768).save_pretrained(tmp_path)
    build_hf_tokenizer("mistral_v3").save_pretrained(tmp_path)
    vocab = gguf_format.read_vocab(tmp_path, gguf_format.read_hparams(tmp_path))
    proto = sp_model.ModelProto()
    proto.ParseFromString(mistral_tokenizer_file("mistral_v3").read_bytes())
    assert vocab.types == [int(p.type) for p in proto.pieces]
    assert vocab.types[3] == 3 and vocab.tokens[3] == b"[INST]"
    assert vocab.types.count(4) == 20  # user-defined pieces, kept whole by llama.cpp's tokenizer
    assert vocab.add_space_prefix is True


@pytest.mark.parametrize("template", sorted(CHAT_TEMPLATES))
def test_template_without_generation_markers_renders_the_same(template):
    from transformers.utils.chat_template_utils import _compile_jinja_template

    original = CHAT_TEMPLATES[template]
    stripped = gguf_format.strip_generation_markers(original)
    assert not re.search(r"{%-?\s*(end)?generation", stripped) and len(stripped) < len(original)
    assert gguf_format.strip_generation_markers(stripped) == stripped
    for messages in CHATS + [CHATS[1][:3]]:
        for gen in (True, False):
            args = dict(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=gen)
            assert _compile_jinja_template(stripped).render(**args) == _compile_jinja_template(original).render(**args)


@pytest.mark.parametrize("template", sorted(ollama.GO_TEMPLATES))
def test_modelfile_go_template_renders_our_format(template, tmp_path_factory):
    """Rendered by Go's text/template (Ollama's engine): the Jinja template's text without the BOS,
    which Ollama's tokenizer adds itself."""
    go = need_go()
    from transformers.utils.chat_template_utils import _compile_jinja_template

    build = tmp_path_factory.getbasetemp() / "go_render"
    binary = build / "render"
    if not binary.exists():
        build.mkdir(exist_ok=True)
        env = {**os.environ, "GOCACHE": str(build / "cache"), "GOPATH": str(build / "gopath"), "GO111MODULE": "off"}
        subprocess.run([go, "build", "-o", str(binary), str(REPO / "tests" / "go_template" / "main.go")],
                       check=True, env=env, capture_output=True)
    jinja = _compile_jinja_template(CHAT_TEMPLATES[template])
    for messages in CHATS:
        want = jinja.render(messages=messages, bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
        assert want.startswith("<s>")
        got = subprocess.run([str(binary)], input=json.dumps({"template": ollama.GO_TEMPLATES[template],
                                                             "messages": messages}),
                             capture_output=True, text=True, check=True).stdout
        assert got == want[len("<s>"):], (template, messages)


# --- the command --------------------------------------------------------------------------------


def test_export_command_writes_gguf_modelfile_manifest_and_skips_a_rerun(v1_folder, tmp_path, caplog):
    need("gguf")
    from mistral_tune import card
    from mistral_tune.runs import RunDir

    run_dir = tmp_path / "run"
    args = ["export", f"run_dir={run_dir}", f"export.model={v1_folder}", "export.quant=q8_0", "export.name=tiny"]
    assert cli.main(args) == 0
    out = run_dir / "export"
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "manifest.json", "tiny-q8_0.Modelfile",
                                                     "tiny-q8_0.gguf"]
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["files"]["tiny-q8_0.gguf"]
    assert entry["quant"] == "q8_0"
    assert entry["gguf"] == "tiny-q8_0.gguf" and entry["chat_format"] == "mistral_v1"
    assert entry["tensor_types"] == {"Q8_0": 16, "F32": 5}
    assert "sliding window 16 < context 64" in entry["sliding_window_note"]
    modelfile = (out / "tiny-q8_0.Modelfile").read_text()
    assert "FROM ./tiny-q8_0.gguf" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert "PARAMETER num_ctx 16" in modelfile and ollama.GO_TEMPLATES["mistral_v1"] in modelfile
    assert entry["source_key"]  # what the card checks the file was made from
    # exported from another folder (export.model), not from this run's merged model: the run's card
    # does not claim it (the pipeline test below checks a card that does)
    assert card._gguf_lines(RunDir(run_dir)) == []
    mtime = (out / "tiny-q8_0.gguf").stat().st_mtime_ns
    caplog.clear()
    caplog.set_level(logging.INFO, logger="mistral_tune")
    assert cli.main(args) == 0
    assert (out / "tiny-q8_0.gguf").stat().st_mtime_ns == mtime
    assert "already made from this model" in caplog.text


def _lora_folder(path: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "/base"}))
    (path / "adapter_model.safetensors").write_bytes(b"")
    return path


def _other_arch(kind: str):
    def make(path: Path) -> Path:
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        model = (LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, num_key_value_heads=1))
                 if kind == "llama" else GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2)))
        model.save_pretrained(path)
        return path
    return make


@pytest.mark.parametrize("case, make, extra, expected", [
    ("lora", _lora_folder, [], "holds a LoRA/PEFT adapter, not a model (its base: /base)"),
    ("llama", _other_arch("llama"), [], "is a llama model (LlamaForCausalLM): GGUF export takes Mistral-architecture"),
    ("gpt2", _other_arch("gpt2"), [], "is a gpt2 model (GPT2LMHeadModel)"),
    ("quant", None, ["export.quant=q5_k"], "export.quant='q5_k' is not one of f16, q8_0, q4_k_m"),
    ("format", None, ["export.format=onnx"], "export.format='onnx' is not one of gguf"),
    ("no_merge", None, [], "export needs a finished merge stage"),
])
def test_bad_input_is_one_line_and_exit_2(case, make, extra, expected, tmp_path, capsys):
    args = ["export", f"run_dir={tmp_path / 'run'}", *extra]
    if make is not None:
        args.append(f"export.model={make(tmp_path / case)}")
    capsys.readouterr()  # drop what making the folder printed
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mistral-tune export: error: "), err
    assert expected in err[0]


def test_pipeline_refuses_a_bad_export_quant_before_any_work(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run_dir}", "logger=none", "export.enabled=true",
                     "export.quant=q3"]) == 2
    assert "export.quant='q3' is not one of" in capsys.readouterr().err
    assert not (run_dir / "data").exists()


# --- llama.cpp itself (extended) ---------------------------------------------------------------


def _trained_tiny(template: str, vocab_size: int, steps: int = 80):
    """A tiny Mistral that has learnt 8 bundled chats by heart (loss 10.4 -> ~0.05), so its argmax
    has clear margins: a random model's logits have near-ties that any rounding may flip, which
    would test nothing. Returns the model and prompts (each chat cut before a reply)."""
    from mistral_tune.formats.chat_format import ChatFormat

    fmt = ChatFormat(template, template)
    rows = [json.loads(line)["messages"] for line in (REPO / "data" / "sft.jsonl").read_text().splitlines()[:8]]
    encoded = [fmt.encode_chat(m) for m in rows]
    n = max(len(e.input_ids) for e in encoded)
    ids = torch.tensor([e.input_ids + [0] * (n - len(e.input_ids)) for e in encoded])
    labels = torch.tensor([[t if m else -100 for t, m in zip(e.input_ids, e.assistant_masks)]
                           + [-100] * (n - len(e.input_ids)) for e in encoded])
    torch.manual_seed(0)
    model = tiny_mistral(vocab_size=vocab_size, sliding_window=None, hidden_size=64, intermediate_size=128,
                         head_dim=16, max_position_embeddings=256).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    prompts = [m[:-1] for m in rows] + [m[:1] for m in rows if len(m) > 2]
    return model.eval(), prompts


@pytest.mark.extended
@pytest.mark.parametrize("template, vocab_size", [("mistral_v1", 32000), ("mistral_v3", 32768)])
def test_llama_cpp_matches_transformers(template, vocab_size, tmp_path):
    need("gguf")
    need("llama_cpp")
    from mistral_tune.formats.gguf_verify import compare

    model, prompts = _trained_tiny(template, vocab_size)
    folder = save_folder(model, template, tmp_path / "hf")
    run_dir = tmp_path / "run"
    figures = {}
    for quant in ("f16", "q8_0", "q4_k_m"):
        assert cli.main(["export", f"run_dir={run_dir}", f"export.model={folder}", f"export.quant={quant}",
                         "export.name=tiny"]) == 0
        figures[quant] = compare(run_dir / "export" / f"tiny-{quant}.gguf", folder, prompts, max_new_tokens=12)
    print(json.dumps(figures, indent=1))
    f16 = figures["f16"]
    assert f16["prompts"] == len(prompts) and f16["skipped_longer_than_window"] == 0
    assert f16["template_ids_equal"] == len(prompts)  # GGUF template rendered + llama.cpp tokenizer = our ids
    assert f16["max_abs_logit_diff"] <= 0.05
    assert f16["argmax_equal"] == f16["positions"]
    assert f16["greedy_equal"] == len(prompts)
    assert f16["chat_completion_equal"] == len(prompts)  # llama-cpp-python's create_chat_completion
    assert figures["q8_0"]["greedy_equal"] == len(prompts)
    assert figures["q4_k_m"]["template_ids_equal"] == len(prompts)
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    assert set(manifest["files"]) == {"tiny-f16.gguf", "tiny-q8_0.gguf", "tiny-q4_k_m.gguf"}
    # llama.cpp's Q4_K_M recipe; rows of 64 are not whole 256-value K blocks, so it falls back to Q5_0
    assert {"Q5_0", "F32"} <= set(manifest["files"]["tiny-q4_k_m.gguf"]["tensor_types"])


@pytest.mark.extended
def test_pipeline_exports_after_merge_and_the_card_names_the_file(tmp_path):
    """export.enabled=true: the pipeline writes the GGUF after merge; the card names it."""
    need("gguf")
    run_dir = tmp_path / "run"
    assert cli.main(["pipeline", f"run_dir={run_dir}", "logger=none", "stages=[sft]", "eval.max_samples=4",
                     "sft.trainer.max_steps=2", "sft.data.limit=16", "export.enabled=true", "export.quant=q8_0"]) == 0
    name = f"{run_dir.name}-q8_0"
    assert (run_dir / "export" / f"{name}.gguf").exists() and (run_dir / "export" / f"{name}.Modelfile").exists()
    card_text = (run_dir / "merged" / "README.md").read_text()
    assert f"`{name}.gguf`" in card_text and "sliding window 48 < context 2048" in card_text
    # export rewrote the card after eval: its evaluation table is still there
    assert "## Evaluation" in card_text and "Not evaluated yet" not in card_text and "task_score" in card_text
    template = (run_dir / "tokenizer" / "chat_template.jinja").read_text()
    import gguf

    fields = gguf.GGUFReader(str(run_dir / "export" / f"{name}.gguf")).fields
    # the exported template is the one the run trained with (pitfall: template differs in serving)
    assert fields["tokenizer.chat_template"].contents() == gguf_format.strip_generation_markers(template)
    assert template == CHAT_TEMPLATES["mistral_v1"]
