# goodput with the stall counters: colocated1 at 64 and 256 sequences against semi_pd
source benchmarks/gpu_calls/common.sh
RUN=${RUN:-_st} GOODPUT_S=${GS:-540} GOODPUT_ARGS="--configs ${CONFIGS:-colocated1@2048,colocated1@2048:256,semi_pd} ${FIXED---semi-pd-fixed} $W --sweep ${SWEEP:-128,144,160,176} --duration-s 5" TAIL=3 bash benchmarks/gpu_run.sh goodput
head -40 /tmp/gpu-out/goodput_bench.txt | cut -c1-300; grep -h "delivery ms" /tmp/gpu-out/goodput${RUN:-_st}.txt | grep -o "^.*rate [0-9]*\|\(kernel_compile\|eager_decode\|graph_capture\) [^;,]*" | head -40
echo "== compiles while serving"; cut -c1-600 /tmp/gpu-out/compiles_while_serving${RUN:-_st}.txt | head -12
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
