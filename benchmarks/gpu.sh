#!/usr/bin/env bash
# Every GPU check of the engine in one call, sized for an H100 with 80 GB (78 GiB usable) and ~8
# minutes of a 15-minute device budget (start-up included): the steps' limits sum to 470 s (each can
# be changed: T_TESTS, T_HOST, T_SHORT, T_LONG, T_SPEC). The whole log goes to $OUT/log.txt, and each
# step copies its results to $OUT as soon as it ends (so a run cut short keeps what finished).
#   OUT=runs/gpu-out bash benchmarks/gpu.sh
#
# 1. tests/test_cuda.py: CUDA graphs + Triton kernels equal the reference decoder; a row's tokens and
#    exit layers across batch compositions in bf16; self_spec's graphs equal full depth.
# 2. Host overhead on the tiny shape, graphs on and off (ops, copies, µs per round).
# 3. Llama-7B shapes (random weights), bf16, trace exits 20/25/20/35, 32 new tokens, prompts of 128
#    tokens, batch 64 and 256: full with graphs vs full eager, drex and batch_all with graphs, the
#    measured oracle, GPU busy; one engine alive at a time (four 7B stores of 256 x 169 positions would
#    be 85 GiB). Graphs are captured lazily (only the buckets steps use).
# 4. The same at a 2048-token context: one engine alive at a time; the batch the memory preflight
#    says fits 76 GiB (56: at 64 the store alone is 66 GiB, 84 GiB with the weights), full and drex.
# 5. self_spec on Llama-7B shapes, trace acceptance 0.8, batch 1, 8 and 64: full vs self_spec drafting
#    from the middle exit (layer 15 of 32) with k = 4, both with graphs.
# Every bench step first checks its memory (--fit-memory 76): weights + stores + fill weights + row
# state + a graph pool, shrinking the batch or context to fit and saying so, before anything is allocated.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRITON_INTERPRET=0
OUT=${OUT:-runs/gpu-out}
WORK=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $* ($(date +%T))"
  timeout "$limit" "$@" 2>&1 | grep -v '^\s*$' | tail -n 60
  echo "== $name: exit ${PIPESTATUS[0]} ($(date +%T))"
}
keep() {  # copy a finished step's results into $OUT at once
  local from=$1 to=$2
  cp "$from/bench.md" "$OUT/$to.md" 2>/dev/null
  cp "$from/bench.json" "$OUT/$to.json" 2>/dev/null
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
BENCH=(python3 -m drex_hf.cli.main bench --synthetic-config llama-7b --device cuda --dtype bfloat16
  --max-new-tokens 32 --no-hf --no-memory --lazy-capture --fit-memory 76 --no-progress)
step cuda_tests "${T_TESTS:-90}" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
step host_overhead "${T_HOST:-40}" python3 benchmarks/host_overhead.py --device cuda --dtype bf16 --repeats 3 \
  --policies full,full:eager,drex,drex:eager --out "$WORK/host"
cp "$WORK/host/host_overhead.md" "$OUT/host_overhead-gpu.md" 2>/dev/null
step bench7b_ctx128 "${T_SHORT:-140}" "${BENCH[@]}" --exit-dist 0.2,0.25,0.2,0.35 --batch-sizes 64,256 --context 128 \
  --policies full,full:eager,batch_all,drex --sequential --gpu-busy --out "$WORK/ctx128"
keep "$WORK/ctx128" bench7b-ctx128
step bench7b_ctx2048 "${T_LONG:-120}" "${BENCH[@]}" --exit-dist 0.2,0.25,0.2,0.35 --batch-sizes 64 --context 2048 \
  --policies full,drex --sequential --no-measured-oracle --out "$WORK/ctx2048"
keep "$WORK/ctx2048" bench7b-ctx2048
step bench7b_self_spec "${T_SPEC:-80}" "${BENCH[@]}" --batch-sizes 1,8,64 --context 128 --acceptance 0.8 \
  --policies full,self_spec@15/4 --out "$WORK/self_spec"
keep "$WORK/self_spec" bench7b-self_spec
ls -la "$OUT"
