"""The JSON-RPC 2.0 envelope: the spec's section 7 examples (adapted to this API's methods),
the limits, and a property test that no text makes parse_frame raise."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    METHODS,
    Call,
    CancelParams,
    EmptyParams,
    Frame,
    InvalidParams,
    RpcError,
    bind_params,
    encode,
    error_response,
    notification,
    parse_frame,
    response,
)

MAX_BATCH = 64


def parse(text: str, **kw: Any) -> Frame:
    return parse_frame(text, max_batch=kw.pop("max_batch", MAX_BATCH), **kw)


def serve(frame: Frame) -> Any:
    """A stand-in dispatcher: every valid request answers with its method name; params are bound
    as the real server does, so by-position and invalid params become -32602."""
    replies = []
    for call in frame.calls:
        try:
            bind_params(call)
            reply = response(call.id, {"method": call.method})
        except RpcError as exc:
            reply = error_response(call.id, exc)
        replies.append(None if call.is_notification else reply)
    return frame.reply(replies)


def error_of(reply: dict[str, Any]) -> tuple[int, str, Any]:
    assert reply["jsonrpc"] == "2.0" and "result" not in reply
    return reply["error"]["code"], reply["error"]["message"], reply["id"]


# --------------------------------------------------------------------------- spec section 7


def test_positional_params_are_refused_with_invalid_params() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "generate", "params": [42, 23], "id": 1}')
    assert frame.calls == [Call(method="generate", params=[42, 23], id=1)]
    with pytest.raises(InvalidParams) as info:
        bind_params(frame.calls[0])
    assert info.value.code == -32602
    assert "by-position" in info.value.data["errors"][0]["message"]
    assert error_of(serve(frame)) == (-32602, info.value.message, 1)


def test_empty_positional_params_are_fine_for_methods_without_params() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "server.info", "params": [], "id": 2}')
    assert isinstance(bind_params(frame.calls[0]), EmptyParams)
    assert serve(frame) == {"jsonrpc": "2.0", "result": {"method": "server.info"}, "id": 2}
    with pytest.raises(InvalidParams):
        bind_params(parse('{"jsonrpc": "2.0", "method": "server.info", "params": [1], "id": 2}').calls[0])


@pytest.mark.parametrize("text", [
    '{"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": 23}, "id": 3}',
    '{"id": 4, "params": {"request_id": 23}, "method": "cancel", "jsonrpc": "2.0"}',
])
def test_named_params_in_any_member_order(text: str) -> None:
    frame = parse(text)
    (call,) = frame.calls
    assert call.method == "cancel" and not call.is_notification
    assert bind_params(call) == CancelParams(request_id=23)
    assert serve(frame)["result"] == {"method": "cancel"}


def test_notifications_get_no_reply() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": "a"}}')
    assert frame.calls[0].is_notification
    assert serve(frame) is None
    # Unknown method as a notification: dropped, still no reply (not even method-not-found).
    frame = parse('{"jsonrpc": "2.0", "method": "foobar"}')
    assert frame.entries == () and serve(frame) is None


def test_nonexistent_method() -> None:
    reply = serve(parse('{"jsonrpc": "2.0", "method": "foobar", "id": "1"}'))
    assert error_of(reply) == (-32601, "Method not found", "1")


def test_invalid_json_is_a_parse_error_with_null_id() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]')
    assert error_of(serve(frame)) == (-32700, "Parse error", None)


def test_invalid_request_object() -> None:
    reply = serve(parse('{"jsonrpc": "2.0", "method": 1, "params": "bar"}'))
    assert error_of(reply) == (-32600, "Invalid Request", None)


def test_batch_with_invalid_json_is_one_parse_error() -> None:
    text = '[{"jsonrpc": "2.0", "method": "server.info", "params": [], "id": "1"}, {"jsonrpc": "2.0", "method"]'
    reply = serve(parse(text))
    assert isinstance(reply, dict) and error_of(reply) == (-32700, "Parse error", None)


def test_empty_batch_is_one_invalid_request_not_an_array() -> None:
    reply = serve(parse("[]"))
    assert isinstance(reply, dict) and error_of(reply) == (-32600, "Invalid Request", None)


@pytest.mark.parametrize("text, n", [("[1]", 1), ("[1,2,3]", 3)])
def test_batch_of_non_objects_gives_one_invalid_request_each(text: str, n: int) -> None:
    reply = serve(parse(text))
    assert isinstance(reply, list) and len(reply) == n
    assert all(error_of(r) == (-32600, "Invalid Request", None) for r in reply)


def test_mixed_batch() -> None:
    text = json.dumps([
        {"jsonrpc": "2.0", "method": "server.info", "params": [], "id": "1"},
        {"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": 7}},
        {"jsonrpc": "2.0", "method": "session.close", "params": {"session_id": "s1"}, "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "rpc.discover", "id": "9"},
    ])
    frame = parse(text)
    assert frame.is_batch and [c.method for c in frame.calls] == ["server.info", "cancel", "session.close",
                                                                   "rpc.discover"]
    reply = serve(frame)
    assert reply[0] == {"jsonrpc": "2.0", "result": {"method": "server.info"}, "id": "1"}
    assert reply[1] == {"jsonrpc": "2.0", "result": {"method": "session.close"}, "id": "2"}
    assert error_of(reply[2]) == (-32600, "Invalid Request", None)
    assert error_of(reply[3]) == (-32601, "Method not found", "5")
    assert reply[4] == {"jsonrpc": "2.0", "result": {"method": "rpc.discover"}, "id": "9"}
    assert len(reply) == 5


def test_batch_of_notifications_gets_nothing() -> None:
    text = json.dumps([
        {"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": 1}},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
    ])
    frame = parse(text)
    assert frame.is_batch and len(frame.calls) == 1
    assert serve(frame) is None


# --------------------------------------------------------------------------- envelope rules


def test_null_id_is_a_request_not_a_notification() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "server.info", "id": null}')
    assert frame.calls == [Call(method="server.info", params=None, id=None, is_notification=False)]
    assert serve(frame) == {"jsonrpc": "2.0", "result": {"method": "server.info"}, "id": None}


@pytest.mark.parametrize("obj, reply_id, reason", [
    ({"jsonrpc": "1.0", "method": "server.info", "id": 5}, 5, "jsonrpc"),
    ({"jsonrpc": 2.0, "method": "server.info", "id": 5}, 5, "jsonrpc"),
    ({"method": "server.info", "id": "a"}, "a", "jsonrpc"),
    ({"jsonrpc": "2.0", "id": 5}, 5, "method"),
    ({"jsonrpc": "2.0", "method": "server.info", "params": None, "id": 5}, 5, "params"),
    ({"jsonrpc": "2.0", "method": "server.info", "params": "x", "id": 5}, 5, "params"),
    ({"jsonrpc": "2.0", "method": "server.info", "id": True}, None, "id"),
    ({"jsonrpc": "2.0", "method": "server.info", "id": [1]}, None, "id"),
    ({"jsonrpc": "2.0", "method": "server.info", "id": {"a": 1}}, None, "id"),
])
def test_invalid_requests_name_the_member_and_echo_a_readable_id(obj: dict, reply_id: Any, reason: str) -> None:
    reply = serve(parse(json.dumps(obj)))
    assert error_of(reply) == (-32600, "Invalid Request", reply_id)
    assert f'"{reason}"' in reply["error"]["data"]["reason"]


@pytest.mark.parametrize("text", ["1", '"x"', "null", "true"])
def test_a_single_non_object_is_an_invalid_request(text: str) -> None:
    assert error_of(serve(parse(text))) == (-32600, "Invalid Request", None)


def test_fractional_ids_are_allowed_but_generate_needs_string_or_integer_id() -> None:
    assert parse('{"jsonrpc": "2.0", "method": "server.info", "id": 1.5}').calls[0].id == 1.5
    for rid in ("null", "1.5"):
        reply = serve(parse('{"jsonrpc": "2.0", "method": "generate", "params": {"messages": []}, "id": ' + rid + '}'))
        assert error_of(reply)[0] == -32600 and "request_id" in reply["error"]["data"]["reason"]
    # A generate notification cannot be served (no id to tag its stream with): dropped silently.
    assert parse('{"jsonrpc": "2.0", "method": "generate", "params": {}}').entries == ()


def test_batch_longer_than_the_limit_is_one_invalid_request() -> None:
    one = {"jsonrpc": "2.0", "method": "server.info", "id": 1}
    assert len(parse(json.dumps([one] * 4), max_batch=4).calls) == 4
    reply = serve(parse(json.dumps([one] * 5), max_batch=4))
    assert isinstance(reply, dict) and error_of(reply) == (-32600, "Invalid Request", None)
    assert reply["error"]["data"]["max_batch"] == 4


@pytest.mark.parametrize("depth", [65, 2_000, 200_000])
def test_deep_nesting_is_refused_not_a_crash(depth: int) -> None:
    reply = serve(parse("[" * depth + "]" * depth, max_depth=64))
    assert error_of(reply) == (-32600, "Invalid Request", None)
    assert reply["error"]["data"]["max_depth"] == 64


def test_nesting_within_the_limit_is_fine() -> None:
    args = {"a": 1}
    for _ in range(40):
        args = {"a": args}
    text = json.dumps({"jsonrpc": "2.0", "method": "cancel", "params": {"request_id": 1, "x": args}, "id": 1})
    assert parse(text, max_depth=64).calls[0].params["x"] == args


@pytest.mark.parametrize("text", ["NaN", '{"a": Infinity}', "-Infinity", "1e999", "1" * 5000, "", "\ufeff{}"])
def test_non_json_numbers_and_empty_frames_are_parse_errors(text: str) -> None:
    frame = parse(text)
    assert frame.error is not None and frame.error["error"]["code"] == -32700 and frame.error["id"] is None


def test_reply_needs_one_answer_per_call() -> None:
    frame = parse('[{"jsonrpc": "2.0", "method": "server.info", "id": 1}, 1]')
    with pytest.raises(ValueError):
        frame.reply([])


# --------------------------------------------------------------------------- builders


def test_builders_and_compact_encoding() -> None:
    assert encode(response(1, CancelParams(request_id="x"))) == '{"jsonrpc":"2.0","result":{"request_id":"x"},"id":1}'
    assert encode(notification("text_chunk", {"request_id": 1, "text": "héllo"})) == (
        '{"jsonrpc":"2.0","method":"text_chunk","params":{"request_id":1,"text":"héllo"}}')
    err = error_response("a", InvalidParams(data={"errors": []}))
    assert err == {"jsonrpc": "2.0", "error": {"code": -32602, "message": "Invalid params",
                                               "data": {"errors": []}}, "id": "a"}


def test_encode_escapes_lone_surrogates_so_the_frame_is_valid_utf8() -> None:
    frame = parse('{"jsonrpc": "2.0", "method": "foobar", "id": "\\ud800x"}')
    text = encode(serve(frame))
    text.encode("utf-8")  # would raise UnicodeEncodeError if the surrogate were written raw
    assert json.loads(text)["id"] == "\ud800x"


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


# --------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=30,
)
method_names = st.sampled_from([*METHODS, "foobar", "rpc.other", ""]) | st.text(max_size=10)
ids = st.none() | st.integers() | st.text(max_size=5) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
request_like = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "1.0", 2]),
        "method": method_names,
        "params": json_values | st.dictionaries(st.sampled_from(["messages", "request_id", "session_id", "x"]),
                                                json_values, max_size=3),
        "id": ids,
    },
)
frames = request_like | st.lists(request_like | json_values, max_size=6)


def _check_frame(frame: Frame) -> None:
    assert isinstance(frame, Frame)
    if frame.error is not None:
        assert frame.entries == () and frame.error["error"]["code"] in (-32700, -32600)
    for entry in frame.entries:
        if isinstance(entry, Call):
            assert entry.method in METHODS
            try:
                bind_params(entry)  # anything a Call carries binds or fails as an RpcError
            except RpcError as exc:
                assert exc.code == -32602
        else:
            assert entry["jsonrpc"] == "2.0" and entry["error"]["code"] in (-32600, -32601)
    encode(serve(frame))  # whatever comes back can be sent


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.text())
def test_parse_frame_never_raises_on_arbitrary_text(text: str) -> None:
    _check_frame(parse(text))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_parse_frame_never_raises_on_arbitrary_json(value: Any) -> None:
    _check_frame(parse(json.dumps(value), max_batch=3))


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(frames)
def test_parse_frame_never_raises_on_request_like_frames(value: Any) -> None:
    frame = parse(json.dumps(value), max_batch=4)
    _check_frame(frame)
    if isinstance(value, list) and 0 < len(value) <= 4:
        assert frame.is_batch and len(frame.entries) <= len(value)
