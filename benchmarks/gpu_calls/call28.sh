# session 44: goodput with the 8B shape (random weights), where a 2048-token chunk costs ~50 ms
# and the 50 ms ITL target binds the colocated engine's chunk; colocated1 at three chunk sizes.
# Rates: the 1B runs served ~1050 prompt tokens a request at 0.37-0.42 of the matmul ceiling;
# an 8B token costs ~14.5 GFLOP (6.9x), so at 0.4-0.6 of the ceiling the knee lies near 20-30
# req/s, and 16,24,32 brackets it (8,12,16 would likely pass everywhere and tell nothing)
WARM=${WARM:-24} KVGB=${KVGB:-30}
source benchmarks/gpu_calls/common.sh
GS=$(( $(left) - 25 ))
SHAPE=8b RUN=_8b GOODPUT_S=$GS GOODPUT_ARGS="--configs ${CONFIGS:-semi_pd,colocated1@1024,colocated1@512,colocated1@2048} --semi-pd-fixed $W --sweep ${SWEEP:-16,24,32} --duration-s 5" TAIL=2 bash benchmarks/gpu_run.sh goodput
head -60 /tmp/gpu-out/goodput_bench.txt | cut -c1-300; grep -h "delivery ms" /tmp/gpu-out/goodput_8b.txt | grep -o "^.*rate [0-9]*\|\(kernel_compile\|eager_decode\|graph_capture\) [^;,]*" | head -30
tail -30 /tmp/gpu-out/goodput_8b.txt | cut -c1-300
echo "== compiles while serving"; cut -c1-500 /tmp/gpu-out/compiles_while_serving_8b.txt | head -8
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
