"""HTTP plumbing shared by the remote backends: status errors, server-sent events, health.

Errors are translated once, here, from httpx and HTTP statuses:
    connection refused / reset / stream cut      -> BackendUnavailable   (-32004)
    HTTP 429                                     -> BackendOverloaded    (-32000)
    HTTP 503                                     -> BackendUnavailable
    context too long (HTTP 400 that says so)     -> BackendContextLength (-32002)
    any other non-200 or an error event          -> BackendError         (-32603)
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
# Decoding on a busy CPU can pause for long between tokens; only connecting is bounded.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=None, write=30.0, pool=30.0)
PROBE_TIMEOUT = httpx.Timeout(5.0)
HEALTH_TIMEOUT = httpx.Timeout(5.0, read=15.0)


def error_text(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text.strip()[:500] or resp.reason_phrase
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


def status_error(resp: httpx.Response, where: str) -> BackendError:
    text = error_text(resp)
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


async def sse_events(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


async def get_json(client: httpx.AsyncClient, url: str, *paths: str) -> Any:
    """GET the first of `paths` that exists (SGLang renamed several endpoints)."""
    last: httpx.Response | None = None
    for path in paths:
        resp = await client.get(url + path, timeout=PROBE_TIMEOUT)
        if resp.status_code == 200:
            return resp.json()
        last = resp
        if resp.status_code != 404:
            break
    assert last is not None
    raise status_error(last, f"GET {url}{paths[-1]}")


async def wait_reachable(client: httpx.AsyncClient, url: str, path: str, timeout_s: float) -> None:
    """Wait until `url + path` answers 200; a clear error naming the URL when it never does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            resp = await client.get(url + path, timeout=PROBE_TIMEOUT)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}: {error_text(resp)}"
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
            resp = await self._client.get(url + self._paths[url], timeout=HEALTH_TIMEOUT)
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
