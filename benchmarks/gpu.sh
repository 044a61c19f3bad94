#!/usr/bin/env bash
# Every GPU check of the fast-decode-path and self_spec issues in one call, in order of what matters
# most, within ~8 minutes of a 15-minute device budget (start-up included): the steps' time limits sum
# to 480 s (each can be changed: T_TESTS, T_SPEC, T_SHORT, T_LONG, T_HOST). The whole log goes to
# $OUT/log.txt and each step's results to $OUT (8 files come back: the most that may).
#   OUT=runs/gpu-out bash benchmarks/gpu.sh
#
# 1. tests/test_cuda.py: CUDA graphs + Triton kernels equal the reference decoder; a row's tokens and
#    exit layers across batch compositions in bf16 (one bucket, and the default buckets).
# 2. self_spec on Llama-7B shapes (random weights), bf16, trace acceptance 0.8, 32 new tokens, prompts
#    of 128 tokens, batch 1, 8 and 64: full depth (graphs) vs self_spec drafting from the middle exit
#    (layer 15 of 32) with k = 4 and with adaptive k (SpecEngine runs eagerly); no HF.
# 3. Llama-7B shapes, bf16, trace exits 20/25/20/35, 32 new tokens, prompts of 128 tokens, batch 64
#    and 256: full with graphs vs full eager vs HF eager vs HF static cache (with transformers' own
#    torch.compile); drex and batch_all (with graphs); the measured oracle; GPU busy.
# 4. The same at batch 64 with 2048-token prompts (one engine at a time: a 7B store of 64 x 2080
#    positions is 70 GB), no HF compile.
# 5. Host overhead on the tiny shape, graphs on and off (ops, copies, µs per round).
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
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
BENCH=(python3 -m drex_hf.cli.main bench --synthetic-config llama-7b --exit-dist 0.2,0.25,0.2,0.35 --device cuda
  --dtype bfloat16 --max-new-tokens 32 --policies full,full:eager,batch_all,drex --gpu-busy --no-memory)
step cuda_tests "${T_TESTS:-80}" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
step bench7b_self_spec "${T_SPEC:-120}" python3 -m drex_hf.cli.main bench --synthetic-config llama-7b --device cuda \
  --dtype bfloat16 --max-new-tokens 32 --context 128 --batch-sizes 1,8,64 --acceptance 0.8 \
  --policies full,self_spec@15/4,self_spec@15/adaptive --no-hf --no-memory --out "$WORK/self_spec"
cp "$WORK/self_spec/bench.md" "$OUT/bench7b-self_spec.md" 2>/dev/null
cp "$WORK/self_spec/bench.json" "$OUT/bench7b-self_spec.json" 2>/dev/null
step bench7b_ctx128 "${T_SHORT:-150}" "${BENCH[@]}" --batch-sizes 64,256 --context 128 --out "$WORK/ctx128"
cp "$WORK/ctx128/bench.md" "$OUT/bench7b-ctx128.md" 2>/dev/null
cp "$WORK/ctx128/bench.json" "$OUT/bench7b-ctx128.json" 2>/dev/null
step bench7b_ctx2048 "${T_LONG:-100}" "${BENCH[@]}" --batch-sizes 64 --context 2048 --sequential --no-hf-compile \
  --out "$WORK/ctx2048"
cp "$WORK/ctx2048/bench.md" "$OUT/bench7b-ctx2048.md" 2>/dev/null
cp "$WORK/ctx2048/bench.json" "$OUT/bench7b-ctx2048.json" 2>/dev/null
step host_overhead "${T_HOST:-30}" python3 benchmarks/host_overhead.py --device cuda --dtype bf16 --repeats 3 \
  --policies full,full:eager,drex,drex:eager --out "$WORK/host"
cp "$WORK/host/host_overhead.md" "$OUT/host_overhead-gpu.md" 2>/dev/null
ls -la "$OUT"
