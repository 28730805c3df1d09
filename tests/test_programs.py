"""The tool-call program without the engine: schemas, canonical rendering, segments, constraint
grammar (xgrammar matcher on the real tokenizer), and the stream parser on hand-written outputs."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest

import programs as P
from programs.formats import FORMATS

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "filters": {
                    "type": "object",
                    "properties": {"site": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
                    "required": ["tags"],
                },
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
            },
            "required": ["query", "filters"],
        },
    },
}
TOOLS = [WEATHER, SEARCH]


def _reordered(value):
    """The same JSON with every object's keys in reverse order."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reordered(v) for v in value]
    return value


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from runtime.config import load_config
    from runtime.model_store import ensure_default_model

    path = ensure_default_model(load_config(env={}, dotenv_path=None).cache_dir)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def fmt(tok):
    return P.format_for(tok)


@pytest.fixture(scope="module")
def renderer(tok, fmt):
    return P.Renderer(tok, fmt)


# ---------------------------------------------------------------------------- schemas
@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_default_model_gets_default_format(fmt):
    assert fmt.name == "default" and fmt.detector == "hermes" and not fmt.template_tools


def test_check_tools_returns_canonical_and_rejects_duplicates():
    out = P.check_tools(TOOLS)
    assert [t["function"]["name"] for t in out] == ["get_weather", "search"]
    assert out == P.check_tools(_reordered(list(reversed(TOOLS))))
    with pytest.raises(P.ToolSchemaError) as e:
        P.check_tools([WEATHER, copy.deepcopy(WEATHER)])
    assert e.value.tool == "get_weather" and "duplicate" in e.value.reason


def test_invalid_schema_has_no_keyword():
    bad = copy.deepcopy(WEATHER)
    bad["function"]["parameters"]["properties"]["city"]["type"] = "text"  # not a JSON type
    with pytest.raises(P.ToolSchemaError) as e:
        P.check_tools([bad])
    assert e.value.keyword is None and e.value.tool == "get_weather"
    assert "JSON Schema" in e.value.reason


def test_malformed_tool_and_name():
    with pytest.raises(P.ToolSchemaError):
        P.check_tools([{"type": "function", "function": {"name": "has space", "parameters": {"type": "object"}}}])
    with pytest.raises(P.ToolSchemaError):
        P.check_tools([{"type": "retrieval"}])
    with pytest.raises(P.ToolSchemaError) as e:
        P.check_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}])
    assert e.value.keyword == "type"


def _tool(prop_schema, **extra):
    params = {"type": "object", "properties": {"x": prop_schema}, "required": ["x"], **extra}
    return {"type": "function", "function": {"name": "f", "parameters": params}}


@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 1}}, "contains"),
        ({"type": "integer", "not": {"const": 3}}, "not"),
        ({"type": "integer", "if": {"minimum": 3}, "then": {"maximum": 5}}, "if"),
        ({"allOf": [{"type": "integer"}, {"type": "integer", "minimum": 3}]}, "allOf"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),
        ({"type": "number", "multipleOf": 0.5}, "multipleOf"),
        ({"type": "integer", "multipleOf": 5, "minimum": 10}, "multipleOf"),
        ({"minimum": 3}, "minimum"),
        ({"type": "string", "pattern": "^[a-z]+$", "minLength": 2}, "minLength"),
        ({"type": "string", "format": "color"}, "format"),
        ({"type": "string", "pattern": "^(?!a).*$"}, "pattern"),
        ({"type": "string", "pattern": "^(a)\\1$"}, "pattern"),
        ({"type": "string", "enum": ["a", 1]}, "enum"),
        ({"$ref": "https://example.com/s.json"}, "$ref"),
        ({"$dynamicRef": "#node"}, "$dynamicRef"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
        ({"type": "object", "additionalProperties": {"type": "integer"}, "required": ["a"]}, "required"),
    ],
)
def test_unsupported_keyword_is_named(schema, keyword):
    with pytest.raises(P.ToolSchemaError) as e:
        P.check_tools([_tool(schema)])
    assert e.value.keyword == keyword
    assert e.value.tool == "f"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "string", "enum": ["a", "b"]},
        {"type": "string", "pattern": "^[0-9]{3}$"},
        {"type": "string", "format": "date"},
        {"type": "string", "minLength": 1, "maxLength": 5},
        {"type": "integer", "minimum": 1, "maximum": 10},
        {"type": "integer", "multipleOf": 3},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        {"type": ["string", "null"]},
        {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        {"oneOf": [{"type": "string"}, {"type": "null"}]},
        {"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}, "required": ["k"]},
                   {"type": "object", "properties": {"k": {"const": "b"}}, "required": ["k"]}]},
        {"allOf": [{"type": "integer", "minimum": 2}]},
        {"$ref": "#/$defs/T"},
    ],
)
def test_supported_keywords_pass(schema):
    tool = _tool(schema)
    tool["function"]["parameters"]["$defs"] = {"T": {"type": "integer"}}
    assert P.check_tools([tool])


# The measurement behind UNSUPPORTED_KEYWORDS: xgrammar accepts these schemas but lets an
# instance through that the schema forbids. If a new xgrammar enforces one, this test fails
# and the keyword can be allowed.
@pytest.mark.parametrize(
    "schema, violating",
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}}, [1]),
        ({"type": "integer", "not": {"const": 3}}, 3),
        ({"type": "integer", "if": {"minimum": 10}, "then": {"maximum": 12}, "else": {"maximum": 3}}, 5),
        ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, 1),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, 1),
        ({"type": "number", "multipleOf": 0.5}, 1.3),
        ({"minimum": 5}, 2),
        ({"type": "object", "additionalProperties": {"type": "integer"}, "required": ["a"]}, {"b": 1}),
    ],
)
def test_xgrammar_really_ignores_rejected_keywords(schema, violating):
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    root = {"type": "object", "properties": {"x": schema}, "required": ["x"]}
    grammar = xgrammar.Grammar.from_json_schema(json.dumps(root), any_whitespace=False, separators=(",", ":"))
    assert _is_grammar_accept_string(grammar, json.dumps({"x": violating}, separators=(",", ":")))


def test_validate_arguments():
    assert P.validate_arguments(WEATHER, {"city": "Paris", "unit": "celsius"}) == []
    errors = P.validate_arguments(WEATHER, {"city": "Paris", "unit": "kelvin"})
    assert len(errors) == 1 and errors[0].startswith("unit:")
    assert P.validate_arguments(WEATHER, {"unit": "celsius"})


# ---------------------------------------------------------------------------- rendering
@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_canonical_prefix_ignores_key_and_tool_order(renderer):
    a = renderer.prefix_ids("You are a bot.", TOOLS)
    b = renderer.prefix_ids("You are a bot.", _reordered(list(reversed(TOOLS))))
    assert a == b
    assert a != renderer.prefix_ids("You are a bot.", [WEATHER])


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_prefix_holds_system_and_tools(renderer, tok):
    text = tok.decode(renderer.prefix_ids("You are a bot.", TOOLS))
    assert text.startswith("<|im_start|>system\nYou are a bot.\n\n# Tools")
    assert '"name":"get_weather"' in text and text.endswith("</tool_call><|im_end|>")
    # no tools, no system prompt: the template's own default system message
    assert "SmolLM" in tok.decode(renderer.prefix_ids(None, []))


HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"call_id": "c1", "name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}},
                    {"call_id": "c2", "name": "search", "arguments": {"query": "Paris news", "filters": {"tags": ["news"]}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 18}'},
    {"role": "tool", "tool_call_id": "c2", "content": "Nothing new."},
    {"role": "assistant", "content": "It is 18 degrees in Paris."},
    {"role": "user", "content": "Thanks! And in Rome?"},
]


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_prefix_is_prefix_of_full(renderer):
    prefix = renderer.prefix_ids("You are a bot.", TOOLS)
    full = renderer.full_ids("You are a bot.", TOOLS, HISTORY)
    assert full[: len(prefix)] == prefix and len(full) > len(prefix)


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_session_append_equals_stateless(renderer, tok):
    system = "You are a bot."
    session = renderer.prefix_ids(system, TOOLS)
    session += renderer.turn_ids(HISTORY[:1], close_previous=False)
    session += renderer.assistant_ids(HISTORY[1])  # what the model wrote, canonically tokenized
    assert session[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    session += renderer.turn_ids(HISTORY[2:4], close_previous=False)
    session += renderer.assistant_ids(HISTORY[4])
    session += renderer.turn_ids(HISTORY[5:], close_previous=False)
    assert session == renderer.full_ids(system, TOOLS, HISTORY)
    # ... and segment-by-segment tokenization is the tokenization of the whole text
    whole = "".join(renderer.segments(system, TOOLS, HISTORY))
    assert session == tok.encode(whole, add_special_tokens=False)


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_stateless_equals_the_chat_template(renderer, tok):
    """The segments are the model's own chat template (ChatML) with the project's tool block."""
    system = "You are a bot.\n\n" + renderer.tools_block(TOOLS)
    messages = renderer._template_messages([{"role": "system", "content": system}] + HISTORY)
    expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert "".join(renderer.segments("You are a bot.", TOOLS, HISTORY)) == expected
    assert '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>\n<tool_call>' in expected
    assert "<|im_start|>user\n<tool_response>\n" in expected


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_close_previous_emits_end_of_turn(renderer, tok):
    msgs = [{"role": "user", "content": "go on"}]
    closed = renderer.turn_ids(msgs, close_previous=True)
    assert closed == renderer.end_of_turn_ids + renderer.turn_ids(msgs, close_previous=False)
    assert tok.decode(closed).startswith("<|im_end|>\n<|im_start|>user\ngo on<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_history_must_end_with_user_or_tool(renderer):
    with pytest.raises(P.RenderError):
        renderer.full_ids(None, TOOLS, HISTORY[:2])


# ---------------------------------------------------------------------------- constraint
@pytest.fixture(scope="module")
def compiler(tok):
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok), stop_token_ids=[tok.eos_token_id])
    return xgrammar.GrammarCompiler(info)


def _accepts(compiler, program, text, *, end=True):
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_structural_tag(program.constraint().value))
    if not matcher.accept_string(text):
        return False
    return matcher.accept_token(2) if end else True  # 2 = <|im_end|>, the stop token


CALL_W = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}</tool_call>'
CALL_S = '<tool_call>{"name":"search","arguments":{"filters":{"tags":["a"]},"query":"q"}}</tool_call>'


def _parallel(fmt):
    """The default format with parallel calls allowed (its registry entry caps a turn at one)."""
    return dataclasses.replace(fmt, max_calls=None)


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_default_format_holds_one_call_per_turn(compiler, fmt):
    prog = P.ToolProgram(fmt, TOOLS, tool_choice="required", parallel_tool_calls=True)
    assert prog.max_calls == 1
    assert _accepts(compiler, prog, CALL_W)
    assert not _accepts(compiler, prog, CALL_W + "\n", end=False)


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_required_constraint(compiler, fmt):
    prog = P.ToolProgram(_parallel(fmt), TOOLS, tool_choice="required")
    assert prog.constraint().kind == "structural_tag"
    assert _accepts(compiler, prog, CALL_W)
    assert _accepts(compiler, prog, CALL_W + "\n" + CALL_S)
    assert not _accepts(compiler, prog, "")  # at least one call
    assert not _accepts(compiler, prog, "Sure." + CALL_W, end=False)  # no text
    assert not _accepts(compiler, prog, CALL_W + "Done.", end=False)  # the turn ends after the calls
    assert not _accepts(compiler, prog, CALL_W.replace('"city":"Paris"', '"city": "Paris"'), end=False)  # compact
    assert not _accepts(compiler, prog, CALL_W.replace("celsius", "kelvin"), end=False)  # schema held


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_single_call_and_named_constraint(compiler, fmt):
    single = P.ToolProgram(_parallel(fmt), TOOLS, tool_choice="required", parallel_tool_calls=False)
    assert _accepts(compiler, single, CALL_W)
    assert not _accepts(compiler, single, CALL_W + "\n", end=False)
    named = P.ToolProgram(_parallel(fmt), TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
    assert _accepts(compiler, named, CALL_S)
    assert not _accepts(compiler, named, CALL_W, end=False)
    assert not _accepts(compiler, named, CALL_S + "\n", end=False)  # a named choice is one call


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_auto_and_none_constraint(compiler, fmt):
    auto = P.ToolProgram(_parallel(fmt), TOOLS, tool_choice="auto")
    assert _accepts(compiler, auto, "Hello! How can I help?")
    assert _accepts(compiler, auto, CALL_W + "\n" + CALL_S)
    assert _accepts(compiler, auto, CALL_W)
    assert _accepts(compiler, auto, "Let me check.\n" + CALL_W)
    assert not _accepts(compiler, auto, CALL_W + " more text", end=False)
    none = P.ToolProgram(fmt, TOOLS, tool_choice="none")
    assert _accepts(compiler, none, "Plain <b>text</b>.")
    assert not _accepts(compiler, none, "x <tool_call>", end=False)
    assert P.ToolProgram(fmt, [], tool_choice="auto").constraint() is None


def test_bad_tool_choice():
    with pytest.raises(ValueError):
        P.ToolProgram(FORMATS["default"], TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError):
        P.ToolProgram(FORMATS["default"], [], tool_choice="required")
    with pytest.raises(ValueError):
        P.ToolProgram(FORMATS["default"], TOOLS, tool_choice="sometimes")


@pytest.mark.parametrize("name", ["default", "qwen25", "hermes", "llama3", "mistral", "deepseekv3"])
def test_each_format_call_syntax_parses_back(name):
    """What the constraint makes a model write, the format's SGLang detector parses back."""
    fmt = FORMATS[name]
    out = fmt.call_text("search", S_ARGS) + (fmt.end_of_turn or "<|im_end|>")
    for step in (1, 10_000):
        text, calls, bad = _summary(_parse(P.ToolProgram(fmt, TOOLS, tool_choice="required"), out, step))
        assert calls == [("search", S_ARGS)] and bad == [] and text.strip() == "", (name, step, text, bad)


@pytest.mark.parametrize("name", ["qwen25", "hermes", "llama3", "mistral", "deepseekv3"])
@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_template_format_constraints_compile(compiler, name):
    fmt = FORMATS[name]
    for choice in ("auto", "required", "none", {"type": "function", "function": {"name": "search"}}):
        prog = P.ToolProgram(fmt, TOOLS, tool_choice=choice)
        compiler.compile_structural_tag(prog.constraint().value)
    assert _accepts(compiler, P.ToolProgram(fmt, TOOLS, tool_choice="required"), fmt.call_text("search", S_ARGS))


def test_registry_detectors_exist():
    from runtime.sglang_adapter import prepare

    prepare()
    from sglang.srt.function_call.function_call_parser import FunctionCallParser

    for fmt in FORMATS.values():
        assert fmt.detector in FunctionCallParser.ToolCallParserEnum, fmt.name


# A chat template in the style of Qwen2.5's (tools in the system block, <tool_call> history,
# tool results grouped in one user message), to exercise the template_tools path offline.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_style(tok):
    t = copy.copy(tok)
    t.chat_template = QWEN_STYLE_TEMPLATE
    return t


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_template_format_detection_and_rendering(qwen_style):
    fmt = P.format_for(qwen_style)
    assert fmt.name == "qwen25"
    r = P.Renderer(qwen_style, fmt)
    system = "You are a bot."
    prefix = r.prefix_text(system, TOOLS)
    assert prefix.startswith("<|im_start|>system\nYou are a bot.\n\n# Tools") and prefix.endswith("</tools><|im_end|>")
    assert r.prefix_ids(system, TOOLS) == r.prefix_ids(system, _reordered(list(reversed(TOOLS))))
    history = copy.deepcopy(HISTORY)
    history[1]["tool_calls"] = history[1]["tool_calls"][:1]  # this format's turn holds one call
    history[2:4] = history[2:3]
    segments = r.segments(system, TOOLS, history)
    # the segments are the template's own rendering of the whole history ...
    messages = [{"role": "system", "content": system}] + r._template_messages(history)
    expected = qwen_style.apply_chat_template(messages, tools=P.canonical_tools(TOOLS), tokenize=False,
                                              add_generation_prompt=True)
    assert "".join(segments) == expected
    # ... and the assistant call is exactly what the constraint makes the model write
    call = history[1]["tool_calls"][0]
    assert r.assistant_text(history[1]) == fmt.call_text(call["name"], call["arguments"]) + "<|im_end|>"
    # session append == stateless, token for token
    session = r.prefix_ids(system, TOOLS) + r.turn_ids(history[:1], close_previous=False)
    session += r.assistant_ids(history[1]) + r.turn_ids(history[2:3], close_previous=False)
    session += r.assistant_ids(history[3]) + r.turn_ids(history[4:], close_previous=False)
    assert session == r.full_ids(system, TOOLS, history)
    assert session == qwen_style.encode(expected, add_special_tokens=False)


# ---------------------------------------------------------------------------- parser
def _parse(program, text, step):
    parser = P.StreamParser(program)
    events = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    events += parser.finish()
    return events


def _summary(events):
    text = "".join(e.text for e in events if isinstance(e, P.TextDelta))
    calls = [(e.name, e.arguments) for e in events if isinstance(e, P.ToolCallEvent)]
    bad = [e.reason for e in events if isinstance(e, P.InvalidOutput)]
    return text, calls, bad


W_ARGS = {"city": "Paris", "unit": "celsius"}
S_ARGS = {"filters": {"tags": ["a"]}, "query": "q"}


@pytest.mark.parametrize("step", [1, 3, 7, 10_000])
@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_parser_default_format(fmt, step):
    prog = P.ToolProgram(_parallel(fmt), TOOLS, tool_choice="auto", end_of_turn="<|im_end|>")
    text, calls, bad = _summary(_parse(prog, "Let me check.\n" + CALL_W + "\n" + CALL_S + "<|im_end|>", step))
    assert text == "Let me check.\n"
    assert calls == [("get_weather", W_ARGS), ("search", S_ARGS)]
    assert bad == []


@pytest.mark.parametrize("step", [1, 4, 10_000])
@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_parser_text_only(fmt, step):
    prog = P.ToolProgram(fmt, TOOLS, tool_choice="auto")
    text, calls, bad = _summary(_parse(prog, "The answer is 2 < 3 and <tool is not a call.<|im_end|>", step))
    assert text == "The answer is 2 < 3 and <tool is not a call."
    assert calls == [] and bad == []


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_parser_calls_are_emitted_as_soon_as_complete(fmt):
    parser = P.StreamParser(P.ToolProgram(fmt, TOOLS, tool_choice="required"))
    events = []
    for ch in CALL_W:
        events += parser.feed(ch)
    assert [type(e) for e in events] == [P.ToolCallEvent]
    assert parser.feed("<|im_end|>") == [] and parser.finish() == []


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_parser_none_mode_never_calls(fmt):
    prog = P.ToolProgram(fmt, TOOLS, tool_choice="none")
    text, calls, bad = _summary(_parse(prog, CALL_W + "<|im_end|>", 2))
    assert calls == [] and bad == [] and text == CALL_W


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_parser_reports_bad_and_truncated_calls(fmt):
    prog = P.ToolProgram(fmt, TOOLS, tool_choice="required")
    _, calls, bad = _summary(_parse(prog, CALL_W + "\n" + CALL_S, 5))  # more calls than the turn allows
    assert calls == [("get_weather", W_ARGS)] and any("exceeds" in b for b in bad)
    _, calls, bad = _summary(_parse(prog, CALL_W.replace("celsius", "kelvin"), 5))
    assert calls == [] and any("schema" in b for b in bad)
    _, calls, bad = _summary(_parse(prog, CALL_W[:40], 5))
    assert calls == [] and any("incomplete" in b for b in bad)
    named = P.ToolProgram(fmt, TOOLS, tool_choice={"type": "function", "function": {"name": "search"}})
    _, calls, bad = _summary(_parse(named, CALL_W, 5))
    assert calls == [] and bad


@pytest.mark.engine  # the default model's tokenizer (materializes the model)
def test_truncated_call_is_not_logged_as_an_error(fmt, caplog):
    # A call cut off by max_tokens is an ordinary 'length' finish: SGLang's detector must not
    # put an ERROR line in the host's log for it.
    prog = P.ToolProgram(fmt, TOOLS, tool_choice="required")
    with caplog.at_level(logging.DEBUG):
        _, calls, bad = _summary(_parse(prog, CALL_W[:19], 5))
    assert calls == [] and bad
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert logging.getLogger("sglang.srt.function_call").level == logging.NOTSET  # restored


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_parser_qwen25(step):
    prog = P.ToolProgram(FORMATS["qwen25"], TOOLS, tool_choice="auto")
    out = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "search", "arguments": {"filters": {"tags": ["a"]}, "query": "q"}}\n</tool_call><|im_end|>'
    )
    text, calls, bad = _summary(_parse(prog, out, step))
    assert text.strip() == "Sure."
    assert calls == [("get_weather", W_ARGS), ("search", S_ARGS)] and bad == []


@pytest.mark.parametrize("step", [1, 5, 10_000])
def test_parser_llama3(step):
    prog = P.ToolProgram(FORMATS["llama3"], TOOLS, tool_choice="required")
    out = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}<|eot_id|>'
    text, calls, bad = _summary(_parse(prog, out, step))
    assert calls == [("get_weather", W_ARGS)] and bad == [] and text.strip() == ""


def test_parser_llama3_text():
    prog = P.ToolProgram(FORMATS["llama3"], TOOLS, tool_choice="auto")
    text, calls, bad = _summary(_parse(prog, "Paris is sunny today.<|eot_id|>", 3))
    assert text == "Paris is sunny today." and calls == [] and bad == []
