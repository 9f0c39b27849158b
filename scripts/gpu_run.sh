#!/usr/bin/env bash
# The whole GPU run in one device call of at most 600 s, with the wheels carried along:
#
#   make wheels-gpu                  # once, on a CPU machine: .whl/ (ignored by git)
#   run(command="scripts/gpu_run.sh", carry=[".whl"], timeout_s=600)
#
#   scripts/gpu_run.sh [--dry-run] [STAGE...]      STAGE: check build test bench cpu (default: the first four)
#
# Stages, in this order, each given what is left of the budget (HEN_GPU_BUDGET seconds, default
# 550) less what the later stages keep for themselves, and skipped with a line when nothing is left:
#   wheels       .whl/*.whl installed offline (pip --no-index --find-links .whl) into /tmp/hen_site
#   check-quick  python -m hen_kernels.check --quick --device cuda (`hen check`): the reference and Triton
#                on the GPU (~75 Triton compiles per dtype; the H200's first run, autotuning every config,
#                did not reach Triton in 120 s)
#   build        the extension with the CUDA kernels (sm_80, sm_90) against the machine's own torch,
#                in the background while check-quick runs
#   check-cuda   python -m hen_kernels.check --backend cuda: the CUDA kernels just built
#   test-fixes   pytest on the tests of what the last GPU run found (FIX_TESTS, FIX_SELECT), before the rest
#   test         pytest on the test files that exercise the GPU, most important first (each Triton launch
#                key runs the first config its rules keep: HEN_TRITON_AUTOTUNE=first, tests/conftest.py)
#   test-configs pytest -m slow -k test_every_kept_config: every kept config of each Triton kernel, once
#   bench-quick  python -m hen_kernels.bench gpu --quick: every regime at shrunken shapes
#   bench        the full GPU table with the time left (its --budget), if any is left
#   cpu          (only when named) the host CPU's tables (bench shapes, nn on the CPU, cpu), on its last two
#                cores with 2 threads, beside the GPU stages once the build is done: that host has been an
#                Intel Xeon with AMX (issue 15 wants its rows); under benchmarks/results/<gpu>/host-cpu/
# Everything goes to $OUT (the device tool's; /tmp/hen_gpu elsewhere), at most 8 files: run.log
# (every stage's output), summary.txt (one line per stage), check-quick.json, check-cuda.json,
# results.tar.gz (benchmarks/results/<gpu>/) and gpu.md.  Exits non-zero when any stage failed.
#
# --dry-run, on a CPU machine: checks the script, the wheels against scripts/gpu_wheels.txt
# (offline, for CPython 3.12), the size of what a device call carries, and runs the CPU-safe part
# of the check stage (--quick on the CPU); prints the stage plan; starts nothing on a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-/tmp/hen_gpu}
BUDGET=${HEN_GPU_BUDGET:-550}
SITE=/tmp/hen_site
WHEELS=scripts/gpu_wheels.txt
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
GPU_TESTS="tests/test_cuda.py tests/test_cuda_build.py tests/test_kernels.py tests/test_triton.py tests/test_check.py
  tests/test_autograd.py tests/test_compile.py tests/test_bank.py tests/test_nn.py tests/test_bench_gpu.py"

# What the last GPU run found (benchmarks/results/nvidia-h200/run3: Triton float32 hard retrieval, the D = 4096
# l2 tolerance; the test stage stopped before test_autograd's saturated gradients): run first, on their own.
FIX_TESTS="tests/test_triton.py tests/test_kernels.py tests/test_autograd.py"
FIX_SELECT="(triton or cuda) and (underflow or hard_retrieval or (partial_matches_reference and D4096) or saturated)"

DRY=0
STAGES=""
for a in "$@"; do
  case $a in
    --dry-run) DRY=1 ;;
    check|build|test|bench|cpu) STAGES="$STAGES $a" ;;
    *) echo "gpu_run: unknown argument $a (expected --dry-run, check, build, test, bench, cpu)" >&2; exit 2 ;;
  esac
done
STAGES=" ${STAGES:-check build test bench} "
wants() { [[ $STAGES == *" $1 "* ]]; }

mkdir -p "$OUT_DIR"
SUMMARY=$OUT_DIR/summary.txt
: >"$SUMMARY"
START=$SECONDS
status=0

# stage NAME CAP KEEP CMD...: run CMD for at most min(CAP, time left - KEEP) seconds.
stage() {
  local name=$1 cap=$2 keep=$3 left limit t0 rc
  shift 3
  left=$((BUDGET - (SECONDS - START) - keep))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 15 ]; then
    echo "== $name: skipped, no time left (${left} s after keeping ${keep} s for later stages)" | tee -a "$SUMMARY"
    return 0
  fi
  echo "== $name (at most ${limit} s): $*"
  t0=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@"
  rc=$?
  [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${limit} s limit"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$SUMMARY"
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

# cpu_tables DIR CORES END: the host's CPU tables one after another, each stopped at second END of the run.
cpu_tables() {
  local dir=$1 cores=$2 end=$3 left args
  mkdir -p "$dir"
  for args in "shapes --name shapes_host" "nn --device cpu --name nn_host --repeats 5" \
              "nn --device cpu --dtype bfloat16 --name nn_host_bf16 --repeats 5" \
              "cpu --no-compile --threads 2 --name cpu_host"; do
    left=$((end - SECONDS))
    if [ "$left" -lt 30 ]; then echo "== cpu tables: no time left for bench $args"; break; fi
    echo "== cpu tables: bench $args (at most $left s, cores $cores)"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 timeout --signal=INT --kill-after=10 "$left" taskset -c "$cores" \
      "$PY" -m hen_kernels.bench $args --out "$dir"
    echo "== cpu tables: bench ${args%% *} exit $?"
  done
}

dry_run() {
  [ -n "${PYTHON:-}" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python; }
  echo "gpu_run --dry-run: stages${STAGES}within ${BUDGET} s; results to $OUT_DIR"
  bash -n "$0" && echo "script: syntax ok"
  if compgen -G ".whl/*.whl" >/dev/null; then
    # Resolves scripts/gpu_wheels.txt against .whl/ alone, for the GPU's CPython 3.12.
    $PY -m pip install -q --dry-run --no-index --find-links .whl --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp $PLATFORMS --target /tmp/hen_site_dry -r "$WHEELS" \
      && echo "wheels: .whl/ holds every wheel of $WHEELS ($(du -sh .whl | cut -f1))" || status=1
  else
    echo "wheels: .whl/ is empty: run 'make wheels-gpu' first"; status=1
  fi
  # What the device tool carries: the working tree (tracked and untracked-not-ignored) plus .whl.
  bytes=$( (git ls-files -co --exclude-standard -z | xargs -0 -r cat -- 2>/dev/null; cat .whl/* 2>/dev/null) | wc -c)
  echo "carried: $((bytes / 1048576)) MiB of the 64 MiB a device call takes"
  [ "$bytes" -lt $((64 * 1048576)) ] || status=1
  wants check && { stage check-quick-cpu 120 0 "$PY" -m hen_kernels.check --quick --device cpu \
    --json "$OUT_DIR/check-quick.json"; }
  echo "plan on the GPU: wheels, check-quick (<=240 s) beside build (<=300 s), check-cuda (<=90 s)," \
       "test-fixes (<=90 s), test (<=200 s)," \
       "then with what is left: test-configs (<=120 s), bench-quick (<=120 s), bench"
  echo "gpu_run --dry-run: exit $status"
  return $status
}

gpu_run() {
  if ! nvidia-smi -L >"$OUT_DIR/device.txt" 2>&1; then
    echo "gpu_run: no GPU here (nvidia-smi failed); use --dry-run on a CPU machine" >&2
    return 2
  fi
  cat "$OUT_DIR/device.txt"
  rm -f "$OUT_DIR/device.txt"
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-' | tr 'A-Z' 'a-z')
  RES=benchmarks/results/${GPU:-gpu}
  mkdir -p "$RES"
  export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

  if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 0 "$PY" -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" -r "$WHEELS" && export PYTHONPATH="$PYTHONPATH:$SITE"
  else
    echo "== wheels: none carried (.whl/ empty: make wheels-gpu, then carry .whl); tests needing them skip" \
      | tee -a "$SUMMARY"
  fi

  # The build (CPU cores) runs beside check-quick (mostly the GPU and Triton's compiler): the machine
  # has 16 cores, and the lease is short.  Its output is shown once it is done.
  local build_pid="" build_log=/tmp/hen_build.log
  if wants build; then
    stage build 300 150 env CMAKE_ARGS="-DHEN_CUDA=ON ${CMAKE_ARGS:-}" "$PY" setup.py -q build_ext --inplace \
      >"$build_log" 2>&1 &
    build_pid=$!
  fi
  # The CPU tables start as soon as the build is done (they need the extension), beside whatever runs then.
  local cpu_pid=""
  if wants cpu; then
    local n; n=$(nproc)
    ( while [ -n "$build_pid" ] && kill -0 "$build_pid" 2>/dev/null; do sleep 2; done
      cpu_tables "$RES/host-cpu" "$((n - 2)),$((n - 1))" $((START + BUDGET - 30)) ) >/tmp/hen_cpu_tables.log 2>&1 &
    cpu_pid=$!
    echo "== cpu tables: on cores $((n - 2)),$((n - 1)) once the build is done (their log comes at the end)"
  fi
  # Correctness first: check-quick keeps time for check-cuda and the tests when they are wanted; the tables
  # get what is left.
  local keep_checks=$(( $(wants test && echo 200 || echo 0) + $(wants check && echo 90 || echo 0) ))
  wants check && stage check-quick 240 "$keep_checks" "$PY" -m hen_kernels.check --quick --device cuda \
    --json "$OUT_DIR/check-quick.json"
  if wants build; then
    wait "$build_pid" || status=1
    cat "$build_log"
    "$PY" -c "import torch, hen_kernels as hk; from hen_kernels import backends; r = backends.load_extension(); \
print('backends:', hk.available_backends(), '| extension:', r or 'loaded', '| cuda:', \
backends.BACKENDS['cuda'].unavailable_reason or torch.ops.hen_kernels.cuda_info())"
  fi
  wants check && stage check-cuda 90 "$(wants test && echo 200 || echo 0)" "$PY" -m hen_kernels.check --backend cuda \
    --json "$OUT_DIR/check-cuda.json"
  # shellcheck disable=SC2086
  wants test && stage test-fixes 90 200 "$PY" -m pytest -q -p no:cacheprovider -rfEs $FIX_TESTS -k "$FIX_SELECT"
  # shellcheck disable=SC2086
  wants test && stage test 200 0 "$PY" -m pytest -q -p no:cacheprovider -rfEs $GPU_TESTS
  wants test && stage test-configs 120 0 "$PY" -m pytest -q -p no:cacheprovider -rfEs -m slow \
    -k test_every_kept_config tests/test_triton.py
  if wants bench; then
    stage bench-quick 120 0 "$PY" -m hen_kernels.bench gpu --quick --out "$RES/quick"
    left=$((BUDGET - (SECONDS - START) - 20))
    stage bench $((left > 0 ? left : 0)) 0 "$PY" -m hen_kernels.bench gpu --out "$RES" --budget $((left - 30))
  fi

  if [ -n "$cpu_pid" ]; then
    wait "$cpu_pid"
    cp /tmp/hen_cpu_tables.log "$RES/host-cpu/log.txt"
    cat /tmp/hen_cpu_tables.log
  fi
  for f in "$RES/gpu.md" "$RES/quick/gpu.md"; do
    [ -f "$f" ] && { cp "$f" "$OUT_DIR/gpu.md"; break; }
  done
  tar czf "$OUT_DIR/results.tar.gz" "$RES" 2>/dev/null
  echo "gpu_run: $((SECONDS - START)) s; results in $RES (and $OUT_DIR/results.tar.gz); exit $status" | tee -a "$SUMMARY"
  return $status
}

# One log of everything, in $OUT even when the device tool stops the call at its limit.
if [ "$DRY" = 1 ]; then dry_run; else gpu_run; fi 2>&1 | tee "$OUT_DIR/run.log"
exit "${PIPESTATUS[0]}"
