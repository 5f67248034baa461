# Sourced by the call scripts here, from the repository root on the GPU machine: LIMIT (seconds
# this call may run, default 585) and left() (what is left of it), session 42's goodput workload
# W (WARM and KVGB override its warm-up requests and KV cache GB), and the machine's setup.
set -u
T0=$(date +%s); LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
W="--workers 3 --warmup ${WARM:-32} --ttft-slo 1 --itl-slo 0.05 --max-prompt-tokens 8192 --max-output-tokens 128 --long-fraction 0.2 --long-prompt-range 1024,7936 --fresh-prompts --repeats 1 --kv-cache-gb ${KVGB:-8}"
bash benchmarks/gpu_run.sh setup > /tmp/setup.txt 2>&1; tail -2 /tmp/setup.txt
mkdir -p /tmp/gpu-out
