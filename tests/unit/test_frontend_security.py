"""API keys on both APIs (admin calls need the admin key), keys never logged, and a TLS round
trip on both APIs with a self-signed certificate made here (openssl CLI)."""

from __future__ import annotations

import http.client
import json
import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvrelay.client import Client, PermissionDeniedError, UnauthenticatedError, UnavailableError
from kvrelay.cluster.api.servers import TlsConfig
from kvrelay_testing.frontend import EchoBackend, FrontendThread, wait_blocks_free

USER_KEY = "sk-user-4f1c9a"
OTHER_KEY = "sk-user-9d03b5"  # a second user of the same server
ADMIN_KEY = "sk-admin-77b2e0"
LONG = 400  # tokens: a stream still running when the test acts on it


@pytest.fixture(scope="module")
def keyed() -> Iterator[FrontendThread]:
    with FrontendThread(
        EchoBackend(), api_keys=[USER_KEY, OTHER_KEY], admin_keys=[ADMIN_KEY]
    ) as srv:
        yield srv
        assert srv.call(wait_blocks_free(srv.backend)) == 0


def test_grpc_keys(keyed: FrontendThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    target = f"127.0.0.1:{keyed.grpc_port}"
    for key in (None, "wrong", ADMIN_KEY + "x"):
        with Client(target, api_key=key, timeout=10) as c:
            with pytest.raises(UnauthenticatedError):
                c.generate("hi", max_tokens=2)
            with pytest.raises(UnauthenticatedError):
                c.models()
            with pytest.raises(UnauthenticatedError):
                c.cluster_status()
    with Client(target, api_key=USER_KEY, timeout=10) as c:
        assert c.generate("hi", max_tokens=2).usage.completion_tokens == 2
        with pytest.raises(PermissionDeniedError):
            c.cluster_status()
        with pytest.raises(PermissionDeniedError):
            c.drain("w")
    with Client(target, api_key=ADMIN_KEY, timeout=10) as c:
        assert c.cluster_status().workers
        assert c.generate("hi", max_tokens=2).finish_reason == "length"
    with grpc.insecure_channel(target) as ch:  # health stays open for probes
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert USER_KEY not in caplog.text and ADMIN_KEY not in caplog.text


def test_only_the_owner_or_an_admin_cancels_a_request(keyed: FrontendThread) -> None:
    target = f"127.0.0.1:{keyed.grpc_port}"
    with (
        Client(target, api_key=USER_KEY, timeout=60) as owner,
        Client(target, api_key=OTHER_KEY, timeout=10) as other,
        Client(target, api_key=ADMIN_KEY, timeout=10) as admin,
    ):
        for canceller in (owner, admin):
            stream = owner.generate("mine", max_tokens=LONG, ignore_eos=True, stream=True)
            rid = next(stream).request_id
            next(stream)  # a token: the request is running
            # another user's key gets the answer an unknown id gets, and the stream goes on
            assert other.cancel(rid) is False
            assert len(next(stream).token_ids) > 0
            assert canceller.cancel(rid) is True
            rest = list(stream)
            assert rest[-1].finish_reason == "abort"
            assert sum(len(c.token_ids) for c in rest) < LONG
    assert keyed.call(wait_blocks_free(keyed.backend)) == 0


def test_http_keys(keyed: FrontendThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    base = f"http://127.0.0.1:{keyed.http_port}/v1"
    for key in ("wrong", ADMIN_KEY[:-1]):
        bad = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as info:
            bad.completions.create(model="echo", prompt="hi", max_tokens=2)
        assert info.value.status_code == 401 and key not in str(info.value.body)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    conn = http.client.HTTPConnection("127.0.0.1", keyed.http_port, timeout=10)
    conn.request("POST", "/v1/completions", body=b'{"model":"echo","prompt":"hi"}')
    resp = conn.getresponse()
    assert resp.status == 401 and json.loads(resp.read())["error"]["type"] == "authentication_error"
    conn.request("GET", "/health")
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    conn.close()
    for key in (USER_KEY, ADMIN_KEY):
        good = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=10)
        out = good.completions.create(
            model=good.models.list().data[0].id, prompt="hi", max_tokens=2
        )
        assert out.usage is not None and out.usage.completion_tokens == 2
    assert USER_KEY not in caplog.text and ADMIN_KEY not in caplog.text


@pytest.fixture(scope="module")
def cert(self_signed_cert: tuple[Path, Path]) -> TlsConfig:
    cert_file, key_file = self_signed_cert
    return TlsConfig(cert_file=str(cert_file), key_file=str(key_file))


def test_tls_round_trip_both_apis(cert: TlsConfig) -> None:
    with FrontendThread(EchoBackend(), tls=cert, api_keys=[USER_KEY]) as srv:
        target = f"localhost:{srv.grpc_port}"
        with Client(target, root_cert=Path(cert.cert_file), api_key=USER_KEY, timeout=10) as c:
            res = c.generate("secure", max_tokens=3, temperature=0)
            assert res.usage.completion_tokens == 3
        with Client(target, api_key=USER_KEY, timeout=3) as plain:  # plaintext to a TLS port
            with pytest.raises(UnavailableError):
                plain.models()
        ctx = ssl.create_default_context(cafile=cert.cert_file)
        http_client = openai.DefaultHttpxClient(verify=ctx)
        oai = openai.OpenAI(
            base_url=f"https://localhost:{srv.http_port}/v1",
            api_key=USER_KEY,
            http_client=http_client,
            max_retries=0,
            timeout=10,
        )
        out = oai.completions.create(
            model="echo" if "Echo" in type(srv.backend).__name__ else oai.models.list().data[0].id,
            prompt="secure",
            max_tokens=3,
            temperature=0,
        )
        assert out.choices[0].text == res.text  # same greedy output over HTTPS and gRPC+TLS
        untrusting = openai.OpenAI(
            base_url=f"https://localhost:{srv.http_port}/v1",
            api_key=USER_KEY,
            max_retries=0,
            timeout=5,
        )
        with pytest.raises(openai.APIConnectionError):  # self-signed: not in the system roots
            untrusting.models.list()
        assert srv.call(wait_blocks_free(srv.backend)) == 0
