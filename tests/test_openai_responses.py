"""The OpenAI Responses API (runtime.openai_responses) over a real socket, driven by the
`openai` package: on the fake backend for the wire, and one turn chain on the real engine for
the exact-token continuation of `previous_response_id`."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pydantic
import pytest
import pytest_asyncio
from openai.types.responses import Response, ResponseStreamEvent

from conftest import running_server, test_config
from runtime.openai_responses import _Output
from runtime.responses_wire import ResponseStore

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


@pytest_asyncio.fixture(scope="module")
async def resp_server(cfg, fake_backend):
    async with running_server(cfg, fake_backend) as (addr, app):
        yield addr, app


@pytest_asyncio.fixture
async def client(resp_server, fake):
    addr, _ = resp_server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="anything", max_retries=0) as c:
        yield c


def prompt(fake) -> str:
    return fake.tokenizer.decode(fake.requests[-1].input_ids)


async def raw_events(addr: str, body: dict, headers: dict | None = None) -> list[dict]:
    """The SSE events of a streamed create, each checked against the SDK's event types."""
    async with httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"http://{addr}/v1/responses", json={**body, "stream": True}, headers=headers or {})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.text.split("\n\n"):
        if not block:
            continue
        name_line, data_line = block.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert name_line == f"event: {event['type']}"
        STREAM_EVENT.validate_python(event)  # strict: every field the SDK's type requires, typed
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


async def test_plain_text(client, fake, resp_server):
    fake.replies.append("Bonjour!")
    r = await client.responses.create(model="whatever", instructions="Be brief.", input=[
        {"role": "developer", "content": "Answer in French."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "fake-chatml"
    assert r.status == "completed" and r.incomplete_details is None and r.error is None
    assert r.output_text == "Bonjour!"
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.status == "completed" and message.content[0].type == "output_text"
    u = r.usage
    assert u.input_tokens > 0 and u.output_tokens == len("Bonjour!") + 1 and u.total_tokens == u.input_tokens + u.output_tokens
    assert u.input_tokens_details.cached_tokens is not None and u.output_tokens_details.reasoning_tokens == 0
    assert r.instructions == "Be brief." and r.store is True and r.tool_choice == "auto" and r.parallel_tool_calls is True
    text = prompt(fake)
    assert text.index("Be brief.") < text.index("Answer in French.") < text.index("Hi")
    # the raw JSON is a valid Response as the SDK's (strict) pydantic model reads it
    addr, _ = resp_server
    async with httpx.AsyncClient() as http:
        raw = await http.post(f"http://{addr}/v1/responses", json={"model": "m", "input": "Hi"})
    Response.model_validate(raw.json())


async def test_streamed_text(client, fake, resp_server):
    fake.replies.append("Streaming works.")
    async with client.responses.stream(model="m", input="Hi") as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Streaming works."
    assert final.output_text == "Streaming works." and final.status == "completed" and final.usage.output_tokens > 0
    assert events[0].response.status == "in_progress" and events[0].response.id == final.id
    fake.replies.append("Raw events.")
    raw = await raw_events(resp_server[0], {"model": "m", "input": "Hi"})
    assert raw[-1]["type"] == "response.completed" and raw[-1]["response"]["output"][0]["content"][0]["text"] == "Raw events."


async def test_function_call(client, fake):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    r = await client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
    [call] = r.output
    assert call.type == "function_call" and call.id.startswith("fc_") and call.call_id and call.status == "completed"
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert r.output_text == "" and r.tools[0].name == "get_weather" and r.tool_choice == "required"


async def test_function_call_streamed(client, fake, resp_server):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    async with client.responses.stream(model="m", input="Weather in Paris?", tools=[WEATHER],
                                       tool_choice={"type": "function", "name": "get_weather"}) as stream:
        events = [e async for e in stream]
        final = await stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) == 1 and json.loads(deltas[0].delta) == {"city": "Paris"}  # whole, in one delta
    fake.replies.append("Let me check. " + fake.call_text("get_weather", {"city": "Rome"}))
    raw = await raw_events(resp_server[0], {"model": "m", "input": "Weather in Rome?", "tools": [WEATHER]})
    types = [e["type"] for e in raw]
    at = types.index("response.function_call_arguments.delta")
    assert types[at - 1:at + 4] == ["response.output_item.added", "response.function_call_arguments.delta",
                                    "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added, done = raw[at - 1]["item"], raw[at + 2]["item"]
    assert added["type"] == "function_call" and added["arguments"] == "" and added["status"] == "in_progress"
    assert done["status"] == "completed" and json.loads(done["arguments"]) == {"city": "Rome"} and done["id"] == added["id"]
    assert raw[at + 1]["name"] == "get_weather" and raw[at]["output_index"] == 1  # the message is output 0
    out = raw[-1]["response"]["output"]
    assert [o["type"] for o in out] == ["message", "function_call"] and out[0]["content"][0]["text"].startswith("Let me check.")


async def test_function_call_output_round_trip_without_store(client, fake):
    """A client that keeps the state itself (store=false) re-sends the output items."""
    fake.replies.extend([fake.call_text("get_weather", {"city": "Paris"}), "Sunny in Paris."])
    items: list = [{"role": "user", "content": "Weather in Paris?"}]
    r1 = await client.responses.create(model="m", input=items, tools=[WEATHER], store=False)
    items += [o.model_dump(exclude_none=True) for o in r1.output]
    items.append({"type": "function_call_output", "call_id": r1.output[0].call_id, "output": json.dumps({"sky": "clear"})})
    r2 = await client.responses.create(model="m", input=items, tools=[WEATHER], store=False)
    assert r2.output_text == "Sunny in Paris." and r2.store is False
    text = prompt(fake)
    assert "Weather in Paris?" in text and "get_weather" in text and "clear" in text
    assert r2.usage.input_tokens_details.cached_tokens > 0  # the fake's prefix cache saw turn 1


async def test_previous_response_id_continues_the_stored_conversation(client, fake):
    fake.replies.extend([fake.call_text("get_weather", {"city": "Paris"}), "Sunny in Paris.", "Bye."])
    r1 = await client.responses.create(model="m", instructions="You are a weather agent.", input="Weather in Paris?",
                                       tools=[WEATHER], tool_choice="required")
    [call] = r1.output
    r2 = await client.responses.create(model="m", instructions="You are a weather agent.", previous_response_id=r1.id,
                                       tools=[WEATHER], input=[{"type": "function_call_output", "call_id": call.call_id,
                                                                "output": "clear sky"}])
    assert r2.output_text == "Sunny in Paris." and r2.previous_response_id == r1.id
    text = prompt(fake)
    assert text.index("Weather in Paris?") < text.rindex("get_weather") < text.index("clear sky")
    assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens  # the prompt starts with turn 1's
    # the new request's instructions apply, not the earlier ones; turn 2's text is in the history
    r3 = await client.responses.create(model="m", instructions="Say goodbye.", previous_response_id=r2.id, input="Thanks!")
    text = prompt(fake)
    assert "Say goodbye." in text and "weather agent" not in text
    assert text.index("clear sky") < text.index("Sunny in Paris.") < text.index("Thanks!")
    assert r3.output_text == "Bye."


async def test_store_false_is_not_found(client, fake):
    r = await client.responses.create(model="m", input="Hi", store=False)
    with pytest.raises(openai.NotFoundError) as err:
        await client.responses.retrieve(r.id)
    assert err.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError) as err:
        await client.responses.create(model="m", input="Again", previous_response_id=r.id)
    assert err.value.code == "previous_response_not_found" and err.value.param == "previous_response_id"
    assert err.value.body["type"] == "invalid_request_error"


async def test_get_and_delete(client, fake, resp_server):
    fake.replies.append("Kept.")
    r = await client.responses.create(model="m", input="Hi", metadata={"k": "v"})
    got = await client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == "Kept." and got.usage == r.usage and got.metadata == {"k": "v"}
    async with httpx.AsyncClient() as http:
        d = await http.delete(f"http://{resp_server[0]}/v1/responses/{r.id}")
    assert d.status_code == 200 and d.json() == {"id": r.id, "object": "response", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(r.id)


async def test_another_api_key_sees_nothing(fake):
    async with running_server(test_config(INFERENCE_API_KEY="k1,k2"), fake) as (addr, _):
        base = f"http://{addr}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key="k1", max_retries=0) as one, \
                openai.AsyncOpenAI(base_url=base, api_key="k2", max_retries=0) as two:
            r = await one.responses.create(model="m", input="Hi")
            async with httpx.AsyncClient() as http:
                theirs = await http.get(f"{base}/responses/{r.id}", headers={"authorization": "Bearer k2"})
                missing = await http.get(f"{base}/responses/resp_missing", headers={"authorization": "Bearer k2"})
                anonymous = await http.get(f"{base}/responses/{r.id}")
            assert theirs.status_code == missing.status_code == 404
            assert theirs.json()["error"]["message"].replace(r.id, "X") == missing.json()["error"]["message"].replace("resp_missing", "X")
            assert anonymous.status_code == 401
            with pytest.raises(openai.NotFoundError):
                await two.responses.delete(r.id)
            with pytest.raises(openai.NotFoundError) as err:
                await two.responses.create(model="m", input="Hi", previous_response_id=r.id)
            assert err.value.code == "previous_response_not_found"
            assert (await one.responses.retrieve(r.id)).id == r.id  # still there for its owner


async def bad(client, **kwargs) -> openai.BadRequestError:
    kwargs.setdefault("model", "m")
    kwargs.setdefault("input", "Hi")
    with pytest.raises(openai.BadRequestError) as err:
        await client.responses.create(**kwargs)
    assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    return err.value


async def test_bad_input_is_400_naming_the_field(client, fake):
    assert (await bad(client, extra_body={"max_output_tokens": "ten"})).param == "max_output_tokens"
    assert (await bad(client, max_output_tokens=0)).param == "max_output_tokens"
    assert (await bad(client, input=None)).param == "input"
    assert (await bad(client, input=[])).param == "input"
    assert (await bad(client, tools=[{"type": "web_search"}])).param == "tools.0.type"
    assert (await bad(client, tools=[{**WEATHER, "name": "get weather"}])).param == "tools.0.name"
    assert (await bad(client, tool_choice="required")).param == "tool_choice"
    assert (await bad(client, tools=[WEATHER], tool_choice={"type": "file_search"})).param == "tool_choice"
    assert (await bad(client, input=[{"type": "item_reference", "id": "x"}])).param == "input.0.type"
    assert (await bad(client, input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])).param == "input.0.content"
    assert (await bad(client, input=[{"role": "robot", "content": "Hi"}])).param == "input.0.role"
    err = await bad(client, input=[{"role": "user", "content": "Hi"},
                                   {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{no"}])
    assert err.param == "input.1.arguments"
    err = await bad(client, input=[{"role": "user", "content": "Hi"}, {"type": "function_call_output", "call_id": "nope", "output": "x"}])
    assert err.param == "input.1" and "input.1" in err.message and "call_id" in err.message
    assert (await bad(client, extra_body={"background": True})).param == "background"
    assert (await bad(client, extra_body={"conversation": "conv_1"})).param == "conversation"
    assert (await bad(client, input=[{"role": "system", "content": "Only a system prompt"}])).param == "input"
    # unknown fields are ignored; text.format "text" is plain text
    r = await client.responses.create(model="m", input="Hi", text={"format": {"type": "text"}}, extra_body={"vendor_field": 1},
                                      reasoning={"effort": "low"}, truncation="disabled", user="u1")
    assert r.status == "completed" and r.text.format.type == "text"


class Place(pydantic.BaseModel):
    city: str
    days: int


async def test_text_format_json_schema_and_json_object(client, fake):
    fake.replies.append('{"city": "Paris", "days": 3}')
    r = await client.responses.parse(model="m", input="Where, and how long?", text_format=Place)
    assert r.output_parsed == Place(city="Paris", days=3)
    assert r.text.format.type == "json_schema" and r.text.format.name == "Place"
    assert fake.requests[-1].sampling.constraint is not None  # the text is held to the schema
    fake.replies.append('{"answer": "yes"}')
    r = await client.responses.create(model="m", input="JSON please", text={"format": {"type": "json_object"}})
    assert json.loads(r.output_text) == {"answer": "yes"} and fake.requests[-1].sampling.constraint is not None
    err = await bad(client, text={"format": {"type": "json_schema", "name": "x"}})
    assert err.param == "text.format.schema"
    err = await bad(client, text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}}})
    assert err.param == "text.format" and err.code == "unsupported_tool_schema" and "uniqueItems" in err.message


async def test_max_output_tokens_is_incomplete(client, fake, resp_server):
    fake.replies.append("a long answer that will be cut")
    r = await client.responses.create(model="m", input="Hi", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete" and r.output_text == "a l"
    fake.replies.append("a long answer that will be cut")
    raw = await raw_events(resp_server[0], {"model": "m", "input": "Hi", "max_output_tokens": 3})
    assert raw[-1]["type"] == "response.incomplete"
    assert raw[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_streaming_client_disconnect_aborts_the_engine_request(client, fake):
    fake.token_delay_s = 0.02  # 2000 tokens: 40 s unless aborted
    fake.replies.append("word " * 400)
    stream = await client.responses.create(model="m", input="Talk", stream=True, max_output_tokens=4000)
    deltas = 0
    async for event in stream:
        deltas += event.type == "response.output_text.delta"
        if deltas >= 3:
            break
    assert await fake.engine_requests() == 1
    await stream.close()
    for _ in range(250):
        if not await fake.engine_requests():
            break
        await asyncio.sleep(0.02)
    assert await fake.engine_requests() == 0


async def test_engine_death_mid_stream_is_response_failed(cfg):
    from runtime.backends.fake import FakeBackend

    backend = FakeBackend(token_delay_s=0.01)
    backend.hang_when_killed = True
    await backend.start()
    try:
        async with running_server(cfg, backend) as (addr, _):
            async with httpx.AsyncClient(timeout=30) as http:
                async with http.stream("POST", f"http://{addr}/v1/responses",
                                       json={"model": "m", "input": "Hi", "max_output_tokens": 24, "stream": True}) as r:
                    events = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(json.loads(line[len("data: "):]))
                            if events[-1]["type"] == "response.output_text.delta":
                                backend.kill()
        STREAM_EVENT.validate_python(events[-1])
        assert events[-1]["type"] == "response.failed"
        assert events[-1]["response"]["status"] == "failed" and "engine" in events[-1]["response"]["error"]["message"]
        assert events[-2]["type"] == "response.output_item.done" and events[-2]["item"]["status"] == "incomplete"
    finally:
        await backend.stop()


async def test_requests_are_counted(client, fake):
    from runtime.metrics import METRICS

    def count(outcome: str) -> float:
        return METRICS.registry.get_sample_value("agent_runtime_requests_total",
                                                 {"method": "openai.responses", "outcome": outcome}) or 0.0

    ok, error = count("ok"), count("error")
    await client.responses.create(model="m", input="Hi")
    stream = await client.responses.create(model="m", input="Hi", stream=True)
    _ = [e async for e in stream]
    await bad(client, max_output_tokens=0)
    assert (count("ok"), count("error")) == (ok + 2, error + 1)


def test_output_items_for_reasoning_text_and_calls():
    """The output builder on a reasoning format's events: a reasoning item, a message, a call;
    every stream event and the final Response valid for the SDK's types."""
    out = _Output()
    events = []
    for kind, payload in [("reasoning_chunk", {"text": "Think"}), ("reasoning_chunk", {"text": "ing."}),
                          ("text_chunk", {"text": "Calling."}),
                          ("function_call_request", {"call_id": "call_1", "name": "f", "arguments": {"a": 1}})]:
        events += out.feed(kind, payload)
    events += out.finish("completed")
    for event in events:
        STREAM_EVENT.validate_python(event)
    assert [i["type"] for i in out.items] == ["reasoning", "message", "function_call"]
    assert out.items[0]["content"] == [{"type": "reasoning_text", "text": "Thinking."}]
    assert [e["type"] for e in events].count("response.output_item.done") == 3
    response = Response.model_validate({"id": "resp_1", "object": "response", "created_at": 0, "model": "m", "output": out.items,
                                        "parallel_tool_calls": True, "tool_choice": "auto", "tools": []})
    assert response.output_text == "Calling." and response.output[2].call_id == "call_1"


def test_store_bounds_and_owners():
    now = [0.0]
    store = ResponseStore(max_entries=3, max_bytes=2000, ttl_s=60.0, clock=lambda: now[0])

    def put(owner: str, rid: str, text: str = "x") -> bool:
        return store.put(owner, {"id": rid, "output": text}, [{"role": "user", "content": text}])

    for i in range(4):
        assert put("a", f"r{i}")
    assert store.get("a", "r0") is None and store.get("a", "r1") is not None  # LRU by entries; r1 is now the newest
    assert put("a", "r4") and store.get("a", "r2") is None and store.get("a", "r1") is not None
    assert store.get("b", "r1") is None and not store.delete("b", "r1")  # another owner sees nothing
    assert put("b", "big", "y" * 900)
    assert put("b", "big2", "y" * 900) and store.get("b", "big") is None  # LRU by bytes
    assert not put("b", "huge", "z" * 3000) and store.get("b", "huge") is None  # alone over the bound: not kept
    assert len(store) == 4
    now[0] = 30.0
    store.get("a", "r1")
    now[0] = 70.0  # r3 and r4 idle for 70 s, r1 for 40 s
    assert store.get("a", "r3") is None and store.get("a", "r1") is not None
    now[0] = 200.0
    assert store.get("a", "r1") is None and store.get("b", "big2") is None and len(store) == 0


@pytest.mark.engine
async def test_engine_previous_response_id_continues_from_the_generated_tokens(server):
    """Turn 2 continues turn 1 by previous_response_id: everything before the new input
    (turn 1's prompt and the tokens it generated) is served from the cache."""
    addr, _ = server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="x", max_retries=0, timeout=300) as client:
        r1 = await client.responses.create(model="m", instructions="You are a weather assistant.",
                                           input="What is the weather in Paris?", tools=[WEATHER], tool_choice="required",
                                           max_output_tokens=48)
        [call] = [o for o in r1.output if o.type == "function_call"]
        assert call.name == "get_weather" and isinstance(json.loads(call.arguments).get("city"), str)
        r2 = await client.responses.create(model="m", instructions="You are a weather assistant.", previous_response_id=r1.id,
                                           tools=[WEATHER], max_output_tokens=16,
                                           input=[{"type": "function_call_output", "call_id": call.call_id,
                                                   "output": json.dumps({"sky": "clear", "celsius": 21})}])
        assert r2.status in ("completed", "incomplete") and r2.usage.input_tokens > r1.usage.input_tokens + r1.usage.output_tokens
        assert r2.usage.input_tokens_details.cached_tokens >= r1.usage.input_tokens + r1.usage.output_tokens - 2
