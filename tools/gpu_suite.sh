#!/usr/bin/env bash
# The GPU benchmarks of docs/benchmarks.md in one go, each step under its own time limit, so that one failure
# does not cost the rest. Results: JSON + logs under $OUT (default ./gpu_results), and rows appended to
# docs/benchmarks.md; at the end $OUT holds results.tgz (every JSON and log) and a copy of docs/benchmarks.md.
# Usage: bash tools/gpu_suite.sh STAGE...   (stages: env check attn train train-ours train-xla mem decode q1000
# q1000-natural profile-train profile-decode profile-decode64 train-unstack train-b2 train-ft mem-unstack
# decode-cmdbuf).
# BUDGET_S (default 570) caps the whole run: each step's limit is cut to what is left, a step with under 30 s left
# is skipped, and the results are packed after every step, so a run stopped from outside keeps what it measured.
# `lease` = `env train mem-unstack decode`: the side-by-side MFU with the GPU default (per-layer weights), the
# memory of per-layer weights under remat (what `layer_weights=auto` waits for) and the decode roofline in one
# device call of ≈ 10 minutes, for a lease of 15 minutes in all (as lent in 2026-12). A machine
# without a package index gets the missing wheels from .whl/ (Python 3.12 wheels of grain, array-record,
# portpicker, mistral-common and, if its optax is older, optax: `pip download --no-deps --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_28_x86_64 -d .whl NAME==VERSION`); never carry flax or jax (they
# must match the machine's jaxlib).
set -u
KNOWN=" lease env check attn train train-ours train-xla train-unstack train-b2 train-ft mem mem-unstack decode \
decode-cmdbuf q1000 q1000-natural profile-train profile-decode profile-decode64 "
for stage in "$@"; do  # a misspelt stage would cost a device start for nothing: refuse it before any work
  case $KNOWN in *" $stage "*) ;; *) echo "unknown stage '$stage'; stages:$KNOWN" >&2; exit 2 ;; esac
done
[ $# -gt 0 ] || { echo "usage: bash tools/gpu_suite.sh STAGE... (stages:$KNOWN)" >&2; exit 2; }
OUT=${OUT:-gpu_results}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT  # its logs and JSON are in $OUT/results.tgz by then
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ]; then  # wheels carried to a machine without a package index (see docs/benchmarks.md)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

BUDGET_S=${BUDGET_S:-570}
pack() {  # what has been measured so far, in $OUT (a run stopped from outside keeps it)
  cp docs/benchmarks.md "$OUT/benchmarks.md" 2>/dev/null
  tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null
}
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS - 10))
  if [ $left -lt 30 ]; then echo "=== $name: skipped, ${left}s of BUDGET_S left"; failed=$((failed + 1)); return; fi
  [ $limit -le $left ] || limit=$left
  echo "=== $name ($(date +%T), limit ${limit}s): $*"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$WORK/$name.log"
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  pack
}
failed=0

stages=()
for stage in "$@"; do
  if [ "$stage" = lease ]; then stages+=(env train mem-unstack decode); else stages+=("$stage"); fi
done
for stage in "${stages[@]}"; do
  case $stage in
    env)
      step env_gpu 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      step env_python 90 $PY -c "import jax, jaxlib, flax, optax, torch, transformers, peft; print('jax', \
jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__); print(jax.devices())" ;;
    check)
      step check 100 $PY -m pytest -q -p no:cacheprovider tests/test_fused_attention.py ;;
    attn)
      step attn 90 $PY tools/bench_attention.py --json "$WORK/attn.json" ;;
    train)
      step train 360 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat none --steps 10 --warmup 3 --json "$WORK/train.json" \
        --note "cuDNN attention (auto), no remat, per-layer weights (auto)" ;;
    train-ft)  # a phenotype-shaped fine-tuning batch: ~50 answer tokens of ~1550 in the loss (ours: head on those)
      step train_ft 360 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat none --response-fraction 0.03 --steps 10 --warmup 3 --json "$WORK/train_ft.json" \
        --note "fine-tuning batch: loss on each row's last 3 %" ;;
    train-ours)
      step train_ours 240 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat none --unstack no --steps 10 --warmup 3 --only ours --json "$WORK/train_ours.json" \
        --note "ours only: stacked weights, layer scan" ;;
    train-unstack)
      step train_unstack 200 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat none --unstack yes --steps 10 --warmup 3 --only ours --json "$WORK/train_unstack.json" \
        --note "A/B: per-layer frozen weights, layers as a Python loop (no weight-slice copies)" ;;
    train-b2)
      step train_b2 240 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 2 --dtype bfloat16 \
        --remat none --steps 6 --warmup 2 --only ours --json "$WORK/train_b2.json" \
        --note "A/B: 2 x 3000 tokens per step (per-step costs amortised), per-layer weights (auto)" ;;
    mem-unstack)
      step mem_unstack 240 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat full --unstack yes --steps 5 --warmup 2 --only ours --json "$WORK/mem_unstack.json" \
        --note "A/B: memory of per-layer weights under remat full" ;;
    decode-cmdbuf)
      XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,\
CONDITIONAL" step decode_cmdbuf 150 $PY tools/bench_decode.py --preset mistral-7b --dtype bfloat16 --batch 1 \
        --prompts 4 --new 128 --prompt-tokens 512 --fill --only ours --json "$WORK/decode_cmdbuf.json" \
        --note "A/B: XLA command buffers (CUDA graphs) for while loops and conditionals too" ;;
    profile-train)
      step profile_train 200 $PY tools/profile_step.py train --seq 3000 --batch 1 --hlo "$WORK/hlo" ;;
    profile-decode)
      step profile_decode 200 $PY tools/profile_step.py decode --batch 1 --prompt-tokens 512 --new 32 \
        --hlo "$WORK/hlo" ;;
    profile-decode64)
      step profile_decode64 240 $PY tools/profile_step.py decode --batch 64 --prompt-tokens 1500 --new 16 ;;
    train-xla)
      step train_xla 240 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat none --attention xla --steps 10 --warmup 3 --only ours --json "$WORK/train_xla.json" \
        --note "A/B: einsum attention" ;;
    mem)
      step mem 240 $PY tools/bench_train.py --preset mistral-7b --seq 3000 --batch 1 --dtype bfloat16 \
        --remat full --steps 5 --warmup 2 --json "$WORK/mem.json" --note "memory target: bf16 base, remat full" ;;
    decode)
      step decode 300 $PY tools/bench_decode.py --preset mistral-7b --dtype bfloat16 --batch 1 --prompts 4 \
        --new 128 --prompt-tokens 512 --fill --only ours --only hf-single --json "$WORK/decode.json" \
        --note "batch-1 roofline; 512-token prompts" ;;
    q1000)
      step q1000 400 $PY tools/bench_decode.py --preset mistral-7b --dtype bfloat16 --task phenotype --fill \
        --prompts 1000 --prompt-tokens 1500 --new 50 --batch 64 --repeats 1 --only ours --no-ttft \
        --json "$WORK/q1000.json" --note "1000 phenotype questions, every prompt filled to 1500 tokens" ;;
    q1000-natural)
      step q1000_natural 300 $PY tools/bench_decode.py --preset mistral-7b --dtype bfloat16 --task phenotype \
        --prompts 1000 --prompt-tokens 1500 --new 50 --batch 128 --repeats 1 --only ours \
        --json "$WORK/q1000_natural.json" --note "1000 phenotype questions at their own length" ;;
  esac
done
pack
[ $failed -eq 0 ] || echo "$failed step(s) failed (see their logs in $OUT/results.tgz)" >&2
exit $((failed > 0))
