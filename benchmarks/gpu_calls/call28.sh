# session 44: goodput with the 8B shape (random weights), where a 2048-token chunk costs ~50 ms
# and the 50 ms ITL target binds the colocated engine's chunk; colocated1 at three chunk sizes
set -u
T0=$(date +%s); LIMIT=${LIMIT:-585}
left() { echo $(( LIMIT - ($(date +%s) - T0) )); }
W="--workers 3 --warmup ${WARM:-24} --ttft-slo 1 --itl-slo 0.05 --max-prompt-tokens 8192 --max-output-tokens 128 --long-fraction 0.2 --long-prompt-range 1024,7936 --fresh-prompts --repeats 1 --kv-cache-gb ${KVGB:-30}"
bash benchmarks/gpu_run.sh setup > /tmp/setup.txt 2>&1; tail -2 /tmp/setup.txt
mkdir -p /tmp/gpu-out
GS=$(( $(left) - 25 ))
SHAPE=8b RUN=_8b GOODPUT_S=$GS GOODPUT_ARGS="--configs ${CONFIGS:-semi_pd,colocated1@1024,colocated1@512,colocated1@2048} --semi-pd-fixed $W --sweep ${SWEEP:-8,12,16} --duration-s 5" TAIL=2 bash benchmarks/gpu_run.sh goodput
head -60 /tmp/gpu-out/goodput_bench.txt | cut -c1-300; grep -h "delivery ms" /tmp/gpu-out/goodput_8b.txt | grep -o "^.*rate [0-9]*\|\(kernel_compile\|eager_decode\|graph_capture\) [^;,]*" | head -30
tail -30 /tmp/gpu-out/goodput_8b.txt | cut -c1-300
echo "== compiles while serving"; cut -c1-500 /tmp/gpu-out/compiles_while_serving_8b.txt | head -8
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
