"""Load generator: workload statistics, CSV replay, report math, and the HTTP driver against a
stub server that streams OpenAI-format SSE on loopback."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from scipy import stats

from kvrelay.benchmarks.loadgen import RunResult, main, run_open_loop
from kvrelay.benchmarks.loadgen_drivers import http_driver
from kvrelay.benchmarks.loadgen_report import (
    RequestResult,
    goodput,
    meets_slo,
    summarize,
    summarize_by_tenant,
)
from kvrelay.benchmarks.loadgen_workload import (
    PROMPT_SLACK,
    Arrival,
    fit_context,
    gamma_gaps,
    parse_tenants,
    read_burstgpt_csv,
    rescale_to_rate,
    synthetic_workload,
    zipf_lengths,
)
from kvrelay_testing.clock import spin

SAMPLE = (
    Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "burstgpt_synthetic_sample.csv"
)


def test_gamma_arrivals_are_bursty_and_fit() -> None:
    gaps = gamma_gaps(8000, np.random.default_rng(3), rate=4.0)
    shape, loc, scale = stats.gamma.fit(gaps, floc=0)
    assert shape < 1 and abs(shape - 0.5) < 0.05
    assert abs(gaps.mean() - 0.25) < 0.02  # rate rescales the mean, keeps the shape
    assert stats.kstest(gaps, "gamma", args=(shape, loc, scale)).pvalue > 0.01
    # and a Poisson process (exponential gaps) is clearly rejected
    assert stats.kstest(gaps, "expon", args=(0, gaps.mean())).pvalue < 1e-6


def test_zipf_lengths_have_a_sane_log_log_slope() -> None:
    x = zipf_lengths(40_000, np.random.default_rng(5), a=1.1, maximum=1024)
    assert x.min() >= 1 and x.max() < 1024
    ks = np.arange(1, 31)
    counts = np.array([(x == k).sum() for k in ks])
    slope = np.polyfit(np.log(ks), np.log(counts), 1)[0]
    assert -1.3 < slope < -0.9
    with pytest.raises(ValueError):
        zipf_lengths(3, np.random.default_rng(0), a=1.0)


def test_tenant_mix() -> None:
    assert parse_tenants("heavy:9,light:1") == (("heavy", 0.9), ("light", 0.1))
    arr = synthetic_workload(4000, 1, rate=10, tenants=parse_tenants("heavy:0.9,light:0.1"))
    light = sum(a.tenant == "light" for a in arr) / len(arr)
    assert 0.08 < light < 0.12
    assert all(b.t_s >= a.t_s for a, b in itertools.pairwise(arr))
    for bad in ("a:0", "a:x", "a:1,a:2", ":1"):
        with pytest.raises(ValueError):
            parse_tenants(bad)


def _plain_workload(n: int, seed: int, rate: float) -> list[Arrival]:
    """The synthetic workload as it was before the long-prompt mix, drawn here by hand."""
    rng = np.random.default_rng(seed)
    times = np.cumsum(gamma_gaps(n, rng, rate=rate))
    prompts, outputs = zipf_lengths(n, rng, maximum=512), zipf_lengths(n, rng, maximum=32)
    return [
        Arrival(float(t), "default", int(p), int(o))
        for t, p, o in zip(times, prompts, outputs, strict=True)
    ]


def test_mixed_workload_without_long_prompts_is_the_plain_one() -> None:
    for seed in (0, 7):
        plain = _plain_workload(500, seed, 3.0)
        kw = dict(rate=3.0, max_prompt_tokens=512, max_output_tokens=32)
        assert synthetic_workload(500, seed, **kw) == plain  # type: ignore[arg-type]
        assert synthetic_workload(500, seed, long_fraction=0.0, **kw) == plain  # type: ignore[arg-type]
        mixed = synthetic_workload(500, seed, long_fraction=0.2, **kw)  # type: ignore[arg-type]
        assert mixed != plain


def test_an_output_floor_keeps_the_arrivals_and_prompts_and_lifts_the_short_outputs() -> None:
    kw = dict(rate=3.0, max_prompt_tokens=512, max_output_tokens=128, long_fraction=0.2)
    base = synthetic_workload(2000, 3, **kw)  # type: ignore[arg-type]
    floored = synthetic_workload(2000, 3, min_output_tokens=64, **kw)  # type: ignore[arg-type]
    assert [(a.t_s, a.prompt_tokens) for a in floored] == [(a.t_s, a.prompt_tokens) for a in base]
    chat = [(a, b) for a, b in zip(base, floored, strict=True) if a.prompt_tokens <= 512]
    assert all(b.output_tokens == max(a.output_tokens, 64) for a, b in chat)
    assert np.mean([a.output_tokens for a, _ in chat]) < 30  # Zipf(1.1): streams barely decode
    assert np.mean([b.output_tokens for _, b in chat]) > 64
    with pytest.raises(ValueError, match="min output tokens"):
        synthetic_workload(10, 0, max_output_tokens=32, min_output_tokens=32)
    assert main(["--max-output-tokens", "32", "--min-output-tokens", "40"]) == 2  # before any run


def test_mixed_workload_fraction_range_bursts_and_rate() -> None:
    n, rate, f = 120_000, 4.0, 0.2
    for seed in (0, 1, 2):
        arr = synthetic_workload(
            n, seed, rate=rate, max_prompt_tokens=512, max_output_tokens=64,
            long_fraction=f, long_prompt_range=(1024, 7936), long_output_tokens=16,
        )  # fmt: skip
        assert len(arr) == n and all(b.t_s >= a.t_s for a, b in itertools.pairwise(arr))
        long = [a for a in arr if a.prompt_tokens >= 1024]
        chat = [a for a in arr if a.prompt_tokens < 1024]
        assert len(long) == round(f * n)  # chat prompts are < 512: every long one is counted
        lp = np.array([a.prompt_tokens for a in long])
        assert lp.min() >= 1024 and lp.max() <= 7936
        assert abs(lp.mean() - (1024 + 7936) / 2) < 60  # uniform over the range
        assert max(a.output_tokens for a in long) < 16 and max(a.output_tokens for a in chat) < 64
        # the rate counts both kinds: arrivals in the first 80% of the nominal span
        horizon = 0.8 * n / rate
        for part, share in ((arr, 1.0), (long, f), (chat, 1 - f)):
            seen = sum(a.t_s < horizon for a in part) / horizon
            assert seen == pytest.approx(share * rate, rel=0.05)
        # bursts: most gaps between long requests are far below the stream's mean gap 1/rate,
        # where Gamma(0.5) arrivals of the long ones alone (mean gap 1/(f*rate)) would have a
        # quarter of them below half the mean gap
        gaps = np.diff([a.t_s for a in long])
        inside = gaps[gaps < 0.5 / rate]
        assert len(inside) / len(gaps) > 0.6
        assert inside.mean() < 0.25 / rate
        # both kinds run to the end: the bursts land among the chat streams all along
        assert long[-1].t_s == pytest.approx(n / rate, rel=0.1)
        assert chat[-1].t_s == pytest.approx(n / rate, rel=0.1)
    with pytest.raises(ValueError, match="long fraction"):
        synthetic_workload(10, long_fraction=1.0)
    with pytest.raises(ValueError, match="long prompt range"):
        synthetic_workload(10, long_fraction=0.5, long_prompt_range=(9, 8))


def test_fit_context_cuts_prompts_to_the_model() -> None:
    arr = synthetic_workload(
        2000, 3, rate=50.0, max_prompt_tokens=8192, max_output_tokens=128,
        long_fraction=0.3, long_prompt_range=(8100, 8192), long_output_tokens=16,
    )  # fmt: skip
    cut = fit_context(arr, 8192)
    assert [(a.t_s, a.output_tokens) for a in cut] == [(a.t_s, a.output_tokens) for a in arr]
    assert max(a.prompt_tokens + a.output_tokens for a in cut) <= 8192 - PROMPT_SLACK
    assert sum(c.prompt_tokens < a.prompt_tokens for a, c in zip(arr, cut, strict=True)) > 50
    assert all(c.prompt_tokens == a.prompt_tokens for a, c in zip(arr, cut, strict=True)
               if a.prompt_tokens + a.output_tokens <= 8192 - PROMPT_SLACK)  # fmt: skip
    with pytest.raises(ValueError, match="no prompt room"):
        fit_context([Arrival(0.0, "t", 5, 60)], 64)


def test_csv_replay(tmp_path: Path) -> None:
    p = tmp_path / "t.csv"
    p.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "110,ChatGPT,300,20,320,Conversation log\n"
        "100,GPT-4,5000,40,5040,API log\n"
        "104,ChatGPT,7,0,7,API log\n"
    )
    arr = read_burstgpt_csv(p, time_scale=2.0, max_prompt_tokens=2048)
    assert [(a.t_s, a.prompt_tokens, a.output_tokens) for a in arr] == [
        (0.0, 2048, 40),
        (5.0, 300, 20),
    ]
    assert len(read_burstgpt_csv(p, keep_failures=True)) == 3
    bad = tmp_path / "bad.csv"
    bad.write_text("time,tokens\n1,2\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_burstgpt_csv(bad)
    bad.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\nx,,1,1,2,\n"
    )
    with pytest.raises(ValueError, match=":2: bad number"):
        read_burstgpt_csv(bad)


def test_shipped_synthetic_sample_replays() -> None:
    arr = read_burstgpt_csv(SAMPLE)
    fast = rescale_to_rate(arr, 20.0)
    assert (len(fast) - 1) / fast[-1].t_s == pytest.approx(20.0)
    assert [a.prompt_tokens for a in fast] == [a.prompt_tokens for a in arr]
    assert 2800 < len(arr) < 3000  # ~2% failures skipped
    gaps = np.diff([a.t_s for a in arr])
    assert stats.gamma.fit(gaps[gaps > 0], floc=0)[0] < 1


def _r(tenant: str, ttft: float | None, n: int, itl: float, error: str = "") -> RequestResult:
    gaps = (itl,) * (n - 1)
    e2e = (ttft or 0.0) + itl * (n - 1)
    return RequestResult(tenant, 0.0, 0.0, ttft, gaps, e2e, 10, n, error)


def test_report_math() -> None:
    res = [_r("a", 0.1 * (i + 1), 5, 0.02) for i in range(10)]  # TTFT 0.1 .. 1.0
    res += [_r("b", 0.05, 11, 0.2), _r("b", None, 0, 0.0, "http 500: boom")]
    s = summarize(res, duration_s=2.0, ttft_slo_s=0.5, itl_slo_s=0.05)
    assert s.requests == 12 and s.succeeded == 11
    assert s.ttft_s.p50 == pytest.approx(
        np.percentile([*(0.1 * (i + 1) for i in range(10)), 0.05], 50)
    )
    assert s.requests_per_s == pytest.approx(5.5)
    assert s.output_tokens_per_s == pytest.approx((50 + 11) / 2.0)
    assert s.slo_attainment == pytest.approx(5 / 12)  # a's first five; b is too slow or failed
    assert s.errors == {"http 500": 1}
    assert s.itl_s.p99 == pytest.approx(0.2) and s.tpot_s.p50 == pytest.approx(0.02)
    by = summarize_by_tenant(res, 2.0, 0.5, 0.05)
    assert (
        set(by) == {"all", "a", "b"}
        and by["a"].slo_attainment == 0.5
        and by["b"].slo_attainment == 0
    )
    assert not meets_slo(_r("a", 0.1, 1, 0.0, "timeout"), 1.0, 1.0)
    # the first gap (a handoff) apart from the later ones (steady decode)
    slow_first = [RequestResult("a", 0.0, 0.0, 0.1, (0.3, 0.01, 0.02), 0.43, 10, 4)] * 2
    split = summarize([*slow_first, _r("a", 0.1, 1, 0.0)], 1.0, 0.5, 0.05)
    assert split.itl_first_s.p50 == pytest.approx(0.3) and split.itl_first_s.p99 == pytest.approx(0.3)
    assert split.itl_later_s.p99 == pytest.approx(np.percentile([0.01, 0.02] * 2, 99))
    assert split.itl_s.p50 == pytest.approx(0.02)
    assert goodput([(1, 0.99), (2, 0.95), (4, 0.7), (8, 0.92)]) == 2  # 8 passing above a failure
    assert goodput([(1, 0.5)]) == 0.0


# ---- HTTP driver against a stub OpenAI server ------------------------------------------


async def _stub(seen: list[dict], release: asyncio.Event) -> tuple[web.AppRunner, str]:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        if body["user"] == "bad":
            return web.json_response({"error": {"message": "nope"}}, status=400)
        if body["user"] == "hang":
            await release.wait()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            chunk = {"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.002)  # the server's pace: makes inter-token gaps measurable
        usage = {"prompt_tokens": 99, "completion_tokens": n, "total_tokens": 99 + n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


def test_http_driver_measures_stream() -> None:
    async def go() -> list[RequestResult]:
        seen: list[dict] = []
        release = asyncio.Event()
        runner, url = await _stub(seen, release)
        try:
            async with aiohttp.ClientSession() as session:
                loop = asyncio.get_running_loop()
                send = http_driver(session, url, "m", request_timeout_s=0.5, t0=loop.time)
                arr = [
                    Arrival(0.0, "x", 12, 6),
                    Arrival(0.01, "y", 3, 1),
                    Arrival(0.02, "bad", 3, 2),
                    Arrival(0.03, "hang", 3, 2),
                ]
                run = await run_open_loop(arr, send, loop.time, timeout_s=5.0)
        finally:
            release.set()
            await runner.cleanup()
        assert [b["user"] for b in seen] == ["x", "y", "bad", "hang"]
        assert seen[0]["stream_options"] == {"include_usage": True} and seen[0]["max_tokens"] == 6
        assert len(seen[0]["messages"][0]["content"].split()) == 12
        return list(run.results)

    res = asyncio.run(go())
    x, y, bad, hang = res
    assert x.ok and x.output_tokens == 6 and x.prompt_tokens == 99 and len(x.gaps_s) == 5
    assert x.ttft_s is not None and 0 < x.ttft_s < x.e2e_s and min(x.gaps_s) >= 0
    # the server sleeps 2 ms after each of the first 5 tokens: the gaps between them add up to
    # at least 4 of those sleeps, however a loaded machine bunches the chunks' arrival
    assert sum(x.gaps_s) >= 4 * 0.002
    assert y.ok and y.output_tokens == 1 and y.gaps_s == ()
    assert not bad.ok and bad.error.startswith("http 400")
    assert not hang.ok and hang.error == "timeout"


def test_refuses_non_loopback_and_unbounded_runs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="non-loopback"):
        http_driver(None, "http://10.0.0.1:8000", "m", t0=lambda: 0.0)  # type: ignore[arg-type]
    assert main(["--url", "http://127.0.0.1:1"]) == 2  # no --num-requests / --duration
    assert main(["--num-requests", "1", "--ttft-slo", "0"]) == 2
    out = tmp_path / "s.csv"
    assert main(["--write-synthetic-csv", str(out), "--num-requests", "50"]) == 0
    assert len(read_burstgpt_csv(out, keep_failures=True)) == 50
    for bad in (
        ["--long-fraction", "1"],
        ["--long-fraction", "0.2", "--trace", str(SAMPLE)],
        ["--long-prompt-range", "512"],
        ["--long-prompt-range", "9,8"],
        ["--long-output-tokens", "1"],
        ["--max-context", "9"],
    ):
        assert main(["--num-requests", "4", *bad]) == 2, bad
    mixed = ["--long-fraction", "0.25", "--long-prompt-range", "2000,3000"]
    assert main(["--write-synthetic-csv", str(out), "--num-requests", "40", *mixed]) == 0
    long = [a for a in read_burstgpt_csv(out, keep_failures=True) if a.prompt_tokens >= 2000]
    assert len(long) == 10


def test_cli_sweep_writes_json(tmp_path: Path) -> None:
    """A full CLI run (sweep of two rates) against the stub, through asyncio in a thread; then a
    trace replay, and a mixed workload cut to a context."""
    seen: list[dict] = []

    async def serve_and_run() -> int:
        runner, url = await _stub(seen, asyncio.Event())
        try:
            out = tmp_path / "r.json"
            argv = [
                "--url",
                url,
                "--num-requests",
                "6",
                "--sweep",
                "50,100",
                "--max-prompt-tokens",
                "16",
                "--max-output-tokens",
                "8",
                "--tenants",
                "a:1,b:1",
                "--json",
                str(out),
                "--timeout",
                "10",
            ]
            rc = await asyncio.to_thread(main, argv)
            rep = json.loads(out.read_text())
            assert rep["mode"] == "sweep" and set(rep["goodput_rps"]) == {"all", "a", "b"}
            assert rep["runs"]["50"]["all"]["requests"] == 6
            replay = [
                "--url",
                url,
                "--trace",
                str(SAMPLE),
                "--num-requests",
                "5",
                "--rate",
                "100",
                "--max-prompt-tokens",
                "16",
                "--max-output-tokens",
                "4",
                "--json",
                str(out),
                "--timeout",
                "10",
            ]
            rc2 = await asyncio.to_thread(main, replay)
            one = json.loads(out.read_text())["summary"]["all"]
            assert one["requests"] == 5 and one["succeeded"] == 5
            seen.clear()
            mixed = [
                "--url", url, "--num-requests", "8", "--rate", "100", "--timeout", "10",
                "--max-prompt-tokens", "16", "--max-output-tokens", "8",
                "--long-fraction", "0.5", "--long-prompt-range", "40,60", "--max-context", "48",
            ]  # fmt: skip
            rc3 = await asyncio.to_thread(main, mixed)
            words = [len(b["messages"][0]["content"].split()) for b in seen]
            assert len(words) == 8 and sum(w > 16 for w in words) == 4  # 4 long, cut to fit
            assert max(w + b["max_tokens"] for w, b in zip(words, seen, strict=True)) == (
                48 - PROMPT_SLACK
            )
            # another --prompt-seed: the same workload in other words (no prefix to reuse)
            first = sorted((b["messages"][0]["content"], b["max_tokens"]) for b in seen)
            seen.clear()
            rc4 = await asyncio.to_thread(main, [*mixed, "--prompt-seed", "5"])
            again = sorted((b["messages"][0]["content"], b["max_tokens"]) for b in seen)
            assert sorted((len(t.split()), m) for t, m in again) == sorted(
                (len(t.split()), m) for t, m in first
            )
            worded = [{t for t, _ in run if " " in t} for run in (first, again)]  # "r1": no words
            assert worded[0] and not worded[0] & worded[1]
            return rc + rc2 + rc3 + rc4
        finally:
            await runner.cleanup()

    assert asyncio.run(serve_and_run()) == 0


def test_fresh_prompts_differ_between_the_rates_of_a_sweep() -> None:
    """By default every rate of a sweep re-sends the same prompts (what a prefix cache can
    serve); with --fresh-prompts the rates after the first send other words, same lengths."""
    seen: list[dict] = []

    async def sweep(*extra: str) -> list[list[str]]:
        runner, url = await _stub(seen, asyncio.Event())
        seen.clear()
        argv = ["--url", url, "--num-requests", "6", "--sweep", "100,200", "--timeout", "10",
                "--max-prompt-tokens", "64", "--max-output-tokens", "4", *extra]  # fmt: skip
        try:
            assert await asyncio.to_thread(main, argv) == 0
        finally:
            await runner.cleanup()
        texts = [b["messages"][0]["content"] for b in seen]
        return [sorted(texts[:6]), sorted(texts[6:])]

    same = asyncio.run(sweep())
    assert same[0] == same[1]
    fresh = asyncio.run(sweep("--fresh-prompts"))
    assert fresh[0] == same[0]  # the first rate is the default's
    assert sorted(len(t.split()) for t in fresh[1]) == sorted(len(t.split()) for t in same[1])
    worded = [t for t in fresh[1] if " " in t]  # a one-word prompt ("r3") has no words to vary
    assert worded and not set(worded) & set(same[1])


def test_grpc_driver_with_a_stand_in_client() -> None:
    """The gRPC driver reads SDK chunks (kvrelay.client.types) from whatever AsyncClient
    gives; a stand-in with the same generate() shape checks the bookkeeping."""
    from kvrelay.benchmarks.loadgen_drivers import grpc_driver
    from kvrelay.client.types import GenerationChunk, Usage

    class Stub:
        def __init__(self) -> None:
            self.params: list[dict] = []

        def generate(self, prompt: str, *, stream: bool, **params):
            self.params.append(params)

            async def chunks():
                yield GenerationChunk("r")
                for i in range(params["max_tokens"]):
                    await asyncio.sleep(0.001)
                    if params["tenant"] == "boom" and i == 1:
                        raise RuntimeError("UNAVAILABLE")
                    yield GenerationChunk("r", token_ids=(i,), text=f" t{i}")
                yield GenerationChunk("r", finish_reason="length", usage=Usage(42, 3, 0))

            return chunks()

    async def go():
        stub = Stub()
        loop = asyncio.get_running_loop()
        send = grpc_driver(stub, "m", t0=loop.time)
        ok = await send(Arrival(0.0, "t", 5, 3), "hi", 0.0)
        bad = await send(Arrival(0.0, "boom", 5, 3), "hi", 0.0)
        return stub, ok, bad

    stub, ok, bad = asyncio.run(go())
    assert stub.params[0]["tenant"] == "t" and stub.params[0]["ignore_eos"] is True
    assert ok.ok and ok.output_tokens == 3 and ok.prompt_tokens == 42 and len(ok.gaps_s) == 2
    assert not bad.ok and "UNAVAILABLE" in bad.error and bad.output_tokens == 1


def test_the_client_measures_its_own_loop_lag() -> None:
    """A request whose handling holds the client's loop (parsing a huge chunk, say) shows up in
    the run's loop lag: a stamp taken after it is late by as much, and the report says so."""

    async def send(a: Arrival, prompt: str, scheduled: float) -> RequestResult:
        if a.tenant == "busy":
            spin(0.05)  # the loop cannot run the lag ticker meanwhile
        await asyncio.sleep(0.02)
        return RequestResult(a.tenant, scheduled, scheduled, 0.01, (), 0.02, 3, 1)

    async def go() -> tuple[RunResult, RunResult]:
        loop = asyncio.get_running_loop()
        arr = [Arrival(0.0, "x", 3, 1), Arrival(0.03, "y", 3, 1)]
        quiet = await run_open_loop(arr, send, loop.time, timeout_s=5.0)
        busy = await run_open_loop([*arr, Arrival(0.04, "busy", 3, 1)], send, loop.time)
        return quiet, busy

    quiet, busy = asyncio.run(go())
    assert busy.loop_lag_ms()["max"] >= 40 and busy.loop_lag_ms()["ticks"] >= 1
    assert quiet.loop_lag_ms()["ticks"] >= 1  # it ran; its lag is the machine's
    assert RunResult((), 1.0).loop_lag_ms() == {"p50": 0.0, "p99": 0.0, "max": 0.0, "ticks": 0.0}
