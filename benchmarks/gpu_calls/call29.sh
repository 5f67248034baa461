# session 45: weight prefetch into L2 at batch 1 and 8 (issue 17): the GPU tests of the kernel
# and the engine with a plan, then prefetch_bench (plans interleaved with no plan, 3 rounds),
# then cuBLAS vs cuBLASLt at the same step (blas_ab.py) for the same machine's baseline
source benchmarks/gpu_calls/common.sh
TESTS="tests/gpu/test_prefetch_gpu.py" TESTS_S=${TS:-120} TEST_TIMEOUT=90 TAIL=4 bash benchmarks/gpu_run.sh tests
grep -E "FAILED|ERROR|passed|failed" /tmp/gpu-out/tests.txt | cut -c1-400 | tail -8; echo "left $(left)"
TAIL=40 PREFETCH_S=$(( $(left) > 330 ? 240 : $(left) - 90 )) bash benchmarks/gpu_run.sh prefetch
echo "left $(left)"
(PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 timeout $(( $(left) - 15 )) python3 benchmarks/gpu_calls/blas_ab.py > /tmp/gpu-out/blas_ab.txt 2>&1; echo "blas rc=$? left $(left)")
grep -E "##|decode b=|Error|error" /tmp/gpu-out/blas_ab.txt | cut -c1-200 | head -30
tar -czf $OUT/gpu-out.tgz -C /tmp/gpu-out .
