"""The HTTP boundary: aiohttp's connection pool, POST, and error translation.

This is the only module that imports aiohttp (the simulator aside). It sends a
body, reads the answer, and maps every failure (HTTP status or transport
error) to the most specific ``APIError``. It does not retry or wait.

A request does not go through a ``ClientSession``. aiohttp's connector still
opens, pools and encrypts the connections (DNS cache, TLS, proxy tunnels, the
pool's limit) and aiohttp's parser still reads the answers; what is left out
is the session's request and response objects, built for every request to
serve cookies, redirects, compression, auth and tracing, none of which a
batch of API calls uses. The request's head is the same for every request
of a run, so it is put together once. At concurrency 64, a whole batchrun
run came to 316.7 thousand instructions a request instead of 581.3 (valgrind
callgrind, ``python benchmarks/run.py --only instructions``), less than a
bare session loop's 402.4.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import socket
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import aiohttp
import orjson
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from .config import ENDPOINT_PATHS, Endpoint, base_of, is_loopback
from .errors import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    ConfigError,
    FatalAPIError,
    MalformedResponseError,
    PermanentError,
    RateLimitError,
    ServerError,
)
from .jsontext import loads_answer
from .records import JSONObject

if TYPE_CHECKING:
    from aiohttp.connector import Connection

__all__ = ["APIClient", "Reply", "env_proxy", "parse_retry_after"]

_BODY_SNIPPET = 300
_SERVER_STATUSES = frozenset({408, 409, 425})
# The error codes of a 429 that means the account is out of quota, not sending
# too fast (OpenAI's; others answer such requests 402).
_QUOTA_CODES = frozenset({"insufficient_quota"})


@dataclass(slots=True)  # one per request: not frozen, which costs 0.4 us more
class Reply:
    """A successful (2xx) answer whose body holds ``choices``."""

    status: int
    data: JSONObject
    raw: bytes
    headers: Mapping[str, str]


def parse_retry_after(
    headers: Mapping[str, str], *, now: float | None = None
) -> float | None:
    """The server's requested wait in seconds (``retry-after-ms`` or ``Retry-After``).

    ``Retry-After`` may be seconds or an HTTP date. Returns ``None`` when absent
    or unparseable; never a negative number.
    """
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class _Watch:
    """The deadline of a task's request in flight, and its connection."""

    __slots__ = ("connection", "deadline", "expired")

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.deadline = 0.0
        self.expired = False


class _Deadlines:
    """Every request's time limit, kept by one coarse timer.

    aiohttp's own total timeout arms and cancels a timer for every request:
    24,000 of the 427,000 instructions a request cost (callgrind, 3,000
    requests at concurrency 64), more than all of batchrun's retry and
    rate-limit bookkeeping. Here a request's deadline is noted when it is
    about to be sent, and one callback looks at the requests in flight every
    ``tick_s``: it closes the connection of any that is past its deadline, and
    that request then fails as timed out. A request may run up to one tick
    over its limit. Each task has one request in flight at most, so watches
    are kept per task and reused.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.tick_s = min(1.0, limit_s / 10)
        self._watches: dict[asyncio.Task[Any] | None, _Watch] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(self.tick_s, self._sweep)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def sending(self, connection: Connection) -> None:
        """The current task's request is about to go out on ``connection``."""
        # Given the loop, current_task does not look it up again: half of its
        # 0.4 us (Python 3.11), once per request.
        task = asyncio.current_task(self._loop)
        watch = self._watches.get(task)
        if watch is None:
            watch = self._watches[task] = _Watch()
        watch.connection = connection
        watch.deadline = time.monotonic() + self.limit_s
        watch.expired = False

    def expired(self) -> bool:
        """Whether the current task's last request was stopped at its deadline."""
        watch = self._watches.get(asyncio.current_task(self._loop))
        if watch is None or not watch.expired:
            return False
        watch.expired = False
        return True

    def oldest_s(self) -> float:
        """How long the request longest in flight has been out (0 if none)."""
        now = time.monotonic()
        oldest = 0.0
        for watch in self._watches.values():
            connection = watch.connection
            if connection is not None and connection.transport is not None:
                oldest = max(oldest, now - (watch.deadline - self.limit_s))
        return oldest

    def _sweep(self) -> None:
        now = time.monotonic()
        for task, watch in list(self._watches.items()):
            if task is None or task.done():
                del self._watches[task]
            elif watch.deadline <= now and not watch.expired:
                # aiohttp lets go of a request's connection when the request
                # ends, and its transport is None from then on: only requests
                # still in flight are stopped.
                transport = watch.connection and watch.connection.transport
                if transport is not None:
                    watch.expired = True
                    transport.abort()
        assert self._loop is not None
        self._timer = self._loop.call_later(self.tick_s, self._sweep)


class _Wire:
    """How every request to one URL goes out: the connector's key to its
    connections, and the request's head up to the body's length."""

    __slots__ = ("head", "request")

    def __init__(
        self,
        url: URL,
        headers: Mapping[str, str],
        *,
        proxy: URL | None,
        proxy_headers: Mapping[str, str] | None,
    ) -> None:
        # Never sent: it tells the connector where to connect, whether with
        # TLS, and through which proxy (a CONNECT tunnel for https).
        self.request = aiohttp.ClientRequest(
            "POST",
            url,
            loop=asyncio.get_running_loop(),
            proxy=proxy,
            proxy_headers=None if proxy_headers is None else dict(proxy_headers),
        )
        lines = dict(headers)
        if url.user is not None and "Authorization" not in lines:
            # user:password@host in the base URL, for a server behind basic
            # auth; an API key, sent as a bearer token, takes its place.
            lines["Authorization"] = _basic_auth(url.user, url.password)
        if proxy is not None and url.scheme == "http":
            # Through a proxy, plain http is sent whole to the proxy, which
            # wants the absolute URL and its own credentials.
            target = str(url)
            lines.update(proxy_headers or {})
        else:
            target = url.raw_path_qs
        for name, value in lines.items():
            if "\r" in value or "\n" in value:
                raise ConfigError(
                    f"the {name} header (from the API key or proxy URL) holds a"
                    " line break; remove it"
                )
        head = [f"POST {target} HTTP/1.1", f"Host: {self.request.headers['Host']}"]
        head += [f"{name}: {value}" for name, value in lines.items()]
        self.head = "\r\n".join([*head, "Content-Length: "]).encode()

    def message(self, body: bytes) -> bytes:
        """The whole request: one write, one system call."""
        return b"%s%d\r\n\r\n%s" % (self.head, len(body), body)


# Files open besides the pool's sockets: the journal, a part being written,
# the input, the event loop's own, and some room.
_SPARE_FILES = 64


def make_room_for(connections: int) -> None:
    """Let the process hold ``connections`` sockets open besides its files.

    The soft limit on open files (``ulimit -n``) is 1,024 on many Linux
    systems and 256 on macOS. A pool beyond it fails its extra connections
    with "Too many open files", and then the writing of results too; so the
    soft limit is raised as far as the hard limit allows.

    Raises:
        ConfigError: Even the hard limit is too low.
    """
    try:
        import resource
    except ImportError:  # Windows has no such limit
        return
    needed = connections + _SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            target = soft  # macOS refuses more than OPEN_MAX whatever the hard limit
        if target < needed:
            raise ConfigError(
                f"{connections} connections need about {needed} open files, and"
                f" this process may open {target} (ulimit -n); lower --concurrency"
                " or raise the limit"
            )
    grow_descriptor_table(needed)


def grow_descriptor_table(size: int) -> None:
    """Have the table of open files hold ``size`` entries now (at most ``ulimit -n``).

    Linux grows the table as files are opened, and in a process with more than
    one thread each growth waits for an RCU grace period: 8-14 ms here, where
    a process of one thread grows it in microseconds. pyarrow starts two
    threads when imported, so the pool's first wave of connections stalled the
    event loop at each growth: 5-7 ms at the 256th (strace -T). The command
    grows the table at start, before that import (``__main__``); a pool larger
    than that pays for its growth here, before the first request.
    """
    try:
        import fcntl
        import resource
    except ImportError:  # Windows
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        size = min(size, soft)
    try:
        spare = os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return
    try:
        # F_DUPFD takes the lowest free descriptor from size - 1 on: unlike
        # dup2, it never closes one in use.
        os.close(fcntl.fcntl(spare, fcntl.F_DUPFD, size - 1))
    except OSError:
        pass  # the table grows as files are opened, as it would have
    finally:
        os.close(spare)


def env_proxy(base_url: str) -> tuple[URL | None, dict[str, str] | None]:
    """The proxy the environment names for ``base_url``, and its headers.

    ``HTTPS_PROXY`` / ``HTTP_PROXY`` (either case) and ``NO_PROXY``, as curl,
    requests and httpx read them, through urllib (which on macOS and Windows
    also reads the system's settings). A server on this machine never goes
    through a proxy. This is read once, for the whole run: aiohttp's own
    ``trust_env`` looks the proxy up again, in a thread, for every request.

    Returns:
        The proxy's URL without credentials, and a ``Proxy-Authorization``
        header when the URL held some; ``(None, None)`` for no proxy.

    Raises:
        ConfigError: The proxy is not an ``http://`` URL (aiohttp tunnels
            https through an http proxy, and knows no other kind).
    """
    url = URL(base_url)
    host = url.host
    if host is None or is_loopback(host) or urllib.request.proxy_bypass(host):
        return None, None
    named = urllib.request.getproxies().get(url.scheme)
    if not named:
        return None, None
    proxy = URL(named if "://" in named else f"http://{named}")
    shown = proxy.with_user(None)  # never print or send on a password
    if proxy.scheme != "http":
        raise ConfigError(
            f"{url.scheme}_proxy {shown}: only http:// proxies are supported"
        )
    if proxy.user is None:
        return shown, None
    return shown, {"Proxy-Authorization": _basic_auth(proxy.user, proxy.password)}


def _basic_auth(user: str, password: str | None) -> str:
    """The value of a basic-auth header."""
    token = base64.b64encode(f"{user}:{password or ''}".encode())
    return f"Basic {token.decode()}"


class APIClient:
    """Posts request bodies to an OpenAI-compatible server.

    Use as ``async with APIClient(...) as client:``; the connection pool
    lives exactly as long as the block.

    Args:
        base_url: E.g. ``https://api.fireworks.ai/inference/v1``.
        api_key: Bearer token, or ``None`` for servers without auth.
        timeout_s: Limit for one request, from sending to the last byte.
        concurrency: Connection pool size; it must match the number of workers
            so that the pool never caps them silently.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None,
        timeout_s: float,
        concurrency: int,
    ) -> None:
        given = URL(base_url.rstrip("/"))
        # Shown in messages, so without the password of a user:password@host.
        self.base_url = str(given.with_user(None))
        self._api_key = api_key
        self._deadlines = _Deadlines(timeout_s)
        self._concurrency = concurrency
        self._connector: aiohttp.TCPConnector | None = None
        self._urls = {
            name: URL(str(given) + path) for name, path in ENDPOINT_PATHS.items()
        }
        self._wires: dict[Endpoint, _Wire] = {}
        self._proxy, self._proxy_headers = env_proxy(self.base_url)
        self._reached = False  # the server has answered at least once
        # aiohttp times only the opening of a new connection; the request's
        # own limit is kept by self._deadlines.
        self._connect_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self._deadlines.limit_s
        )

    async def __aenter__(self) -> Self:
        headers = {
            "Accept": "*/*",
            "Accept-Encoding": "identity",  # the answers are kept as they come
            "Content-Type": "application/json",
            "User-Agent": "batchrun",
        }
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        self._wires = {
            name: _Wire(
                url, headers, proxy=self._proxy, proxy_headers=self._proxy_headers
            )
            for name, url in self._urls.items()
        }
        self._connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=0, ttl_dns_cache=300
        )
        self._deadlines.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._deadlines.close()
        if self._connector is not None:
            await self._connector.close()
            self._connector = None

    def oldest_in_flight_s(self) -> float:
        """How long the request longest in flight has been out (0 if none)."""
        return self._deadlines.oldest_s()

    def _scrub(self, text: str) -> str:
        """Never let the key through into a message, whatever the server echoes."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "***")
        return text

    async def post(self, endpoint: Endpoint, body: bytes | JSONObject) -> Reply:
        """Send one request and return the parsed answer.

        Args:
            endpoint: Where to send it.
            body: The JSON body, encoded already or to encode here.

        Raises:
            TransientError: Retryable (429, 5xx, timeout, connection, bad body).
            PermanentError: A 4xx that retrying cannot fix.
            FatalAPIError: 401, 403 or 404: the key, model or URL is wrong.
        """
        if self._connector is None:
            raise RuntimeError("APIClient used outside 'async with'")
        payload = body if isinstance(body, bytes) else orjson.dumps(body)
        deadlines = self._deadlines
        try:
            status, raw, headers = await self._exchange(self._wires[endpoint], payload)
            self._reached = True
        except (aiohttp.ClientError, HttpProcessingError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientSSLError):
                raise self._tls_error(exc) from exc
            if not self._reached and _unknown_host(exc):
                # A mistyped host retried like a dropped connection took
                # minutes to abort through the circuit breaker. Once the server
                # has answered, it is a resolver's hiccup, and retried.
                raise FatalAPIError(
                    f"cannot find the host of {self.base_url} ({exc}): is the"
                    " base URL right?"
                ) from exc
            if isinstance(exc, TimeoutError) or deadlines.expired():
                raise APITimeoutError(
                    f"no response within {deadlines.limit_s:g} s (--timeout; a long"
                    " answer may need more)"
                ) from exc
            message = self._scrub(str(exc) or type(exc).__name__)
            raise APIConnectionError(f"{type(exc).__name__}: {message}") from exc
        if 200 <= status < 300:
            try:
                data = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                try:
                    data = loads_answer(raw)
                except ValueError:
                    raise self._not_json(status, raw, headers) from exc
            if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
                # Some gateways (OpenRouter) answer 200 with an error body.
                stated = None
                if isinstance(data, dict) and "error" in data:
                    stated, _ = _stated_error(data)
                detail = f": {self._scrub(stated)[:_BODY_SNIPPET]}" if stated else ""
                raise MalformedResponseError(
                    f"HTTP {status} without choices{detail}",
                    status=status,
                    body=self._snippet(raw),
                    data=data if isinstance(data, dict) else None,
                )
            return Reply(status, data, raw, headers)
        url = self.base_url + ENDPOINT_PATHS[endpoint]  # without credentials
        raise self._error(status, raw, headers, url)

    async def _exchange(
        self, wire: _Wire, body: bytes
    ) -> tuple[int, bytes, Mapping[str, str]]:
        """Send one request on a pooled connection; its status, body and headers."""
        assert self._connector is not None
        connection = await self._connector.connect(
            wire.request, [], self._connect_timeout
        )
        try:
            self._deadlines.sending(connection)
            protocol, transport = connection.protocol, connection.transport
            if protocol is None or transport is None:
                raise aiohttp.ServerDisconnectedError()
            # What a session sets for every request: a body that ends only
            # with the connection is read to its end, and kept as it came.
            protocol.set_response_params(read_until_eof=True, auto_decompress=False)
            transport.write(wire.message(body))
            message, content = await protocol.read()
            while 100 <= message.code < 200 and message.code != 101:
                message, content = await protocol.read()  # after "100 Continue"
            raw = await content.read()
        except BaseException:
            connection.close()  # cut off mid-answer: never reused
            raise
        # Back to the pool, or closed if the answer asked for it.
        connection.release()
        return message.code, raw, message.headers

    def _tls_error(self, exc: aiohttp.ClientSSLError) -> FatalAPIError:
        """No retry makes a certificate trusted or a server speak TLS: a
        self-signed certificate took 450 attempts and 111 s to abort the run
        through the circuit breaker, saying why only at the end."""
        where = f"{exc.host}:{exc.port}"
        if isinstance(exc, aiohttp.ClientConnectorCertificateError):
            reason = getattr(exc.certificate_error, "verify_message", None)
            return FatalAPIError(
                f"the TLS certificate of {where} is not trusted"
                f" ({reason or exc.certificate_error}); for a server with its own"
                " certificate authority, name it: SSL_CERT_FILE=/path/to/ca.pem"
            )
        reason = getattr(exc.os_error, "reason", None) or exc.os_error
        return FatalAPIError(
            f"TLS with {where} failed ({reason}): does it speak https? A server"
            " without TLS needs an http:// base URL"
        )

    def _not_json(
        self, status: int, raw: bytes, headers: Mapping[str, str]
    ) -> APIError:
        """A 2xx that is not JSON: cut short in transit (retried), or a web
        page, which no retry changes: the URL leads to a site, a proxy's login
        or a captive portal rather than to the API."""
        if headers.get("Content-Type", "").startswith("text/html"):
            return PermanentError(
                f"HTTP {status} with a web page, not an API answer: is the base"
                f" URL right? ({self.base_url}; an OpenAI-compatible API's"
                " usually ends in /v1)",
                status=status,
                body=self._snippet(raw),
            )
        return MalformedResponseError(
            f"HTTP {status} with a body that is not JSON", status=status
        )

    def _snippet(self, raw: bytes) -> str:
        # Scrub the whole body before cutting it, so a key cut in half by the
        # limit cannot survive as a fragment.
        text = self._scrub(raw.decode("utf-8", "replace"))
        return " ".join(text.split())[:_BODY_SNIPPET]

    def _error(
        self, status: int, raw: bytes, headers: Mapping[str, str], url: str
    ) -> APIError:
        stated, code = _error_fields(raw)
        detail = stated or self._snippet(raw)
        detail = self._scrub(" ".join(detail.split()))[:_BODY_SNIPPET]
        request_id = headers.get("x-request-id")
        body = self._snippet(raw)
        message = f"HTTP {status}: {detail}" if detail else f"HTTP {status}"
        if 300 <= status < 400:
            return FatalAPIError(
                self._moved(status, url, headers.get("Location")),
                status=status,
                body=body,
                request_id=request_id,
            )
        if status == 402 or (status == 429 and code in _QUOTA_CODES):
            # No retry or wait brings credit back, and every row would wait
            # out its backoffs first: rate learning from these 429s slowed an
            # account out of quota to one request a minute, with no row done.
            return FatalAPIError(
                f"HTTP {status} from {self.base_url}: the account's quota or"
                f" credit is used up ({detail or 'no detail'}); once it is"
                " topped up, the same command resumes",
                status=status,
                body=body,
                request_id=request_id,
            )
        if status == 429:
            return RateLimitError(
                message,
                status=status,
                body=body,
                request_id=request_id,
                headers=headers,
                retry_after=parse_retry_after(headers),
            )
        if status >= 500 or status in _SERVER_STATUSES:
            return ServerError(
                message,
                status=status,
                body=body,
                request_id=request_id,
                headers=headers,
                retry_after=parse_retry_after(headers),
            )
        if status in (401, 403):
            return FatalAPIError(
                f"HTTP {status} from {self.base_url}: the API key is missing or wrong"
                f" ({detail or 'no detail'})",
                status=status,
                body=body,
                request_id=request_id,
            )
        if status == 404:
            hint = ""
            if not self.base_url.endswith("/v1"):
                hint = "; an OpenAI-compatible base URL usually ends in /v1"
            return FatalAPIError(
                f"HTTP 404 for {url}: the endpoint or model does not exist"
                f" ({detail or 'no detail'}){hint}",
                status=status,
                body=body,
                request_id=request_id,
            )
        return PermanentError(message, status=status, body=body, request_id=request_id)

    def _moved(self, status: int, url: str, location: str | None) -> str:
        """What a redirect says. Requests are not sent on: a run would pay a
        second round trip for every one of them (and a 301 or 302 turns a
        POST into a body-less GET), where the right base URL costs none."""
        if not location:
            return f"HTTP {status} without a Location for {url}: is the base URL right?"
        target = str(URL(url).join(URL(location)).with_user(None))
        base = base_of(target)
        if base is not None:
            return f"HTTP {status}: {url} moved to {target}; use --base-url {base}"
        return f"HTTP {status}: {url} moved to {target}; is the base URL right?"


_NO_SUCH_NAME = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def _unknown_host(exc: BaseException) -> bool:
    """Whether ``exc`` says the host's name does not exist (not that the
    resolver failed for now)."""
    cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    return isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_NAME


def _error_fields(raw: bytes) -> tuple[str | None, str | None]:
    """The ``error.message`` and ``error.code`` (or ``type``) of an
    OpenAI-style error body, where it has them."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None
    return _stated_error(data)


def _stated_error(data: object) -> tuple[str | None, str | None]:
    """``_error_fields`` of a body already parsed."""
    if not isinstance(data, dict):
        return None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return error, None
    if not isinstance(error, dict):
        return None, None
    message = error.get("message") or error.get("detail")
    code = error.get("code") or error.get("type")
    return (
        message if isinstance(message, str) else None,
        code if isinstance(code, str) else None,
    )
