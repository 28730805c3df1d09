"""The OpenAI Responses API on the same runtime as /ws and /v1/chat/completions:
POST /v1/responses (plain and streamed as server-sent events), GET and DELETE
/v1/responses/{id}.

Authorization, limits, draining, metrics and the generate's task are runtime.openai_api's; the
wire, the translation and the store are runtime.responses_wire. Each request is one stateless
generate. With `previous_response_id`, its history is the stored conversation (the earlier
turns' messages and what this runtime generated for them) followed by the new input items; the
request's own instructions apply (those of earlier requests do not, as at OpenAI).

The output: a `reasoning` item for reasoning text (reasoning formats only), a `message` item
with one `output_text` part, and a `function_call` item per call, in the order the generate
produced them (a response with none of these gets an empty message, so `output_text` is "").
Status `completed`, or `incomplete` with `incomplete_details.reason` "max_output_tokens".

Streaming: `event:` and `data:` lines, each event with its `sequence_number`:
response.created, response.in_progress; per message item output_item.added,
content_part.added, output_text.delta..., output_text.done, content_part.done,
output_item.done (a reasoning item the same with reasoning_text events); per call
output_item.added, one function_call_arguments.delta with the whole arguments,
function_call_arguments.done, output_item.done; then response.completed, response.incomplete,
or response.failed with the error when the generate fails after the stream started (before it,
the error is an HTTP error).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from runtime.metrics import METRICS
from runtime.openai_api import Event, _body, _Generation, _handler, authorize, refuse_when_draining, served_model
from runtime.openai_wire import OpenAIError, bad_request
from runtime.responses_wire import Plan, ResponsesRequest, ResponseStore, parse_request, to_generate
from runtime.server import Server
from runtime.turn import TurnOutcome

STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def responses_routes(server: Server, store: ResponseStore | None = None) -> list[Route]:
    """The /v1/responses routes on `server`, keeping stored responses in `store`."""
    responses = store if store is not None else ResponseStore()

    async def create(request: Request) -> Response:
        owner = authorize(server, request)
        refuse_when_draining(server)
        req = parse_request(await _body(request, server.cfg.max_frame_bytes))
        previous: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            stored = responses.get(owner, req.previous_response_id)
            if stored is None:
                raise OpenAIError(404, f"Previous response with id {req.previous_response_id[:200]!r} not found.",
                                  param="previous_response_id", code="previous_response_not_found")
            previous = stored.messages
        plan = to_generate(req, previous, server.limits)
        turn = _Turn(responses, owner, req, plan, served_model(server))
        gen = _Generation(server, plan.params, owner)
        try:
            first = await gen.next(request)
            if first is None and gen.error is not None:  # refused or failed before any output
                raise plan.error(gen.error)
            if req.stream:
                return StreamingResponse(turn.sse(gen, first), media_type="text/event-stream", headers=STREAM_HEADERS)
            item = first
            while item is not None:
                turn.output.feed(*item)
                item = await gen.next(request)
        except BaseException:
            gen.cancelled.set()  # this handler is going away (server shutdown): so does its generate
            raise
        if gen.error is not None:
            raise plan.error(gen.error)
        turn.output.finish(turn.status(gen.out)[0])
        return JSONResponse(turn.final(gen.out))

    async def retrieve(request: Request) -> Response:
        owner = authorize(server, request)
        if request.query_params.get("stream", "false").lower() not in ("false", "0", ""):
            raise bad_request("stream: a stored response is returned whole; streaming it again is not supported", param="stream")
        stored = responses.get(owner, request.path_params["response_id"])
        if stored is None:
            raise _not_found(request.path_params["response_id"])
        return JSONResponse(stored.response)

    async def delete(request: Request) -> Response:
        owner = authorize(server, request)
        response_id = request.path_params["response_id"]
        if not responses.delete(owner, response_id):
            raise _not_found(response_id)
        return JSONResponse({"id": response_id, "object": "response", "deleted": True})

    return [
        Route("/v1/responses", _handler("openai.responses", create), methods=["POST"]),
        Route("/v1/responses/{response_id}", _handler("openai.responses.get", retrieve), methods=["GET"]),
        Route("/v1/responses/{response_id}", _handler("openai.responses.delete", delete), methods=["DELETE"]),
    ]


def _not_found(response_id: str) -> OpenAIError:
    return OpenAIError(404, f"No response with id {response_id[:200]!r} found.", param="response_id", code="response_not_found")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


class _Output:
    """The output items of one response, built from its generate's events, and the stream
    events that announce them (numbered from `seq`)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.seq = 0
        self._open: dict[str, Any] | None = None  # the message or reasoning item being streamed
        self._parts: list[str] = []

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        ev = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return ev

    def feed(self, kind: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The stream events for one generate event (text_chunk, reasoning_chunk, function_call_request)."""
        if kind == "function_call_request":
            return self._close("completed") + self._call(payload)
        item_type = {"text_chunk": "message", "reasoning_chunk": "reasoning"}.get(kind)
        if item_type is None:
            return []
        events = []
        if self._open is None or self._open["type"] != item_type:
            events = self._close("completed") + self._start(item_type)
        assert self._open is not None
        self._parts.append(payload["text"])
        where = {"item_id": self._open["id"], "output_index": len(self.items) - 1, "content_index": 0}
        if item_type == "message":
            events.append(self.event("response.output_text.delta", **where, delta=payload["text"], logprobs=[]))
        else:
            events.append(self.event("response.reasoning_text.delta", **where, delta=payload["text"]))
        return events

    def finish(self, status: str, *, failed: bool = False) -> list[dict[str, Any]]:
        """The events that end the output: the open item ends 'incomplete' if the response is;
        without any output item, an empty message (unless the response failed)."""
        item_status = "completed" if status == "completed" else "incomplete"
        events = self._close(item_status)
        if not self.items and not failed:
            events = self._start("message") + self._close(item_status)
        return events

    def _start(self, item_type: str) -> list[dict[str, Any]]:
        if item_type == "message":
            item: dict[str, Any] = {"id": _new_id("msg"), "type": "message", "role": "assistant", "status": "in_progress", "content": []}
        else:
            item = {"id": _new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
        index = len(self.items)
        self.items.append(item)
        self._open, self._parts = item, []
        return [self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
                self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part=_part(item_type, ""))]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self._open
        if item is None:
            return []
        self._open = None
        text = "".join(self._parts)
        part = _part(item["type"], text)
        item["content"], item["status"] = [part], status
        where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        if item["type"] == "message":
            done = self.event("response.output_text.done", **where, text=text, logprobs=[])
        else:
            done = self.event("response.reasoning_text.done", **where, text=text)
        return [done, self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=where["output_index"], item=item)]

    def _call(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        index = len(self.items)
        arguments = json.dumps(call["arguments"], ensure_ascii=False)
        item = {"id": _new_id("fc"), "type": "function_call", "call_id": call["call_id"], "name": call["name"],
                "arguments": arguments, "status": "completed"}
        self.items.append(item)
        where = {"item_id": item["id"], "output_index": index}
        return [self.event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
                self.event("response.function_call_arguments.delta", **where, delta=arguments),
                self.event("response.function_call_arguments.done", **where, name=call["name"], arguments=arguments),
                self.event("response.output_item.done", output_index=index, item=item)]


def _part(item_type: str, text: str) -> dict[str, Any]:
    if item_type == "message":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    return {"type": "reasoning_text", "text": text}


def _usage(out: TurnOutcome) -> dict[str, Any]:
    return {"input_tokens": out.prompt_tokens, "input_tokens_details": {"cached_tokens": out.cached_tokens},
            "output_tokens": out.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class _Turn:
    """One response being made: its id, the request it echoes, its output, and its storing."""

    def __init__(self, store: ResponseStore, owner: str, req: ResponsesRequest, plan: Plan, model: str):
        self.store, self.owner, self.req, self.plan, self.model = store, owner, req, plan, model
        self.id = _new_id("resp")
        self.created_at = int(time.time())
        self.output = _Output()

    @staticmethod
    def status(out: TurnOutcome) -> tuple[str, dict[str, Any] | None]:
        """The response's status and incomplete_details for a generate's outcome."""
        if out.finish_reason == "length":
            return "incomplete", {"reason": "max_output_tokens"}
        if out.finish_reason == "cancelled":
            return "incomplete", {"reason": None}
        return "completed", None

    def snapshot(self, status: str, *, usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None,
                 incomplete: dict[str, Any] | None = None) -> dict[str, Any]:
        """The Response object in `status`, with the output items made so far."""
        req = self.req
        fmt = req.text.format if req.text is not None and req.text.format is not None else None
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status, "background": False,
            "error": error, "incomplete_details": incomplete, "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens, "max_tool_calls": None, "metadata": req.metadata or {},
            "model": self.model, "output": list(self.output.items), "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": req.store is not False, "temperature": req.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}},
            "tool_choice": req.tool_choice if req.tool_choice is not None else "auto", "tools": req.tools or [],
            "top_p": req.top_p, "truncation": "disabled", "usage": usage, "user": None,
        }

    def final(self, out: TurnOutcome) -> dict[str, Any]:
        """The finished Response (the output must be finished), stored when `store` is on."""
        status, incomplete = self.status(out)
        response = self.snapshot(status, usage=_usage(out), incomplete=incomplete)
        if self.req.store is not False:
            # The conversation as chat-level history: this turn's assistant message exactly as
            # generated (text, and the calls with the runtime's call ids), so a continuation
            # starts from what this runtime produced.
            assistant: dict[str, Any] = {"role": "assistant", "content": (out.text or None) if out.tool_calls else out.text}
            if out.tool_calls:
                assistant["tool_calls"] = [dict(c) for c in out.tool_calls]
            self.store.put(self.owner, response, [*self.plan.history, assistant])
        return response

    async def sse(self, gen: _Generation, first: Event | None) -> AsyncIterator[str]:
        outcome = "ok"
        try:
            for kind in ("response.created", "response.in_progress"):
                yield _sse(self.output.event(kind, response=self.snapshot("in_progress")))
            item = first
            while item is not None:
                for ev in self.output.feed(*item):
                    yield _sse(ev)
                item = await gen.next(None)
            if gen.error is not None:
                outcome = "error"
                err = self.plan.error(gen.error)
                for ev in self.output.finish("failed", failed=True):
                    yield _sse(ev)
                code = "rate_limit_exceeded" if err.status == 429 else "server_error"
                failed = self.snapshot("failed", error={"code": code, "message": err.message})
                yield _sse(self.output.event("response.failed", response=failed))
            else:
                status = self.status(gen.out)[0]
                for ev in self.output.finish(status):
                    yield _sse(ev)
                response = self.final(gen.out)
                yield _sse(self.output.event(f"response.{status}", response=response))
        finally:
            if not gen.ended:  # the client went away: stop generating (the engine request is aborted)
                gen.cancelled.set()
            METRICS.requests.labels(method="openai.responses", outcome=outcome).inc()
