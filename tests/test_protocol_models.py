"""Wire models, the error table and the OpenRPC document: valid params pass, invalid params are
-32602 naming the field, and the published document matches what the models emit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

import protocol
from protocol import (
    ERROR_CODES,
    METHODS,
    NOTIFICATIONS,
    Call,
    ContextLengthExceeded,
    GenerateRequestParams,
    GenerateResult,
    InvalidParams,
    Overloaded,
    RpcError,
    ServerInfoResult,
    SessionNotFound,
    SessionOpenParams,
    StreamEnd,
    Timings,
    Tool,
    ToolCall,
    UnsupportedToolSchema,
    Usage,
    bind_params,
    check_tool_choice,
    encode,
    invalid_params,
    openrpc_document,
    parse_frame,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"call_id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}


def generate(params: dict[str, Any]) -> Any:
    return bind_params(Call(method="generate", params=params, id=1))


def fields_of(params: dict[str, Any], method: str = "generate") -> list[str]:
    with pytest.raises(InvalidParams) as info:
        bind_params(Call(method=method, params=params, id=1))
    assert info.value.code == -32602
    errors = info.value.data["errors"]
    assert all(e["message"] for e in errors)
    return [e["field"] for e in errors]


# --------------------------------------------------------------------------- valid params


def test_stateless_generate_with_tools_and_tool_history() -> None:
    p = generate({
        "system_prompt": "You are terse.",
        "messages": [USER, {"role": "assistant", "content": None, "tool_calls": [CALL]},
                     {"role": "tool", "tool_call_id": "c1", "content": "18C"}],
        "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "max_tokens": 64, "temperature": 0, "top_p": 1, "stop": ["\n\n"],
        "seed": 7,
    })
    assert isinstance(p, GenerateRequestParams)
    assert p.messages[1].tool_calls == [ToolCall(**CALL)] and p.messages[2].tool_call_id == "c1"
    assert p.tool_choice.function.name == "get_weather" and p.temperature == 0.0


def test_generate_defaults() -> None:
    p = generate({"messages": [USER]})
    assert (p.tool_choice, p.parallel_tool_calls, p.session_id, p.tools, p.max_tokens) == ("auto", True, None, None, None)


def test_session_turn_carries_only_new_user_or_tool_messages() -> None:
    p = generate({"session_id": "s1", "messages": [{"role": "tool", "tool_call_id": "c9", "content": "ok"}],
                  "tool_choice": "required"})  # the session's tools are checked by the runtime
    assert p.session_id == "s1" and p.messages[0].role == "tool"


def test_tool_parameters_default_to_an_empty_object_schema() -> None:
    tool = Tool.model_validate({"type": "function", "function": {"name": "ping"}})
    assert tool.function.parameters == {"type": "object", "properties": {}}
    tool.function.parameters["x"] = 1  # defaults are per instance, not shared
    assert Tool.model_validate({"type": "function", "function": {"name": "ping"}}).function.parameters == {
        "type": "object", "properties": {}}


@pytest.mark.parametrize("name", ["a", "get-weather_2", "A" * 64])
def test_tool_names_that_are_allowed(name: str) -> None:
    assert SessionOpenParams.model_validate({"tools": [{"type": "function", "function": {"name": name}}]})


# --------------------------------------------------------------------------- invalid params


@pytest.mark.parametrize("params, field", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [USER], "bogus": 1}, "bogus"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages.0.name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"messages": [USER, {"role": "user", "content": "x", "tool_calls": [CALL]}]}, "messages.1.tool_calls"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "content": None,
                    "tool_calls": [{**CALL, "arguments": "{\"city\": 1}"}]}]}, "messages.0.tool_calls.0.arguments"),
    ({"messages": [USER, {"role": "tool", "tool_call_id": "nope", "content": "x"}]}, "messages"),
    ({"session_id": "s1", "messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"session_id": "s1", "messages": [USER], "system_prompt": "x"}, "system_prompt"),
    ({"session_id": "s1", "messages": [USER], "tools": [WEATHER]}, "tools"),
    ({"session_id": "", "messages": [USER]}, "session_id"),
    ({"messages": [{"role": "system", "content": "a"}, USER], "system_prompt": "b"}, "system_prompt"),
    ({"messages": [USER], "tools": [WEATHER, WEATHER]}, "tools"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "x\n"}}]}, "tools.0.function.name"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "a" * 65}}]}, "tools.0.function.name"),
    ({"messages": [USER], "tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools.0.type"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "a", "parameters": []}}]},
     "tools.0.function.parameters"),
    ({"messages": [USER], "tools": [{"type": "function", "function": {"name": "a",
                                                                    "parameters": {"type": "string"}}}]},
     "tools.0.function.parameters"),
    ({"messages": [USER], "tool_choice": "any"}, "tool_choice"),
    ({"messages": [USER], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"messages": [USER], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [USER], "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice"),
    ({"messages": [USER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
    ({"messages": [USER], "max_tokens": "5"}, "max_tokens"),
    ({"messages": [USER], "max_tokens": True}, "max_tokens"),
    ({"messages": [USER], "max_tokens": 5.5}, "max_tokens"),
    ({"messages": [USER], "temperature": 2.5}, "temperature"),
    ({"messages": [USER], "temperature": -0.1}, "temperature"),
    ({"messages": [USER], "top_p": 0}, "top_p"),
    ({"messages": [USER], "top_p": 1.01}, "top_p"),
    ({"messages": [USER], "stop": ["x"] * 17}, "stop"),
    ({"messages": [USER], "stop": [""]}, "stop.0"),
    ({"messages": [USER], "stop": "x"}, "stop"),
    ({"messages": [USER], "seed": -1}, "seed"),
])
def test_invalid_generate_params_name_the_field(params: dict[str, Any], field: str) -> None:
    assert field in fields_of(params)


@pytest.mark.parametrize("method, params, field", [
    ("cancel", {}, "request_id"),
    ("cancel", {"request_id": True}, "request_id"),
    ("cancel", {"request_id": [1]}, "request_id"),
    ("cancel", {"request_id": 1, "force": True}, "force"),
    ("session.close", {}, "session_id"),
    ("session.close", {"session_id": 5}, "session_id"),
    ("session.open", {"system_prompt": 1}, "system_prompt"),
    ("session.open", {"tools": {"name": "x"}}, "tools"),
    ("session.open", {"tools": [{"type": "function", "function": {"name": "x", "extra": 1}}]},
     "tools.0.function.extra"),
    ("server.info", {"verbose": True}, "verbose"),
    ("rpc.discover", {"x": 1}, "x"),
])
def test_invalid_params_of_other_methods_name_the_field(method: str, params: dict, field: str) -> None:
    assert fields_of(params, method) == [field]


def test_a_union_field_reports_one_error_not_one_per_member() -> None:
    assert fields_of({"request_id": 1.5}, "cancel") == ["request_id"]
    assert fields_of({"messages": [USER], "tool_choice": 3}) == ["tool_choice"]


def test_many_errors_are_truncated() -> None:
    with pytest.raises(ValidationError) as info:
        GenerateRequestParams.model_validate({"messages": [{"role": "x", "content": "y"}] * 40})
    exc = invalid_params(info.value)
    assert len(exc.data["errors"]) == 16 and exc.data["truncated"] == 24
    assert exc.message.startswith("Invalid params: messages.0.role")


def test_check_tool_choice_for_sessions() -> None:
    tools = [Tool.model_validate(WEATHER)]
    check_tool_choice("required", tools)
    check_tool_choice("none", [])
    with pytest.raises(InvalidParams) as info:
        check_tool_choice("required", [])
    assert info.value.data["errors"][0]["field"] == "tool_choice"
    named = GenerateRequestParams.model_validate(
        {"session_id": "s", "messages": [USER], "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    with pytest.raises(InvalidParams):
        check_tool_choice(named.tool_choice, tools)


# --------------------------------------------------------------------------- results and notifications

USAGE = Usage(prompt_tokens=120, cached_tokens=0, completion_tokens=9)


def test_result_keeps_zero_cached_tokens_and_null_ttft() -> None:
    result = GenerateResult(text="", tool_calls=[ToolCall(**CALL)], finish_reason="tool_calls", usage=USAGE,
                            timings=Timings(ttft_ms=None, total_ms=3.5))
    dumped = result.model_dump(mode="json")
    assert dumped["usage"] == {"prompt_tokens": 120, "cached_tokens": 0, "completion_tokens": 9}
    assert dumped["timings"] == {"ttft_ms": None, "total_ms": 3.5}
    with pytest.raises(ValidationError):
        GenerateResult(text="", tool_calls=[], finish_reason="error", usage=USAGE, timings=Timings(ttft_ms=1, total_ms=2))


def test_stream_end_carries_error_exactly_when_finish_reason_is_error() -> None:
    ok = StreamEnd(request_id=7, finish_reason="stop", usage=USAGE, timings=Timings(ttft_ms=1, total_ms=2))
    assert "error" not in ok.model_dump(mode="json")
    failed = StreamEnd.for_error(7, ContextLengthExceeded(5000, 4096), total_ms=1.0)
    assert failed.model_dump(mode="json")["error"] == {
        "code": -32002, "message": "Context length exceeded", "data": {"prompt_tokens": 5000, "limit": 4096}}
    with pytest.raises(ValidationError):
        StreamEnd(request_id=7, finish_reason="error", usage=USAGE, timings=Timings(ttft_ms=1, total_ms=2))
    with pytest.raises(ValidationError):
        StreamEnd(request_id=7, finish_reason="stop", usage=USAGE, timings=Timings(ttft_ms=1, total_ms=2),
                  error={"code": -32603, "message": "x"})


def test_server_info_is_protocol_version_1() -> None:
    info = ServerInfoResult(model="m", backend="embedded", context_length=8192, limits={"max_batch": 64})
    assert info.model_dump()["protocol_version"] == 1


# --------------------------------------------------------------------------- errors


def test_error_table_and_classes() -> None:
    assert {e.code for e in ERROR_CODES} == {-32700, -32600, -32601, -32602, -32603,
                                             -32000, -32001, -32002, -32003, -32004}
    assert Overloaded(250).to_error() == {"code": -32000, "message": "Server overloaded",
                                          "data": {"retry_after_ms": 250}}
    assert UnsupportedToolSchema("t", "patternProperties").to_error()["data"] == {"tool": "t",
                                                                                 "keyword": "patternProperties"}
    assert SessionNotFound("s1").to_error()["code"] == -32001
    assert RpcError(-32099, "custom").to_error() == {"code": -32099, "message": "custom"}


def test_from_error_rebuilds_the_subclass() -> None:
    exc = RpcError.from_error(Overloaded(10).to_error())
    assert isinstance(exc, Overloaded) and exc.data == {"retry_after_ms": 10}
    assert type(RpcError.from_error({"code": -32050, "message": "?"})) is RpcError


# --------------------------------------------------------------------------- OpenRPC


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return json.loads(json.dumps(openrpc_document()))  # must survive a JSON round trip


def test_openrpc_lists_every_method_notification_and_error(doc: dict[str, Any]) -> None:
    assert doc["openrpc"] == "1.2.6"
    assert [m["name"] for m in doc["methods"]] == ["session.open", "generate", "cancel", "session.close",
                                                   "server.info", "rpc.discover"]
    assert {n["name"] for n in doc["x-notifications"]} == set(NOTIFICATIONS) == {
        "text_chunk", "reasoning_chunk", "function_call_request", "stream_end"}
    assert {e["code"] for e in doc["components"]["errors"].values()} == {e.code for e in ERROR_CODES}
    generate_params = {p["name"]: p for p in doc["methods"][1]["params"]}
    assert set(generate_params) == set(GenerateRequestParams.model_fields)
    assert [n for n, p in generate_params.items() if p["required"]] == ["messages"]
    stream_end = next(n for n in doc["x-notifications"] if n["name"] == "stream_end")
    assert {p["name"] for p in stream_end["params"]} == {"request_id", "finish_reason", "usage", "timings", "error"}


def test_openrpc_refs_resolve_and_schemas_are_valid(doc: dict[str, Any]) -> None:
    text = json.dumps(doc)
    for name in doc["components"]["schemas"]:
        jsonschema.Draft202012Validator.check_schema(doc["components"]["schemas"][name])
    for method in doc["methods"]:
        for ref in [e["$ref"] for e in method["errors"]]:
            assert ref.rsplit("/", 1)[-1] in doc["components"]["errors"]
    refs = {part.split('"')[0] for part in text.split('"$ref": "#/components/schemas/')[1:]}
    assert {"Tool", "HistoryMessage", "GenerateResult", "Usage"} <= refs
    assert refs <= set(doc["components"]["schemas"])


def test_openrpc_schemas_describe_what_the_models_emit(doc: dict[str, Any]) -> None:
    def validator(model: str) -> jsonschema.Draft202012Validator:
        return jsonschema.Draft202012Validator({"$ref": f"#/components/schemas/{model}",
                                                "components": doc["components"]})

    result = GenerateResult(text="hi", tool_calls=[ToolCall(**CALL)], finish_reason="stop", usage=USAGE,
                            timings=Timings(ttft_ms=1.0, total_ms=2.0)).model_dump(mode="json")
    validator("GenerateResult").validate(result)
    assert not validator("GenerateResult").is_valid({k: v for k, v in result.items() if k != "usage"})
    validator("StreamEnd").validate(StreamEnd.for_error(1, Overloaded(5), total_ms=1).model_dump(mode="json"))
    params = {"messages": [USER], "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 8}
    validator("GenerateRequestParams").validate(params)
    assert not validator("GenerateRequestParams").is_valid({**params, "bogus": 1})
    assert set(METHODS) == {m["name"] for m in doc["methods"]}


# --------------------------------------------------------------------------- protocol/PROTOCOL.md

PROTOCOL_MD = (Path(protocol.__file__).parent / "PROTOCOL.md").read_text(encoding="utf-8")


def test_protocol_md_error_table_matches_the_code() -> None:
    rows = {int(line.split("|")[1]): line.split("|")[2].strip()
            for line in PROTOCOL_MD.splitlines() if line.startswith("| -32")}
    assert rows == {e.code: e.message for e in ERROR_CODES}


def test_protocol_md_transcript_is_true_to_the_models() -> None:
    """Every example frame parses, binds and validates; each generate's stream_end comes once,
    before its one response; and the notifications' text adds up to the result's text."""
    methods: dict[Any, str] = {}
    streams: dict[Any, list[str]] = {}
    text: dict[Any, str] = {}
    ready: dict[Any, dict[str, Any]] = {}
    bind_errors: dict[Any, dict[str, Any]] = {}
    end_errors: dict[Any, dict[str, Any]] = {}
    lines = [line for line in PROTOCOL_MD.splitlines() if line.startswith(("--> ", "<-- "))]
    assert len(lines) > 20
    for line in lines:
        frame = json.loads(line[4:])
        assert encode(frame) == line[4:]  # the examples are what encode() writes
        if line.startswith("-->"):
            (entry,) = parse_frame(line[4:], max_batch=64).entries
            methods[frame["id"]] = frame["method"]
            if isinstance(entry, dict):  # refused by the envelope: the reply is this, verbatim
                ready[frame["id"]] = entry
            else:
                try:
                    bind_params(entry)
                except RpcError as exc:  # the server must answer with exactly this error
                    bind_errors[entry.id] = exc.to_error()
                if entry.method == "generate":
                    streams[entry.id], text[entry.id] = [], ""
            continue
        if "method" in frame:
            model = NOTIFICATIONS[frame["method"]][0].model_validate(frame["params"])
            rid = frame["params"]["request_id"]
            assert methods[rid] == "generate" and "response" not in streams[rid]
            streams[rid].append(frame["method"])
            text[rid] += getattr(model, "text", "") if frame["method"] == "text_chunk" else ""
            if isinstance(model, StreamEnd) and model.error is not None:
                end_errors[rid] = model.error.model_dump(mode="json")
            continue
        rid, method = frame["id"], methods[frame["id"]]
        if rid in ready:
            assert frame == ready.pop(rid)
            continue
        if method == "generate":
            assert streams[rid][-1] == "stream_end" and streams[rid].count("stream_end") == 1
            streams[rid].append("response")
        if "error" in frame:
            assert frame["error"] == bind_errors.pop(rid)
            if method == "generate":
                assert frame["error"] == end_errors[rid]
        else:
            result = METHODS[method].result.model_validate(frame["result"])
            if method == "generate":
                assert result.text == text[rid]
    assert streams and all(s[-2:] == ["stream_end", "response"] for s in streams.values())
    assert not ready and not bind_errors
    assert set(methods.values()) >= {"session.open", "generate", "cancel", "server.info", "session.close"}
