"""The OpenAI-compatible front end (runtime.openai_api) on the fake backend over a real socket,
driven by the `openai` package itself."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
import pytest_asyncio

from conftest import running_server, test_config

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest_asyncio.fixture(scope="module")
async def oai_server(cfg, fake_backend):
    async with running_server(cfg, fake_backend) as (addr, app):
        yield addr, app


@pytest_asyncio.fixture
async def client(oai_server, fake):
    addr, _ = oai_server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="anything", max_retries=0) as c:
        yield c


async def wait_idle(fake, timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while await fake.engine_requests():
        assert asyncio.get_running_loop().time() < deadline, "the engine request was not aborted"
        await asyncio.sleep(0.02)


async def test_models_list_and_retrieve(client, fake):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-chatml"]
    assert models.data[0].object == "model"
    model = await client.models.retrieve("fake-chatml")
    assert model.id == "fake-chatml" and model.owned_by
    with pytest.raises(openai.NotFoundError) as err:
        await client.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"
    assert err.value.body["type"] == "invalid_request_error"


async def test_plain_completion(client, fake):
    fake.replies.append("Bonjour!")
    r = await client.chat.completions.create(model="whatever", messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "fake-chatml"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Bonjour!"
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens is not None
    prompt = fake.tokenizer.decode(fake.requests[-1].input_ids)
    assert "Be brief." in prompt and "Hi" in prompt


async def test_max_tokens_ends_with_length(client, fake):
    fake.replies.append("a long answer that will be cut")
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


async def test_streaming_text_with_usage(client, fake):
    fake.replies.append("Streaming works.")
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Streaming works."
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens > 0 and last.usage.prompt_tokens_details.cached_tokens is not None


async def test_stream_ends_with_done(oai_server, fake):
    """The raw SSE: `data: [DONE]` ends it, after the usage chunk."""
    addr, _ = oai_server
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient() as http:
        r = await http.post(f"http://{addr}/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"] == [] and "usage" in json.loads(events[-2])


async def test_tool_call_required(client, fake):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                             tools=[WEATHER], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tool_call_streamed_whole_in_one_chunk(client, fake):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    chunks = [c async for c in stream]
    with_calls = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(with_calls) == 1
    [call] = with_calls[0].choices[0].delta.tool_calls
    assert call.index == 0 and call.id and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_three_turn_tool_loop_reuses_the_prefix(client, fake):
    messages: list[dict] = [{"role": "system", "content": "You are a weather agent. " * 8},
                            {"role": "user", "content": "Weather in Paris, then in Rome?"}]
    fake.replies.extend([fake.call_text("get_weather", {"city": "Paris"}), fake.call_text("get_weather", {"city": "Rome"}),
                         "Sunny in Paris, rainy in Rome."])
    usages = []
    for turn in range(3):
        r = await client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
        usages.append(r.usage)
        message = r.choices[0].message
        messages.append(message.model_dump(exclude_none=True))  # what frameworks replay: the message as received
        if turn < 2:
            [call] = message.tool_calls
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps({"sky": "clear"})})
    assert r.choices[0].message.content == "Sunny in Paris, rainy in Rome."
    assert r.choices[0].finish_reason == "stop"
    assert usages[1].prompt_tokens > usages[0].prompt_tokens
    assert usages[1].prompt_tokens_details.cached_tokens > 0
    assert usages[2].prompt_tokens_details.cached_tokens > usages[1].prompt_tokens_details.cached_tokens
    prompt = fake.tokenizer.decode(fake.requests[-1].input_ids)
    assert "Paris" in prompt and "Rome" in prompt and "clear" in prompt


async def test_wrong_type_is_400(client, fake):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], extra_body={"max_tokens": "ten"})
    assert err.value.status_code == 400 and err.value.body["type"] == "invalid_request_error"
    assert err.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "x"}], tools=[WEATHER])
    assert err.value.param == "messages.1.tool_calls.0.function.arguments"


async def test_protocol_rules_are_400_at_openai_indexes(client, fake):
    with pytest.raises(openai.BadRequestError) as err:  # a tool result that answers no call
        await client.chat.completions.create(model="m", messages=[
            {"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
            {"role": "tool", "tool_call_id": "nope", "content": "x"}])
    assert err.value.param == "messages" and "messages.2" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], tool_choice="required")
    assert err.value.param == "tool_choice"


async def test_context_too_long_is_400(client, fake):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x" * 40000}])
    assert err.value.code == "context_length_exceeded" and "maximum context length" in err.value.message


async def test_api_key(fake):
    async with running_server(test_config(INFERENCE_API_KEY="k1"), fake) as (addr, _):
        for key in ("wrong", ""):
            async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key=key, max_retries=0) as c:
                with pytest.raises(openai.AuthenticationError) as err:
                    await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
                assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
                with pytest.raises(openai.AuthenticationError):
                    await c.models.list()
        async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="k1", max_retries=0) as c:
            r = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
            assert r.choices[0].message.content


async def test_streaming_client_disconnect_aborts_the_engine_request(client, fake):
    fake.token_delay_s = 0.02  # 2000 tokens: 40 s unless aborted
    fake.replies.append("word " * 400)
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Talk"}], stream=True,
                                                  max_tokens=4000)
    got = 0
    async for c in stream:
        got += bool(c.choices and c.choices[0].delta.content)
        if got >= 3:
            break
    assert await fake.engine_requests() == 1
    await stream.close()
    await wait_idle(fake)
    assert fake.requests[-1].rid.startswith("oai-")


async def test_plain_client_disconnect_aborts_the_engine_request(client, fake):
    fake.token_delay_s = 0.02  # 2000 tokens: 40 s unless aborted
    fake.replies.append("word " * 400)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Talk"}], max_tokens=4000,
                                             timeout=0.5)
    await wait_idle(fake)


async def test_overloaded_is_429_with_retry_headers(oai_server, fake):
    addr, app = oai_server
    runtime = app.state.server.runtime
    for _ in range(500):  # an earlier test's turn may still be ending
        if not runtime.active:
            break
        await asyncio.sleep(0.01)
    saved = runtime.active
    runtime.active = app.state.server.cfg.max_queue  # the engine queue is full
    try:
        async with httpx.AsyncClient() as http:
            r = await http.post(f"http://{addr}/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "Hi"}]})
    finally:
        runtime.active = saved
    assert r.status_code == 429
    assert r.headers["retry-after-ms"] == "1000" and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


async def test_unsupported_fields(client, fake):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], n=2)
    assert err.value.param == "n"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                             response_format={"type": "xml"})
    assert err.value.param == "response_format.type"
    # unknown fields and ignored ones are accepted
    r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], presence_penalty=0.5,
                                             user="u1", extra_body={"some_vendor_field": 1}, stop="\n\n")
    assert r.choices[0].finish_reason == "stop"


async def test_engine_death_mid_stream_is_an_sse_error_then_done(cfg):
    """The server fails the generate of a dead engine (its stream hangs, as a killed SGLang
    scheduler's does): the stream already started, so the error comes as an SSE event."""
    from runtime.backends.fake import FakeBackend

    backend = FakeBackend(token_delay_s=0.01)
    backend.hang_when_killed = True
    await backend.start()
    try:
        async with running_server(cfg, backend) as (addr, _):
            async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="x", max_retries=0) as c:
                stream = await c.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                                         max_tokens=24, stream=True)
                with pytest.raises(openai.APIError) as err:
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            backend.kill()
                assert err.value.body["code"] == "engine_unavailable"
            async with httpx.AsyncClient() as http:  # the raw stream: the error event, then [DONE]
                for _ in range(200):
                    if backend.is_ready():
                        break
                    await asyncio.sleep(0.05)
                backend.token_delay_s = 0.05
                async with http.stream("POST", f"http://{addr}/v1/chat/completions", json={
                        "model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": True}) as r:
                    events = []
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: "):])
                            if len(events) == 2:
                                backend.kill()
                assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_unavailable"
    finally:
        await backend.stop()


async def test_unsupported_tool_schema_names_the_keyword(client, fake):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "not": {"const": "x"}}}}}}
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], tools=[tool])
    assert err.value.code == "unsupported_tool_schema" and err.value.param == "tools"
    assert "'not'" in err.value.message


async def test_requests_are_counted(client, fake):
    from runtime.metrics import METRICS

    def count(outcome: str) -> float:
        return METRICS.registry.get_sample_value("agent_runtime_requests_total",
                                                 {"method": "openai.chat.completions", "outcome": outcome}) or 0.0

    ok, error = count("ok"), count("error")
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}])
    stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], stream=True)
    _ = [c async for c in stream]
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=0)
    assert (count("ok"), count("error")) == (ok + 2, error + 1)
