"""Tool-call formats per model family: a registry of data, one builder each in render/program.

A ToolFormat says how a model writes a call (begin/end strings around the JSON arguments, the
separator between calls), which SGLang detector parses it (sglang.srt.function_call), which
reasoning parser splits its thinking (sglang.srt.parser.reasoning_parser), and whether the
model's own chat template renders tools. The call strings of the template formats are the
ones the family's chat template writes for an assistant tool call (as in xgrammar's builtin
structural tags, e.g. `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>` for
Qwen2.5), so a session's constrained output and a stateless re-rendering of the same history
agree; a test checks that the SGLang detector of each format parses this syntax back.

"default" is this project's format for chat templates without tool support (the embedded
SmolLM2 default model among them): Hermes/Qwen2.5 style calls, compact JSON, one line each,
`<tool_call>{"name":"f","arguments":{...}}</tool_call>`, tools described in the system message,
tool results sent back as a user message of `<tool_response>` blocks.

Reasoning formats (qwen3, qwen3-thinking, deepseek-r1) name SGLang's reasoning parser: the parser
streams the reasoning block as ReasoningDelta (never TextDelta), and the constraint admits that
block before the answer (`reasoning_begin` .. `reasoning_end`, required when the generation
prompt opened it: `reasoning_forced`), with free text inside and the calls held to the schema
after it. Families recognised but not served in their own syntax are in UNSUPPORTED_FAMILIES
(their models get "default"); tests/test_families.py replays canitoolcall's fixtures of every
family through this registry and keeps that list honest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ToolFormat", "FORMATS", "UNSUPPORTED_FAMILIES", "format_for", "unsupported_family"]

COMPACT = (",", ":")
SPACED = (", ", ": ")  # json.dumps defaults; what chat templates' `tojson` writes


@dataclass(frozen=True)
class ToolFormat:
    name: str
    # SGLang FunctionCallParser name (FunctionCallParser.ToolCallParserEnum) that parses the calls.
    detector: str | None
    # Call syntax: call_begin with "{name}" replaced, the arguments object, call_end.
    call_begin: str | None = None
    call_end: str | None = None
    # The text that starts any call; free text in `auto` mode may not contain it.
    call_trigger: str | None = None
    # In `auto` mode, whether text may come before the calls (else: text, or calls only).
    text_before_calls: bool = True
    # Between two calls of one turn.
    call_separator: str = "\n"
    # Most calls one turn can hold in this syntax (None: no limit); below 2 disables parallel calls.
    max_calls: int | None = None
    # JSON separators of the arguments: the constraint generates them, the renderer writes them.
    json_separators: tuple[str, str] = COMPACT
    # The model's chat template renders `tools=` and tool_calls itself.
    template_tools: bool = False
    # Extra variables for the chat template (tuple of pairs: the dataclass is frozen/hashable).
    template_kwargs: tuple[tuple[str, Any], ...] = ()
    # Text of the end-of-turn token; None: the tokenizer's eos_token.
    end_of_turn: str | None = None
    # SGLang reasoning parser name for models with thinking (None: no reasoning split).
    reasoning_parser: str | None = None
    # The generation prompt already opens the reasoning block (the output starts inside it):
    # passed to the reasoning parser as force_reasoning (None: the parser's own default).
    reasoning_forced: bool | None = None
    # What the constraint lets the model write before its calls when it reasons: the block's
    # opening text ("" when the prompt opens it) and its closing text (None: no reasoning element).
    reasoning_begin: str = ""
    reasoning_end: str | None = None
    # Texts of further tokens that end the turn (besides end_of_turn and eos), e.g. harmony's
    # <|call|>; the parser keeps them (the detector needs them) and stop_token_ids includes them.
    stop_texts: tuple[str, ...] = ()
    # How tool results are rendered when the template has no tool role (template_tools False).
    tool_result_role: str = "user"
    tool_result_begin: str = "<tool_response>\n"
    tool_result_end: str = "\n</tool_response>"
    tool_result_joiner: str = "\n"
    # Substrings that identify a chat template of this family (all must be present).
    template_markers: tuple[str, ...] = ()
    # Special-token texts the detector must receive whole (it is fed other text one character
    # at a time; see parse.StreamParser._normal).
    atomic_markers: tuple[str, ...] = ()
    # The constraint can be built (False: parse only, e.g. pythonic calls are not JSON).
    constrainable: bool = True

    def begin(self, tool_name: str) -> str:
        assert self.call_begin is not None
        return self.call_begin.replace("{name}", tool_name)

    def call_text(self, tool_name: str, arguments: dict) -> str:
        """One call in canonical syntax (arguments with this format's JSON separators)."""
        args = json.dumps(arguments, ensure_ascii=False, separators=self.json_separators)
        return f"{self.begin(tool_name)}{args}{self.call_end}"

    @property
    def parallel(self) -> bool:
        return self.max_calls is None or self.max_calls > 1


DEFAULT_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
DEFAULT_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>{"name":<function-name>,'
    '"arguments":<args-json-object>}</tool_call>'
)


_QWEN25 = ToolFormat(
    name="qwen25",
    detector="qwen25",
    call_begin='<tool_call>\n{"name": "{name}", "arguments": ',
    call_end="}\n</tool_call>",
    call_trigger="<tool_call>",
    call_separator="\n",
    json_separators=SPACED,
    template_tools=True,
    end_of_turn="<|im_end|>",
    template_markers=("<tool_call>", "<|im_start|>"),
)

_DEEPSEEK_V3 = ToolFormat(
    name="deepseekv3",
    detector="deepseekv3",
    call_begin="<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>{name}\n```json\n",
    call_end="\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    call_trigger="<｜tool▁calls▁begin｜>",
    call_separator="",
    max_calls=1,  # the detector's structure is one call per calls block
    json_separators=SPACED,
    template_tools=True,
    end_of_turn="<｜end▁of▁sentence｜>",
    atomic_markers=("<｜tool▁calls▁begin｜>", "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>",
                    "<｜tool▁call▁end｜>", "<｜tool▁calls▁end｜>"),
    template_markers=("<｜tool▁calls▁begin｜>",),
)

FORMATS: dict[str, ToolFormat] = {
    f.name: f
    for f in (
        ToolFormat(
            name="default",
            detector="hermes",
            call_begin='<tool_call>{"name":"{name}","arguments":',
            call_end="}</tool_call>",
            call_trigger="<tool_call>",
            call_separator="\n",
            # Measured with the 135M default model: allowed a second call, it repeats the first
            # one until max_tokens (greedy), so its turn holds one call. Formats of models
            # trained on parallel calls leave this at None.
            max_calls=1,
        ),
        _QWEN25,
        # Hermes: Qwen 2.5's call syntax without its end-of-turn token or its template marker.
        dataclasses.replace(_QWEN25, name="hermes", detector="hermes", end_of_turn=None, template_markers=("<tool_call>",)),
        ToolFormat(
            name="llama3",
            detector="llama3",
            call_begin='{"name": "{name}", "parameters": ',
            call_end="}",
            call_trigger='{"name": ',
            call_separator=";",
            text_before_calls=False,  # the detector finds a call only at the start of the message
            max_calls=1,  # Llama 3.x has no trained syntax for parallel calls
            json_separators=SPACED,
            template_tools=True,
            # keep tools in the system block (the shared prefix), not in the first user message
            template_kwargs=(("tools_in_user_message", False),),
            end_of_turn="<|eot_id|>",
            atomic_markers=("<|python_tag|>",),
            template_markers=("<|start_header_id|>", "ipython"),
        ),
        ToolFormat(
            name="mistral",
            detector="mistral",
            call_begin='[TOOL_CALLS] [{"name": "{name}", "arguments": ',
            call_end="}]",
            call_trigger="[TOOL_CALLS]",
            call_separator="",
            max_calls=1,  # one call per [TOOL_CALLS] block in this syntax
            atomic_markers=("[TOOL_CALLS]",),
            json_separators=SPACED,
            template_tools=True,
            template_markers=("[TOOL_CALLS]",),
        ),
        _DEEPSEEK_V3,
        # ---- reasoning families (see the "Model families" section of README.md)
        # Qwen3 hybrid thinking: <think>...</think> then Hermes-style calls
        dataclasses.replace(_QWEN25, name="qwen3", reasoning_parser="qwen3", reasoning_forced=False,
                            reasoning_begin="<think>\n", reasoning_end="</think>\n\n",
                            template_markers=("<tool_call>", "<|im_start|>", "<think>")),
        # Qwen3 Thinking-2507: the generation prompt opens <think>
        dataclasses.replace(_QWEN25, name="qwen3-thinking", reasoning_parser="qwen3", reasoning_forced=True,
                            reasoning_end="</think>\n\n",
                            template_markers=("<tool_call>", "<|im_start|>", "<|im_start|>assistant\\n<think>\\n")),
        # DeepSeek-R1: reasoning (the prompt opens <think>), then V3 calls
        dataclasses.replace(_DEEPSEEK_V3, name="deepseek-r1", reasoning_parser="deepseek-r1", reasoning_forced=True,
                            reasoning_end="</think>\n\n", template_markers=("<｜tool▁calls▁begin｜>", "<think>")),
        ToolFormat(
            name="pythonic",
            detector="pythonic",
            call_trigger="[",
            template_tools=True,
            template_markers=("[func_name1(",),
            constrainable=False,  # Python call syntax, not JSON: parsed and validated, not constrained
        ),
    )
}

# Detection order: the most specific markers first; "default" is the fallback.
_DETECTION_ORDER = ("deepseek-r1", "deepseekv3", "mistral", "llama3", "pythonic", "qwen3-thinking", "qwen3", "qwen25", "hermes")

# Families recognised from their chat templates but not served in their own syntax: replayed
# through SGLang's detectors, canitoolcall's fixtures of these families do not all parse (tests/
# test_families.py keeps the measurement), so their models get the "default" format (this
# project's tools block and call syntax, fully constrained) instead of being half-parsed.
# Checked before the supported families: their templates also hold e.g. <tool_call>.
UNSUPPORTED_FAMILIES: dict[str, tuple[tuple[str, ...], str]] = {
    "qwen3-coder": (("<function=", "<parameter="),
                    "Qwen3-Coder XML calls: SGLang's qwen3_coder detector ends a parameter at a '</parameter>' or "
                    "'</function>' inside its value"),
    "gpt-oss": (("<|channel|>", "<|call|>"),
                "harmony: SGLang's gpt-oss reasoning parser, fed the stream, keeps the commentary/final messages "
                "in the reasoning"),
    "glm": (("<arg_key>", "<arg_value>"),
            "GLM-4.5/4.7 key/value calls: SGLang's glm45/glm47 detectors end a value at a marker inside it and drop "
            "text after a call"),
    "kimi": (("<|tool_calls_section_begin|>",),
             "Kimi K2: SGLang's kimi_k2 detector ends the arguments at a '<|tool_call_end|>' inside a JSON string"),
    "gemma4": (("<|tool_call>",), "Gemma 4: no format here"),
    "deepseek-v3.1+": (("DSML",), "DeepSeek V3.2/V4 DSML calls: no format here"),
}


def _chat_template(tokenizer: Any, model_path: str | None) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the one used for tools, else default
        template = template.get("tool_use") or template.get("default")
    if template or not model_path:
        return template
    path = Path(model_path)
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    cfg = path / "tokenizer_config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("chat_template")
    return None


def format_for(tokenizer: Any, model_path: str | None = None) -> ToolFormat:
    """The format of the model behind `tokenizer`: a family whose markers appear in a chat
    template that renders tools; otherwise "default" (the project renders tools itself)."""
    template = _chat_template(tokenizer, model_path)
    if not template or "tools" not in template:
        return FORMATS["default"]
    if unsupported_family(template) is not None:
        return FORMATS["default"]
    for name in _DETECTION_ORDER:
        fmt = FORMATS[name]
        if all(marker in template for marker in fmt.template_markers):
            return fmt
    return FORMATS["default"]


def unsupported_family(template: str) -> str | None:
    """The name of an unsupported family whose markers the chat template holds (see
    UNSUPPORTED_FAMILIES), or None."""
    for name, (markers, _reason) in UNSUPPORTED_FAMILIES.items():
        if all(marker in template for marker in markers):
            return name
    return None
