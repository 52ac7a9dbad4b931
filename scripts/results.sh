#!/usr/bin/env bash
# Regenerates docs/results.md: trains SmolLM2-CLS and the SFT-only baseline from the
# SmolLM2-135M-Instruct GGUF, makes the harmful responses of the prefill-k columns, evaluates every
# cell of configs/results_smollm2.py, measures the CLS on the test split, and renders the table.
#
#   bash scripts/results.sh WORKDIR [--smoke | --cpu | --gpu] [--budget SECONDS] [--serial | --parallel] [--out FILE]
#
#   --smoke      CPU check of the whole pipeline: 2 training steps of 2 x 128 tokens, 1-4 prompts per
#                column, 16 new tokens, GCG 2 steps; the table says it is a smoke run
#   --cpu        2-core CPU, about an hour: the README main job's training recipe (configs/smollm2_135m_cpu.py)
#                for both runs and the `cpu` sizes of configs/results_smollm2.py
#   --gpu        one GPU: bf16 compute, both trainings at once, evaluation jobs in parallel
#   (neither)    the GPU sizes in fp32, one step after the other (any machine with the time)
#   --budget S   stop whatever still runs S - 25 seconds after the start, then render the table from the
#                cells that finished ("not run" elsewhere); 0 (default) = no limit
#   --out FILE   the markdown file whose generated block is replaced (default docs/results.md)
#
# Environment: PYTHON (default .venv/bin/python); RESULTS_TRAIN_FLAGS, extra flags for both trainings
# (e.g. "--config.train.num_steps=30" for a quick check of the GPU path).
# Everything lands in WORKDIR: cls/ and sft/ (training runs), eval/ (the harness's output),
# harmful_responses.jsonl, cls_test.json, jax_cache/ (the persistent compilation cache, shared by the
# jobs), logs/ (one log per step, steps.tsv with each step's exit status and seconds). A second
# invocation resumes: finished trainings and cells are kept.
set -euo pipefail

usage() { sed -n '2,21p' "$0" >&2; exit 2; }

W=""
MODE=full
BUDGET=0
PARALLEL=""
OUT=docs/results.md
while (($#)); do
  case "$1" in
    --smoke) MODE=smoke ;;
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    --serial) PARALLEL=0 ;;
    --parallel) PARALLEL=1 ;;
    --out) OUT=${2:?--out needs a file}; shift ;;
    -h|--help) usage ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) [[ -z "$W" ]] || usage; W=$1 ;;
  esac
  shift
done
[[ -n "$W" ]] || usage

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
W=$(cd "$W" && pwd)
LOGS=$W/logs
STATE=$W/logs/state
rm -rf "$STATE"
mkdir -p "$LOGS" "$STATE"
HARM=$W/harmful_responses.jsonl
T0=$(date +%s)
RESERVE=25  # seconds kept for rendering when a budget is set

# Two real epochs of the shipped mixture (4,462 class-balanced examples; the config's default of
# 29,600 is the paper's mixture, ~6.6x larger), 16 x 1024 tokens, validation and saving at the end.
TRAIN_FLAGS=(--config.data.num_train_examples=4462 --config.checkpoint.every_steps=0
             --config.eval.every_steps=0 --config.metrics.progress_bar=False)
# shellcheck disable=SC2206  # word splitting of the extra flags is intended
TRAIN_FLAGS+=(${RESULTS_TRAIN_FLAGS:-})
TRAIN_CONFIG=configs/smollm2_135m_sft.py
case "$MODE" in
  cpu)
    SIZE=cpu; BATCH=16; CLS_TEST_EXAMPLES=-1; : "${PARALLEL:=0}"
    TRAIN_CONFIG=configs/smollm2_135m_cpu.py
    TRAIN_FLAGS+=(--config.after_training.evaluate=False) ;;
  smoke)
    SIZE=smoke; BATCH=4; CLS_TEST_EXAMPLES=4; : "${PARALLEL:=0}"
    TRAIN_FLAGS+=(--config.train.num_steps=2 --config.data.seq_len=128 --config.data.global_batch_size=2
                  --config.eval.num_batches=1 --config.model.remat_policy=none) ;;
  gpu)
    SIZE=gpu; BATCH=64; CLS_TEST_EXAMPLES=-1; : "${PARALLEL:=1}"
    TRAIN_FLAGS+=(--config.model.dtype=bfloat16 --config.model.attention_impl=cudnn)
    # Several processes share the GPU: no preallocation, a cap per process instead.
    export XLA_PYTHON_CLIENT_PREALLOCATE=false ;;
  full)
    SIZE=gpu; BATCH=64; CLS_TEST_EXAMPLES=-1; : "${PARALLEL:=0}" ;;
esac
export JAX_COMPILATION_CACHE_DIR=$W/jax_cache
export PYTHONUNBUFFERED=1

log() { printf '[results %4ds] %s\n' "$(($(date +%s) - T0))" "$*" >&2; }

remaining() {  # seconds left before the rendering reserve (a large number without a budget)
  if ((BUDGET > 0)); then echo $((T0 + BUDGET - RESERVE - $(date +%s))); else echo 999999; fi
}

py() {  # STEP MEM_FRACTION ARGS...: one python process under the time left, logged to logs/STEP.log
  local step=$1 frac=$2 left rc=0 t
  shift 2
  left=$(remaining)
  if ((left <= 5)); then
    log "$step: skipped, budget spent"
    printf '%s\t%s\t%s\n' "$step" skipped 0 >>"$LOGS/steps.tsv"
    return 124
  fi
  t=$(date +%s)
  log "$step: start"
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac timeout -k 10 "$left" "$PY" "$@" >"$LOGS/$step.log" 2>&1 || rc=$?
  log "$step: exit $rc after $(($(date +%s) - t)) s (logs/$step.log)"
  printf '%s\t%s\t%s\n' "$step" "$rc" "$(($(date +%s) - t))" >>"$LOGS/steps.tsv"
  return "$rc"
}

job() {  # NAME FUNCTION: run FUNCTION (in the background when parallel); its exit status goes to logs/state/NAME
  local name=$1 fn=$2 rc=0
  if ((PARALLEL)); then
    ( rc=0; "$fn" || rc=$?; echo "$rc" >"$STATE/$name" ) &
  else
    "$fn" || rc=$?
    echo "$rc" >"$STATE/$name"
  fi
}

await() {  # NAME...: wait for those jobs; fails if one failed or the budget ran out
  local name
  for name in "$@"; do
    while [[ ! -e "$STATE/$name" ]]; do
      (($(remaining) > 5)) || return 1
      sleep 2
    done
    [[ "$(cat "$STATE/$name")" == 0 ]] || return 1
  done
}

train() {  # STEP RUN_DIR EXTRA_FLAGS...
  local step=$1 dir=$2
  shift 2
  py "$step" 0.4 -m clsalign_jax.main --config="$TRAIN_CONFIG" --workdir="$dir" "${TRAIN_FLAGS[@]}" "$@"
}

evaluate() {  # STEP PHASE VARIANTS: one harness process over those variants' cells of the phase
  py "$1" 0.25 -m clsalign_jax.evaluate \
    --config="configs/results_smollm2.py:size=$SIZE,phase=$2,variants=$3,cls=$W/cls,sft=$W/sft,harmful_responses=$HARM" \
    --config.output_dir="$W/eval"
}

# ----- jobs, most important first (the serial order) --------------------------------------------
job_data() {
  py prepare_data 0.1 -c "import os; from clsalign_jax.data import builders
builders.prepare(builders.SafetyMix(data_dir=os.path.expanduser(os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets'))))"
}
job_train_cls() { await data; train train_cls "$W/cls"; }
job_train_sft() {
  await data
  train train_sft "$W/sft" --config.loss.cls_weight=0 --config.mask.response_sees_cls=False --config.loss.malicious_lm_weight=1
}
job_harmful() {
  evaluate eval_harmful harmful as_shipped || return 1
  py harmful 0.1 -m clsalign_jax.eval.results_table harmful --eval_dir "$W/eval" --out "$HARM"
}
job_cls_test() {
  await train_cls || return 1
  py cls_test 0.25 -m clsalign_jax.after_training cls-test --workdir "$W/cls" --out "$W/cls_test.json" \
    --examples "$CLS_TEST_EXAMPLES" --batch_size "$BATCH"
}
# One process per variant: their compilations run in parallel (with --gpu), and the overhead column's
# two cells (cls_full, first_only) run at about the same time under the same load.
job_cls_a() { await train_cls || return 1; await harmful || true; evaluate eval_cls_a main cls_full; }
job_cls_d() { await train_cls || return 1; await harmful || true; evaluate eval_cls_d main first_only; }
job_as_shipped() { await harmful || true; evaluate eval_as_shipped main as_shipped; }
job_sft() { await train_sft || return 1; await harmful || true; evaluate eval_sft main sft_only; }
job_cls_b() { await train_cls || return 1; await harmful || true; evaluate eval_cls_b main no_strategic_decoding; }
job_cls_c() { await train_cls || return 1; await harmful || true; evaluate eval_cls_c main no_strategic_attention; }
# GCG with the CLS term is optimised once against the CLS weights (cached per item and checkpoint);
# the three other CLS rows then only generate from the cached prompts.
job_gcg_cls() {
  await train_cls || return 1
  evaluate eval_gcg_cls gcg_adaptive cls_full+no_strategic_attention+no_strategic_decoding+first_only
}
job_gcg_as_shipped() { evaluate eval_gcg_as_shipped gcg as_shipped; }
job_gcg_sft() { await train_sft || return 1; evaluate eval_gcg_sft gcg sft_only; }

log "mode $MODE (parallel=$PARALLEL, budget ${BUDGET}s), workdir $W, python $PY"
job data job_data
job train_cls job_train_cls
job train_sft job_train_sft
job harmful job_harmful
job cls_test job_cls_test
job cls_a job_cls_a
job cls_d job_cls_d
job as_shipped job_as_shipped
job sft job_sft
job cls_b job_cls_b
job cls_c job_cls_c
job gcg_cls job_gcg_cls
job gcg_as_shipped job_gcg_as_shipped
job gcg_sft job_gcg_sft
wait

elapsed=$(($(date +%s) - T0))
failed=$(awk -F'\t' '$2 != "0" {printf "%s%s (%s)", sep, $1, $2; sep=", "}' "$LOGS/steps.tsv")
info="scripts/results.sh"
if [[ $MODE != full ]]; then info+=" --$MODE"; fi
if ((BUDGET > 0)); then info+=" --budget $BUDGET"; fi
info+=", ${elapsed} s wall, finished $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)"
[[ -z "$failed" ]] || info+="; steps that did not finish (exit status; 124 = stopped by the budget): $failed"
log "rendering $OUT"
"$PY" -m clsalign_jax.eval.results_table render --eval_dir "$W/eval" --cls_test "$W/cls_test.json" \
  --out "$OUT" --mode "$([[ $MODE == smoke ]] && echo smoke || echo gpu)" --run_info "$info"
cp "$OUT" "$W/results.md"
log "done in $(($(date +%s) - T0)) s; per-step times in $LOGS/steps.tsv"
