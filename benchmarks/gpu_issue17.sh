#!/usr/bin/env bash
# Issue 17 on a GPU machine in one call (benchmarks/README.md, "issue 17"), from the repo root:
#
#     OUT=$OUT bash benchmarks/gpu_issue17.sh          # TOKENIZER=.carry/smol_tok adds swap_bench
#     DRY_RUN=1 bash benchmarks/gpu_issue17.sh         # CPU: the parts that run without a GPU
#
# 1. tests/gpu, with the overlapped-vs-plain equality tests (CUDA graphs on);
# 2. gpu_bench --engine-only: Engine.step with the overlapped scheduler off / on against the
#    graph step, 1B shape, batch 1/32/128 (target: within 1.15x of the graph step at 32 and 128);
# 3. step_overhead: the host's parts of a step (schedule / prepare / sample), batch 32/128;
# 4. with TOKENIZER set: swap_bench recompute / swap / auto on a 1B-shape fp32 model (the copy
#    rate now measured; swap p99 ITL against recompute's).
# Every step runs under its own timeout (caps summing to ~600 s, one device call); a failure is
# reported and the next step still runs. SKIP_TESTS=1 leaves out step 1 (a second call).
set -u
OUT=${OUT:-issue17-out}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -z "${PYTHONPATH:-}" ]; then  # import kvrelay from this checkout, the root off sys.path
    mkdir -p /tmp/site && ln -sfn "$PWD" /tmp/site/kvrelay
    export PYTHONPATH=/tmp/site
fi
export PYTHONSAFEPATH=1
status=0
run() {  # run NAME TIMEOUT_S CMD...: output to $OUT/NAME.txt and to the terminal
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
PYTEST=("$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib -o addopts=)
if [ -n "${DRY_RUN:-}" ]; then
    run overlap_cpu 900 "${PYTEST[@]}" tests/integration/test_engine_overlap.py -x
    run step_overhead 300 "$PY" benchmarks/step_overhead.py --batches 32 128 --steps 20 \
        --reps 1 --overlap off on --json "$OUT/step_overhead.json"
    exit $status
fi
[ -n "${SKIP_TESTS:-}" ] || run tests_gpu 200 "${PYTEST[@]}" tests/gpu
run gpu_bench 150 "$PY" benchmarks/gpu_bench.py --engine-only --out "$OUT"
run step_overhead 60 "$PY" benchmarks/step_overhead.py --device cuda --batches 32 128 \
    --steps 40 --reps 3 --overlap off on --json "$OUT/step_overhead.json"
if [ -n "${TOKENIZER:-}" ]; then
    model=/tmp/kvrelay-1b-fp32
    run make_model 45 "$PY" -c "import torch; from pathlib import Path
from kvrelay.benchmarks.gpu_serve import make_model
make_model(Path('$model'), Path('$TOKENIZER'), torch.float32, '1b', 'cuda')"
    run swap_bench 150 "$PY" benchmarks/swap_bench.py --model "$model" --device cuda \
        --dtype float32 --requests 64 --prompt 512 --out 256 --num-blocks 1024 --cpu-kv-gb 4 \
        --json "$OUT/swap_bench.json"
fi
exit $status
