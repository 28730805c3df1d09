"""An OpenAI-compatible server (`INFERENCE_BACKEND=openai`): a ChatBackend.

`/v1/chat/completions` with `tools`, `tool_choice`, streaming; `tool_calls` deltas are
assembled into complete calls. The runtime cannot send token ids to such a server: the chat
turn (runtime.chat_turn) keeps a session's history as messages and sends all of it each turn;
the server's chat template renders it and its prefix cache (if any) finds what it can.
`cached_tokens` comes from `usage.prompt_tokens_details.cached_tokens`. HTTP errors:
runtime.backends.http.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from runtime.backends.base import BackendError, BackendInfo, BackendUnavailable, ChatBackend, ChatRequest, ChatToolCall, ChatUpdate
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
from runtime.config import Config

log = logging.getLogger("runtime.backends.openai_http")

# --------------------------------------------------------------------------- openai


class OpenAIBackend(ChatBackend):
    """An OpenAI-compatible server (`INFERENCE_BACKEND=openai`): vLLM, TGI, SGLang, `transformers serve`."""

    def __init__(self, cfg: Config, *, health_interval_s: float = HEALTH_INTERVAL_S, start_timeout_s: float = START_TIMEOUT_S,
                 read_timeout_s: float = STREAM_READ_TIMEOUT_S, max_line_bytes: int = MAX_LINE_BYTES):
        if len(cfg.backend_urls) != 1:
            raise BackendError("INFERENCE_BACKEND=openai takes exactly one URL in INFERENCE_BACKEND_URLS")
        url = cfg.backend_urls[0].rstrip("/")
        self.url = url[:-3] if url.endswith("/v1") else url
        self._cfg = cfg
        self._health_interval = health_interval_s
        self._start_timeout = start_timeout_s
        self.read_timeout_s = read_timeout_s  # a stream silent this long fails: BackendUnavailable
        self.max_line_bytes = max_line_bytes  # one server-sent event line at most; beyond: BackendError
        self._client: httpx.AsyncClient | None = None
        self._health: Health | None = None
        self._info: BackendInfo | None = None
        self._started = False
        self.model = cfg.backend_model
        self._inflight: set[str] = set()

    @property
    def info(self) -> BackendInfo:
        if self._info is None:
            raise BackendUnavailable("the openai backend has not started")
        return self._info

    def is_ready(self) -> bool:
        return self._started and self._health is not None and self._health.any_up()

    def inflight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
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
        await wait_reachable(client, self.url, "/v1/models", self._start_timeout)
        models = (await get_json(client, self.url, "/v1/models")).get("data", [])
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
        self._health = Health(client, {self.url: health_path}, interval_s=self._health_interval)
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
                    raise status_error(resp, where, await error_body(resp))
                finish: str | None = None
                async for chunk in sse_events(resp, max_line_bytes=self.max_line_bytes):
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
        except httpx.ReadTimeout as exc:
            # The server holds the connection but sends nothing: a stalled server, not a gone one.
            raise BackendUnavailable(f"{self.url}: no data for {self.read_timeout_s:g} s (the stream's read deadline)") from exc
        except httpx.TransportError as exc:
            if self._health is not None and not finished:
                self._health.mark_down(self.url, type(exc).__name__)
            raise BackendUnavailable(f"{self.url}: {type(exc).__name__}: {exc}") from exc
        finally:
            self._inflight.discard(request.rid)


def _complete(call: dict[str, str]) -> ChatToolCall:
    return ChatToolCall(id=call["id"], name=call["name"], arguments=call["arguments"])
