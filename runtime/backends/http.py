"""HTTP plumbing shared by the remote backends: status errors, server-sent events, health.

Errors are translated once, here, from httpx and HTTP statuses:
    connection refused / reset / stream cut      -> BackendUnavailable   (-32004)
    HTTP 429                                     -> BackendOverloaded    (-32000)
    HTTP 503                                     -> BackendUnavailable
    context too long (HTTP 400 that says so)     -> BackendContextLength (-32002)
    any other non-200 or an error event          -> BackendError         (-32603)
    no byte for `read_timeout_s` on a stream     -> BackendUnavailable   (a stalled server)
    an event line or a body beyond its bound     -> BackendError naming the bound

Every read is bounded in time (the read deadline of the stream's timeout) and in size: a
server-sent event line holds at most MAX_LINE_BYTES, a JSON answer MAX_BODY_BYTES, and of an
error body only the first ERROR_BODY_BYTES are read (its message is what matters).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from runtime.backends.base import BackendContextLength, BackendError, BackendOverloaded, BackendUnavailable

log = logging.getLogger("runtime.backends.http")
# httpx logs every request at INFO: the health polls would fill the log every few seconds.
logging.getLogger("httpx").setLevel(logging.WARNING)

HEALTH_INTERVAL_S = 2.0
START_TIMEOUT_S = 30.0
# Decoding on a busy CPU can pause for long between tokens, and a long prompt's prefill comes
# before the first event: the read deadline is generous, but there is one, so a server that
# stalls with its connection open cannot pin a turn (and its session and queue slot) forever.
STREAM_READ_TIMEOUT_S = 300.0
MAX_LINE_BYTES = 8 * 1024 * 1024  # one server-sent event (SGLang's carry the cumulative text and ids)
MAX_BODY_BYTES = 16 * 1024 * 1024  # one JSON answer of a probe (/server_info, /v1/models, /v1/loads)
ERROR_BODY_BYTES = 64 * 1024  # what is read of an error answer


def stream_timeout(read_s: float = STREAM_READ_TIMEOUT_S) -> httpx.Timeout:
    return httpx.Timeout(10.0, read=read_s, write=30.0, pool=30.0)


STREAM_TIMEOUT = stream_timeout()
PROBE_TIMEOUT = httpx.Timeout(5.0)
HEALTH_TIMEOUT = httpx.Timeout(5.0, read=15.0)


def error_text(resp: httpx.Response, raw: bytes | None = None) -> str:
    """The message of an error answer: `raw` (what was read of its body), else its whole body."""
    raw = resp.content if raw is None else raw
    try:
        body = json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()[:500] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or err.get("detail") or err)[:500]
        return str(err)[:500]
    return str(body)[:500]


# SGLang: "The input (N tokens) is longer than the model's context length (M tokens)."
# vLLM:   "This model's maximum context length is M tokens. However, you requested N tokens ..."
_CTX_PATTERNS = (
    re.compile(r"input \((?P<n>\d+) tokens\) is longer than the model's context length \((?P<m>\d+)"),
    re.compile(r"maximum context length is (?P<m>\d+) tokens.*?(?:requested|has) (?P<n>\d+)", re.S),
)


def status_error(resp: httpx.Response, where: str, raw: bytes | None = None) -> BackendError:
    text = error_text(resp, raw)
    message = f"{where}: HTTP {resp.status_code}: {text}"
    if resp.status_code == 429:
        retry = resp.headers.get("retry-after")
        ms = int(float(retry) * 1000) if retry and retry.replace(".", "", 1).isdigit() else 1000
        return BackendOverloaded(message, retry_after_ms=ms)
    if resp.status_code == 503:
        return BackendUnavailable(message)
    for pattern in _CTX_PATTERNS:
        m = pattern.search(text)
        if m:
            return BackendContextLength(message, prompt_tokens=int(m["n"]), limit=int(m["m"]))
    return BackendError(message)


async def read_body(resp: httpx.Response, max_bytes: int, where: str, *, truncate: bool = False) -> bytes:
    """At most `max_bytes` of a streamed answer's body: beyond, BackendError naming the bound
    (or, with `truncate`, the first `max_bytes`, for an error answer's message)."""
    body = bytearray()
    async for chunk in resp.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            if truncate:
                return bytes(body[:max_bytes])
            raise BackendError(f"{where}: the answer is larger than {max_bytes} bytes (MAX_BODY_BYTES)")
    return bytes(body)


async def error_body(resp: httpx.Response) -> bytes:
    """The first ERROR_BODY_BYTES of an error answer's body: enough for its message."""
    return await read_body(resp, ERROR_BODY_BYTES, "", truncate=True)


async def sse_lines(resp: httpx.Response, *, max_line_bytes: int = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """The lines of a streamed body, each at most `max_line_bytes` (BackendError beyond: a
    server that never ends a line must not grow this process's memory)."""
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            if nl - start > max_line_bytes:
                break
            yield bytes(buf[start:nl]).rstrip(b"\r")
            start = nl + 1
        del buf[:start]
        if len(buf) > max_line_bytes:
            raise BackendError(f"{resp.url}: a server-sent event line is longer than {max_line_bytes} bytes (MAX_LINE_BYTES)")
    if buf:
        yield bytes(buf).rstrip(b"\r")


async def sse_events(resp: httpx.Response, *, max_line_bytes: int = MAX_LINE_BYTES) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for line in sse_lines(resp, max_line_bytes=max_line_bytes):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        if data:
            try:
                yield json.loads(data)
            except ValueError as exc:
                raise BackendError(f"{resp.url}: an event that is not JSON: {data[:200]!r}") from exc


async def get_json(client: httpx.AsyncClient, url: str, *paths: str) -> Any:
    """GET the first of `paths` that exists (SGLang renamed several endpoints)."""
    last: tuple[httpx.Response, bytes] | None = None
    for path in paths:
        async with client.stream("GET", url + path, timeout=PROBE_TIMEOUT) as resp:
            if resp.status_code == 200:
                body = await read_body(resp, MAX_BODY_BYTES, f"GET {url}{path}")
                try:
                    return json.loads(body)
                except ValueError as exc:
                    raise BackendError(f"GET {url}{path}: the answer is not JSON") from exc
            last = (resp, await error_body(resp))
        if resp.status_code != 404:
            break
    assert last is not None
    raise status_error(last[0], f"GET {url}{paths[-1]}", last[1])


async def wait_reachable(client: httpx.AsyncClient, url: str, path: str, timeout_s: float) -> None:
    """Wait until `url + path` answers 200; a clear error naming the URL when it never does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            async with client.stream("GET", url + path, timeout=PROBE_TIMEOUT) as resp:
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {error_text(resp, await error_body(resp))}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() >= deadline:
            raise BackendUnavailable(f"backend {url} is not reachable or not healthy ({url}{path}: {last})")
        await asyncio.sleep(1.0)


class Health:
    """Polls each URL's health endpoint in the background; `any_up()` drives /ready.

    A URL is down after `failures` failed polls in a row (a busy CPU server can be slow to
    answer one probe; that is not an outage), or at once when a request cannot connect."""

    def __init__(self, client: httpx.AsyncClient, paths: dict[str, str], *, interval_s: float, failures: int = 3):
        self._client = client
        self._paths = paths
        self._interval = interval_s
        self._failures = failures
        self.up: dict[str, bool] = {url: True for url in paths}
        self._failed: dict[str, int] = {url: 0 for url in paths}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="remote-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def any_up(self) -> bool:
        return any(self.up.values())

    def mark_down(self, url: str, reason: str) -> None:
        if self.up.get(url):
            log.warning("backend %s is down: %s", url, reason)
        self.up[url] = False

    async def check(self, url: str) -> bool:
        try:
            async with self._client.stream("GET", url + self._paths[url], timeout=HEALTH_TIMEOUT) as resp:
                pass  # the status is the answer: the body is not read
            ok = resp.status_code == 200
            reason = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, type(exc).__name__
        if ok:
            if not self.up.get(url):
                log.info("backend %s is up", url)
            self.up[url], self._failed[url] = True, 0
            return True
        self._failed[url] += 1
        if self._failed[url] >= self._failures:
            self.mark_down(url, f"{reason} ({self._failed[url]} health checks in a row)")
        return self.up[url]

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await asyncio.gather(*(self.check(url) for url in self._paths), return_exceptions=True)
