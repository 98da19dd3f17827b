#!/usr/bin/env bash
# The GPU session's one call: install carried wheels, run the GPU tests, then every benchmark.
#
#   here (once):  bash scripts/gpu_check.sh fetch      # wheels the GPU image lacks, into .whl/ (git-ignored)
#   device tool:  run(command="bash scripts/gpu_check.sh", carry=[".whl"])
#
# The image has torch 2.11 / Triton 3.6 / transformers but no optuna, lightgbm or platformdirs.
# Results land in benchmarks/results/ and are copied under $OUT to come back; logs too.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS="optuna==4.5.0 sqlalchemy==2.0.43 alembic==1.16.5 mako==1.3.10 colorlog==6.9.0 lightgbm==4.6.0 platformdirs==4.4.0"

if [[ "${1:-}" == "fetch" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d .whl "$w" || exit 1
  done
  ls -la .whl
  exit 0
fi

OUT="${OUT:-/tmp/adaptc-gpu}"
mkdir -p "$OUT/results"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1 ADAPTC_CACHE_DIR="$OUT/cache"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

status=0
python3 -m pytest -q -rs -m gpu tests/kernels 2>&1 | tee "$OUT/gpu-tests.log" || status=1
python3 -m pytest -q -x tests/passes tests/test_api.py 2>&1 | tail -5 | tee "$OUT/cpu-tests-on-gpu-box.log" || status=1
python3 benchmarks/moe.py --no-smollm2 --out benchmarks/results 2>&1 | tee "$OUT/moe.log" || status=1
python3 benchmarks/attention.py --out benchmarks/results 2>&1 | tee "$OUT/attention.log" || status=1
python3 benchmarks/exit_confidence.py --out benchmarks/results 2>&1 | tee "$OUT/exit_confidence.log" || status=1
python3 benchmarks/tuner.py --record 2>&1 | tee "$OUT/tuner.log" || status=1
cp benchmarks/results/* "$OUT/results/"
exit $status
