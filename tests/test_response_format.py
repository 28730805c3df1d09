"""response_format (json_object, json_schema): the protocol field, the schema checks, the turn's
grammar (xgrammar matcher), the check after the turn, /v1 and /ws on the fake backend (the
constraint the backend receives, compiled and matched here), and the real engine."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
import pytest_asyncio
from pydantic import ValidationError

import programs as P
from conftest import connect
from programs.formats import FORMATS
from protocol.models import GenerateRequestParams
from runtime.backends.fake import fake_tokenizer

USER = {"role": "user", "content": "Describe a person as JSON."}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "color", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
JSON_OBJECT = {"type": "json_object"}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
ALICE = '{"age":30,"color":"blue","name":"Alice"}'


# --------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("rf", [{"type": "text"}, JSON_OBJECT, PERSON_FORMAT,
                                {"type": "json_schema", "json_schema": {"name": "any", "schema": {}, "description": "d"}}])
def test_protocol_accepts_the_shapes(rf):
    params = GenerateRequestParams.model_validate({"messages": [USER], "response_format": rf})
    assert params.response_format is not None and params.response_format.wire() == rf


@pytest.mark.parametrize(("rf", "field"), [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_object", "json_schema": {"name": "x", "schema": {}}}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\ud800"]}}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "bogus": 1}}, "response_format.json_schema.bogus"),
])
def test_protocol_refuses_bad_shapes_naming_the_field(rf, field):
    with pytest.raises(ValidationError) as err:
        GenerateRequestParams.model_validate({"messages": [USER], "response_format": rf})
    assert [".".join(map(str, e["loc"])) for e in err.value.errors()] == [field]


# --------------------------------------------------------------------------- schema checks
def test_check_canonical_and_any_root():
    reordered = {"type": "json_schema", "json_schema": {"name": "person", "schema": dict(reversed(list(PERSON.items())))}}
    a, b = P.check_response_format(PERSON_FORMAT), P.check_response_format(reordered)
    assert a == b and a.kind == "json_schema" and a.name == "person" and a.schema == PERSON
    assert P.check_response_format({"type": "text"}) is None and P.check_response_format(None) is None
    assert P.check_response_format(JSON_OBJECT).schema == {"type": "object"}
    root = P.check_response_format({"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}})
    assert root.schema == {"type": "integer"}


@pytest.mark.parametrize(("schema", "keyword"), [
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "uniqueItems"),
    ({"type": "object", "not": {"required": ["a"]}}, "not"),
    ({"type": "string", "format": "credit-card"}, "format"),
    ({"minimum": 3}, "minimum"),
])
def test_unsupported_keyword_is_named(schema, keyword):
    with pytest.raises(P.ToolSchemaError) as err:
        P.check_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert err.value.keyword == keyword and err.value.tool == "s"


def test_invalid_schema_and_too_many_branches_have_no_keyword():
    with pytest.raises(P.ToolSchemaError) as err:
        P.check_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "nope"}}})
    assert err.value.keyword is None
    wide = {"anyOf": [{"const": i} for i in range(9)]}
    with pytest.raises(P.ToolSchemaError) as err:
        P.check_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": wide}}, max_branches=8)
    assert err.value.keyword is None and "9 branches" in err.value.reason


def test_validate_response():
    person, obj = P.check_response_format(PERSON_FORMAT), P.check_response_format(JSON_OBJECT)
    assert P.validate_response(person, ALICE) == []
    assert P.validate_response(person, '{"age":130,"color":"blue","name":"A"}')
    assert P.validate_response(person, '{"color":"blue","name":"A"}')
    assert P.validate_response(person, ALICE + " and more")
    assert P.validate_response(obj, '{"a":[1,{"b":null}]}') == [] and P.validate_response(obj, "[1]")
    assert P.validate_response(obj, '{"a":NaN}') and P.validate_response(obj, "Sure!")


# --------------------------------------------------------------------------- the turn's grammar
@pytest.fixture(scope="module")
def compiler():
    import xgrammar

    tok = fake_tokenizer()
    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    return xgrammar.GrammarCompiler(info)


def _accepts(compiler, constraint_json: str, text: str) -> bool:
    """The matcher takes `text` and then the end of turn (the fake tokenizer's <|im_end|>)."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(constraint_json))
    return matcher.accept_string(text) and matcher.accept_token(fake_tokenizer().eos_token_id)


def _program(fmt="default", tools=(), choice="auto", rf=PERSON_FORMAT):
    return P.ToolProgram(FORMATS[fmt], list(tools), tool_choice=choice, response_format=rf)


def test_json_schema_grammar(compiler):
    c = _program().constraint().value
    assert _accepts(compiler, c, ALICE)
    assert not _accepts(compiler, c, '{"age":30,"color":"pink","name":"Alice"}')  # enum
    assert not _accepts(compiler, c, '{"age":121,"color":"blue","name":"Alice"}')  # range
    assert not _accepts(compiler, c, '{"age":30,"color":"blue"}')  # required
    assert not _accepts(compiler, c, '{"age":30,"color":"blue","name":"Alice","x":1}')  # closed
    assert not _accepts(compiler, c, '{"age": 30, "color": "blue", "name": "Alice"}')  # compact
    assert not _accepts(compiler, c, "Here you go: " + ALICE)  # not free text
    assert not _accepts(compiler, c, ALICE + "\nDone.")  # the end of turn right after the value
    assert not _accepts(compiler, c, "")


def test_json_object_grammar(compiler):
    c = _program(rf=JSON_OBJECT).constraint().value
    for good in ("{}", '{"a":[1,{"b":null}],"c":"x"}', '{"k":-1.5e3,"t":true}'):
        assert _accepts(compiler, c, good), good
    for bad in ("[1]", '"x"', "42", "Hello!", '{"a":1', '{"a":1}{"b":2}', '{"a":1} '):
        assert not _accepts(compiler, c, bad), bad


def test_tools_auto_is_calls_or_json(compiler):
    call = FORMATS["default"].call_text("get_weather", {"city": "Paris"})
    auto = _program(tools=[WEATHER]).constraint().value
    assert _accepts(compiler, auto, ALICE) and _accepts(compiler, auto, call)
    assert not _accepts(compiler, auto, "Let me check.")  # no free text
    assert not _accepts(compiler, auto, "Let me check." + call)
    assert not _accepts(compiler, auto, ALICE + call)
    required = _program(tools=[WEATHER], choice="required").constraint().value
    assert _accepts(compiler, required, call) and not _accepts(compiler, required, ALICE)
    none = _program(tools=[WEATHER], choice="none").constraint().value
    assert _accepts(compiler, none, ALICE) and not _accepts(compiler, none, call)


@pytest.mark.parametrize(("fmt", "reasoning"), [("qwen3", "<think>\nFirst, the name.</think>\n\n"), ("qwen3", ""),
                                                ("qwen3-thinking", "First, the name.</think>\n\n")])
def test_reasoning_comes_before_the_json(compiler, fmt, reasoning):
    c = _program(fmt).constraint().value
    assert _accepts(compiler, c, reasoning + ALICE)
    assert not _accepts(compiler, c, reasoning + "Alice, 30.")
    call = FORMATS[fmt].call_text("get_weather", {"city": "Paris"})
    auto = _program(fmt, tools=[WEATHER]).constraint().value
    assert _accepts(compiler, auto, reasoning + ALICE) and _accepts(compiler, auto, reasoning + call)


@pytest.mark.parametrize("fmt", ["qwen25", "hermes", "llama3", "mistral", "deepseekv3"])
def test_every_format_compiles_with_a_response_format(compiler, fmt):
    call = FORMATS[fmt].call_text("get_weather", {"city": "Paris"})
    auto = _program(fmt, tools=[WEATHER]).constraint().value
    assert _accepts(compiler, auto, ALICE) and _accepts(compiler, auto, call)
    assert not _accepts(compiler, auto, "Sure.")


def test_parser_in_auto_mode_reads_json_holding_the_trigger_as_text():
    """A JSON answer whose string holds the call trigger is text; a call is still a call."""
    prog = _program(tools=[WEATHER], rf=JSON_OBJECT)
    answer = '{"note":"write <tool_call> to call"}'
    for step in (1, 7, 1000):
        parser = P.StreamParser(prog)
        events = []
        text = answer + "<|im_end|>"
        for i in range(0, len(text), step):
            events += parser.feed(text[i:i + step])
        events += parser.finish()
        assert "".join(e.text for e in events if isinstance(e, P.TextDelta)) == answer
        assert not [e for e in events if not isinstance(e, P.TextDelta)]
    parser = P.StreamParser(prog)
    events = parser.feed(FORMATS["default"].call_text("get_weather", {"city": "Paris"}) + "<|im_end|>") + parser.finish()
    assert [(e.name, e.arguments) for e in events if isinstance(e, P.ToolCallEvent)] == [("get_weather", {"city": "Paris"})]


# --------------------------------------------------------------------------- /v1 on the fake backend
@pytest_asyncio.fixture
async def client(fake_server, fake):
    addr, _ = fake_server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="anything", max_retries=0) as c:
        yield c


async def _create(client, **kwargs):
    return await client.chat.completions.create(model="m", messages=[USER], **kwargs)


async def test_v1_json_schema_content_and_the_constraint_sent(client, fake, compiler):
    fake.replies.append(ALICE)
    r = await _create(client, response_format=PERSON_FORMAT)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    constraint = fake.requests[-1].sampling.constraint
    assert constraint.kind == "structural_tag" and json.loads(constraint.value)["format"]["type"] == "grammar"
    assert _accepts(compiler, constraint.value, ALICE)
    assert not _accepts(compiler, constraint.value, '{"age":30,"color":"pink","name":"Alice"}')


async def test_v1_json_object_streamed(client, fake, compiler):
    fake.replies.append('{"answer":"yes","n":[1,2]}')
    stream = await _create(client, response_format=JSON_OBJECT, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert json.loads(text) == {"answer": "yes", "n": [1, 2]}
    constraint = fake.requests[-1].sampling.constraint.value
    assert _accepts(compiler, constraint, text) and not _accepts(compiler, constraint, "[1,2]")


async def test_v1_text_format_is_unconstrained(client, fake):
    fake.replies.append("Plain words.")
    r = await _create(client, response_format={"type": "text"})
    assert r.choices[0].message.content == "Plain words." and fake.requests[-1].sampling.constraint is None


async def test_v1_tools_auto_gives_calls_or_json(client, fake, compiler):
    fake.replies.append(fake.call_text("get_weather", {"city": "Paris"}))
    r = await _create(client, tools=[WEATHER], response_format=PERSON_FORMAT)
    call = r.choices[0].message.tool_calls[0]
    assert r.choices[0].finish_reason == "tool_calls" and json.loads(call.function.arguments) == {"city": "Paris"}
    constraint = json.loads(fake.requests[-1].sampling.constraint.value)
    assert constraint["format"]["type"] == "or"
    fake.replies.append(ALICE)
    r = await _create(client, tools=[WEATHER], response_format=PERSON_FORMAT)
    assert r.choices[0].finish_reason == "stop" and json.loads(r.choices[0].message.content) == json.loads(ALICE)
    assert _accepts(compiler, fake.requests[-1].sampling.constraint.value, ALICE)


async def test_v1_output_is_validated_after_the_turn(client, fake):
    """The fake backend ignores the constraint: text that is not the format fails the turn."""
    fake.replies.append("Alice likes blue.")
    with pytest.raises(openai.InternalServerError) as err:
        await _create(client, response_format=JSON_OBJECT)
    assert "response_format" in err.value.message and "not one JSON value" in err.value.message
    fake.replies.append('{"age":300,"color":"blue","name":"Alice"}')
    with pytest.raises(openai.InternalServerError) as err:
        await _create(client, response_format=PERSON_FORMAT)
    assert "age" in err.value.message


async def test_v1_cut_json_ends_with_length_not_an_error(client, fake):
    fake.replies.append(ALICE)
    r = await _create(client, response_format=PERSON_FORMAT, max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content == ALICE[:5]


@pytest.mark.parametrize(("rf", "param"), [
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}, "response_format"),
])
async def test_v1_bad_shapes_are_400_naming_the_field(client, fake, rf, param):
    before = len(fake.requests)
    with pytest.raises(openai.BadRequestError) as err:
        await _create(client, response_format=rf)
    assert err.value.param == param and err.value.body["type"] == "invalid_request_error"
    assert len(fake.requests) == before  # refused before the engine


async def test_v1_unsupported_keyword_is_400_naming_it(client, fake):
    before = len(fake.requests)
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True}}}
    with pytest.raises(openai.BadRequestError) as err:
        await _create(client, response_format={"type": "json_schema", "json_schema": {"name": "tagged", "schema": schema}})
    assert err.value.param == "response_format" and err.value.code == "unsupported_tool_schema"
    assert "uniqueItems" in err.value.message and "#/properties/tags" in err.value.message
    assert len(fake.requests) == before  # refused before the engine


async def test_v1_schema_size_and_branches_are_bounded(client, fake, cfg):
    big = {"type": "string", "description": "x" * (cfg.max_tools_bytes + 1)}
    with pytest.raises(openai.BadRequestError) as err:
        await _create(client, response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": big}})
    assert err.value.param == "response_format" and "max_tools_bytes" in err.value.message
    wide = {"anyOf": [{"const": i} for i in range(cfg.max_schema_branches + 1)]}
    with pytest.raises(openai.BadRequestError) as err:
        await _create(client, response_format={"type": "json_schema", "json_schema": {"name": "wide", "schema": wide}})
    assert err.value.param == "response_format" and "max_schema_branches" in err.value.message


# --------------------------------------------------------------------------- /ws on the fake backend
async def test_ws_session_turns_each_give_their_own_format(fake_server, fake, compiler):
    addr, _ = fake_server
    async with connect(addr) as c:
        opened, _ = await c.call("session.open", {"system_prompt": "You answer in JSON.", "tools": [WEATHER]})
        sid = opened["result"]["session_id"]
        fake.replies.append(ALICE)
        r, notes = await c.call("generate", {"session_id": sid, "messages": [USER], "response_format": PERSON_FORMAT})
        assert json.loads(r["result"]["text"]) == json.loads(ALICE) and r["result"]["finish_reason"] == "stop"
        assert "".join(n["params"]["text"] for n in notes if n["method"] == "text_chunk") == ALICE
        assert _accepts(compiler, fake.requests[-1].sampling.constraint.value, ALICE)
        fake.replies.append("Anything else?")
        r, _ = await c.call("generate", {"session_id": sid, "messages": [{"role": "user", "content": "Thanks"}]})
        assert r["result"]["text"] == "Anything else?"
        assert json.loads(fake.requests[-1].sampling.constraint.value)["format"]["type"] == "sequence"  # text, then calls
        assert ALICE in fake.tokenizer.decode(fake.requests[-1].input_ids)  # the JSON turn is in the history
        schema = {"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}
        r, notes = await c.call("generate", {"session_id": sid, "messages": [USER], "response_format": {
            "type": "json_schema", "json_schema": {"name": "cond", "schema": schema}}})
        assert r["error"]["code"] == -32003
        assert r["error"]["data"] == {"tool": "cond", "keyword": "if", "field": "response_format"}
        assert notes[-1]["params"]["finish_reason"] == "error"


# --------------------------------------------------------------------------- the real engine
@pytest_asyncio.fixture
async def engine_client(server):
    addr, _ = server
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="anything", max_retries=0) as c:
        yield c


PERSON_PROMPT = [{"role": "system", "content": "You reply with JSON only."},
                 {"role": "user", "content": "Describe Alice: her favourite color is blue and she is 30 years old."}]


@pytest.mark.engine
async def test_engine_json_schema(engine_client):
    r = await engine_client.chat.completions.create(model="m", messages=PERSON_PROMPT, response_format=PERSON_FORMAT,
                                                    max_completion_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PERSON)


@pytest.mark.engine
async def test_engine_json_object(engine_client):
    messages = [{"role": "system", "content": "You reply with a JSON object only."},
                {"role": "user", "content": 'Give the capital of France as {"capital": ...}.'}]
    r = await engine_client.chat.completions.create(model="m", messages=messages, response_format=JSON_OBJECT,
                                                    max_completion_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


@pytest.mark.engine
async def test_engine_json_schema_with_tools_auto(engine_client):
    r = await engine_client.chat.completions.create(model="m", messages=PERSON_PROMPT, tools=[WEATHER], tool_choice="auto",
                                                    response_format=PERSON_FORMAT, max_completion_tokens=96)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        for call in choice.message.tool_calls:
            assert call.function.name == "get_weather"
            jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    else:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_chat_backend_refuses_a_response_format():
    """A chat backend's own server decodes: there is no constraint to hold the JSON, so -32602."""
    from protocol import errors as rpc
    from runtime.prompts import checked_response_format

    with pytest.raises(rpc.InvalidParams) as err:
        checked_response_format(JSON_OBJECT, 1 << 20, 64, chat_backend=True)
    assert err.value.data["errors"][0]["field"] == "response_format"
    assert checked_response_format({"type": "text"}, 1 << 20, 64, chat_backend=True) is None
    assert checked_response_format(PERSON_FORMAT, 1 << 20, 64).kind == "json_schema"
