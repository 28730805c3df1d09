"""The prompt side of a request, before any engine work: what a client sends is measured and
checked cheaply, and what is rendered is cached within bounds.

    check_tools / sized_tools   the canonical tools, or the client's error; the size bound
                                (max_tools_bytes) comes before any schema work
    checked_response_format     the same for a generate's response_format schema
    content_chars, longest_token  a lower bound on a prompt's tokens without rendering it
    rendered                    render, with what the template cannot express as -32602
    PrefixCache                 rendered agent prefixes, bounded in entries and tokens
"""

from __future__ import annotations

import array
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NoReturn

import programs
from protocol import errors as rpc

PREFIX_CACHE_ENTRIES = 256
PREFIX_CACHE_TOKENS = 4_000_000  # ids kept for rendered agent prefixes, all entries together (4 bytes each)
FALLBACK_TOKEN_CHARS = 1024  # a tokenizer whose vocabulary cannot be read: a loose bound


class PrefixCache:
    """Rendered agent prefixes (system prompt + tools -> token ids), least recently used first out.

    Keyed by a digest of the canonical inputs, bounded by entries and by the tokens of all entries
    together, ids stored as 32-bit integers: a client sending many distinct large prefixes costs
    a bounded amount of memory. Only prefixes that fit the context are put here."""

    def __init__(self, *, max_entries: int = PREFIX_CACHE_ENTRIES, max_tokens: int = PREFIX_CACHE_TOKENS):
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.tokens = 0
        self._entries: OrderedDict[bytes, array.array[int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key(system_prompt: str | None, tools: list[dict[str, Any]]) -> bytes:
        text = json.dumps([system_prompt, tools], ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()

    def get(self, key: bytes) -> list[int] | None:
        ids = self._entries.get(key)
        if ids is None:
            return None
        self._entries.move_to_end(key)
        return ids.tolist()

    def put(self, key: bytes, ids: list[int]) -> None:
        if len(ids) > self.max_tokens or key in self._entries:
            return
        self._entries[key] = array.array("i", ids)
        self.tokens += len(ids)
        while len(self._entries) > self.max_entries or self.tokens > self.max_tokens:
            _, old = self._entries.popitem(last=False)
            self.tokens -= len(old)


def check_tools(tools: list[dict[str, Any]] | None, *, max_branches: int = programs.MAX_BRANCHES) -> list[dict[str, Any]]:
    """The canonical tools, or the client's error naming what the grammar cannot hold."""
    # `strict` is accepted for OpenAI compatibility and changes nothing (calls are always
    # constrained): dropped so it cannot split otherwise identical agent prefixes. Empty
    # `parameters` ({}) means no parameters, as at OpenAI: the same as none given.
    tools = [{**t, "function": {k: v for k, v in t["function"].items() if k != "strict" and not (k == "parameters" and v == {})}}
             for t in tools or []]
    try:
        return programs.check_tools(tools, max_branches=max_branches)
    except programs.ToolSchemaError as exc:
        if exc.keyword:
            raise rpc.UnsupportedToolSchema(exc.tool or "", exc.keyword, f"tool {exc.tool!r}: {exc.reason}") from None
        raise rpc.InvalidParams(
            f"Invalid params: tools: {exc.reason}", {"errors": [{"field": "tools", "message": f"{exc.tool}: {exc.reason}"}]}
        ) from None


def rendered(render: Callable[..., list[int]], *args: Any, **kwargs: Any) -> list[int]:
    """Render, with a history the template cannot express reported as the client's error."""
    import jinja2

    try:
        return render(*args, **kwargs)
    except (programs.RenderError, jinja2.TemplateError) as exc:
        # A chat template's raise_exception (e.g. roles must alternate) is a TemplateError.
        raise rpc.InvalidParams(f"Invalid params: messages: {exc}", {"errors": [{"field": "messages", "message": str(exc)}]}) from None


def content_chars(messages: list[dict[str, Any]]) -> int:
    """Characters of the messages' content: what their rendering holds at least."""
    return sum(len(m.get("content") or "") for m in messages)


def sized_tools(tools: list[dict[str, Any]], max_bytes: int, max_branches: int) -> list[dict[str, Any]]:
    size = len(json.dumps(tools, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        message = f"{size} bytes as compact JSON: at most {max_bytes} (limits.max_tools_bytes)"
        raise rpc.InvalidParams(f"Invalid params: tools: {message}", {"errors": [{"field": "tools", "message": message}]})
    return check_tools(tools, max_branches=max_branches)


def checked_response_format(response_format: dict[str, Any] | None, max_bytes: int, max_branches: int, *,
                            chat_backend: bool = False) -> programs.ResponseFormat | None:
    """A response_format checked like a tool set: its schema's size (max_tools_bytes) first, then
    the schema checks, then its grammar compiled (cached for the turn's constraint). Errors name
    the field `response_format`: -32602, or -32003 with data.tool the schema's name and
    data.field "response_format". Run it in a worker thread: the checks cost with the schema.
    A chat backend (its server decodes) has no response format here: -32602."""
    if chat_backend and response_format and response_format.get("type") != "text":
        _response_format_error(f"{response_format.get('type')!r} needs a token backend (INFERENCE_BACKEND embedded, sglang "
                               "or fake), not a chat backend")
    spec = (response_format or {}).get("json_schema") or {}
    if "schema" in spec:
        size = len(json.dumps(spec["schema"], ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            _response_format_error(f"json_schema.schema is {size} bytes as compact JSON: at most {max_bytes} "
                                   "(limits.max_tools_bytes)")
    try:
        fmt = programs.check_response_format(response_format, max_branches=max_branches)
    except programs.ToolSchemaError as exc:
        where = f" at {exc.pointer}" if exc.pointer != "#" else ""
        message = f"response_format json_schema {exc.tool!r}{where}: {exc.reason}"
        if exc.keyword:
            error = rpc.UnsupportedToolSchema(exc.tool or "", exc.keyword, message)
            assert error.data is not None
            error.data["field"] = "response_format"
            raise error from None
        _response_format_error(message)
    except ValueError as exc:
        _response_format_error(str(exc))
    if fmt is not None:
        programs.response_grammar(fmt)
    return fmt


def _response_format_error(message: str) -> NoReturn:
    raise rpc.InvalidParams(f"Invalid params: response_format: {message}",
                            {"errors": [{"field": "response_format", "message": message}]})


def longest_token(tokenizer: Any) -> int:
    try:
        vocab = tokenizer.get_vocab()
        longest = max((len(t) for t in vocab), default=0)
    except Exception:  # a tokenizer without a readable vocabulary: a loose bound, still a bound
        return FALLBACK_TOKEN_CHARS
    return max(1, longest)
