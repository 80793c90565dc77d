#!/usr/bin/env bash
# The GPU measurements behind bench/results/gpu.md, on one H100/H200 with no network. From the project root,
# after `bash ../shared/gpu/make_wheels.sh` (wheels of the pinned packages in .gpu/whl; tools in .gpu/tools):
#     OUT=/some/dir bash bench/gpu.sh      (at most ~9.8 minutes: run with timeout_s=600; PARTS=bcd picks parts, BUDGET= caps it in s)
# a  install .gpu/whl into /tmp/site (skipped when /tmp/site already has trl), versions
# b  bench/gpu_exact.py (CUDA path vs plain: loss and gradients), then bench/run.py at hidden 2048 x 8 layers on
#    360-1930-token chats: TRL default, TRL best (flex_attention, no Liger) and mistral_tune, SFT and DPO full/LoRA
# c  bench/run.py --shape mistral-7b --layers 4, LoRA SFT on 2000-4000-token chats, batch 4
# d  the default pipeline (`mistral-tune pipeline`), shortened, on the GPU: dtype, attention and Liger the stages used
# Every part has its own timeout, cut to what is left of BUDGET (s). DRY=1: CPU dry run at tiny sizes.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled \
    TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
PROJ="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; G="$PROJ/.gpu"
OUT="${OUT:-/tmp/gpu_out}"; mkdir -p "$OUT"
DRY="${DRY:-0}"; PY="${PY:-python3}"; SITE="${SITE:-/tmp/site}"; BUDGET="${BUDGET:-585}"; PARTS="${PARTS:-abcd}"
T=/tmp/mt_gpu; mkdir -p "$T"
{
part() { echo; echo "+++ [$(date +%T) t=${SECONDS}s] part $1"; }
left() { local l=$((BUDGET - SECONDS)); ((l < $1)) && echo $((l > 15 ? l : 15)) || echo "$1"; }
want() { [[ "$PARTS" == *$1* ]]; }

if [ "$DRY" = 1 ]; then export PYTHONPATH="$PROJ"; elif want a || [ ! -d "$SITE/trl" ]; then
    part "a: install .gpu/whl into $SITE"
    timeout -k 10 "$(left 150)" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$G"/whl/*.whl 2>&1 | grep -v "already exists" | tail -5
    timeout -k 5 "$(left 90)" "$PY" -m compileall -q -j 0 "$SITE" > /dev/null 2>&1; echo "compileall: exit $?"
fi
[ "$DRY" = 1 ] || export PYTHONPATH="$SITE:$PROJ"
"$PY" -c "import torch, transformers, trl, peft, importlib.util as u; print('torch', torch.__version__, 'cuda',
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), '| transformers', transformers.__version__,
'trl', trl.__version__, 'peft', peft.__version__, '| liger', u.find_spec('liger_kernel') is not None,
'flash_attn', u.find_spec('flash_attn') is not None)"

if want b; then
part "b1: exactness of the CUDA path (bench/gpu_exact.py)"
(cd "$PROJ" && timeout -k 10 "$(left 120)" "$PY" bench/gpu_exact.py --json "$OUT/exact.json" 2>&1 |
    grep -E "^(sft|dpo|gpu_exact)|Error|error" | grep -v "Warning")
part "b2: bench, hidden 2048 x 8 layers, 360-1930-token chats"
if [ "$DRY" = 1 ]; then
    SHAPE=(--hidden-size 64 --layers 2 --steps 3 --dpo-steps 3 --warmup 1 --batch-size 2 --dpo-batch-size 2)
    GEN=(--sft-rows 12 --dpo-rows 8 --max-tokens 500)
else
    SHAPE=(--hidden-size 2048 --layers 8 --steps 8 --dpo-steps 7 --warmup 3); GEN=(--sft-rows 160 --dpo-rows 80)
fi
CONFIGS="sft/trl,sft/trl best,sft/mistral_tune,dpo-full/trl,dpo-full/trl best,dpo-full/mistral_tune,dpo-lora/trl,dpo-lora/mistral_tune"
[ "$DRY" = 1 ] && CONFIGS="sft/trl,sft/mistral_tune,dpo-full/trl,dpo-full/mistral_tune,dpo-lora/mistral_tune"
"$PY" "$G/tools/make_long_data.py" "$T/long" "${GEN[@]}" | tail -2
(cd "$PROJ" && timeout -k 10 "$(left 270)" "$PY" bench/run.py "${SHAPE[@]}" --sft-data "$T/long/sft_long.jsonl" \
    --dpo-data "$T/long/dpo_long.jsonl" --max-length 2048 --set model.config.sliding_window=4096 \
    --configs "$CONFIGS" --config-timeout 75 --workdir "$T/work" --out "$OUT/bench" 2>&1 | grep -E "^bench|^\||^- |Error|error" | grep -v Warning)
fi

if want c; then
part "c: bench, Mistral-7B layer shape x 4 layers, LoRA SFT, 2000-4000-token chats, batch 4"
if [ "$DRY" = 1 ]; then
    SHAPE=(--hidden-size 64 --layers 1 --steps 3 --dpo-steps 3 --warmup 1 --batch-size 2)
    GEN=(--sft-rows 8 --dpo-rows 4 --min-tokens 200 --max-tokens 400); ML=512
else
    SHAPE=(--shape mistral-7b --layers 4 --steps 6 --dpo-steps 4 --warmup 3 --batch-size 4)
    GEN=(--sft-rows 40 --dpo-rows 8 --min-tokens 2000 --max-tokens 4000); ML=4096
fi
"$PY" "$G/tools/make_long_data.py" "$T/long4k" "${GEN[@]}" | tail -2
(cd "$PROJ" && timeout -k 10 "$(left 150)" "$PY" bench/run.py "${SHAPE[@]}" --sft-data "$T/long4k/sft_long.jsonl" \
    --dpo-data "$T/long4k/dpo_long.jsonl" --max-length "$ML" --configs "sft-lora/trl,sft-lora/trl best,sft-lora/mistral_tune" --config-timeout 60 \
    --workdir "$T/work7b" --out "$OUT/bench7b" 2>&1 | grep -E "^bench|^\||^- |Error|error" | grep -v Warning)
fi

if want d; then
part "d: the default pipeline on the GPU, shortened (SFT 40 steps, DPO 12, eval 24 rows)"
EXTRA=(sft.trainer.max_steps=40 dpo.trainer.max_steps=12 eval.max_samples=24)
[ "$DRY" = 1 ] && EXTRA=(sft.trainer.max_steps=3 dpo.trainer.max_steps=3 eval.max_samples=8)
rm -rf "$T/run"; t0=$SECONDS
(cd "$PROJ" && timeout -k 10 "$(left 200)" "$PY" -m mistral_tune pipeline run_dir="$T/run" logger=none "${EXTRA[@]}" \
    > "$T/pipeline.log" 2>&1); echo "pipeline: exit $? in $((SECONDS - t0)) s"
tr '\r' '\n' < "$T/pipeline.log" | grep -vE '(it/s|s/it|examples/s)\]' | tail -n 40 > "$OUT/pipeline_tail.txt"
grep -E "^\[mistral_tune\]|attention|Error" "$T/pipeline.log" | tail -n 12
for s in sft dpo; do echo "$s: $(tr -d '\n ' < "$T/run/$s/metrics.json" 2>/dev/null)"; done
"$PY" -c "import json, sys; r = json.load(open(sys.argv[1]))
for m, x in r.items(): print(f'eval {m}: task_score {x.get(\"task_score\")}, preference_accuracy {x.get(\"preference_accuracy\")}')" \
    "$T/run/eval/results.json" 2>&1 | tail -4
fi
echo "+++ done in ${SECONDS} s"
} 2>&1 | tee -a "$OUT/log.txt"
