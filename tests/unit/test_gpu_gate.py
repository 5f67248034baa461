"""The gate between a CUDA graph capture and other threads' GPU work (workers/gpu_gate.py):
pure thread logic, no GPU; the GPU test is tests/gpu/test_cuda_graphs.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvrelay.workers.gpu_gate import CaptureContended, GpuGate


def _until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def _in_thread(fn: Callable[[], None]) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_a_capture_waits_for_another_threads_work_and_holds_new_work_off() -> None:
    gate = GpuGate()
    log: list[str] = []
    in_work, end_work, in_capture, end_capture = (threading.Event() for _ in range(4))

    def worker() -> None:
        with gate.work():
            log.append("work")
            in_work.set()
            end_work.wait(10)
        log.append("work done")

    def capturer() -> None:
        with gate.capture():
            log.append("capture")
            in_capture.set()
            end_capture.wait(10)
        log.append("capture done")

    def late_worker() -> None:
        with gate.work():
            log.append("late work")

    w = _in_thread(worker)
    assert in_work.wait(10)
    c = _in_thread(capturer)
    _until(lambda: gate.capture_waits == 1, "the capture to wait")
    late = _in_thread(late_worker)  # comes while the capture waits: must not overtake it
    end_work.set()
    assert in_capture.wait(10)
    assert "late work" not in log
    end_capture.set()
    for t in (w, c, late):
        t.join(10)
    assert log == ["work", "work done", "capture", "capture done", "late work"]
    assert gate.captures == 1


def test_sections_are_reentrant_and_a_threads_own_work_does_not_block_its_capture() -> None:
    gate = GpuGate()
    with gate.work(), gate.work(), gate.capture(), gate.capture(), gate.work():
        pass
    assert gate.captures == 1 and gate.capture_waits == 0
    done = threading.Event()

    def other() -> None:
        with gate.capture():
            done.set()

    _in_thread(other).join(10)
    assert done.is_set()  # nothing left held


def test_work_sections_of_two_threads_do_not_wait_for_each_other() -> None:
    gate = GpuGate()
    inside = threading.Barrier(2, timeout=10)

    def worker() -> None:
        with gate.work():
            inside.wait()  # both inside at once, or the barrier times out

    threads = [_in_thread(worker) for _ in range(2)]
    for t in threads:
        t.join(10)
    assert not inside.broken


def test_a_capture_from_inside_work_while_another_thread_waits_to_capture_is_refused() -> None:
    """Two lanes each capturing inside their own forward section would wait for each other."""
    gate = GpuGate()
    a_in, a_go = threading.Event(), threading.Event()
    result: list[object] = []

    def lane_a() -> None:
        with gate.work():
            a_in.set()
            a_go.wait(10)
            try:
                with gate.capture():
                    result.append("captured")
            except CaptureContended as exc:
                result.append(exc)

    def lane_b() -> None:
        with gate.work(), gate.capture():
            result.append("b captured")

    a = _in_thread(lane_a)
    assert a_in.wait(10)
    b = _in_thread(lane_b)
    _until(lambda: gate.capture_waits == 1, "lane b's capture to wait for lane a")
    a_go.set()
    a.join(10)
    b.join(10)
    assert isinstance(result[0], CaptureContended) and result[1] == "b captured"
    assert not a.is_alive() and not b.is_alive()
    assert isinstance(result[0], RuntimeError)  # what the graph runner catches
