"""Model-family conformance from fixtures nobody here wrote: canitoolcall's recorded model outputs.

canitoolcall (PyPI, pinned in the `test` extra) ships 469 fixtures of raw model output for nine
families, each with the tools offered and the parse a correct engine returns (content,
reasoning, tool calls), or the error a correct engine reports. Each fixture is run through this
project's parse path (programs.StreamParser of a ToolProgram in `auto` mode on the format that
serves the fixture's model) whole, and streamed under several chunkings, and judged by
canitoolcall's own checks (canitoolcall.pytest_plugin.assert_conforms / assert_equivalent).

The fixtures' token ids need the models' tokenizers, which are not available offline, so the
streams split the text: at the family's special-token markers (what the `special` strategy
does with ids), per character, and in seeded random groups of 1 to 8 characters (canitoolcall's
`char` strategies, which also cut inside tokens, so they are stricter than token chunkings).

SUPPORTED maps each fixture's reference model to the format that serves it; a model with no
entry is reported unsupported (UNSUPPORTED says why), never half-parsed: the test checks that
no fixture falls between the two.
"""

from __future__ import annotations

import functools
import json
import re

import pytest

import programs as P
from programs.formats import FORMATS, UNSUPPORTED_FAMILIES

FAMILY_REASONS = {name: reason for name, (_markers, reason) in UNSUPPORTED_FAMILIES.items()}

canitoolcall = pytest.importorskip("canitoolcall")
from canitoolcall.chunking import ChunkStrategy, split_text  # noqa: E402
from canitoolcall.fixtures import Fixture, load_fixtures  # noqa: E402
from canitoolcall.pytest_plugin import assert_conforms, assert_equivalent, family_for  # noqa: E402
from canitoolcall.results import ParsedToolCall, ParseResult  # noqa: E402

# (family, substring of the reference model) -> format name; first match wins.
SUPPORTED: list[tuple[str, str, str]] = [
    ("qwen3-hermes", "Thinking-2507", "qwen3-thinking"),
    ("qwen3-hermes", "Instruct-2507", "qwen25"),  # no thinking: Qwen2.5's syntax and template markers
    ("qwen3-hermes", "Qwen3-", "qwen3"),
    ("deepseek", "DeepSeek-V3-0324", "deepseekv3"),
    ("llama", "Llama-3", "llama3"),
    ("mistral", "Mistral-7B-Instruct-v0.3", "mistral"),
]

# (family, substring of the reference model) -> why the runtime does not claim it.
UNSUPPORTED: list[tuple[str, str, str]] = [
    *[(family, "", reason) for family, reason in (
        ("qwen3-xml", FAMILY_REASONS["qwen3-coder"]), ("gpt-oss", FAMILY_REASONS["gpt-oss"]),
        ("glm", FAMILY_REASONS["glm"]), ("kimi", FAMILY_REASONS["kimi"]), ("gemma4", FAMILY_REASONS["gemma4"]))],
    ("deepseek", "DeepSeek-V3.", "DeepSeek V3.1+ call syntaxes: no format here"),
    ("deepseek", "DeepSeek-V4", FAMILY_REASONS["deepseek-v3.1+"]),
    ("llama", "Llama-4", "Llama 4 pythonic calls: SGLang's pythonic detector refuses identifiers with a leading "
     "underscore (the 'pythonic' format stays parse-only, unclaimed)"),
    ("mistral", "", "Mistral's [TOOL_CALLS]name[ARGS]{...} syntax (v11+ tokenizers) and [THINK] reasoning: no format here"),
]

STRATEGIES = ("one", "markers", "char:0", "char:1", "char:2", "char:3")


def _unsupported(fixture: Fixture) -> str | None:
    for family, model, reason in UNSUPPORTED:
        if fixture.family == family and model in fixture.reference_model:
            return reason
    return None


def _format_for(fixture: Fixture) -> str | None:
    for family, model, name in SUPPORTED:
        if fixture.family == family and model in fixture.reference_model:
            return name
    return None


def _text(fixture: Fixture, fmt: P.ToolFormat) -> str:
    """The output as the runtime's parser sees it: the fixture ends before the stop token; a
    harmony call ends with <|call|> (a stop token the parser keeps), anything else with the
    end-of-turn token (which the parser removes). A truncated output has no stop token."""
    text = fixture.raw_output
    if fixture.truncated:
        return text
    if fmt.stop_texts:
        start = text.rfind("<|start|>")
        header = (text[start:] if start >= 0 else text).split("<|message|>", 1)[0]
        if " to=" in f" {header}":
            return text + fmt.stop_texts[0]
    return text + (fmt.end_of_turn or "<|im_end|>")


def _chunks(text: str, strategy: str, markers: list[str]) -> list[str]:
    if strategy == "one":
        return [text]
    if strategy == "markers":
        if not markers:
            return [text]
        pattern = "(" + "|".join(re.escape(m) for m in sorted(markers, key=len, reverse=True)) + ")"
        return [p for p in re.split(pattern, text) if p]
    return split_text(text, ChunkStrategy.parse(strategy))


@functools.cache
def _admitted(fixture_id: str) -> bool:
    """Whether the turn's constraint (tool_choice auto) lets the model write this output."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    fixture = BY_ID[fixture_id]
    program = P.ToolProgram(FORMATS[_format_for(fixture)], list(fixture.tools), tool_choice="auto")  # type: ignore[index]
    constraint = program.constraint()
    if constraint is None:
        return True
    # a truncated output (cut by max_tokens) is admitted when the constraint admits it as a prefix
    return _is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(constraint.value), fixture.raw_output,
                                     require_termination=not fixture.truncated)


def _parse(fixture: Fixture, fmt: P.ToolFormat, chunks: list[str]) -> ParseResult:
    program = P.ToolProgram(fmt, list(fixture.tools), tool_choice="auto")
    parser = P.StreamParser(program)
    events: list[P.Event] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.finish()
    content = "".join(e.text for e in events if isinstance(e, P.TextDelta))
    reasoning = "".join(e.text for e in events if isinstance(e, P.ReasoningDelta))
    calls = [ParsedToolCall(e.name, json.dumps(e.arguments, ensure_ascii=False)) for e in events if isinstance(e, P.ToolCallEvent)]
    # The runtime's policy (runtime/turn.py): an InvalidOutput ends the turn with an error (an
    # exception here), except after a `length` finish (a truncated output), which ends with no call.
    bad = [e.reason for e in events if isinstance(e, P.InvalidOutput) and not fixture.truncated]
    return ParseResult(content=content or None, reasoning_content=reasoning or None, tool_calls=tuple(calls),
                       exception=f"InvalidOutput: {'; '.join(bad)}" if bad else None)


FIXTURES = load_fixtures()
CASES = [f for f in FIXTURES if _format_for(f) is not None]
BY_ID = {f.id: f for f in FIXTURES}


def test_every_fixture_is_supported_or_declared_unsupported():
    assert len(FIXTURES) > 400
    for fixture in FIXTURES:
        name = _format_for(fixture)
        if name is None:
            assert _unsupported(fixture), f"{fixture.id}: neither supported nor declared unsupported"
        else:
            assert name in FORMATS, (fixture.id, name)
    # every family the suite covers is claimed for some models, or declared unsupported
    assert {f.family for f in FIXTURES} == {f.family for f in CASES} | {u[0] for u in UNSUPPORTED}


@pytest.mark.parametrize("fixture", CASES, ids=[f.id for f in CASES])
def test_fixture_whole_and_chunked(fixture):
    fmt = FORMATS[_format_for(fixture)]  # type: ignore[index]
    try:
        _conforms(fixture, fmt)
    except AssertionError:
        if fmt.constrainable and not _admitted(fixture.id):
            # The runtime holds this format's output to its constraint, which refuses this text
            # (keys out of schema order, no separator, several calls in one block, malformed
            # JSON, ...): a model served here cannot write it. Reported, not claimed.
            pytest.xfail(f"the {fmt.name} constraint does not let a model write this output")
        raise


def _conforms(fixture: Fixture, fmt: P.ToolFormat) -> None:
    text = _text(fixture, fmt)
    family = family_for(fixture)
    markers = list(family.markers) if family is not None else []
    whole = _parse(fixture, fmt, [text])
    assert_conforms(fixture, whole, soft=True)
    for strategy in STRATEGIES[1:]:
        streamed = _parse(fixture, fmt, _chunks(text, strategy, markers + list(fmt.atomic_markers)))
        assert_conforms(fixture, streamed, soft=True)
        assert_equivalent(whole, streamed)


def test_constraint_admits_most_fixtures_of_each_constrained_format():
    """The xfail escape above is for outputs the constraint refuses; it must stay the exception."""
    for name in {_format_for(f) for f in CASES}:
        cases = [f for f in CASES if _format_for(f) == name]
        admitted = [f for f in cases if _admitted(f.id)]
        assert admitted, name


REASONING = "The user asked; a tool answers this.\n"


@pytest.mark.parametrize("fixture", [f for f in CASES if _format_for(f) == "deepseekv3" and f.expected is not None],
                         ids=lambda f: f.id)
def test_deepseek_r1_reasoning_then_v3_fixture(fixture):
    """DeepSeek-R1 writes V3's calls after reasoning that its generation prompt opened: each V3
    fixture, behind a reasoning block, parses to the same answer plus the reasoning."""
    import dataclasses

    fmt = FORMATS["deepseek-r1"]
    r1 = dataclasses.replace(fixture, raw_output=REASONING + "</think>\n\n" + fixture.raw_output,
                             expected=dataclasses.replace(fixture.expected, reasoning_content=REASONING.strip()))
    try:
        _conforms(r1, fmt)
    except AssertionError:
        if not _admitted_text(fmt, r1):
            pytest.xfail("the deepseek-r1 constraint does not let a model write this output")
        raise


def _admitted_text(fmt: P.ToolFormat, fixture: Fixture) -> bool:
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    constraint = P.ToolProgram(fmt, list(fixture.tools), tool_choice="auto").constraint()
    assert constraint is not None
    return _is_grammar_accept_string(xgrammar.Grammar.from_structural_tag(constraint.value), fixture.raw_output,
                                     require_termination=not fixture.truncated)


# ---------------------------------------------------------------------------- a real tokenizer
# mistral_common (an SGLang dependency) ships Mistral's v3 tokenizer, the one of
# Mistral-7B-Instruct-v0.3, whose calls the "mistral" format writes.
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city"]}}}


@pytest.fixture(scope="module")
def mistral_v3():
    mistral_common = pytest.importorskip("mistral_common")
    from pathlib import Path

    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    path = Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    return MistralTokenizer.from_file(str(path))


def _detokenize(inner, ids: list[int]) -> str:
    """Text of `ids` as a server streams it: control tokens as their text, the rest decoded."""
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    vocab = inner.vocab()
    out, run = "", []
    for i in [*ids, None]:
        if i is not None and not inner.is_special(i):
            run.append(i)
            continue
        if run:
            text = inner.decode(run, special_token_policy=SpecialTokenPolicy.IGNORE)
            out += (" " + text) if out and vocab[run[0]].startswith("\u2581") else text
            run = []
        if i is not None:
            out += vocab[i]
    return out


def test_mistral_call_syntax_is_what_mistral_common_renders(mistral_v3):
    """The format's call text is Mistral's own rendering of an assistant call (which, in a
    history, also carries the call id the model does not write)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    fn = WEATHER["function"]
    request = ChatCompletionRequest(
        tools=[Tool(function=Function(name=fn["name"], description=fn["description"], parameters=fn["parameters"]))],
        messages=[UserMessage(content="Weather in Paris?"),
                  AssistantMessage(tool_calls=[ToolCall(id="abcdefghi", function=FunctionCall(
                      name="get_weather", arguments=json.dumps({"city": "Paris", "days": 3})))]),
                  UserMessage(content="Thanks.")])
    rendered = mistral_v3.encode_chat_completion(request).text.replace("\u2581", " ")
    call = FORMATS["mistral"].call_text("get_weather", {"city": "Paris", "days": 3})
    assert call[:-2] + ', "id": "abcdefghi"}]' in rendered


@pytest.mark.parametrize("arguments", [{"city": "Paris", "days": 3}, {"city": "São Paulo \"centro\""}])
def test_mistral_constrained_call_decoded_token_by_token(mistral_v3, arguments):
    """With Mistral's real vocabulary: the call's tokens are each allowed by the compiled
    constraint, end-of-sequence is allowed right after it, off-schema output is refused, and the
    text decoded token by token parses back to the same call."""
    import xgrammar

    inner = mistral_v3.instruct_tokenizer.tokenizer
    vocab = inner.vocab()
    info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.BYTE_FALLBACK, vocab_size=len(vocab),
                                  stop_token_ids=[inner.eos_id], add_prefix_space=True)
    fmt = FORMATS["mistral"]
    program = P.ToolProgram(fmt, [WEATHER], tool_choice="required")
    compiled = xgrammar.GrammarCompiler(info).compile_structural_tag(program.constraint().value)

    text = fmt.call_text("get_weather", arguments)
    marker = inner.get_control_token("[TOOL_CALLS]")
    ids = [marker, *inner.encode(text[len("[TOOL_CALLS] "):], bos=False, eos=False)]
    matcher = xgrammar.GrammarMatcher(compiled)
    for i in ids:
        assert matcher.accept_token(i), f"token {i} {vocab[i]!r} refused"
    assert matcher.accept_token(inner.eos_id) and matcher.is_terminated()

    # the same constraint refuses what the schema forbids, token by token
    for bad in ({"days": 3, "city": "Paris"}, {"city": "Paris", "days": 0}, {"town": "Paris"}):
        bad_ids = [marker, *inner.encode(json.dumps([{"name": "get_weather", "arguments": bad}]), bos=False, eos=False)]
        matcher = xgrammar.GrammarMatcher(compiled)
        assert not all(matcher.accept_token(i) for i in bad_ids), bad

    parser = P.StreamParser(program)
    events: list[P.Event] = []
    previous = ""
    for k in range(1, len(ids) + 1):
        current = _detokenize(inner, ids[:k])
        assert current.startswith(previous)
        events += parser.feed(current[len(previous):])
        previous = current
    events += parser.finish()
    assert previous == text
    assert events == [P.ToolCallEvent(name="get_weather", arguments=arguments, index=0)]


# ---------------------------------------------------------------------------- detection
class _Tok:
    def __init__(self, template: str):
        self.chat_template = template


# Excerpts of each family's chat template: the lines that carry the markers format_for keys on
# (the Jinja source as the tokenizer_config.json holds it, escapes included).
TEMPLATES = {
    "qwen25": "{%- if tools %}<|im_start|>system ... <tools>{%- endif %}<tool_call>\\n{\"name\": ...</tool_call>"
              "{{- '<|im_start|>assistant\\n' }}",
    "qwen3": "{%- if tools %}<|im_start|>system ...{%- endif %}{%- if '</think>' in content %}<think>\\n"
             "{{ reasoning_content }}</think><tool_call>\\n{%- if enable_thinking is defined and enable_thinking is false %}"
             "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{{- '<|im_start|>assistant\\n' }}",
    "qwen3-thinking": "{%- if tools %}<|im_start|>system ...{%- endif %}<think>\\n</think><tool_call>\\n"
                      "{{- '<|im_start|>assistant\\n<think>\\n' }}",
    "deepseekv3": "{% if tools %}...{% endif %}<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>"
                  "{{tool['type'] + '<｜tool▁sep｜>' + tool['function']['name']}}",
    "deepseek-r1": "{% if tools %}...{% endif %}{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
                   "{% endif %}<｜tool▁calls▁begin｜>{{'<｜Assistant｜><think>\\n'}}",
}
UNSUPPORTED_TEMPLATES = {
    "qwen3-coder": "{%- if tools %}<tools>{%- endif %}<tool_call>\\n<function=' + tool_call.name + '>\\n<parameter=' + name",
    "gpt-oss": "{%- if tools %}...{%- endif %}<|start|>assistant<|channel|>commentary to=functions.x <|constrain|>json"
               "<|message|>...<|call|>",
    "glm": "[gMASK]<sop>{%- if tools %}...{%- endif %}<tool_call>{{ tc.name }}<arg_key>{{ k }}</arg_key><arg_value>",
    "kimi": "{%- if tools %}...{%- endif %}<|im_middle|><|tool_calls_section_begin|><|tool_call_begin|>",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_family_is_detected_from_its_chat_template(name):
    assert P.format_for(_Tok(TEMPLATES[name])).name == name


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_TEMPLATES))
def test_unsupported_family_gets_the_default_format(name):
    from programs.formats import unsupported_family

    assert unsupported_family(UNSUPPORTED_TEMPLATES[name]) == name
    assert P.format_for(_Tok(UNSUPPORTED_TEMPLATES[name])).name == "default"


# ---------------------------------------------------------------------------- reasoning
@pytest.mark.parametrize("name, prefix", [("qwen3", "<think>\nLet me look.\n</think>\n\n"),
                                          ("qwen3-thinking", "Let me look.\n</think>\n\n"),
                                          ("deepseek-r1", "Let me look.\n</think>\n\n")])
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_reasoning_is_split_and_constrained(name, prefix, step):
    """The constraint admits a reasoning block before a required call (and a call inside the
    reasoning is not one); the parser streams the block as ReasoningDelta, never as text."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    fmt = FORMATS[name]
    program = P.ToolProgram(fmt, [WEATHER], tool_choice="required")
    output = prefix + fmt.call_text("get_weather", {"city": "Paris"})
    grammar = xgrammar.Grammar.from_structural_tag(program.constraint().value)
    assert _is_grammar_accept_string(grammar, output)
    assert not _is_grammar_accept_string(grammar, prefix + "Some text." + fmt.call_text("get_weather", {"city": "Paris"}))
    parser = P.StreamParser(program)
    events: list[P.Event] = []
    text = output + fmt.end_of_turn
    for i in range(0, len(text), step):
        events += parser.feed(text[i:i + step])
    events += parser.finish()
    assert "".join(e.text for e in events if isinstance(e, P.ReasoningDelta)).strip() == "Let me look."
    assert "".join(e.text for e in events if isinstance(e, P.TextDelta)).strip() == ""
    assert [e for e in events if isinstance(e, P.ToolCallEvent)] == [P.ToolCallEvent("get_weather", {"city": "Paris"}, 0)]


@pytest.mark.parametrize("fixture", [f for f in CASES if f.family == "qwen3-hermes" and _format_for(f) == "qwen25"],
                         ids=lambda f: f.id)
def test_qwen3_instruct_fixture_also_under_the_qwen3_format(fixture):
    """A Qwen3-Instruct-2507 template that mentions <think> is detected as `qwen3`, whose
    reasoning block is optional: its outputs parse the same there."""
    _conforms(fixture, FORMATS["qwen3"])


def test_llama3_text_only_answer_under_required_is_reported():
    """A message that opens with text holds no llama3 call; under `required` that is reported."""
    program = P.ToolProgram(FORMATS["llama3"], [WEATHER], tool_choice="required")
    parser = P.StreamParser(program)
    events = parser.feed('{"a": 1} is a dict') + parser.finish()
    assert [e.text for e in events if isinstance(e, P.TextDelta)] == ['{"a": 1} is a dict']
    assert any(isinstance(e, P.InvalidOutput) for e in events)
