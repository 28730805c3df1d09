"""Remote generation backends: SGLang servers (alone or behind sglang-router), and any
OpenAI-compatible server. Same wire contract, same sessions; the engine runs elsewhere.

sglang (token level, like the embedded engine)
    Every turn POSTs SGLang's native `/generate` with `input_ids`, the sampling params of
    `Sampling.to_sglang()` (json_schema / ebnf / structural_tag constraints included) and
    `stream: true`; the server-sent events carry the same dicts `Engine.async_generate` yields.
    One URL: a worker or an sglang-router (cache_aware). The router routes a request that has
    `input_ids` and no `text` on the ids written as decimal numbers joined by spaces, so a
    session's next prompt (which extends its last one token for token) matches the prefix it
    sent before and lands on the worker that holds it. Several URLs: workers without a router;
    `PrefixAffinity` below does the same thing here. The tokenizer is loaded locally from the
    model the workers serve and checked against a worker's `/v1/tokenize` at start, so the
    renderer produces exactly the ids the worker would.

openai (message level: `token_level = False`)
    `/v1/chat/completions` with `tools`, `tool_choice`, streaming; `tool_calls` deltas are
    assembled into complete calls. The runtime cannot send token ids to such a server: the
    service's chat path (runtime.service) keeps a session's history as messages and sends all
    of it each turn; the server's chat template renders it and its prefix cache (if any) finds
    what it can. `cached_tokens` comes from `usage.prompt_tokens_details.cached_tokens`.

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
import functools
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Iterable

import httpx

from runtime.backend import (
    Backend,
    BackendError,
    BackendInfo,
    BackendOverloaded,
    BackendUnavailable,
    GenRequest,
    GenUpdate,
)
from runtime.config import Config

log = logging.getLogger("runtime.remote")
# httpx logs every request at INFO: the health polls would fill the log every few seconds.
logging.getLogger("httpx").setLevel(logging.WARNING)

HEALTH_INTERVAL_S = 2.0
START_TIMEOUT_S = 30.0
# Decoding on a busy CPU can pause for long between tokens; only connecting is bounded.
STREAM_TIMEOUT = httpx.Timeout(10.0, read=None, write=30.0, pool=30.0)
PROBE_TIMEOUT = httpx.Timeout(5.0)
HEALTH_TIMEOUT = httpx.Timeout(5.0, read=15.0)
# A string with the chat markup and JSON a tool prompt is made of: if the local tokenizer
# splits it like the worker does, the renderer's ids are the worker's ids.
TOKENIZER_PROBE = (
    '<|im_start|>system\nYou may call tools: {"type": "function", "function": {"name": "get_weather", '
    '"parameters": {"city": {"type": "string"}}}}<|im_end|>\n<|im_start|>user\nWeather in Paris?  Ünïcødé 42.<|im_end|>\n'
)


class BackendContextLength(BackendError):
    """The server refused the prompt as longer than its context."""

    def __init__(self, message: str, *, prompt_tokens: int = 0, limit: int = 0):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.limit = limit


# --------------------------------------------------------------------------- HTTP helpers


def _error_text(resp: httpx.Response) -> str:
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


def _status_error(resp: httpx.Response, where: str) -> BackendError:
    text = _error_text(resp)
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


async def _sse(resp: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    async for line in resp.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        if data:
            yield json.loads(data)


async def _get_json(client: httpx.AsyncClient, url: str, *paths: str) -> Any:
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
    raise _status_error(last, f"GET {url}{paths[-1]}")


async def _wait_reachable(client: httpx.AsyncClient, url: str, path: str, timeout_s: float) -> None:
    """Wait until `url + path` answers 200; a clear error naming the URL when it never does."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            resp = await client.get(url + path, timeout=PROBE_TIMEOUT)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}: {_error_text(resp)}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if time.monotonic() >= deadline:
            raise BackendUnavailable(f"backend {url} is not reachable or not healthy ({url}{path}: {last})")
        await asyncio.sleep(1.0)


class _Health:
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


# --------------------------------------------------------------------------- worker affinity


class PrefixAffinity:
    """Choose a worker per request so that a prompt goes where its longest prefix was computed.

    Used with several worker URLs and no router. Token ids are hashed in chained blocks of
    `block` tokens; each block hash remembers the worker that last got it. A session's next
    prompt extends its previous one, so its deepest known block is the previous turn's and the
    turn goes back to the same worker: session affinity without a session id, and stateless
    callers that resend a history get it too. A prompt that matches less than `threshold` of
    itself, or whose worker is busier than the least loaded by more than `max_imbalance`
    requests, goes to the least loaded worker (ties: the first in the configured order).
    This is sglang-router's cache_aware policy, on token blocks instead of characters.
    """

    def __init__(self, *, block: int = 16, threshold: float = 0.3, max_imbalance: int = 8, max_blocks: int = 200_000):
        self.block = block
        self.threshold = threshold
        self.max_imbalance = max_imbalance
        self.max_blocks = max_blocks
        self._owner: OrderedDict[int, str] = OrderedDict()

    def _hashes(self, ids: list[int]) -> Iterable[int]:
        h = 0
        for start in range(0, len(ids) - self.block + 1, self.block):
            h = hash((h, tuple(ids[start:start + self.block])))
            yield h

    def pick(self, ids: list[int], workers: list[str], load: dict[str, int]) -> str:
        if len(workers) == 1:
            return workers[0]
        matched_blocks, owner = 0, None
        for i, h in enumerate(self._hashes(ids)):
            w = self._owner.get(h)
            if w is None:
                break
            if w in workers:
                matched_blocks, owner = i + 1, w
        least = min(workers, key=lambda w: load.get(w, 0))
        rate = matched_blocks * self.block / max(len(ids), 1)
        if owner is not None and rate > self.threshold and load.get(owner, 0) - load.get(least, 0) <= self.max_imbalance:
            return owner
        return least

    def record(self, ids: list[int], worker: str) -> None:
        for h in self._hashes(ids):
            self._owner[h] = worker
            self._owner.move_to_end(h)
        while len(self._owner) > self.max_blocks:
            self._owner.popitem(last=False)


# --------------------------------------------------------------------------- sglang


def _local_model_path(cfg: Config, remote_path: str) -> Path:
    """A local directory with the tokenizer of the model the backend serves."""
    from runtime import model_store

    if cfg.model_id:  # the operator said which model it is: trust that (the probe checks it)
        return model_store.resolve_model(cfg.model_id, cache_dir=cfg.cache_dir)
    local = Path(remote_path).expanduser()
    if (local / "tokenizer_config.json").is_file() or (local / "tokenizer.json").is_file():
        return local
    if Path(remote_path).name.startswith(model_store.DEFAULT_NAME):
        return model_store.ensure_default_model(cfg.cache_dir)
    if not remote_path.startswith(("/", ".", "~")) and remote_path.count("/") == 1:
        return model_store.resolve_model(remote_path, cache_dir=cfg.cache_dir)
    raise BackendError(
        f"the backend serves {remote_path!r}, which is not a directory on this machine nor a Hugging Face id; "
        "set INFERENCE_MODEL_ID to a local copy (or the Hugging Face id) of that model so its tokenizer can be loaded"
    )


@functools.lru_cache(maxsize=256)
def structural_tag_to_ebnf(tag: str) -> str:
    """An xgrammar structural tag as the equivalent xgrammar EBNF (the workers' grammar backend
    must be xgrammar, SGLang's default, for its TagDispatch rules)."""
    import xgrammar

    return str(xgrammar.Grammar.from_structural_tag(tag))


def _load_tokenizer(path: Path, *, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, clean_up_tokenization_spaces=False)


class SGLangBackend(Backend):
    """SGLang servers over HTTP (`INFERENCE_BACKEND=sglang`): one router, or several workers."""

    token_level = True

    def __init__(self, cfg: Config, *, health_interval_s: float = HEALTH_INTERVAL_S, start_timeout_s: float = START_TIMEOUT_S):
        if not cfg.backend_urls:
            raise BackendError("INFERENCE_BACKEND=sglang needs INFERENCE_BACKEND_URLS")
        self._cfg = cfg
        self.urls: list[str] = list(cfg.backend_urls)
        self._health_interval = health_interval_s
        self._start_timeout = start_timeout_s
        self._client: httpx.AsyncClient | None = None
        self._health: _Health | None = None
        self._tokenizer: Any = None
        self._info: BackendInfo | None = None
        self._incremental = False
        self._started = False
        self.router = False
        self.worker_urls: list[str] = []
        self.affinity = PrefixAffinity()
        self._inflight: dict[str, str] = {}  # rid -> url
        self._aborts: set[asyncio.Task] = set()

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise BackendUnavailable("the sglang backend has not started")
        return self._info

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            raise BackendUnavailable("the sglang backend has not started")
        return self._tokenizer

    def is_ready(self) -> bool:
        return self._started and self._health is not None and self._health.any_up()

    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        from runtime.sglang_env import prepare

        # No engine here, but the tool-call program's stream parser imports SGLang's parsers:
        # SGLang must see its environment (CPU flag, sgl_kernel stand-in) before that import.
        prepare(self._cfg.device if self._cfg.device != "auto" else None)
        self._client = httpx.AsyncClient(timeout=STREAM_TIMEOUT, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            await self._start()
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise

    async def _start(self) -> None:
        client = self._client
        assert client is not None
        await asyncio.gather(*(_wait_reachable(client, u, "/health", self._start_timeout) for u in self.urls))
        # Workers answer /server_info (/get_server_info is deprecated there); a router only the old name.
        kinds = await asyncio.gather(*(_get_json(client, u, "/server_info", "/get_server_info") for u in self.urls))
        self.router = any(k.get("router_manager") for k in kinds)
        if self.router and len(self.urls) > 1:
            raise BackendError("INFERENCE_BACKEND_URLS: give one sglang-router URL, or worker URLs without a router, not both")
        if self.router:
            workers = (await _get_json(client, self.urls[0], "/workers")).get("workers", [])
            self.worker_urls = [w["url"] for w in workers if w.get("url")]
            if not self.worker_urls:
                raise BackendUnavailable(f"the sglang-router at {self.urls[0]} has no workers")
            worker_infos = await asyncio.gather(*(self._worker_info(u) for u in self.worker_urls), return_exceptions=True)
            # The workers may sit on a network the runtime does not reach: then the router's word is all there is.
            reachable = [i for i in worker_infos if isinstance(i, dict)]
        else:
            self.worker_urls = list(self.urls)
            reachable = [await self._worker_info(u) for u in self.urls]
        model = await _get_json(client, self.urls[0], "/model_info", "/get_model_info")
        remote_path = str(model.get("model_path") or "")
        if model.get("is_generation") is False:
            raise BackendError(f"{self.urls[0]} serves an embedding model ({remote_path}), not a generative one")
        paths = {str(i["model_path"]) for i in reachable}
        if len(paths) > 1:
            raise BackendError(f"the SGLang workers serve different models: {sorted(paths)}")
        incremental = {bool(i.get("incremental_streaming_output")) for i in reachable}
        if len(incremental) > 1:
            raise BackendError("the SGLang workers disagree on --incremental-streaming-output; start them alike")
        self._incremental = incremental.pop() if incremental else False

        local = await asyncio.to_thread(_local_model_path, self._cfg, remote_path)
        self._tokenizer = await asyncio.to_thread(_load_tokenizer, local, trust_remote_code=self._cfg.trust_remote_code)
        await self._check_tokenizer(reachable)

        context = min([int(i["context_length"]) for i in reachable if i.get("context_length")] or [0])
        if not context:
            context = int(getattr(self._tokenizer, "model_max_length", 0) or 0)
            context = context if 0 < context < 10**8 else 0
        if self._cfg.context_length:
            context = min(context, self._cfg.context_length) if context else self._cfg.context_length
        first = reachable[0] if reachable else {}
        self._info = BackendInfo(
            name="sglang",
            model=self._cfg.model_id or remote_path,
            device=str(first.get("device", "remote")),
            dtype=str(first.get("dtype", "unknown")),
            attention_backend=str(first.get("attention_backend") or "sglang-default"),
            context_length=context or 8192,
            kv_capacity_tokens=sum(int(i.get("max_total_num_tokens") or 0) for i in reachable),
            radix_cache=not any(i.get("disable_radix_cache") for i in reachable),
            extra={
                "model_path": str(local),
                "remote_model_path": remote_path,
                "urls": list(self.urls),
                "router": self.router,
                "workers": list(self.worker_urls),
            },
        )
        health_paths = {u: ("/readiness" if self.router else "/health") for u in self.urls}
        self._health = _Health(client, health_paths, interval_s=self._health_interval)
        self._health.start()
        self._started = True
        log.info("sglang backend: %s %s, model %s, tokenizer from %s", "router" if self.router else "workers",
                 ", ".join(self.urls), remote_path, local)

    async def _worker_info(self, url: str) -> dict[str, Any]:
        client = self._client
        assert client is not None
        info = dict(await _get_json(client, url, "/server_info", "/get_server_info"))
        with contextlib.suppress(Exception):  # /v1/models has the resolved context length
            models = await _get_json(client, url, "/v1/models")
            lens = [m.get("max_model_len") for m in models.get("data", []) if m.get("max_model_len")]
            if lens:
                info["context_length"] = int(lens[0])
        info["url"] = url
        return info

    async def _check_tokenizer(self, workers: list[dict[str, Any]]) -> None:
        """The local tokenizer must split text exactly as the worker's (the renderer's ids are sent as is)."""
        client = self._client
        assert client is not None
        for w in workers:
            try:
                resp = await client.post(w["url"] + "/v1/tokenize", json={"prompt": TOKENIZER_PROBE, "add_special_tokens": False},
                                         timeout=PROBE_TIMEOUT)
            except httpx.HTTPError:
                continue
            if resp.status_code != 200:
                continue
            remote = resp.json().get("tokens")
            local = self._tokenizer.encode(TOKENIZER_PROBE, add_special_tokens=False)
            if remote != local:
                raise BackendError(
                    f"the local tokenizer ({self._tokenizer.name_or_path}) does not match the one of {w['url']} "
                    f"({w.get('model_path')}): set INFERENCE_MODEL_ID to the model the workers serve"
                )
            return
        log.warning("could not check the tokenizer against a worker (/v1/tokenize unavailable); trusting %s",
                    self._tokenizer.name_or_path)

    async def stop(self) -> None:
        self._started = False
        if self._health is not None:
            await self._health.stop()
        for task in list(self._aborts):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _pick(self, ids: list[int]) -> str:
        if self.router or len(self.urls) == 1:
            return self.urls[0]
        assert self._health is not None
        healthy = [u for u in self.urls if self._health.up.get(u)] or list(self.urls)
        load: dict[str, int] = {}
        for u in self._inflight.values():
            load[u] = load.get(u, 0) + 1
        url = self.affinity.pick(ids, healthy, load)
        self.affinity.record(ids, url)
        return url

    def _sampling_params(self, request: GenRequest) -> dict[str, Any]:
        params = request.sampling.to_sglang()
        if self.router and "structural_tag" in params:
            # sglang-router re-serializes sampling_params through a typed struct that has
            # json_schema / regex / ebnf but no structural_tag: it would drop the constraint
            # silently. The same constraint as xgrammar EBNF passes through.
            params["ebnf"] = structural_tag_to_ebnf(params.pop("structural_tag"))
        return params

    async def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        from runtime.engine import to_update

        if not self.is_ready() or self._client is None:
            raise BackendUnavailable("the SGLang backend is not reachable")
        url = self._pick(request.input_ids)
        body = {
            "input_ids": request.input_ids,
            "sampling_params": self._sampling_params(request),
            "stream": True,
            "rid": request.rid,
        }
        self._inflight[request.rid] = url
        finished = False
        text, ids = "", []
        try:
            async with self._client.stream("POST", url + "/generate", json=body) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _status_error(resp, f"POST {url}/generate")
                async for event in _sse(resp):
                    if "error" in event:
                        err = event["error"]
                        raise BackendError(f"{url}: {err.get('message', err) if isinstance(err, dict) else err}")
                    update = to_update(event)
                    if self._incremental:
                        text += update.text
                        ids += update.output_ids
                        update.text, update.output_ids = text, list(ids)
                    finished = update.finish_reason is not None
                    yield update
                    if finished:
                        return
            raise BackendUnavailable(f"{url}: the stream ended before the request finished")
        except httpx.TransportError as exc:
            if self._health is not None:
                self._health.mark_down(url, type(exc).__name__)
            raise BackendUnavailable(f"{url}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.pop(request.rid, None)
            if not finished:
                self._abort_later(url, request.rid)

    def _abort_later(self, url: str, rid: str) -> None:
        """Closing the stream already makes SGLang abort the request, but only when it next
        checks for a disconnect (seconds later; the router passes the disconnect on). An
        explicit /abort_request frees the slot at once: sent to the worker, or behind a router
        (which has no abort endpoint) to every worker it listed; rids are unique, the others ignore it."""
        if self._client is None:
            return
        task = asyncio.ensure_future(self._post_abort(self.worker_urls if self.router else [url], rid))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)

    async def _post_abort(self, urls: list[str], rid: str) -> None:
        client = self._client
        if client is None:
            return

        async def one(url: str) -> None:
            with contextlib.suppress(httpx.HTTPError):
                await client.post(url + "/abort_request", json={"rid": rid}, timeout=PROBE_TIMEOUT)

        await asyncio.gather(*(one(u) for u in urls))

    async def abort(self, rid: str) -> None:
        url = self._inflight.get(rid)
        if url is not None:
            await self._post_abort(self.worker_urls if self.router else [url], rid)

    async def engine_requests(self) -> int | None:
        """Requests the workers hold (running + waiting), from each worker's /v1/loads."""
        if self._client is None:
            return None
        total = 0
        for url in self.worker_urls:
            try:
                loads = await _get_json(self._client, url, "/v1/loads")
            except (httpx.HTTPError, BackendError):
                return None
            total += sum(int(l.get("num_running_reqs", 0)) + int(l.get("num_waiting_reqs", 0)) for l in loads.get("loads", []))
        return total


# --------------------------------------------------------------------------- openai


@dataclass
class ChatRequest:
    """One chat-completions call: OpenAI-shaped messages and tools."""

    rid: str
    messages: list[dict[str, Any]]
    max_tokens: int
    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class ChatToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the server sent it


@dataclass
class ChatUpdate:
    """One streamed step: deltas, calls completed in this step, and at the end the finish and usage."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ChatToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    completion_tokens: int | None = None


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HistoryMessage dicts (protocol) -> OpenAI chat messages."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        if role == "assistant":
            calls = m.get("tool_calls") or []
            content = m.get("content")
            msg: dict[str, Any] = {"role": "assistant", "content": content if content is not None or calls else ""}
            if calls:
                msg["tool_calls"] = [
                    {"id": c["call_id"], "type": "function",
                     "function": {"name": c["name"], "arguments": json.dumps(c.get("arguments", {}), ensure_ascii=False)}}
                    for c in calls
                ]
            out.append(msg)
        elif role == "tool":
            out.append({"role": "tool", "tool_call_id": m.get("tool_call_id"), "content": m.get("content") or ""})
        else:
            out.append({"role": role, "content": m.get("content") or ""})
    return out


def chat_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical tools -> the request's tools, marked strict so servers that constrain decoding
    (SGLang, vLLM) hold the arguments to each schema, not just to 'some JSON'."""
    out = []
    for t in tools:
        fn = dict(t["function"])
        fn["strict"] = True
        out.append({"type": "function", "function": fn})
    return out


class OpenAIBackend(Backend):
    """An OpenAI-compatible server (`INFERENCE_BACKEND=openai`): vLLM, TGI, SGLang, `transformers serve`."""

    token_level = False

    def __init__(self, cfg: Config, *, health_interval_s: float = HEALTH_INTERVAL_S, start_timeout_s: float = START_TIMEOUT_S):
        if len(cfg.backend_urls) != 1:
            raise BackendError("INFERENCE_BACKEND=openai takes exactly one URL in INFERENCE_BACKEND_URLS")
        url = cfg.backend_urls[0].rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url
        self._cfg = cfg
        self._health_interval = health_interval_s
        self._start_timeout = start_timeout_s
        self._client: httpx.AsyncClient | None = None
        self._health: _Health | None = None
        self._info: BackendInfo | None = None
        self._started = False
        self.model = cfg.backend_model
        self._inflight: set[str] = set()

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise BackendUnavailable("the openai backend has not started")
        return self._info

    @property
    def tokenizer(self) -> Any:
        raise BackendError("an OpenAI-compatible backend works in messages: there is no tokenizer on this side")

    def is_ready(self) -> bool:
        return self._started and self._health is not None and self._health.any_up()

    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=STREAM_TIMEOUT, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            await self._start()
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise

    async def _start(self) -> None:
        client = self._client
        assert client is not None
        await _wait_reachable(client, self.url, "/v1/models", self._start_timeout)
        models = (await _get_json(client, self.url, "/v1/models")).get("data", [])
        ids = [m.get("id") for m in models if m.get("id")]
        if not ids:
            raise BackendError(f"{self.url}/v1/models lists no model")
        if self.model and self.model not in ids:
            raise BackendError(f"INFERENCE_BACKEND_MODEL={self.model!r} is not served by {self.url}; it serves {ids}")
        self.model = self.model or ids[0]
        card = next(m for m in models if m.get("id") == self.model)
        context = int(card.get("max_model_len") or 0)
        if self._cfg.context_length:
            context = min(context, self._cfg.context_length) if context else self._cfg.context_length
        health_path = "/v1/models"
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get(self.url + "/health", timeout=PROBE_TIMEOUT)).status_code == 200:
                health_path = "/health"
        self._info = BackendInfo(
            name="openai",
            model=self.model,
            device="remote",
            dtype="unknown",
            attention_backend="remote",
            context_length=context or 8192,
            kv_capacity_tokens=0,
            radix_cache=False,
            extra={"url": self.url, "model_path": None, "context_length_known": bool(context)},
        )
        self._health = _Health(client, {self.url: health_path}, interval_s=self._health_interval)
        self._health.start()
        self._started = True
        log.info("openai backend: %s, model %s", self.url, self.model)

    async def stop(self) -> None:
        self._started = False
        if self._health is not None:
            await self._health.stop()
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        raise BackendError("token-level generation is not available on an OpenAI-compatible backend")

    async def abort(self, rid: str) -> None:
        return None  # closing the stream is how an OpenAI-compatible server is told

    def _body(self, request: ChatRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
        }
        if request.tools:
            body["tools"] = request.tools
            body["tool_choice"] = request.tool_choice
            if not request.parallel_tool_calls:
                body["parallel_tool_calls"] = False
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        return body

    async def chat(self, request: ChatRequest) -> AsyncIterator[ChatUpdate]:
        """Stream one chat completion; cancelling the consumer closes the HTTP stream."""
        if not self.is_ready() or self._client is None:
            raise BackendUnavailable(f"the OpenAI-compatible backend at {self.url} is not reachable")
        where = f"POST {self.url}/v1/chat/completions"
        self._inflight.add(request.rid)
        calls: dict[int, dict[str, str]] = {}  # index -> {id, name, arguments}, not yet complete
        finished = False
        try:
            async with self._client.stream("POST", self.url + "/v1/chat/completions", json=self._body(request)) as resp:
                if resp.status_code != 200:
                    await resp.aread()
                    raise _status_error(resp, where)
                finish: str | None = None
                async for chunk in _sse(resp):
                    if "error" in chunk:
                        err = chunk["error"]
                        raise BackendError(f"{where}: {err.get('message', err) if isinstance(err, dict) else err}")
                    update = ChatUpdate()
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        update.text += delta.get("content") or ""
                        update.reasoning += delta.get("reasoning_content") or delta.get("reasoning") or ""
                        for d in delta.get("tool_calls") or []:
                            index = int(d.get("index", 0))
                            # A call is complete once a later one starts (servers stream them in order).
                            for done in sorted(i for i in calls if i < index):
                                update.tool_calls.append(_complete(calls.pop(done)))
                            call = calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
                            call["id"] = d.get("id") or call["id"]
                            fn = d.get("function") or {}
                            call["name"] += fn.get("name") or ""
                            call["arguments"] += fn.get("arguments") or ""
                        finish = choice.get("finish_reason") or finish
                    usage = chunk.get("usage")
                    if usage:
                        update.prompt_tokens = usage.get("prompt_tokens")
                        update.completion_tokens = usage.get("completion_tokens")
                        details = usage.get("prompt_tokens_details") or {}
                        update.cached_tokens = int(details.get("cached_tokens") or 0)
                    if update.text or update.reasoning or update.tool_calls or usage:
                        yield update
                if finish is None:
                    raise BackendUnavailable(f"{where}: the stream ended without a finish_reason")
                finished = True
                # With finish_reason 'length' the calls still open here may be cut short (their
                # arguments are what the server's partial-JSON parser made of a prefix), or
                # complete with the model writing on after them: the caller decides by validating.
                yield ChatUpdate(tool_calls=[_complete(calls.pop(i)) for i in sorted(calls)], finish_reason=finish)
        except httpx.TransportError as exc:
            if self._health is not None and not finished:
                self._health.mark_down(self.url, type(exc).__name__)
            raise BackendUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.discard(request.rid)


def _complete(call: dict[str, str]) -> ChatToolCall:
    return ChatToolCall(id=call["id"], name=call["name"], arguments=call["arguments"])
