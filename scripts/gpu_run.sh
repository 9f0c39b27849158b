#!/usr/bin/env bash
# The whole GPU run in one call of the `device` tool: build the extension
# against the machine's own torch (CUDA kernels for sm_80/sm_90), run the test
# suite on the GPU, then the GPU benchmark tables.  No package registry is
# needed: the machine's python already has torch, triton, pytest and
# matplotlib; wheels in .whl/ (carried with the call) are added when present.
#
#   scripts/gpu_run.sh [build] [test] [bench] [quick]     (default: build test bench)
#
# Results go to benchmarks/results/<gpu>/ (gpu.md, gpu.json, roofline.png,
# bank.md, nn.md); logs and a copy of the results to $OUT when the device tool
# sets it (else /tmp/hen_gpu).  Exits non-zero when any stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOG=${OUT:-/tmp/hen_gpu}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGES=" ${*:-build test bench} "
status=0

if ! nvidia-smi -L >"$LOG/device.txt" 2>&1; then
  echo "gpu_run: no GPU here (nvidia-smi failed); nothing to do" >&2
  exit 2
fi
cat "$LOG/device.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
RES=benchmarks/results/${GPU:-gpu}
mkdir -p "$RES"

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/hen_site .whl/*.whl && \
    export PYTHONPATH="$PYTHONPATH:/tmp/hen_site"
fi

stage() {  # stage NAME CMD...: run, log to $LOG/NAME.log, remember a failure
  local name=$1 start=$SECONDS rc
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$LOG/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=$rc
}

QUICK=""
[[ $STAGES == *" quick "* ]] && QUICK="--quick"

if [[ $STAGES == *" build "* ]]; then
  stage build env CMAKE_ARGS="-DHEN_CUDA=ON ${CMAKE_ARGS:-}" $PY setup.py -q build_ext --inplace
  $PY -c "import torch, hen_kernels as hk; from hen_kernels import backends; backends.load_extension();
print('backends:', hk.available_backends(), '| cuda:', torch.ops.hen_kernels.cuda_info(),
      '| cuda reason:', backends.BACKENDS['cuda'].unavailable_reason)" 2>&1 | tee "$LOG/backends.txt"
fi
if [[ $STAGES == *" test "* ]]; then
  stage test $PY -m pytest -q -p no:cacheprovider -ra tests
fi
if [[ $STAGES == *" bench "* ]]; then
  stage bench-gpu $PY -m hen_kernels.bench gpu --out "$RES" $QUICK --budget "${HEN_BENCH_BUDGET:-420}"
  stage bench-nn $PY -m hen_kernels.bench nn --out "$RES" --device cuda $QUICK
  stage bench-bank $PY -m hen_kernels.bench bank --out "$RES" $QUICK
fi
cp -r "$RES" "$LOG/results" 2>/dev/null || true
echo "gpu_run: results in $RES (copied to $LOG/results); exit $status"
exit $status
