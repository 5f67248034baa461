# session 43: the never-GPU-run semi-PD graph sets and sparse tests, then the kernel A/B (old = 86a82f9)
source benchmarks/gpu_calls/common.sh
TESTS="tests/gpu/test_sparse_graphs_gpu.py tests/gpu/test_sparse_gpu.py" TESTS_S=${TS:-240} TEST_TIMEOUT=150 TAIL=4 bash benchmarks/gpu_run.sh tests
grep -E "FAILED|ERROR|passed|failed" /tmp/gpu-out/tests.txt | cut -c1-400 | tail -12; echo "left $(left)"
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
(PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 timeout 150 python3 benchmarks/gpu_calls/blas_ab.py > /tmp/gpu-out/blas_ab.txt 2>&1; echo "blas rc=$? left $(left)")
grep -E "##|decode b=|Error|error" /tmp/gpu-out/blas_ab.txt | cut -c1-200 | head -40
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
timeout $(( $(left) - 15 )) bash benchmarks/ab_tree.sh run 3 python3 benchmarks/kernel_bench.py --skip move > /tmp/gpu-out/ab_kernel_bench.txt 2>&1
echo "ab rc=$? left $(left)"; grep -iE "prefill|decode" /tmp/gpu-out/ab_kernel_bench.txt | cut -c1-200 | head -60
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
