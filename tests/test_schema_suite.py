"""The official JSON-Schema-Test-Suite (draft 2020-12) through this project's own path.

For every suite schema: the tool check (programs.check_tools) either refuses it, naming the
keyword and a JSON pointer that exists in the parameters, or accepts it; an accepted schema
becomes the arguments grammar (programs.program.arguments_grammar) and every suite instance is
fed to xgrammar's matcher as the compact, key-sorted JSON the runtime would generate. No
instance the suite marks invalid may be accepted by the grammar of a schema the runtime
accepts. Valid instances the grammar refuses are over-constraints (documented in
programs/schema.py) and are reported, not failed.

The suite's schemas are not objects with `type: object` (what a tool's parameters must be), so
each is embedded as the one required property `x` of the parameters, and its local references
are moved along ("#/..." -> "#/properties/x/...").

Files: tests/data/JSON-Schema-Test-Suite/ (vendored from the jsonschema sdist, see its README).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest

import programs as P
from programs.program import arguments_grammar

SUITE = Path(__file__).parent / "data" / "JSON-Schema-Test-Suite" / "draft2020-12"
FILES = sorted(SUITE.glob("*.json"))


def _move_refs(schema):
    if isinstance(schema, dict):
        out = {}
        for key, value in schema.items():
            if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
                out[key] = "#/properties/x" + value[1:]
            else:
                out[key] = _move_refs(value)
        return out
    if isinstance(schema, list):
        return [_move_refs(v) for v in schema]
    return schema


def _parameters(schema) -> dict:
    if isinstance(schema, dict):
        schema = {k: v for k, v in schema.items() if k != "$schema"}
    return {"type": "object", "properties": {"x": _move_refs(schema)}, "required": ["x"]}


def _resolve(document, pointer: str):
    assert pointer == "#" or pointer.startswith("#/"), pointer
    node = document
    for part in pointer[2:].split("/") if pointer != "#" else []:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _instance(data) -> str:
    return json.dumps({"x": data}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _run_file(path: Path):
    """(outcome, case, test, detail) for every instance of one suite file."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    rows = []
    for case in json.loads(path.read_text()):
        params = _parameters(case["schema"])
        tool = {"type": "function", "function": {"name": "f", "parameters": params}}
        try:
            canonical = P.check_tools([tool])[0]["function"]["parameters"]
        except P.ToolSchemaError as exc:
            for test in case["tests"]:
                rows.append(("refused_up_front", case, test, exc))
            continue
        grammar = xgrammar.Grammar.from_ebnf(arguments_grammar(json.dumps(canonical, sort_keys=True), (",", ":")))
        for test in case["tests"]:
            accepted = _is_grammar_accept_string(grammar, _instance(test["data"]))
            outcome = {(True, True): "accepted_valid", (True, False): "refused_valid",
                       (False, True): "accepted_invalid", (False, False): "refused_invalid"}[(test["valid"], accepted)]
            rows.append((outcome, case, test, None))
    return rows


def test_suite_is_vendored():
    assert len(FILES) > 40 and (SUITE.parent / "LICENSE").is_file()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_no_invalid_instance_is_accepted(path):
    rows = _run_file(path)
    bad = [f"{case['description']} / {test['description']}: {_instance(test['data'])}"
           for outcome, case, test, _ in rows if outcome == "accepted_invalid"]
    assert not bad, "the grammar of an accepted schema lets invalid instances through:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_refusals_name_the_keyword_and_pointer(path):
    for outcome, case, _test, exc in _run_file(path):
        if outcome != "refused_up_front":
            continue
        params = _parameters(case["schema"])
        if exc.keyword is None:
            # only a schema that is not a JSON Schema at all is refused without a keyword
            with pytest.raises(jsonschema.SchemaError):
                jsonschema.Draft202012Validator.check_schema(params)
            continue
        target = _resolve(params, exc.pointer)  # the pointer names a place in the parameters
        # ... the subschema that holds the keyword, or a subschema under that keyword
        under = f"/{exc.keyword}/" in exc.pointer or exc.pointer.endswith(f"/{exc.keyword}")
        assert (isinstance(target, dict) and exc.keyword in target) or under, \
            (case["description"], exc.keyword, exc.pointer, str(exc))


def test_whole_suite_summary(capsys):
    """The totals, printed for the docs; the assertions are the per-file tests above plus these."""
    totals: Counter[str] = Counter()
    keywords: Counter[str] = Counter()
    for path in FILES:
        for outcome, _case, _test, exc in _run_file(path):
            totals[outcome] += 1
            if exc is not None:
                keywords[str(exc.keyword)] += 1
    with capsys.disabled():
        print(f"\nJSON-Schema-Test-Suite draft2020-12: {dict(totals)}\nrefused up front by keyword: {dict(keywords.most_common())}")
    assert totals["accepted_invalid"] == 0
    # the suite still exercises the grammar: schemas are accepted and invalid instances refused by it
    assert totals["accepted_valid"] > 0 and totals["refused_invalid"] > 0


# Found by the suite; each was let through before the keyword checks named it.
@pytest.mark.parametrize(
    "schema, keyword",
    [
        ({"patternProperties": {"[0-9]{2,}": {"type": "boolean"}}}, "patternProperties"),  # no type: xgrammar takes anything
        ({"type": "object", "patternProperties": {"f.*": True, "b.*": False}}, "patternProperties"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "patternProperties": {"^a$": {"type": "string"}}},
         "patternProperties"),
        ({"type": "object", "propertyNames": False}, "propertyNames"),
        ({"type": "object", "propertyNames": {"const": "foo"}}, "propertyNames"),
        ({"type": "object", "propertyNames": {"enum": ["foo", "bar"]}}, "propertyNames"),
        ({"type": "object", "properties": {"A1": {"type": "integer"}}, "propertyNames": {"pattern": "^[a-z]+$"}}, "propertyNames"),
        ({"type": "array", "allOf": [True], "unevaluatedItems": False}, "unevaluatedItems"),
        ({"type": "object", "properties": {"foo": {"type": "string"}}, "allOf": [True], "unevaluatedProperties": False},
         "unevaluatedProperties"),
        ({"type": "object", "allOf": [{"properties": {"foo": True}, "unevaluatedProperties": False}]}, "unevaluatedProperties"),
        ({"type": "object", "properties": {"a": False}}, "properties"),
    ],
)
def test_suite_findings_are_refused(schema, keyword):
    tool = {"type": "function", "function": {"name": "f", "parameters": _parameters(schema)}}
    with pytest.raises(P.ToolSchemaError) as e:
        P.check_tools([tool])
    assert e.value.keyword == keyword
    assert e.value.pointer.startswith("#/properties/x")


@pytest.mark.parametrize(
    "schema, valid, invalid",
    [
        ({"type": "object", "patternProperties": {"^[0-9]+$": {"type": "boolean"}}}, {"12": True}, {"12": 1}),
        ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}, "additionalProperties": {"type": "integer"}},
         {"ab": 1}, {"A1": 1}),
        ({"type": "object", "propertyNames": {"maxLength": 2}, "additionalProperties": True}, {"ab": 1}, {"abc": 1}),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "unevaluatedProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
        ({"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": False}, [1], [1, 2]),
    ],
)
def test_what_stays_accepted_is_enforced(schema, valid, invalid):
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    params = _parameters(schema)
    canonical = P.check_tools([{"type": "function", "function": {"name": "f", "parameters": params}}])[0]["function"]["parameters"]
    grammar = xgrammar.Grammar.from_ebnf(arguments_grammar(json.dumps(canonical, sort_keys=True), (",", ":")))
    assert _is_grammar_accept_string(grammar, _instance(valid))
    assert not _is_grammar_accept_string(grammar, _instance(invalid))
    assert jsonschema.Draft202012Validator(schema).is_valid(valid)
    assert not jsonschema.Draft202012Validator(schema).is_valid(invalid)


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_values_without_schema_use_the_format_separators(separators):
    """xgrammar writes schema-less values with ", " between items whatever the separators;
    arguments_grammar holds them to the format's own (what the renderer writes)."""
    import xgrammar
    from xgrammar.testing import _is_grammar_accept_string

    params = {"type": "object", "properties": {"x": {}, "y": {"type": "array"}}, "required": ["x", "y"]}
    grammar = xgrammar.Grammar.from_ebnf(arguments_grammar(json.dumps(params, sort_keys=True), separators))
    value = {"x": {"a": [1, 2], "b": {"c": None, "d": "e"}}, "y": [1, "two", [3, 4]]}
    assert _is_grammar_accept_string(grammar, json.dumps(value, separators=separators))
    other = (", ", ": ") if separators == (",", ":") else (",", ":")
    assert not _is_grammar_accept_string(grammar, json.dumps(value, separators=other))
