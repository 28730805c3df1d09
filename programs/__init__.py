"""The constrained-decoding tool-call program: schemas, formats, rendering, constraint, parsing.

One module per stage:
    schema   check_tools / canonical_tools / validate_arguments (what the grammar can hold)
    formats  ToolFormat registry per model family, format_for(tokenizer)
    render   Renderer: prefix / turn / full token ids, segment by segment
    program  ToolProgram: the whole-turn constraint (xgrammar structural tag)
    response ResponseFormat: the JSON value a turn's text must be (json_object, json_schema)
    parse    StreamParser: text / reasoning / tool-call events (SGLang's parsers)

Nothing here imports sglang at module load, and nothing imports the runtime: the parser imports
SGLang's parsers on first use (a process that runs SGLang's engine prepares its environment
first: runtime.sglang_adapter.prepare).
"""

from programs.formats import FORMATS, ToolFormat, format_for
from programs.keywords import MAX_BRANCHES
from programs.parse import Event, InvalidOutput, ReasoningDelta, StreamParser, TextDelta, ToolCallEvent
from programs.program import Constraint, ToolProgram, normalize_tool_choice, response_grammar
from programs.render import Renderer, RenderError
from programs.response import ResponseFormat, check_response_format, validate_response
from programs.schema import ToolSchemaError, canonical_tools, check_tools, validate_arguments

__all__ = [
    "FORMATS", "ToolFormat", "format_for",
    "Event", "InvalidOutput", "ReasoningDelta", "StreamParser", "TextDelta", "ToolCallEvent",
    "Constraint", "ToolProgram", "normalize_tool_choice", "response_grammar",
    "ResponseFormat", "check_response_format", "validate_response",
    "Renderer", "RenderError",
    "MAX_BRANCHES", "ToolSchemaError", "canonical_tools", "check_tools", "validate_arguments",
]
