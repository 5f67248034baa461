# session 44: goodput with the 8B shape (random weights), where a 2048-token chunk costs ~50 ms
# and the 50 ms ITL target binds the colocated engine's chunk; colocated1 at three chunk sizes
WARM=${WARM:-24} KVGB=${KVGB:-30}
source benchmarks/gpu_calls/common.sh
GS=$(( $(left) - 25 ))
SHAPE=8b RUN=_8b GOODPUT_S=$GS GOODPUT_ARGS="--configs ${CONFIGS:-semi_pd,colocated1@1024,colocated1@512,colocated1@2048} --semi-pd-fixed $W --sweep ${SWEEP:-8,12,16} --duration-s 5" TAIL=2 bash benchmarks/gpu_run.sh goodput
head -60 /tmp/gpu-out/goodput_bench.txt | cut -c1-300; grep -h "delivery ms" /tmp/gpu-out/goodput_8b.txt | grep -o "^.*rate [0-9]*\|\(kernel_compile\|eager_decode\|graph_capture\) [^;,]*" | head -30
tail -30 /tmp/gpu-out/goodput_8b.txt | cut -c1-300
echo "== compiles while serving"; cut -c1-500 /tmp/gpu-out/compiles_while_serving_8b.txt | head -8
nvidia-smi --query-gpu=memory.used,memory.total --format=csv
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
