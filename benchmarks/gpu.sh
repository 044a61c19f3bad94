#!/usr/bin/env bash
# One GPU session's checks in one call (device time is scarce: one start, then everything in order of
# what matters most). Each step has its own time limit; the whole log goes to $OUT/log.txt and each
# step's JSON result to $OUT (at most 8 files come back from the device machine).
#   OUT=runs/gpu-out bash benchmarks/gpu.sh
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
  timeout "$limit" "$@" 2>&1 | grep -v '^\s*$' | tail -n 40
  echo "== $name: exit ${PIPESTATUS[0]} ($(date +%T))"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
step cuda_tests "${T_TESTS:-90}" python3 -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
step calibration "${T_CALIB:-70}" python3 benchmarks/device_calibration.py profile model_cards/smollm2-135m-drex \
  --base-config runs/gpu/smollm2-config.json --out "$WORK/calib"
cp "$WORK/calib/calibration.json" "$OUT/calibration.json" 2>/dev/null
step decisions "${T_DECIDE:-90}" python3 benchmarks/decisions.py llama-7b --device cuda --dtype bf16 --batch 64 \
  --max-new-tokens 32 --out "$WORK/decisions"
cp "$WORK/decisions/decisions.json" "$OUT/decisions.json" 2>/dev/null
step kernels "${T_KERNELS:-130}" python3 benchmarks/kernels.py --out "$WORK/kernels"
cp "$WORK/kernels/kernels.json" "$OUT/kernels.json" 2>/dev/null
step bench7b "${T_ENGINE:-300}" python3 -m drex_hf.cli.main bench --synthetic-config llama-7b \
  --exit-dist 0.2,0.25,0.2,0.35 --device cuda --dtype bf16 --batch-sizes 8,64,256 --max-new-tokens 32 --no-hf \
  --out "$WORK/bench7b"
cp "$WORK/bench7b/bench.md" "$OUT/bench7b.md" 2>/dev/null
cp "$WORK/bench7b/bench.json" "$OUT/bench7b.json" 2>/dev/null
ls -la "$OUT"
