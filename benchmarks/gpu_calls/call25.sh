# session 43, call A: the semi-PD GPU tests (graph sets never GPU-run), then goodput with the
# deadline policy on both sides
source benchmarks/gpu_calls/common.sh
TESTS="tests/gpu/test_semi_pd_gpu.py tests/gpu/test_engine_gpu.py::test_graphs_captured_up_front" TESTS_S=${TS:-150} TEST_TIMEOUT=120 TAIL=3 bash benchmarks/gpu_run.sh tests
grep -E "FAILED|ERROR|passed|failed" /tmp/gpu-out/tests.txt | cut -c1-400 | tail -8; echo "left $(left)"
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
GS=$(( $(left) - 25 ))
RUN=_dl GOODPUT_S=$GS GOODPUT_ARGS="--configs ${CONFIGS:-colocated1@2048,colocated1@2048/deadline,semi_pd,semi_pd/deadline} --semi-pd-fixed $W --sweep ${SWEEP:-144,160,176} --duration-s 5" TAIL=2 bash benchmarks/gpu_run.sh goodput
head -40 /tmp/gpu-out/goodput_bench.txt | cut -c1-300; grep -h "delivery ms" /tmp/gpu-out/goodput_dl.txt | grep -o "^.*rate [0-9]*\|\(kernel_compile\|eager_decode\|graph_capture\) [^;,]*" | head -30
echo "== compiles while serving"; cut -c1-500 /tmp/gpu-out/compiles_while_serving_dl.txt | head -8
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
