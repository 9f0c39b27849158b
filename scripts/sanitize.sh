#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer and UndefinedBehaviorSanitizer: the CPU extension
# (forward, backward, binding) built with both and driven by the tests that reach it, and the
# CUDA kernels' CPU emulation (csrc/emu) built with both.  An out-of-bounds read that happens to
# land in mapped memory, or a signed overflow in an index, passes every comparison with the
# reference; here it stops the run with a report.
#
#   scripts/sanitize.sh                  the default tests below (17 min on 2 cores, EPYC Zen 4)
#   scripts/sanitize.sh tests/test_x.py  those instead (pytest arguments)
#
# It works on a copy of the working tree (build/sanitize/tree), so the package's own build is
# untouched; reports land in build/sanitize/logs and any report fails the run.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
WORK=${HEN_SANITIZE_DIR:-$ROOT/build/sanitize}
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
if [ $# -gt 0 ]; then
  TESTS=("$@")
else
  TESTS=(tests/test_cpu_kernel.py tests/test_fast_update.py tests/test_kernels.py tests/test_split_banks.py
         tests/test_autograd.py tests/test_nn.py tests/test_nn_checks.py tests/test_nn_hflayers.py
         tests/test_compile.py tests/test_torch_conventions.py tests/test_validation.py tests/test_weights.py
         tests/test_properties.py tests/test_bank.py tests/test_bank_files.py tests/test_bank_crash.py
         tests/test_bank_threads.py tests/test_distributed.py tests/test_hen_masked.py tests/test_check.py
         tests/test_cuda_emulated.py)
fi

rm -rf "$WORK/tree" "$WORK/logs"
mkdir -p "$WORK/tree" "$WORK/logs"
# Tracked and untracked files, not the ignored ones (the package's own _C among them).
(cd "$ROOT" && git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf -) |
  tar -xf - -C "$WORK/tree"

SUFFIX=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
cmake -S "$WORK/tree" -B "$WORK/build" -DHEN_EXT_DIR="$WORK/tree/hen_kernels" -DHEN_EXT_SUFFIX="$SUFFIX" \
  -DHEN_CUDA=OFF -DPython3_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="$SAN" -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" >/dev/null
cmake --build "$WORK/build" -j "$(nproc)"

# The instrumented _C needs the sanitizers' runtimes first in the process (python is not built
# with them); torch's own leaks and its operator new/free pairing are not ours to report.
# fork children, g++ and the emulator inherit the same settings and log to the same place.
export LD_PRELOAD="$(g++ -print-file-name=libasan.so) $(g++ -print-file-name=libubsan.so)"
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:detect_stack_use_after_return=0:log_path=$WORK/logs/asan"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$WORK/logs/ubsan"
export PYTHONMALLOC=malloc
export HEN_EMU_CXXFLAGS="$SAN"
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}

status=0
(cd "$WORK/tree" && PYTHONPATH="$WORK/tree" "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}") || status=$?

# ASan's note that it only partly follows the emulator's swapcontext fibers is not a finding:
# a log with any other line is.
reports=""
for f in "$WORK"/logs/*; do
  [ -e "$f" ] || continue
  if grep -q -v -x -E "(==[0-9]+==WARNING: ASan doesn't fully support makecontext/swapcontext.*)?" "$f"; then
    reports="$reports $f"
  fi
done
if [ -n "$reports" ]; then
  echo "sanitizer reports:" >&2
  for f in $reports; do echo "== $f" >&2; head -60 "$f" >&2; done
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "the tests failed (exit $status) without a sanitizer report" >&2
  exit "$status"
fi
echo "no sanitizer reports: ${TESTS[*]}"
