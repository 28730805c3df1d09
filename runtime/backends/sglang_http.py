"""SGLang servers over HTTP (`INFERENCE_BACKEND=sglang`, token level like the embedded engine).

Every turn POSTs SGLang's native `/generate` with `input_ids`, the sampling params of
`Sampling.to_sglang()` (json_schema / ebnf / structural_tag constraints included) and
`stream: true`; the server-sent events carry the same dicts `Engine.async_generate` yields.
One URL: a worker or an sglang-router (cache_aware). The router routes a request that has
`input_ids` and no `text` on the ids written as decimal numbers joined by spaces, so a
session's next prompt (which extends its last one token for token) matches the prefix it
sent before and lands on the worker that holds it. Several URLs: workers without a router;
`PrefixAffinity` below does the same thing here. The tokenizer is loaded locally from the
model the workers serve and checked against a worker's `/v1/tokenize` at start, so the
renderer produces exactly the ids the worker would. HTTP errors: runtime.backends.http.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import httpx

from runtime.backends.base import BackendError, BackendInfo, BackendUnavailable, GenRequest, GenUpdate, TokenBackend
from runtime.backends.http import (
    HEALTH_INTERVAL_S,
    MAX_LINE_BYTES,
    PROBE_TIMEOUT,
    START_TIMEOUT_S,
    STREAM_READ_TIMEOUT_S,
    Health,
    error_body,
    get_json,
    sse_events,
    status_error,
    stream_timeout,
    wait_reachable,
)
from runtime.backends.sglang_output import to_update
from runtime.config import Config

log = logging.getLogger("runtime.backends.sglang_http")

# A string with the chat markup and JSON a tool prompt is made of: if the local tokenizer
# splits it like the worker does, the renderer's ids are the worker's ids.
TOKENIZER_PROBE = (
    '<|im_start|>system\nYou may call tools: {"type": "function", "function": {"name": "get_weather", '
    '"parameters": {"city": {"type": "string"}}}}<|im_end|>\n<|im_start|>user\nWeather in Paris?  Ünïcødé 42.<|im_end|>\n'
)

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


class SGLangBackend(TokenBackend):
    """SGLang servers over HTTP (`INFERENCE_BACKEND=sglang`): one router, or several workers."""

    def __init__(self, cfg: Config, *, health_interval_s: float = HEALTH_INTERVAL_S, start_timeout_s: float = START_TIMEOUT_S,
                 read_timeout_s: float = STREAM_READ_TIMEOUT_S, max_line_bytes: int = MAX_LINE_BYTES):
        if not cfg.backend_urls:
            raise BackendError("INFERENCE_BACKEND=sglang needs INFERENCE_BACKEND_URLS")
        self._cfg = cfg
        self.urls: list[str] = list(cfg.backend_urls)
        self._health_interval = health_interval_s
        self._start_timeout = start_timeout_s
        self.read_timeout_s = read_timeout_s  # a stream silent this long fails: BackendUnavailable
        self.max_line_bytes = max_line_bytes  # one server-sent event line at most; beyond: BackendError
        self._client: httpx.AsyncClient | None = None
        self._health: Health | None = None
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
        from runtime.sglang_adapter import prepare

        # No engine here, but the tool-call program's stream parser imports SGLang's parsers:
        # SGLang must see its environment (CPU flag, sgl_kernel stand-in) before that import.
        prepare(self._cfg.device if self._cfg.device != "auto" else None)
        self._client = httpx.AsyncClient(timeout=stream_timeout(self.read_timeout_s),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            await self._start()
        except BaseException:
            await self._client.aclose()
            self._client = None
            raise

    async def _start(self) -> None:
        client = self._client
        assert client is not None
        await asyncio.gather(*(wait_reachable(client, u, "/health", self._start_timeout) for u in self.urls))
        # Workers answer /server_info (/get_server_info is deprecated there); a router only the old name.
        kinds = await asyncio.gather(*(get_json(client, u, "/server_info", "/get_server_info") for u in self.urls))
        self.router = any(k.get("router_manager") for k in kinds)
        if self.router and len(self.urls) > 1:
            raise BackendError("INFERENCE_BACKEND_URLS: give one sglang-router URL, or worker URLs without a router, not both")
        if self.router:
            workers = (await get_json(client, self.urls[0], "/workers")).get("workers", [])
            self.worker_urls = [w["url"] for w in workers if w.get("url")]
            if not self.worker_urls:
                raise BackendUnavailable(f"the sglang-router at {self.urls[0]} has no workers")
            worker_infos = await asyncio.gather(*(self._worker_info(u) for u in self.worker_urls), return_exceptions=True)
            # The workers may sit on a network the runtime does not reach: then the router's word is all there is.
            reachable = [i for i in worker_infos if isinstance(i, dict)]
        else:
            self.worker_urls = list(self.urls)
            reachable = [await self._worker_info(u) for u in self.urls]
        model = await get_json(client, self.urls[0], "/model_info", "/get_model_info")
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
        self._health = Health(client, health_paths, interval_s=self._health_interval)
        self._health.start()
        self._started = True
        log.info("sglang backend: %s %s, model %s, tokenizer from %s", "router" if self.router else "workers",
                 ", ".join(self.urls), remote_path, local)

    async def _worker_info(self, url: str) -> dict[str, Any]:
        client = self._client
        assert client is not None
        info = dict(await get_json(client, url, "/server_info", "/get_server_info"))
        with contextlib.suppress(Exception):  # /v1/models has the resolved context length
            models = await get_json(client, url, "/v1/models")
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
                    raise status_error(resp, f"POST {url}/generate", await error_body(resp))
                async for event in sse_events(resp, max_line_bytes=self.max_line_bytes):
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
        except httpx.ReadTimeout as exc:
            # The server holds the connection but sends nothing: a stalled server, not a gone one.
            raise BackendUnavailable(f"{url}: no data for {self.read_timeout_s:g} s (the stream's read deadline)") from exc
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
                loads = await get_json(self._client, url, "/v1/loads")
            except (httpx.HTTPError, BackendError):
                return None
            total += sum(int(w.get("num_running_reqs", 0)) + int(w.get("num_waiting_reqs", 0)) for w in loads.get("loads", []))
        return total


