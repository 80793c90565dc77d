"""The typed config contract, registered in Hydra's ConfigStore.

Every node is a dataclass, so a misspelt key (``sft.trainer.learning_rat=1``) or a value of the
wrong type is a composition error, never a silently ignored value. The per-stage TRL arguments
(``sft.trainer.*``, ``dpo.trainer.*``, ``orpo.trainer.*``, ``kto.trainer.*``) are dataclasses generated from
TRL's own ``SFTConfig``, ``DPOConfig``, (experimental) ``ORPOConfig`` and ``KTOConfig`` fields, so every argument the pinned TRL accepts can be set from the command line,
and nothing else can. Unset trainer fields stay ``???`` (MISSING) and TRL's own default applies.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# Arguments that mistral_tune owns: the run_dir decides where outputs go, the logger group decides
# where metrics go, and tokens come from the environment only (never from a config that gets
# written next to every output).
OWNED_TRAINER_FIELDS = {
    "output_dir": "outputs go to run_dir/<stage>; set run_dir=...",
    "report_to": "set logger=wandb or logger=none",
    "run_name": "W&B runs are named after the stage",
    "hub_token": "tokens come from HF_TOKEN or `hf auth login`, never from a config",
    "push_to_hub": "use `mistral-tune push push.repo_id=...`",
    "logging_dir": "logs go to run_dir",
}

_PRIMITIVES = (bool, int, float, str)


def _omegaconf_type(annotation: Any) -> Any:
    """Map a TRL field annotation onto a type OmegaConf can validate, or Any."""
    if annotation in _PRIMITIVES:
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and args[0] in _PRIMITIVES:
            return Optional[args[0]]
    return Any


def trainer_schema(trl_config_cls: type, name: str) -> type:
    """A dataclass with one MISSING-by-default field per argument of ``trl_config_cls``."""
    hints = typing.get_type_hints(trl_config_cls)
    fields = [
        (f.name, _omegaconf_type(hints.get(f.name, Any)), field(default=MISSING))
        for f in dataclasses.fields(trl_config_cls)
        if f.init and f.name not in OWNED_TRAINER_FIELDS
    ]
    return dataclasses.make_dataclass(name, fields)


def _trl_configs() -> tuple[type, type, type, type]:
    from trl import DPOConfig, KTOConfig, SFTConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "You are importing from 'trl.experimental'"
        from trl.experimental.orpo import ORPOConfig

    return SFTConfig, DPOConfig, ORPOConfig, KTOConfig


_SFT, _DPO, _ORPO, _KTO = _trl_configs()
SFTTrainerArgs = trainer_schema(_SFT, "SFTTrainerArgs")
DPOTrainerArgs = trainer_schema(_DPO, "DPOTrainerArgs")
ORPOTrainerArgs = trainer_schema(_ORPO, "ORPOTrainerArgs")
KTOTrainerArgs = trainer_schema(_KTO, "KTOTrainerArgs")


@dataclass
class ModelConfig:
    # Hub id or local folder of a pretrained checkpoint; null builds a randomly initialised
    # Mistral-architecture model from `config` below (the tiny default).
    name_or_path: Optional[str] = None
    revision: Optional[str] = None  # hub revision (branch, tag or commit) of name_or_path
    # MistralConfig fields for a randomly initialised model (ignored when name_or_path is set).
    config: dict[str, Any] = field(default_factory=dict)
    init_seed: int = 0  # seed of the random initialisation, so the tiny base is reproducible
    # Chat format used when template=auto; auto reads the checkpoint's vocabulary (v1, v3, v7).
    default_template: str = "mistral_v1"
    default_peft: str = "lora"  # training method used when peft=auto
    # A null data max_length on your own data becomes min(max_position_embeddings, this): the
    # memory of a step grows with the longest row.
    max_length_cap: int = 4096
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU; or float32|bfloat16|float16
    # auto: flash_attention_2 if installed on CUDA, else flex_attention on CUDA, sdpa on CPU
    attn_implementation: str = "auto"
    trust_remote_code: bool = False  # never run a checkpoint's own code unless you ask for it


@dataclass
class TemplateConfig:
    name: str = "auto"  # auto | mistral_v1 | mistral_v3 | mistral_v7
    # Which tokens carry a loss: assistant (every assistant turn and its EOS), last_assistant,
    # or all (prompt too).
    train_on: str = "assistant"


@dataclass
class PeftConfig:
    method: str = "auto"  # auto (the model's default_peft) | none (full) | lora | qlora
    r: int = 16  # LoRA rank: higher is more capacity and memory
    lora_alpha: int = 16  # LoRA scale is lora_alpha / r
    lora_dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    use_rslora: bool = False
    # QLoRA only: bitsandbytes 4-bit settings of the frozen base.
    bnb_4bit_quant_type: str = "nf4"
    bnb_4bit_use_double_quant: bool = True


@dataclass
class DecontaminateConfig:
    # Evaluation files (JSONL/JSON/Parquet/CSV; files, folders or globs) whose prompts must not
    # appear in training rows: a row sharing an n-gram of words with one of them is dropped and
    # counted. Prompts are read from messages/conversations (user turns), or from the first of
    # prompt, question, instruction, problem, input, turns, text.
    files: list[str] = field(default_factory=list)
    ngram: int = 13  # words per n-gram (GPT-3's 13); shorter prompts must appear whole


@dataclass
class DataConfig:
    on_error: str = "raise"  # raise: stop at the first bad row; skip: drop it, listed in rejects.jsonl
    show: int = 0  # print this many rendered examples with the trained spans marked
    # Duplicate removal per stage, across its sources (the first occurrence is kept):
    # none | exact (same text after lowercasing and collapsing whitespace) | near (exact, then
    # MinHash over word 5-grams, a pair above near_dup_threshold Jaccard counts as duplicate).
    dedup: str = "none"
    near_dup_threshold: float = 0.8  # Jaccard similarity of word 5-gram sets
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    # Rows over <stage>.data.max_length tokens: drop (counted as too_long), or truncate: keep the
    # conversation up to the last complete assistant turn that fits, with its EOS (a row whose
    # first assistant turn does not fit is still dropped). Preference pairs are never truncated.
    overlong: str = "drop"
    # Stop (exit 2) when more than this fraction of a dataset's rows is dropped as too long,
    # rather than silently train on what is left.
    max_drop_fraction: float = 0.1
    # Processes that tokenize (the output is identical for any value); null: the cores available.
    num_proc: Optional[int] = None


@dataclass
class SourceConfig:
    # A local file, folder or glob (.jsonl, .json, .parquet, .csv), or a Hugging Face Hub
    # dataset id (org/name) loaded with datasets.load_dataset.
    path: str = MISSING
    split: Optional[str] = None  # hub only: split to read (default train)
    name: Optional[str] = None  # hub only: subset (configuration) name
    revision: Optional[str] = None  # hub only: branch, tag or commit; pin it for reproducible data
    format: str = "auto"  # auto: the stage's data.format; or force this source's format
    columns: dict[str, str] = field(default_factory=dict)  # renames {old: new} applied before detection
    # Mixture weight: 0.5 keeps a seeded random half of this source's rows, 2.0 repeats each
    # twice, 1.5 repeats each once plus a seeded random half.
    weight: float = 1.0
    # hub only: read rows as they download (datasets' IterableDataset) instead of first preparing
    # the whole split in the datasets cache; the build cache still keys on the data's content hash.
    streaming: bool = False


@dataclass
class StageData:
    # Local files, folders or globs (.jsonl, .json, .parquet, .csv): the simple form of `sources`.
    files: list[str] = field(default_factory=list)
    # Several sources with split/subset/revision, per-source format, column renames and weights.
    # Give either files or sources (data=none clears the bundled files).
    sources: list[SourceConfig] = field(default_factory=list)
    format: str = "auto"  # auto-detect per row, or force one (messages, sharegpt, alpaca, ...)
    # Rows longer than this many tokens are dropped (or cut after a whole turn, data.overlong) and
    # counted in report.json; never cut mid-turn (a cut row loses its EOS). null: 256 for the bundled
    # files, else the model's context capped at model.max_length_cap (mistral_tune.config.resolve_model_defaults).
    max_length: Optional[int] = None
    limit: Optional[int] = None  # keep only the first N rows (smoke tests)


@dataclass
class SFTStage:
    data: StageData = field(default_factory=StageData)
    trainer: SFTTrainerArgs = field(default_factory=SFTTrainerArgs)
    # LoRA settings of this stage's adapter over peft.* (r, lora_alpha, lora_dropout,
    # target_modules, use_rslora), e.g. dpo.peft={r: 128, lora_alpha: 128} as in Zephyr's QLoRA DPO.
    peft: dict[str, Any] = field(default_factory=dict)


@dataclass
class DPOStage:
    data: StageData = field(default_factory=StageData)
    trainer: DPOTrainerArgs = field(default_factory=DPOTrainerArgs)
    # LoRA settings of this stage's adapter over peft.* (r, lora_alpha, lora_dropout,
    # target_modules, use_rslora), e.g. dpo.peft={r: 128, lora_alpha: 128} as in Zephyr's QLoRA DPO.
    peft: dict[str, Any] = field(default_factory=dict)


@dataclass
class ORPOStage:
    # ORPO (reference-free preference tuning, TRL's experimental ORPOTrainer) on preference rows;
    # built by mistral_tune.training.trainers.build_orpo_trainer.
    data: StageData = field(default_factory=StageData)
    trainer: ORPOTrainerArgs = field(default_factory=ORPOTrainerArgs)
    # LoRA settings of this stage's adapter over peft.* (r, lora_alpha, lora_dropout,
    # target_modules, use_rslora), e.g. orpo.peft={r: 64, lora_alpha: 64}.
    peft: dict[str, Any] = field(default_factory=dict)


@dataclass
class KTOStage:
    # KTO (TRL's KTOTrainer) on unpaired replies labelled desirable or not, or on preference pairs
    # split into one of each; built by mistral_tune.training.trainers.build_kto_trainer.
    data: StageData = field(default_factory=StageData)
    trainer: KTOTrainerArgs = field(default_factory=KTOTrainerArgs)
    # LoRA settings of this stage's adapter over peft.* (r, lora_alpha, lora_dropout,
    # target_modules, use_rslora), e.g. kto.peft={r: 64, lora_alpha: 64}.
    peft: dict[str, Any] = field(default_factory=dict)


@dataclass
class PairsConfig:
    # given: DPO trains on dpo.data as configured (the bundled, hand-written pairs by default);
    # onpolicy: on the pairs the `pairs` stage samples from the policy DPO starts from and scores
    # (configs/pairs/onpolicy.yaml points dpo.data.files at run_dir/pairs/pairs.jsonl).
    name: str = "given"
    # Chats whose prompts (each up to its last user turn) are sampled; empty: sft.data's files.
    # Prompts of eval.files and eval.pref_files are always left out.
    prompts_files: list[str] = field(default_factory=list)
    max_prompts: Optional[int] = None  # the first N prompts; null: all
    num_samples: int = 4  # completions per prompt (k); the best and the worst scored make a pair
    temperature: float = 1.0  # sampling temperature: higher gives more varied (and more wrong) samples
    top_p: float = 1.0  # nucleus sampling; 1.0 samples the full distribution
    max_new_tokens: int = 16  # the longest bundled answer is 15 tokens with its EOS
    # Add the greedy reply as one more candidate (the first): every pair then holds the reply the
    # model gives when decoding greedily, as eval does; its mistakes become the rejected replies.
    greedy: bool = False
    batch_size: int = 64  # prompts per generate call (each with num_samples sequences), and scored per batch
    # The verifier, by default the bundled tasks' exact checker (exact match with the chat's reference
    # reply for other prompts). reward: "module:function" called as function(prompt, completion) ->
    # float, prompt the last user turn's text; reward_model: path or hub id of a sequence-
    # classification model, its first logit the score. At most one of the two.
    reward: Optional[str] = None
    reward_model: Optional[str] = None
    # Iterative DPO: after DPO, sample again from the DPO policy and train another round from it,
    # `rounds` rounds in all (round r >= 2 in run_dir/rounds/<r>; mistral_tune/stages/rounds.py).
    rounds: int = 1


@dataclass
class MergeConfig:
    dtype: str = "auto"  # dtype of the saved merged weights: auto keeps the training dtype
    # The merged model's logits must match the adapter model's on a probe batch within this
    # absolute tolerance before the merge is marked complete.
    atol: float = 1e-3
    max_shard_size: str = "5GB"


@dataclass
class PushConfig:
    repo_id: Optional[str] = None  # org/name; the pipeline pushes when this is set
    private: bool = True
    revision: Optional[str] = None  # branch to push to (created if missing)
    include_adapters: bool = False  # also upload the adapters under adapters/<stage>
    dry_run: bool = False  # list what would be uploaded, upload nothing
    commit_message: str = "Upload model trained with mistral_tune"
    # The card's `license`; null: the base model card's license (local folder or HF cache), if any.
    license: Optional[str] = None
    max_retries: int = 5


@dataclass
class ExportConfig:
    # `mistral-tune export`: run_dir/merged as DIR/export/<name>-<quant>.gguf for llama.cpp / Ollama.
    enabled: bool = False  # the pipeline exports after merge and eval
    format: str = "gguf"  # gguf (the only one)
    quant: str = "f16"  # f16 | q8_0 (written in Python) | q4_k_m (llama.cpp's quantizer: the `export` extra)
    model: Optional[str] = None  # a HF Mistral folder to export instead of run_dir/merged
    name: Optional[str] = None  # file name stem; null: the run_dir's (or export.model's) folder name


@dataclass
class LauncherConfig:
    name: str = "none"  # none: stages run in this process; else accelerate launch per stage
    config_file: Optional[str] = None  # accelerate config (launch/accelerate/*.yaml)
    num_processes: int = 1  # processes in all, over every machine (accelerate's count)
    extra_args: list[str] = field(default_factory=list)
    # Several machines: run the same command on each, changing only machine_rank. Machine rank 0
    # builds the data, holds the run_dir lock and writes every file; run_dir must be shared.
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: Optional[str] = None  # machine rank 0's address, reachable from every machine
    main_process_port: Optional[int] = None  # null: 29500 (one port per concurrent job on a host)
    # Seconds any process waits for another: a collective op (a lost machine ends the others after
    # this, gloo/NCCL timeout), or machine ranks > 0 for the data machine rank 0 builds.
    timeout_s: int = 1800


@dataclass
class LoggerConfig:
    name: str = "wandb"  # wandb | none
    project: str = "mistral_tune"
    entity: Optional[str] = None
    # auto: online when a W&B API key is configured and the host answers, else offline.
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)
    # W&B group of the stage runs; null: one group per run_dir. A sweep (-m) sets one group for all
    # its jobs.
    group: Optional[str] = None


# --- evaluation, plan and sweeps (mistral_tune/evaluate.py, plan.py, sweep.py) ---------------


@dataclass
class EvalConfig:
    enabled: bool = True  # the pipeline evaluates after merge
    # Held-out SFT chats (any SFT format): loss/perplexity on their trained tokens, and greedy
    # generation on their last user turn, scored by the bundled task checker where it applies.
    # null: the bundled held-out chats when SFT trains on the bundled data, else the held-out split
    # of your own SFT rows (run_dir/data/<stage>/eval.jsonl; perplexity only, no generation).
    files: Optional[list[str]] = None
    # Held-out preference pairs (any preference format): preference accuracy and reward margin.
    # null: as files, with the bundled pairs or the held-out split of your preference rows.
    pref_files: Optional[list[str]] = None
    # Share of the prompts of your own data (not the bundled data, which ships held-out files) that
    # the data stage holds out for eval, at most max_samples rows, seeded; training rows sharing a
    # held-out prompt are dropped (counted as decontaminated). 0: no split.
    split_fraction: float = 0.05
    # Models to evaluate, those present in run_dir: null = base and every stage in stages=[...].
    models: Optional[list[str]] = None
    max_samples: int = 100  # at most this many chats and pairs per model (each a fraction of the files)
    max_new_tokens: int = 16  # greedy generation length; the longest bundled answer is 15 tokens with EOS
    batch_size: int = 32  # sequences per forward pass (generation batches are left-padded)
    show: int = 5  # sample generations kept in results.json and the model card, per model
    # lm-evaluation-harness (`pip install -e ".[eval]"`) on every model eval scores and on run_dir/merged:
    # lm-eval task, group or tag names (`[arc_easy, hellaswag, gsm8k, ifeval]`, datasets from the Hub
    # or its cache) and `mistral_tune_bundled` (this run's held-out chats, the prompts eval generates
    # from, offline). Results: run_dir/eval/harness.json, the table, the card, W&B. Not part of eval's
    # fingerprint: adding a task to a finished eval runs only the harness, only what is missing.
    harness: list[str] = field(default_factory=list)
    harness_limit: Optional[float] = None  # examples per task (below 1: a fraction of it) for quick runs; null: all
    harness_num_fewshot: Optional[int] = None  # null: each task's own default (most are 0-shot)
    # Hub tasks through the model's chat template, few-shot examples as turns: null = the trained models
    # (and merged) yes, the base model no; true/false for all. mistral_tune_bundled is always pre-templated.
    harness_chat_template: Optional[bool] = None
    harness_models: Optional[list[str]] = None  # null: every model eval scores, and merged; or e.g. [dpo, merged]


@dataclass
class ChatConfig:
    # `mistral-tune chat`: talk to run_dir/merged (or model.name_or_path) through its chat template.
    max_new_tokens: int = 256  # longest reply, in tokens
    temperature: float = 0.0  # 0: greedy (the same reply every time); e.g. 0.7 samples
    top_p: float = 1.0  # nucleus sampling, used when temperature > 0
    system: Optional[str] = None  # system prompt of the conversation


@dataclass
class PlanConfig:
    num_gpus: Optional[int] = None  # null: launcher.num_processes
    gpus_per_node: int = 8  # for DeepSpeed's estimators (nodes = ceil(num_gpus / gpus_per_node))
    gpu_memory_gb: float = 80.0  # per GPU; the plan warns when the estimate exceeds it
    # Rows to assume when the data files are not at hand (e.g. 207865 for UltraChat-200k
    # train_sft, 61135 for UltraFeedback train_prefs); null: count the built data.
    sft_rows: Optional[int] = None
    dpo_rows: Optional[int] = None


@dataclass
class SweepConfig:
    # What each job of a sweep (-m) returns to Hydra and the summary table sorts by:
    # <stage>/<metric> from DIR/<stage>/metrics.json (sft/train_loss) or eval/<model>/<metric> from
    # DIR/eval/results.json (eval/dpo/task_score). null: sft/train_loss for `sft`, dpo/train_loss
    # for `dpo`, eval/<last model>/task_score for `pipeline` and `eval`.
    objective: Optional[str] = None
    direction: str = "auto"  # minimize | maximize | auto (minimize losses and perplexity)


@dataclass
class Config:
    run_dir: str = "runs/default"  # everything a run writes; never a timestamp (ranks must agree)
    seed: int = 42
    force: bool = False  # re-run a completed stage whose recorded config differs
    # The training stages, in order: each starts from the model the one before it left (the first
    # from the base model); merge takes the last. [sft], [sft, dpo], [orpo], [sft, kto], ...
    stages: list[str] = field(default_factory=lambda: ["sft", "dpo"])
    model: ModelConfig = field(default_factory=ModelConfig)
    template: TemplateConfig = field(default_factory=TemplateConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTStage = field(default_factory=SFTStage)
    dpo: DPOStage = field(default_factory=DPOStage)
    orpo: ORPOStage = field(default_factory=ORPOStage)
    kto: KTOStage = field(default_factory=KTOStage)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    push: PushConfig = field(default_factory=PushConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
