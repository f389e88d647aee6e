#!/usr/bin/env bash
# The GPU check of issue 18, for a lent GPU machine: GPU tests (and the CPU tests of the changed loop and
# worker planning, under that machine's torch), then benchmarks/gpu.py. About 8 minutes on one H200.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh      # logs and gpu_bench.json go to $OUT (default ./gpu_check_out)
#   BENCH_ARGS="--sections throughput,peak" bash benchmarks/gpu_check.sh   # a part of the benchmark only
#
# Needs optuna importable (e.g. installed to a folder on PYTHONPATH); MLflow is not used (--no-mlflow), no
# server and no network. Runs from the repository root with the repository first on PYTHONPATH.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"

{ date -u; nvidia-smi || true; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"; \
  "$PY" -c "import pynvml; print('nvidia-ml-py present')" || echo "nvidia-ml-py missing"; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. tests: the gpu-marked ones plus the fast CPU tests of train.py and the worker planning (~2 min).
timeout 300 "$PY" -m pytest tests/test_gpu.py tests/test_train.py tests/test_devices.py -m "gpu or not slow" \
    -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log"
tests_rc=${PIPESTATUS[0]}
echo "pytest exit code: $tests_rc" | tee -a "$OUT/pytest_gpu.log"

# 2. the benchmark (sections capped to stay under ~6 minutes; prints as it goes).
timeout 480 "$PY" benchmarks/gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "benchmark exit code: $bench_rc" | tee -a "$OUT/gpu_bench.log"
exit $(( tests_rc != 0 ? tests_rc : bench_rc ))
