"""Tests for ``batchrun.client``: Retry-After parsing, HTTP error mapping, and
the table of open files the pool needs.

The error mapping is exercised against the real simulator over a socket, with
scripted responses; nothing in aiohttp is mocked.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import anyio
import orjson
import pytest
import trustme
from yarl import URL

from batchrun.client import (
    APIClient,
    Reply,
    _unknown_host,
    env_proxy,
    parse_retry_after,
)
from batchrun.config import ENDPOINT_PATHS, Endpoint
from batchrun.errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ConfigError,
    FatalAPIError,
    MalformedResponseError,
    PermanentError,
    RateLimitError,
    ServerError,
    TransientError,
)
from batchrun.simulator import ScriptedResponse, SimulatorHandle, start_simulator

from .helpers import (
    SimFactory,
    closed_port_url,
    prompts,
    read_results,
    run_against,
    run_cli,
    write_jsonl,
)

BODY = {"model": "m", "prompt": "x"}
SECRET = "sk-test-0123456789abcdefghijklmnopqrstuvwxyz"


async def _post_error(
    sim: SimulatorHandle,
    response: ScriptedResponse,
    *,
    api_key: str | None = None,
    timeout_s: float = 5.0,
) -> APIError:
    """Script one response, post once, and return the error it raised."""
    sim.state.enqueue(response)
    async with APIClient(
        sim.base_url, api_key=api_key, timeout_s=timeout_s, concurrency=4
    ) as client:
        with pytest.raises(APIError) as info:
            await client.post("completions", BODY)
    return info.value


# --- parse_retry_after --------------------------------------------------------


def test_retry_after_ms_wins() -> None:
    """retry-after-ms is used, in seconds, before Retry-After."""
    headers = {"retry-after-ms": "1500", "retry-after": "30"}
    assert parse_retry_after(headers) == 1.5


def test_retry_after_seconds() -> None:
    """Retry-After in seconds is returned as a float."""
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after": "0.25"}) == 0.25


def test_retry_after_bad_ms_falls_back_to_seconds() -> None:
    """An unparseable retry-after-ms falls back to Retry-After."""
    assert parse_retry_after({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0


def test_retry_after_http_date() -> None:
    """An HTTP-date Retry-After is the difference to ``now``."""
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == pytest.approx(42.0)


def test_retry_after_past_http_date_is_zero() -> None:
    """An HTTP date in the past gives 0, not a negative wait."""
    now = 1_700_000_000.0
    date = email.utils.formatdate(now - 100, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == 0.0


@pytest.mark.parametrize("value", ["soon", "", "Mon, 99 Foo 2020"])
def test_retry_after_garbage_is_none(value: str) -> None:
    """An unparseable Retry-After gives None."""
    assert parse_retry_after({"retry-after": value}) is None


def test_retry_after_absent_is_none() -> None:
    """No header gives None."""
    assert parse_retry_after({}) is None


def test_retry_after_negative_is_zero() -> None:
    """Negative values are clamped to 0."""
    assert parse_retry_after({"retry-after": "-5"}) == 0.0
    assert parse_retry_after({"retry-after-ms": "-100"}) == 0.0


# --- responses over a socket --------------------------------------------------


async def test_ok_reply(sim: SimulatorHandle) -> None:
    """A 200 answer is a Reply with choices, raw body and headers."""
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=5, concurrency=4
    ) as client:
        reply = await client.post("completions", BODY)
        chat = await client.post(
            "chat", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        )
    assert isinstance(reply, Reply)
    assert reply.status == 200
    assert isinstance(reply.data["choices"], list)
    assert reply.data["choices"][0]["text"]
    assert reply.raw.startswith(b"{")
    assert reply.headers["x-request-id"].startswith("req_")
    assert chat.data["choices"][0]["message"]["role"] == "assistant"
    assert sim.state.snapshot()["requests"] == 2


async def test_body_over_a_mebibyte(sim_factory: SimFactory) -> None:
    """A long-context prompt (a body over 1 MiB) is sent whole, without the
    ResourceWarning aiohttp gives for such a body passed as bytes."""
    sim = sim_factory(record_requests=True)
    prompt = "word " * 300_000
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=30, concurrency=4
    ) as client:
        reply = await client.post("completions", {"model": "m", "prompt": prompt})
    assert reply.status == 200
    assert sim.state.requests[0]["prompt"] == prompt


async def test_post_outside_context_manager(sim: SimulatorHandle) -> None:
    """post() before entering the client is a RuntimeError."""
    client = APIClient(sim.base_url, api_key=None, timeout_s=5, concurrency=1)
    with pytest.raises(RuntimeError, match="async with"):
        await client.post("completions", BODY)


async def test_rate_limit_retry_after(sim: SimulatorHandle) -> None:
    """A 429 with retry-after-ms is a RateLimitError carrying the wait."""
    error = await _post_error(
        sim,
        ScriptedResponse(
            status=429, headers={"retry-after-ms": "2500", "x-request-id": "req-9"}
        ),
    )
    assert isinstance(error, RateLimitError)
    assert error.status == 429
    assert error.retry_after == 2.5
    assert error.request_id == "req-9"


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409, 425])
async def test_server_errors(sim: SimulatorHandle, status: int) -> None:
    """5xx, 408, 409 and 425 are transient ServerErrors with the status."""
    error = await _post_error(sim, ScriptedResponse(status=status))
    assert isinstance(error, ServerError)
    assert isinstance(error, TransientError)
    assert error.status == status
    assert f"HTTP {status}" in str(error)


async def test_server_error_retry_after(sim: SimulatorHandle) -> None:
    """A 503 with Retry-After carries the wait on the ServerError."""
    error = await _post_error(
        sim, ScriptedResponse(status=503, headers={"retry-after": "4"})
    )
    assert isinstance(error, ServerError)
    assert error.retry_after == 4.0


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_permanent_errors(sim: SimulatorHandle, status: int) -> None:
    """Other 4xx are PermanentErrors with the status and the server's message."""
    body = {"error": {"message": "the prompt is too long", "type": "invalid"}}
    error = await _post_error(sim, ScriptedResponse(status=status, body=body))
    assert isinstance(error, PermanentError)
    assert not isinstance(error, TransientError)
    assert error.status == status
    assert str(error) == f"HTTP {status}: the prompt is too long"
    assert error.body is not None
    assert "too long" in error.body


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_fatal_errors(sim: SimulatorHandle, status: int) -> None:
    """401, 403 and 404 are FatalAPIErrors, never PermanentErrors."""
    error = await _post_error(sim, ScriptedResponse(status=status))
    assert isinstance(error, FatalAPIError)
    assert not isinstance(error, PermanentError)
    assert not isinstance(error, TransientError)
    assert error.status == status


QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}


@pytest.mark.parametrize(
    ("status", "body"),
    [(429, QUOTA), (402, {"error": "Payment Required"})],
    ids=["429-insufficient_quota", "402"],
)
async def test_quota_used_up_is_fatal(
    sim: SimulatorHandle, status: int, body: object
) -> None:
    """An account out of quota or credit is a FatalAPIError, not a rate limit
    to wait out: no retry can succeed until it is topped up."""
    error = await _post_error(sim, ScriptedResponse(status=status, body=body))
    assert isinstance(error, FatalAPIError)
    assert error.status == status
    assert "quota or credit is used up" in str(error)
    message = "You exceeded your current quota" if status == 429 else "Payment Required"
    assert message in str(error)


async def test_other_429_codes_are_rate_limits(sim: SimulatorHandle) -> None:
    """A 429 with any other code (sending too fast) is still waited out."""
    body = {"error": {"message": "Rate limit reached", "code": "rate_limit_exceeded"}}
    error = await _post_error(sim, ScriptedResponse(status=429, body=body))
    assert isinstance(error, RateLimitError)
    assert str(error) == "HTTP 429: Rate limit reached"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """A certificate authority of the tests' own, which no system trusts."""
    return trustme.CA()


def _server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


async def test_an_untrusted_certificate_is_fatal(ca: trustme.CA) -> None:
    """A certificate that no trusted authority signed (a self-signed one, say)
    aborts at the first request and names SSL_CERT_FILE: retried like a
    dropped connection, it took 450 attempts and 111 s to abort a run."""
    async with start_simulator(ssl_context=_server_tls(ca)) as sim:
        assert sim.base_url.startswith("https://127.0.0.1:")
        async with APIClient(
            sim.base_url, api_key=None, timeout_s=5, concurrency=2
        ) as client:
            with pytest.raises(FatalAPIError) as info:
                await client.post("completions", BODY)
        assert sim.state.snapshot()["requests"] == 0
    message = str(info.value)
    assert message.startswith("the TLS certificate of 127.0.0.1:")
    assert "is not trusted (" in message
    assert message.endswith("SSL_CERT_FILE=/path/to/ca.pem")


async def test_https_to_a_server_without_tls_is_fatal(sim: SimulatorHandle) -> None:
    """An https:// base URL for a plain http server says so at once."""
    url = sim.base_url.replace("http://", "https://")
    async with APIClient(url, api_key=None, timeout_s=5, concurrency=2) as client:
        with pytest.raises(FatalAPIError, match="does it speak https") as info:
            await client.post("completions", BODY)
    assert "needs an http:// base URL" in str(info.value)


async def test_ssl_cert_file_names_a_servers_own_authority(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """With its authority named by SSL_CERT_FILE, a server with its own
    certificate answers: the advice of the error above works."""
    authority = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(authority))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    async with start_simulator(ssl_context=_server_tls(ca)) as sim:
        done = await anyio.run_process(
            [
                sys.executable, "-m", "batchrun", "run", str(inp),
                "-o", str(tmp_path / "out"), "--base-url", sim.base_url,
                "--model", "m", "--quiet",
            ],
            env={**os.environ, "SSL_CERT_FILE": str(authority)},
            check=False,
        )  # fmt: skip
        assert sim.state.snapshot()["requests"] == 5
    assert done.returncode == 0, done.stderr.decode()
    assert [r["status"] for r in read_results(tmp_path / "out")] == ["ok"] * 5


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def test_https_goes_through_a_proxy_tunnel(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """To an https server, a proxy is asked for a tunnel (CONNECT, with the
    proxy URL's credentials); TLS and the requests go through it. The proxy
    here tunnels to the simulator whatever host it is asked for, and the
    simulator's certificate names the host the run asks for."""
    authority = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(authority))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("api.example.invalid").configure_cert(tls)
    heads: list[bytes] = []
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    async with start_simulator(ssl_context=tls) as sim:
        port = URL(sim.base_url).port

        async def tunnel(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        proxy = await asyncio.start_server(tunnel, "127.0.0.1", 0)
        proxy_port = proxy.sockets[0].getsockname()[1]
        async with proxy:
            done = await anyio.run_process(
                [
                    sys.executable, "-m", "batchrun", "run", str(inp),
                    "-o", str(tmp_path / "out"), "--model", "m", "--quiet",
                    "--base-url", f"https://api.example.invalid:{port}/v1",
                    "--concurrency", "2", "--max-attempts", "1",
                ],
                env={
                    **os.environ,
                    "SSL_CERT_FILE": str(authority),
                    "HTTPS_PROXY": f"http://user:pw@127.0.0.1:{proxy_port}",
                    "NO_PROXY": "",
                },
                check=False,
            )  # fmt: skip
        assert sim.state.snapshot()["requests"] == 5
    assert done.returncode == 0, done.stderr.decode()
    assert [r["status"] for r in read_results(tmp_path / "out")] == ["ok"] * 5
    assert heads  # one tunnel per connection
    for head in heads:
        assert head.startswith(f"CONNECT api.example.invalid:{port} HTTP/1.1".encode())
        assert b"\r\nProxy-Authorization: Basic dXNlcjpwdw==\r\n" in head


def _resolves_as_unknown(host: str) -> bool:
    try:
        socket.getaddrinfo(host, 80)
    except socket.gaierror as exc:
        return _unknown_host(exc)
    return False


async def test_a_host_that_does_not_exist_is_fatal() -> None:
    """A mistyped host name (.invalid never resolves) aborts at the first
    request: retried like a dropped connection, it ran for minutes."""
    host = "no-such-host.invalid"
    if not _resolves_as_unknown(host):
        pytest.skip("this machine's resolver cannot tell a name does not exist")
    base_url = f"http://{host}/v1"
    async with APIClient(base_url, api_key=None, timeout_s=5, concurrency=2) as client:
        with pytest.raises(FatalAPIError) as info:
            await client.post("completions", BODY)
    message = str(info.value)
    assert message.startswith(f"cannot find the host of {base_url} (")
    assert message.endswith("is the base URL right?")


def test_only_a_name_that_does_not_exist_counts_as_unknown() -> None:
    """A resolver that fails for now (EAI_AGAIN) is retried like any dropped
    connection; only "no such name" is a wrong base URL."""
    assert _unknown_host(socket.gaierror(socket.EAI_NONAME, "Name not known"))
    assert not _unknown_host(socket.gaierror(socket.EAI_AGAIN, "Try again"))
    assert not _unknown_host(ConnectionRefusedError())


async def test_404_without_v1_hints_at_it(sim: SimulatorHandle) -> None:
    """A 404 from a base URL without /v1 (the usual slip) says where it
    usually ends; one from a base URL with /v1 does not."""
    assert sim.base_url.endswith("/v1")
    async with APIClient(
        sim.base_url.removesuffix("/v1"), api_key=None, timeout_s=5, concurrency=4
    ) as client:
        with pytest.raises(FatalAPIError) as info:
            await client.post("completions", BODY)
    assert info.value.status == 404
    assert str(info.value).endswith("usually ends in /v1")
    error = await _post_error(sim, ScriptedResponse(status=404))
    assert "/v1" not in str(error).split(": ", 1)[1]


async def test_dropped_connection(sim: SimulatorHandle) -> None:
    """A connection dropped mid-body is an APIConnectionError."""
    error = await _post_error(sim, ScriptedResponse(action="drop"))
    assert isinstance(error, APIConnectionError)
    assert error.status is None


async def test_malformed_body(sim: SimulatorHandle) -> None:
    """A 200 whose body is truncated JSON is a MalformedResponseError."""
    error = await _post_error(sim, ScriptedResponse(action="malformed"))
    assert isinstance(error, MalformedResponseError)
    assert isinstance(error, TransientError)
    assert error.status == 200


@pytest.mark.parametrize(
    ("body", "text"),
    [
        # Half of an emoji, as Python's json writes it: valid JSON, not Unicode.
        (b'{"choices": [{"text": "cut \\ud83d"}]}', "cut \ufffd"),
        # Not UTF-8 at all.
        (b'{"choices": [{"text": "caf\xe9"}]}', "caf\ufffd"),
    ],
)
async def test_answer_that_is_not_unicode_is_kept(
    sim: SimulatorHandle, body: bytes, text: str
) -> None:
    """A paid-for answer that orjson refuses only for its Unicode is read
    with U+FFFD in place of what could not be, and its raw bytes kept."""
    sim.state.enqueue(ScriptedResponse(body=body))
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=5, concurrency=4
    ) as client:
        reply = await client.post("completions", BODY)
    assert reply.data["choices"][0]["text"] == text
    assert reply.raw == body


async def test_web_page_is_not_retried(sim: SimulatorHandle) -> None:
    """A 200 web page (a base URL leading to a site or a proxy's login) is a
    PermanentError pointing at the base URL: no retry turns it into an answer."""
    page = ScriptedResponse(
        body="<html><body>Welcome</body></html>",
        headers={"Content-Type": "text/html; charset=utf-8"},
    )
    error = await _post_error(sim, page)
    assert type(error) is PermanentError
    assert "web page, not an API answer: is the base URL right?" in str(error)
    assert error.body == "<html><body>Welcome</body></html>"


async def test_ok_without_choices(sim: SimulatorHandle) -> None:
    """A 200 with valid JSON but no choices is a MalformedResponseError."""
    error = await _post_error(sim, ScriptedResponse(body={"foo": 1}))
    assert isinstance(error, MalformedResponseError)
    assert str(error) == "HTTP 200 without choices"
    assert error.body == '{"foo":1}'


@pytest.mark.parametrize("body", [5, "text", ["error"], {"error": None}])
async def test_ok_without_choices_or_error_message(
    sim: SimulatorHandle, body: object
) -> None:
    """A 200 of any other JSON says only that it has no choices."""
    error = await _post_error(sim, ScriptedResponse(body=orjson.dumps(body)))
    assert isinstance(error, MalformedResponseError)
    assert str(error) == "HTTP 200 without choices"


async def test_ok_with_an_error_body_says_the_error(sim: SimulatorHandle) -> None:
    """A gateway's 200 holding an error (OpenRouter's, when the model behind it
    fails) names that error: it is retried, and a row that runs out of
    attempts says why instead of only "without choices"."""
    body = {"error": {"message": "Upstream provider timed out", "code": 502}}
    error = await _post_error(sim, ScriptedResponse(body=body))
    assert isinstance(error, MalformedResponseError)
    assert isinstance(error, TransientError)
    assert str(error) == "HTTP 200 without choices: Upstream provider timed out"


async def test_timeout(sim: SimulatorHandle) -> None:
    """No answer within timeout_s is an APITimeoutError."""
    error = await _post_error(sim, ScriptedResponse(delay_ms=500), timeout_s=0.05)
    assert isinstance(error, APITimeoutError)
    assert isinstance(error, TransientError)
    assert str(error).startswith("no response within 0.05 s (--timeout")


async def test_timeout_keeps_the_limit(sim: SimulatorHandle) -> None:
    """A request that gets no answer fails at its limit (plus at most one tick),
    not when the server finally answers."""
    sim.state.enqueue(ScriptedResponse(delay_ms=5000))
    loop = asyncio.get_running_loop()
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=0.2, concurrency=1
    ) as client:
        started = loop.time()
        with pytest.raises(APITimeoutError):
            await client.post("completions", BODY)
        elapsed = loop.time() - started
        # The connection it held was closed, not returned to the pool: the
        # next request gets an answer on a new one.
        reply = await client.post("completions", BODY)
    assert 0.2 <= elapsed < 1.0
    assert reply.status == 200


async def test_timeouts_among_fast_requests(sim: SimulatorHandle) -> None:
    """Only the requests that overrun time out; the others in flight finish."""
    sim.state.enqueue(
        *(ScriptedResponse(delay_ms=5000 if i % 2 else 0) for i in range(8))
    )
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=0.3, concurrency=8
    ) as client:

        async def post() -> str:
            try:
                await client.post("completions", BODY)
            except APITimeoutError:
                return "timeout"
            return "ok"

        outcomes = await asyncio.gather(*(post() for _ in range(8)))
    assert sorted(outcomes) == ["ok"] * 4 + ["timeout"] * 4


async def test_timeout_counts_from_sending(sim: SimulatorHandle) -> None:
    """The limit runs from sending: a request that waited for a pooled
    connection behind one that timed out still gets its whole limit."""
    sim.state.enqueue(ScriptedResponse(delay_ms=5000), ScriptedResponse(delay_ms=100))
    async with APIClient(
        sim.base_url, api_key=None, timeout_s=0.2, concurrency=1
    ) as client:
        results = await asyncio.gather(
            client.post("completions", BODY),
            client.post("completions", BODY),
            return_exceptions=True,
        )
    assert [type(r) for r in results] == [APITimeoutError, Reply]
    assert sim.state.request_count == 2


async def test_connection_refused() -> None:
    """A closed port is an APIConnectionError."""
    async with APIClient(
        closed_port_url(), api_key=None, timeout_s=5, concurrency=1
    ) as client:
        with pytest.raises(APIConnectionError) as info:
            await client.post("completions", BODY)
    assert info.value.status is None


async def test_api_key_is_sent(sim_factory: SimFactory) -> None:
    """The key is sent as a bearer token; a wrong one gives a FatalAPIError."""
    sim = sim_factory(api_key=SECRET)
    async with APIClient(
        sim.base_url, api_key=SECRET, timeout_s=5, concurrency=1
    ) as client:
        assert (await client.post("completions", BODY)).status == 200
    async with APIClient(
        sim.base_url, api_key="wrong", timeout_s=5, concurrency=1
    ) as client:
        with pytest.raises(FatalAPIError) as info:
            await client.post("completions", BODY)
    assert info.value.status == 401


_ANSWER = b'{"choices": [{"index": 0, "text": "x", "finish_reason": "stop"}]}'


def _http(answer: bytes = _ANSWER, *, close: bool = False) -> bytes:
    """A whole 200 answer with its length (and ``Connection: close``)."""
    closing = b"Connection: close\r\n" if close else b""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n%sContent-Length: %d"
    return head % (closing, len(answer)) + b"\r\n\r\n" + answer


class _RawServer:
    """A server that answers each request with the next of ``answers``, as
    bytes on the wire, and closes the connection after an answer that says
    ``Connection: close`` (or at once, for a ``None``). It keeps every
    request's head and body, and the connection each came on."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.requests: list[tuple[int, bytes, bytes]] = []
        self.connections = 0

    async def serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        number = self.connections
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                assert length is not None
                body = await reader.readexactly(int(length.group(1)))
                self.requests.append((number, head.lower(), body))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection
        writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()


async def test_request_head_asks_for_an_uncompressed_json_answer() -> None:
    """Every request names its body type, its client, and no compression."""
    server = _RawServer([_http(close=True)])
    async with (
        server as url,
        APIClient(url, api_key=None, timeout_s=5, concurrency=1) as client,
    ):
        reply = await client.post("completions", BODY)
    assert reply.data["choices"][0]["text"] == "x"
    ((_, head, body),) = server.requests
    assert head.startswith(b"post /v1/completions http/1.1\r\n")
    assert b"\r\nhost: 127.0.0.1:" in head
    assert b"\r\naccept-encoding: identity\r\n" in head
    assert b"\r\ncontent-type: application/json\r\n" in head
    assert b"\r\nuser-agent: batchrun\r\n" in head
    assert b"gzip" not in head
    assert orjson.loads(body) == BODY


async def test_connections_are_kept_until_an_answer_says_close() -> None:
    """Requests one after another share a connection; an answer with
    ``Connection: close`` ends it, and the next request opens another."""
    server = _RawServer([_http(), _http(close=True), _http(), _http()])
    async with (
        server as url,
        APIClient(url, api_key=None, timeout_s=5, concurrency=1) as client,
    ):
        for _ in range(4):
            assert (await client.post("completions", BODY)).status == 200
    assert [number for number, _, _ in server.requests] == [1, 1, 2, 2]


@pytest.mark.parametrize(
    "answer",
    [
        # No length: the answer ends with the connection.
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\n\r\n" + _ANSWER,
        # Chunked, in two pieces.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (10, _ANSWER[:10], len(_ANSWER) - 10, _ANSWER[10:]),
        # An interim "100 Continue" first.
        b"HTTP/1.1 100 Continue\r\n\r\n" + _http(),
    ],
    ids=["until-close", "chunked", "continue"],
)
async def test_answers_are_read_however_they_are_framed(answer: bytes) -> None:
    server = _RawServer([answer])
    async with (
        server as url,
        APIClient(url, api_key=None, timeout_s=5, concurrency=1) as client,
    ):
        reply = await client.post("completions", BODY)
    assert reply.status == 200
    assert reply.raw == _ANSWER


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # not HTTP at all
        # Cut short: the server closes the connection halfway through the body.
        b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\nConnection: close\r\n\r\n"
        + _ANSWER,
        None,  # closed without a word
    ],
    ids=["not-http", "cut-short", "closed"],
)
async def test_a_broken_answer_is_a_connection_error_and_the_connection_goes(
    answer: bytes | None,
) -> None:
    """What no HTTP parser accepts is retryable, and the connection it came
    on is never used again: the next request opens a new one."""
    server = _RawServer([answer, _http()])
    async with (
        server as url,
        APIClient(url, api_key=None, timeout_s=5, concurrency=1) as client,
    ):
        with pytest.raises(APIConnectionError):
            await client.post("completions", BODY)
        assert (await client.post("completions", BODY)).raw == _ANSWER
    assert [number for number, _, _ in server.requests] == [1, 2]


async def test_a_plain_http_request_through_a_proxy_carries_its_credentials(
    clean_proxy_env: pytest.MonkeyPatch,
) -> None:
    """A proxy receives the absolute URL, and the credentials of the proxy
    URL as Proxy-Authorization; the request's own head is unchanged."""
    server = _RawServer([_http()])
    async with server as url:
        proxy = URL(url).with_path("").with_user("user").with_password("pw")
        clean_proxy_env.setenv("HTTP_PROXY", str(proxy))
        async with APIClient(
            "http://api.example.invalid/v1", api_key=SECRET, timeout_s=5, concurrency=1
        ) as client:
            assert (await client.post("completions", BODY)).raw == _ANSWER
    ((_, head, _),) = server.requests
    assert head.startswith(b"post http://api.example.invalid/v1/completions http/1.1")
    assert b"\r\nhost: api.example.invalid\r\n" in head
    assert b"\r\nproxy-authorization: basic dxnlcjpwdw==\r\n" in head
    assert f"\r\nauthorization: bearer {SECRET}\r\n".lower().encode() in head


@pytest.mark.parametrize(
    ("endpoint", "location", "said"),
    [
        (
            "completions",
            "https://api.example.com/v1/completions",
            "moved to https://api.example.com/v1/completions; use --base-url"
            " https://api.example.com/v1",
        ),
        (
            "chat",
            "https://api.example.com/v1/chat/completions",
            "moved to https://api.example.com/v1/chat/completions; use --base-url"
            " https://api.example.com/v1",
        ),
        ("completions", "/elsewhere", "/elsewhere; is the base URL right?"),
    ],
)
async def test_a_redirect_stops_the_run_and_names_where_it_leads(
    endpoint: Endpoint, location: str, said: str
) -> None:
    """A redirect (an http:// URL for an https:// API, say) is not followed:
    every request would pay for it again. It is fatal, naming the base URL to
    give instead."""
    server = _RawServer(
        [b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
         b"Content-Length: 0\r\n\r\n" % location.encode()]
    )  # fmt: skip
    async with (
        server as url,
        APIClient(url, api_key=None, timeout_s=5, concurrency=1) as client,
    ):
        with pytest.raises(FatalAPIError) as info:
            await client.post(endpoint, BODY)
    assert info.value.status == 308
    path = ENDPOINT_PATHS[endpoint]
    assert str(info.value).startswith(f"HTTP 308: {url}{path} moved to ")
    assert str(info.value).endswith(said)


async def test_credentials_in_the_base_url_are_sent_and_never_shown() -> None:
    """user:password@host authenticates with basic auth (for a server behind
    it), and messages show the URL without them."""
    server = _RawServer(
        [b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"]
    )  # fmt: skip
    async with server as url:
        with_password = URL(url).with_user("user").with_password("s3cret")
        async with APIClient(
            str(with_password), api_key=None, timeout_s=5, concurrency=1
        ) as client:
            assert client.base_url == url
            with pytest.raises(FatalAPIError) as info:
                await client.post("completions", BODY)
    ((_, head, _),) = server.requests
    assert b"\r\nauthorization: basic dxnlcjpzm2nyzxq=\r\n" in head  # user:s3cret
    assert b"s3cret" not in head
    assert "s3cret" not in str(info.value)
    assert f"HTTP 404 for {url}/completions" in str(info.value)


def test_a_run_behind_basic_auth_keeps_the_password_out_of_its_output(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """The manifest records the base URL without its user:password@."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    url = URL(sim.base_url).with_user("user").with_password("s3cret")
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url", str(url),
        "--model", "m", "--quiet",
    )  # fmt: skip
    assert code == 0
    assert sim.state.request_count == 3
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert "s3cret" not in manifest
    assert orjson.loads(manifest)["endpoint"] == sim.base_url


async def test_an_api_key_with_a_line_break_is_refused() -> None:
    """A key read from a file with its newline would split the request's
    head (and let the rest of the line through as a header of its own)."""
    with pytest.raises(ConfigError, match=r"Authorization header .* line break"):
        async with APIClient(
            "http://127.0.0.1:9/v1",
            api_key="sk-x\nX-Evil: 1",
            timeout_s=5,
            concurrency=1,
        ):
            pass


@pytest.mark.parametrize("status", [400, 401, 500])
async def test_echoed_api_key_is_scrubbed(sim: SimulatorHandle, status: int) -> None:
    """A key echoed by the server in an error body is not in the exception."""
    body = {"error": {"message": f"Incorrect API key provided: {SECRET}"}}
    error = await _post_error(
        sim, ScriptedResponse(status=status, body=body), api_key=SECRET
    )
    assert error.status == status
    assert SECRET not in str(error)
    assert SECRET not in (error.body or "")
    assert "***" in str(error)


async def test_echoed_api_key_in_plain_text_body_is_scrubbed(
    sim: SimulatorHandle,
) -> None:
    """A key echoed in a non-JSON error body is not in the exception."""
    body = f"Bad header: Authorization: Bearer {SECRET}"
    error = await _post_error(
        sim, ScriptedResponse(status=400, body=body), api_key=SECRET
    )
    assert isinstance(error, PermanentError)
    assert SECRET not in str(error)
    assert SECRET not in (error.body or "")


async def test_echoed_api_key_cut_by_body_limit_does_not_leak(
    sim: SimulatorHandle,
) -> None:
    """A key straddling the body-snippet cut does not leak a prefix of itself."""
    # The key starts 40 bytes before the 1200-byte read limit of the snippet, so
    # only its first 40 characters are read; the whitespace before it collapses.
    body = " " * 1160 + SECRET
    error = await _post_error(
        sim, ScriptedResponse(status=400, body=body), api_key=SECRET
    )
    leaked = SECRET[:16]
    assert leaked not in str(error), f"key prefix leaked in message: {error}"
    assert leaked not in (error.body or ""), f"key prefix leaked in body: {error.body}"


# In a process of its own, so that its table of open files starts small.
_GROW_TABLE = """
import os, resource, sys
from batchrun.client import grow_descriptor_table

def table_size():
    for line in open("/proc/self/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])

soft = int(sys.argv[1])
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
used = int(sys.argv[2])
before = table_size()
if used:
    os.dup2(os.open(os.devnull, os.O_RDONLY), used)
    inode = os.fstat(used).st_ino
grow_descriptor_table(1000)
if used:
    assert os.fstat(used).st_ino == inode, "a descriptor in use was replaced"
print(before, table_size())
"""


def _grow_table(soft: int, used: int = 0) -> tuple[int, int]:
    """Table sizes before and after ``grow_descriptor_table(1000)``."""
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < soft:
        pytest.skip(f"the hard limit on open files is {hard}")
    done = subprocess.run(
        [sys.executable, "-c", _GROW_TABLE, str(soft), str(used)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    before, after = done.stdout.split()
    return int(before), int(after)


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads FDSize in /proc"
)


@linux_only
def test_the_table_of_open_files_is_grown_at_once() -> None:
    """The table holds the size asked for at once, rather than growing as files
    open (mid-run, where each growth waits for an RCU grace period)."""
    before, after = _grow_table(soft=4096)
    assert before < 1000 <= after


@linux_only
def test_growing_the_table_stays_under_the_open_file_limit() -> None:
    """A soft limit below the size asked for caps it, without an error."""
    before, after = _grow_table(soft=300)
    assert before < 300 <= after < 1000


@linux_only
def test_growing_the_table_leaves_descriptors_in_use_alone() -> None:
    """The descriptor at the top of the new table, open already, stays open."""
    _, after = _grow_table(soft=4096, used=999)
    assert after >= 1000


# --- proxies ------------------------------------------------------------------

_PROXY_VARS = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture
def clean_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No proxy settings from the machine running the tests."""
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def test_requests_go_through_the_environments_proxy(
    sim: SimulatorHandle, tmp_path: Path, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """With HTTP_PROXY set, every request goes to the proxy, which reaches a
    host this machine cannot resolve (the simulator stands in for the proxy,
    answering the absolute-form requests a proxy receives)."""
    clean_proxy_env.setenv("HTTP_PROXY", sim.base_url.removesuffix("/v1"))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url",
        "http://api.example.invalid/v1", "--model", "m", "--quiet",
        "--max-attempts", "1",  # without the proxy: fail now, not after backoffs
    )  # fmt: skip
    assert code == 0
    assert sim.state.request_count == 5
    assert len(read_results(tmp_path / "out")) == 5


def test_a_fireworks_404_shows_how_fireworks_names_models(
    sim: SimulatorHandle,
    tmp_path: Path,
    clean_proxy_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A 404 from Fireworks for a model named without its account path says
    how Fireworks names it. (The simulator stands in for a proxy to
    api.fireworks.ai, and has no /inference route: a 404.)"""
    clean_proxy_env.setenv("HTTP_PROXY", sim.base_url.removesuffix("/v1"))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    code = run_cli(
        "run", inp, "-o", tmp_path / "out", "--base-url",
        "http://api.fireworks.ai/inference/v1", "--model", "llama-v3p1-8b-instruct",
        "--quiet",
    )  # fmt: skip
    assert code == 3
    said = capsys.readouterr().err.rstrip()
    assert said.endswith(
        "; the request's model is 'llama-v3p1-8b-instruct' (Fireworks names it"
        " accounts/fireworks/models/llama-v3p1-8b-instruct)"
    )


def test_a_server_on_this_machine_bypasses_the_proxy(
    sim: SimulatorHandle, tmp_path: Path, clean_proxy_env: pytest.MonkeyPatch
) -> None:
    """A proxy cannot reach this machine's loopback: requests to it go direct."""
    clean_proxy_env.setenv("HTTP_PROXY", closed_port_url().removesuffix("/v1"))
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    assert run_against(sim, inp, tmp_path / "out") == 0
    assert sim.state.request_count == 3


def test_env_proxy_reads_no_proxy_and_credentials(
    clean_proxy_env: pytest.MonkeyPatch,
) -> None:
    """NO_PROXY exempts a host; credentials in the proxy URL become its auth."""
    clean_proxy_env.setenv("HTTPS_PROXY", "http://user:pw@proxy.example:3128")
    clean_proxy_env.setenv("NO_PROXY", "api.internal")
    assert env_proxy("https://api.internal/v1") == (None, None)
    assert env_proxy("http://api.example/v1") == (None, None)  # no HTTP_PROXY
    proxy, headers = env_proxy("https://api.fireworks.ai/inference/v1")
    assert proxy == URL("http://proxy.example:3128")
    assert headers == {"Proxy-Authorization": "Basic dXNlcjpwdw=="}  # user:pw


def test_env_proxy_refuses_other_kinds_without_showing_the_password(
    clean_proxy_env: pytest.MonkeyPatch,
) -> None:
    """A socks proxy is a ConfigError naming the proxy, never its password."""
    clean_proxy_env.setenv("HTTPS_PROXY", "socks5://user:secret@proxy.example:1080")
    with pytest.raises(ConfigError, match="only http:// proxies") as info:
        env_proxy("https://api.openai.com/v1")
    assert "proxy.example:1080" in str(info.value)
    assert "secret" not in str(info.value)
