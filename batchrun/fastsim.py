"""The simulator's fast path: the same answers from a minimal HTTP/1.1 server.

Benchmarks need a server that is never the bottleneck. aiohttp.web spends
most of a core answering a fast Python client, so ``serve-mock --fast``
answers from an ``asyncio.Protocol`` that parses only what OpenAI-compatible
clients send: a request line, headers and a ``Content-Length`` body (no
chunked bodies), over keep-alive connections, answering the requests of one
connection in order. ``benchmarks/run.py`` measures its capacity with wrk.

The answers, ids, token counts and ``/stats`` come from the same
``Simulator`` as the full server. What the fast path leaves out: rate limits,
fault injection, ``/sim/script`` and ``[[sim:...]]`` directives (such prompts
get a plain answer); ``SimulatorConfig.beyond_fast_path`` names the options
set in a config that it cannot serve.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

import orjson

from .simulator import MAX_BODY_BYTES, Rejection, Simulator

__all__ = ["FastProtocol", "factory"]

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    422: "Unprocessable Entity",
    501: "Not Implemented",
}
_MAX_HEAD = 64 * 1024
_NOT_FOUND = b'{"error":{"message":"Not found","type":"invalid_request_error"}}'


class FastProtocol(asyncio.Protocol):
    """One client connection to the fast simulator.

    Args:
        sim: The shared answers and counters.
        latency_s: Added to every completion (a timer, not a sleeping task).
    """

    def __init__(self, sim: Simulator, latency_s: float) -> None:
        self._sim = sim
        self._latency_s = latency_s
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._close_after = False
        self._waiting = False  # a completion's answer is still on its timer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        self._drain()

    def _drain(self) -> None:
        """Answer buffered requests in order; stop while one waits on its timer."""
        while not self._waiting and self._transport is not None and self._one():
            pass

    def _one(self) -> bool:
        """Answer the first buffered request; False until a whole one is here."""
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > _MAX_HEAD:
                self._fail(413, "request head too large")
            return False
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3:
            self._fail(400, "bad request line")
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._fail(501, "chunked request bodies are not supported")
            return False
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            self._fail(400, "bad Content-Length")
            return False
        if length > MAX_BODY_BYTES:
            self._fail(413, "request body too large")
            return False
        start = end + 4
        if len(buffer) < start + length:
            return False
        body = bytes(buffer[start : start + length])
        del buffer[: start + length]
        connection = headers.get("connection", "").lower()
        self._close_after = connection == "close" or (
            version == "HTTP/1.0" and connection != "keep-alive"
        )
        self._dispatch(method, target.partition("?"), headers, body)
        return True

    def _dispatch(
        self,
        method: str,
        target: tuple[str, str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> None:
        sim = self._sim
        path, _, query = target
        if path in ("/v1/completions", "/v1/chat/completions"):
            if method != "POST":
                self._send(405, _NOT_FOUND)
                return
            self._complete(path == "/v1/chat/completions", headers, body)
        elif path == "/stats" and method == "GET":
            prompts = "prompts=1" in query or "prompts=true" in query
            self._send(200, orjson.dumps(sim.state.snapshot(prompts=prompts)))
        elif path == "/stats/reset" and method == "POST":
            sim.state.reset()
            self._send(200, b'{"ok":true}')
        elif path == "/v1/models" and method == "GET":
            self._send(200, sim.models_body)
        else:
            self._send(404, _NOT_FOUND)

    def _complete(self, chat: bool, headers: dict[str, str], body: bytes) -> None:
        sim = self._sim
        state = sim.state
        state.request_count += 1
        accepted = sim.accept(
            body, chat, headers.get("authorization"), directives=False
        )
        if isinstance(accepted, Rejection):
            sim.answered(accepted.status, None)
            self._send(accepted.status, accepted.body)
            return
        data, done = sim.answer(accepted[0])
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)

        def reply() -> None:
            state.in_flight -= 1
            if self._transport is not None:
                sim.answered(200, done)
                self._send(200, data)

        if self._latency_s <= 0:
            reply()
            return

        def later() -> None:
            self._waiting = False
            reply()
            self._drain()

        self._waiting = True
        asyncio.get_running_loop().call_later(self._latency_s, later)

    def _fail(self, status: int, message: str) -> None:
        self._close_after = True
        self._buffer.clear()
        body = orjson.dumps({"error": {"message": message, "type": "invalid_request"}})
        self._send(status, body)

    def _send(self, status: int, body: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            + ("Connection: close\r\n\r\n" if self._close_after else "\r\n")
        )
        transport.write(head.encode() + body)
        if self._close_after:
            transport.close()


def factory(sim: Simulator, latency_ms: float) -> Callable[[], FastProtocol]:
    """The protocol factory for ``loop.create_server``."""
    return lambda: FastProtocol(sim, latency_ms / 1000)
