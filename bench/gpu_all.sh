#!/usr/bin/env bash
# The GPU benchmarks of docs/BENCHMARKS.md on one GPU (H100 / H200; JAX + CUDA, torch, transformers),
# sampler and train step, within a time budget.
#
#   bash bench/gpu_all.sh            # on the GPU machine; results in $OUT (default runs/gpu_all)
#   bash bench/gpu_all.sh --smoke    # the same pieces at tiny shapes, on this CPU (checks the script)
#
# Pieces, in priority order; each has its own time limit and none starts with less than 20 s of the
# budget left (BUDGET_S, default 360 s of wall time); skipped pieces are listed in summary.txt:
#   env            versions, devices; wheels from .gpu_wheels/ (ml_collections, absl-py, soundfile, ...)
#                  installed if present and the modules are missing (e2e_speed needs them, the rest not)
#   gpu_tests      the tests that need a GPU (tests/test_lm.py: cuDNN decode attention against `attend`)
#   b1_long        batch 1 over 1500 steps (30 s): the library's step against cuDNN self-attention,
#                  which reads only the filled part of the cache (one segment: the whole cache read
#                  at every step costs 0.31 ms of the 1.29 ms step at 1500 steps)
#   b1_rows        batch 1, 300 steps: the library's step beside its projection weights laid out
#                  [*out, D_in], so the products-and-sum projections reduce contiguous rows (variant rows)
#   e2e_30s_b1     e2e_speed: text -> WAV, 30 s, batch 1, cold then warm, ours (sample.py) vs transformers
#   train_small    train_speed, small shape, 30 s segments, batch 8, bf16: our train step vs
#                  transformers' decoder step (bf16 autocast, AdamW), steps/s, MFU, peak memory (our
#                  unrolled step compiled in 178 s on an H200)
#   b1_long_seg4   b1_long with the step scan in 4 segments
#   profile_b1     decode_profile, small shape, bf16, batch 1, 300 steps: the decode step's device time by
#                  kernel (jax.profiler)
#   variants_b1    attention variants of the decode step timed side by side at batch 1 (XLA's dots,
#                  products and sums, cuDNN for self- / cross-attention)
#   variants_b8    XLA against cuDNN self-attention at batch 8 (16 rows), 1500 steps
#   variants_b64   the same at batch 64, 1500 steps
#   train_profile  our train step (train_small's shape, ours only): device time by kernel
#   train_rolled   our train step with the layer loop (scan_unroll 1, ours only), beside train_unrolled
#   train_unrolled the same with the layer scan unrolled (model.scan_unroll=0)
#   b1_matmul      profile_b1 beside the layer projections as matmuls (variant matmul; the library
#                  runs them as products and sums at batch 1 on a GPU)
#   b1_cublas      b1_matmul with XLA's Triton matmuls off (cuBLAS for every dot)
#   codec_30s      codec_speed: EnCodec 32 kHz encode / decode of 30 s, ours vs transformers, fp32
#   small_b1       sample_speed, small shape (24 x 1024), bf16, batch 1, CFG, 1500 steps: ours vs
#                  transformers fp32 (its fastest), same run; kernels and bytes copied per step
#   small_b64      the same at batch 64 (segments chosen by the sampler: 4)
#   cmdbuf_while   small_b1 ours only, with XLA command buffers for the whole step loop (WHILE, CONDITIONAL)
#   medium_b1      48 x 1536, batch 1, 300 steps, ours only
#   large_b1       48 x 2048, batch 1, 300 steps, ours only
#   cmdbuf_off     small_b1 ours only, command buffers off
#   small_b64_seg1 small_b64 ours only with one segment (attention reads the whole cache at every step)
# PIECES="env profile_b1 ..." runs only the pieces named (still in this order).
# Every piece writes $OUT/<piece>.txt (and .json where the bench writes one); summary.txt has one line per
# piece: exit code and seconds.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_all}
BUDGET_S=${BUDGET_S:-360}
PIECES=${PIECES:-}     # space-separated piece names to run (default: all, in the order below)
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"
START=$(date +%s)

piece() {   # piece NAME LIMIT_S [ENV=VALUE ...] -- COMMAND ...
  local name=$1 limit=$2
  shift 2
  if [ -n "$PIECES" ] && [[ " $PIECES " != *" $name "* ]]; then
    return
  fi
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  local now left rc
  now=$(date +%s)
  left=$((BUDGET_S - (now - START)))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped (budget: ${left}s left)" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit}s, ${left}s of budget left)"
  env ${envs[@]+"${envs[@]}"} timeout -k 10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  rc=$?
  tail -n 14 "$OUT/$name.txt"
  echo "$name rc=$rc $(( $(date +%s) - now ))s" | tee -a "$OUT/summary.txt"
}

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  SMALL=(--layers 2 --dim 64 --heads 4 --card 64 --top-k 16 --text-dim 32)
  MEDIUM=(--layers 3 --dim 96 --heads 4 --card 64 --top-k 16 --text-dim 32)
  LARGE=(--layers 3 --dim 128 --heads 4 --card 64 --top-k 16 --text-dim 32)
  TRAIN=(--layers 2 --dim 64 --heads 4 --card 64 --batch 2 --seconds 2 --steps 2 --repeats 2)
  STEPS=24; SHORT=12; CODEC_S=1; B8=2; B64=4; E2E=(--smoke --durations 1 --batches 1); EXTRA=(--torch-threads 1)
  # The sampler benches must not need what the GPU image lacks (absl comes with flax, which needs it).
  PY=(python -c "import runpy, sys
for m in ('ml_collections', 'soundfile', 'tensorflow_datasets', 'librosa', 'tensorflow'):
  sys.modules[m] = None
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name='__main__')")
else
  SMALL=(); MEDIUM=(--layers 48 --dim 1536 --heads 24); LARGE=(--layers 48 --dim 2048 --heads 32)
  TRAIN=(--size small --batch 8 --seconds 30 --steps 5 --repeats 2)
  STEPS=1500; SHORT=300; CODEC_S=30; B8=8; B64=64; E2E=(--durations 30 --batches 1 --states warm); EXTRA=()
  PY=(python)
fi
WHILE_FLAGS="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
SS=(bench/sample_speed.py --dtype bfloat16 --hf-dtype float32)

env_check() {
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  if ! python -c "import ml_collections, absl, soundfile" 2>/dev/null && [ -d .gpu_wheels ]; then
    python -m pip install -q --no-index --find-links .gpu_wheels ml_collections absl-py soundfile tqdm
  fi
  python -c "import sys, jax, flax, numpy; print(sys.version.split()[0], 'jax', jax.__version__, 'flax', \
flax.__version__, jax.devices())"
  python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
  python -c "import ml_collections, absl, soundfile; print('e2e modules: ok')"
}

piece env 60 -- bash -c "$(declare -f env_check); env_check"
piece gpu_tests 150 -- python -m pytest -q -n 0 -p no:cacheprovider tests/test_lm.py -k cudnn
piece b1_long 120 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $STEPS --variants base,cudnn-self --agree-steps 0 --json "$OUT/b1_long.json"
piece b1_rows 120 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $SHORT --variants base,rows --json "$OUT/b1_rows.json"
piece e2e_30s_b1 200 -- python bench/e2e_speed.py "${E2E[@]}" ${EXTRA[@]+"${EXTRA[@]}"} --json "$OUT/e2e.json"
piece train_small 300 -- python bench/train_speed.py "${TRAIN[@]}" --json "$OUT/train_small.json"
piece b1_long_seg4 90 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $STEPS --segments 4 --variants base,cudnn-self --agree-steps 0 \
    --json "$OUT/b1_long_seg4.json"
piece profile_b1 120 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $SHORT --variants base --profile --agree-steps 0 --json "$OUT/profile_b1.json"
piece variants_b1 200 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $SHORT --variants xla,reduce,cudnn-self,cudnn-both --agree-steps 0 \
    --json "$OUT/variants_b1.json"
piece variants_b8 150 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch $B8 --steps $STEPS --repeats 2 --variants xla,cudnn-self --agree-steps 0 \
    --json "$OUT/variants_b8.json"
piece variants_b64 200 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch $B64 --steps $STEPS --repeats 2 --variants xla,reduce,cudnn-self --agree-steps 0 \
    --json "$OUT/variants_b64.json"
piece train_profile 150 -- python bench/train_speed.py "${TRAIN[@]}" --skip-hf --profile \
    --json "$OUT/train_profile.json"
piece train_rolled 120 -- python bench/train_speed.py "${TRAIN[@]}" --skip-hf --scan-unroll 1 \
    --json "$OUT/train_rolled.json"
piece train_unrolled 200 -- python bench/train_speed.py "${TRAIN[@]}" --skip-hf --profile --scan-unroll 0 \
    --json "$OUT/train_unrolled.json"
piece b1_matmul 130 -- "${PY[@]}" bench/decode_profile.py ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 \
    --batch 1 --steps $SHORT --variants base,matmul --profile --agree-steps 0 --json "$OUT/b1_matmul.json"
piece b1_cublas 130 XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" -- "${PY[@]}" bench/decode_profile.py \
    ${SMALL[@]+"${SMALL[@]}"} --dtype bfloat16 --batch 1 --steps $SHORT --variants base,matmul --profile \
    --agree-steps 0 --json "$OUT/b1_cublas.json"
piece codec_30s 120 -- python bench/codec_speed.py --seconds $CODEC_S --repeats 5
piece small_b1 110 -- "${PY[@]}" "${SS[@]}" ${SMALL[@]+"${SMALL[@]}"} --batch 1 --steps $STEPS --repeats 3 \
    --hf-repeats 1 --hlo-stats ${EXTRA[@]+"${EXTRA[@]}"} --json "$OUT/small_b1.json"
piece small_b64 240 -- "${PY[@]}" "${SS[@]}" ${SMALL[@]+"${SMALL[@]}"} --batch $B64 --steps $STEPS --repeats 2 \
    --hf-repeats 1 --hlo-stats ${EXTRA[@]+"${EXTRA[@]}"} --json "$OUT/small_b64.json"
piece cmdbuf_while 70 XLA_FLAGS="$WHILE_FLAGS" -- "${PY[@]}" "${SS[@]}" ${SMALL[@]+"${SMALL[@]}"} --batch 1 \
    --steps $STEPS --repeats 3 --skip-hf --hlo-stats --json "$OUT/cmdbuf_while.json"
piece medium_b1 90 -- "${PY[@]}" "${SS[@]}" "${MEDIUM[@]}" --batch 1 --steps $SHORT --repeats 2 \
    --skip-hf --hlo-stats --json "$OUT/medium_b1.json"
piece large_b1 90 -- "${PY[@]}" "${SS[@]}" "${LARGE[@]}" --batch 1 --steps $SHORT --repeats 2 \
    --skip-hf --json "$OUT/large_b1.json"
piece cmdbuf_off 70 XLA_FLAGS="--xla_gpu_enable_command_buffer=" -- "${PY[@]}" "${SS[@]}" ${SMALL[@]+"${SMALL[@]}"} \
    --batch 1 --steps $STEPS --repeats 3 --skip-hf --json "$OUT/cmdbuf_off.json"
piece small_b64_seg1 70 -- "${PY[@]}" "${SS[@]}" ${SMALL[@]+"${SMALL[@]}"} --batch $B64 --steps $STEPS --repeats 2 \
    --skip-hf --segments 1 --json "$OUT/small_b64_seg1.json"
echo "=== done in $(( $(date +%s) - START ))s; results in $OUT"
cat "$OUT/summary.txt"
