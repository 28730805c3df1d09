"""Agent frameworks, unmodified, against this runtime's OpenAI-compatible API (/v1).

Each framework runs the same three-turn tool loop against a local Python tool: the model is made
to call the tool on the first two turns (tool_choice required or named: the default 135M model
does not call tools on its own), the framework runs the tool and sends its result back, and a
third turn with tool_choice "none" ends the loop with text. What is checked is what happened:
the tool ran twice with arguments valid for its schema, each later request carries the earlier
calls and their results as the framework replays them, and the later turns were served mostly
from the prefix cache (the usage each framework reports, equal to what GET /metrics counted).

The `engine` tests run on the real engine (the session's `server`); the others run the same
loops on the scripted fake backend, to keep each framework's request shapes covered in the fast
suite. pydantic-ai is not here: see the comment on the test extra in pyproject.toml.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pytest
from agents import Agent, AgentHooks, ModelSettings, OpenAIChatCompletionsModel, OpenAIResponsesModel, RunConfig, Runner, function_tool
from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from prometheus_client.parser import text_string_to_metric_families
from pydantic import Field

SYSTEM = (
    "You are the weather desk of a travel agency. Travellers ask about the weather in the cities on "
    "their itinerary. For every city they name, call get_weather once with the city's name and the "
    "unit they prefer (celsius unless they say otherwise), one city per call, in the order they gave. "
    "When every city has been looked up, answer in one short sentence per city, quoting the sky and "
    "the temperature the tool returned. Never invent a forecast the tool did not return, never call a "
    "tool for a place that is not a city, and keep answers plain: no lists, no markdown, no greetings."
)
QUESTION = "I fly to Paris on Monday and to Rome on Thursday. What weather should I expect?"
TOOL_SCHEMA = {"type": "object", "properties": {
    "city": {"type": "string", "minLength": 1, "maxLength": 40},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}
TOOL_DESCRIPTION = "The current weather in a city."
TOOL_TURNS = 2  # turns the tool is forced on; then one turn with tool_choice "none" ends the loop
ENGINE_MAX_TOKENS = 96  # a forced call with a city of 40 characters at most fits; a final text may end at "length"
FAKE_MAX_TOKENS = 256  # the fake backend's tokenizer is one token per byte


class WeatherTool:
    """The local tool every framework runs: it records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.results: list[str] = []

    def __call__(self, city: str, unit: str) -> str:
        self.calls.append({"city": city, "unit": unit})
        degrees = 18 + len(self.calls)
        self.results.append(json.dumps({"city": city, "sky": "clear", "unit": unit,
                                        "temperature": degrees if unit == "celsius" else degrees * 9 // 5 + 32}))
        return self.results[-1]


@dataclasses.dataclass
class Loop:
    """What one framework run left behind: the tool's calls, the bodies the framework POSTed,
    per model turn the ids of the calls the framework parsed from the reply and the usage it
    reports (prompt_tokens, cached_tokens), and its final text."""

    tool: WeatherTool
    bodies: list[dict[str, Any]]
    call_ids: list[list[str]]
    usage: list[tuple[int, int]]
    final_text: str


def recording_http() -> tuple[httpx.AsyncClient, list[dict[str, Any]]]:
    """An httpx client for the framework's OpenAI client that keeps every JSON body it POSTs."""
    bodies: list[dict[str, Any]] = []

    async def keep(request: httpx.Request) -> None:
        if request.method == "POST":
            bodies.append(json.loads(request.content))

    return httpx.AsyncClient(event_hooks={"request": [keep]}, timeout=300), bodies


# ---------------------------------------------------------------------------- the frameworks


async def openai_agents_loop(base_url: str, model: str, *, max_tokens: int, responses: bool = False,
                             stream: bool = False, chained: bool = False) -> Loop:
    """openai-agents: an Agent with a function tool on OpenAIChatCompletionsModel (or
    OpenAIResponsesModel), tool_choice named for TOOL_TURNS turns (reset_tool_choice off), then
    "none" (set by an AgentHooks.on_tool_end), max_turns = the three turns. `chained`: the
    Responses turns continue the server's stored response (auto_previous_response_id) instead
    of re-sending the history."""
    weather = WeatherTool()

    @function_tool(name_override="get_weather", description_override=TOOL_DESCRIPTION)
    def get_weather(city: Annotated[str, Field(min_length=1, max_length=40)], unit: Literal["celsius", "fahrenheit"]) -> str:
        return weather(city, unit)

    class EndAfterTwoCalls(AgentHooks):
        async def on_tool_end(self, context: Any, agent: Any, tool: Any, result: str) -> None:
            if len(weather.calls) >= TOOL_TURNS:
                agent.model_settings = dataclasses.replace(agent.model_settings, tool_choice="none")

    http, bodies = recording_http()
    async with http, openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, http_client=http) as client:
        model_cls = OpenAIResponsesModel if responses else OpenAIChatCompletionsModel
        agent = Agent(name="weather desk", instructions=SYSTEM, tools=[get_weather], hooks=EndAfterTwoCalls(),
                      model=model_cls(model=model, openai_client=client), reset_tool_choice=False,
                      model_settings=ModelSettings(tool_choice="get_weather", max_tokens=max_tokens, temperature=0.0,
                                                   include_usage=True if stream else None))
        run_config = RunConfig(tracing_disabled=True)
        if stream:
            result = Runner.run_streamed(agent, QUESTION, max_turns=TOOL_TURNS + 1, run_config=run_config,
                                         auto_previous_response_id=chained)
            async for _ in result.stream_events():
                pass
        else:
            result = await Runner.run(agent, QUESTION, max_turns=TOOL_TURNS + 1, run_config=run_config,
                                      auto_previous_response_id=chained)
    call_ids = [[item.call_id for item in r.output if item.type == "function_call"] for r in result.raw_responses]
    usage = [(r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens) for r in result.raw_responses]
    if chained:
        ids = [r.response_id for r in result.raw_responses]
        assert [b.get("previous_response_id") for b in bodies] == [None, *ids[:-1]]
    assert isinstance(result.final_output, str)
    return Loop(weather, bodies, call_ids, usage, result.final_output)


async def langgraph_loop(base_url: str, model: str, *, max_tokens: int, stream: bool = False) -> Loop:
    """LangChain's ChatOpenAI(...).bind_tools(...) in a LangGraph loop (StateGraph, ToolNode,
    tools_condition): the model bound with tool_choice "required" until TOOL_TURNS tool results
    are in the state, then with "none"."""
    weather = WeatherTool()
    tool = StructuredTool.from_function(weather.__call__, name="get_weather", description=TOOL_DESCRIPTION,
                                        args_schema={**TOOL_SCHEMA, "title": "get_weather"})
    http, bodies = recording_http()
    async with http:
        llm = ChatOpenAI(model=model, base_url=base_url, api_key="unused", max_retries=0, http_async_client=http,
                         max_tokens=max_tokens, temperature=0.0, streaming=stream, stream_usage=stream)
        forced, final = llm.bind_tools([tool], tool_choice="required"), llm.bind_tools([tool], tool_choice="none")

        async def agent(state: MessagesState) -> dict[str, Any]:
            results = sum(isinstance(m, ToolMessage) for m in state["messages"])
            return {"messages": [await (forced if results < TOOL_TURNS else final).ainvoke(state["messages"])]}

        graph = StateGraph(MessagesState)
        graph.add_node("agent", agent)
        graph.add_node("tools", ToolNode([tool]))
        graph.add_edge(START, "agent")
        graph.add_conditional_edges("agent", tools_condition)
        graph.add_edge("tools", "agent")
        out = await graph.compile().ainvoke({"messages": [SystemMessage(SYSTEM), HumanMessage(QUESTION)]},
                                            {"recursion_limit": 2 * TOOL_TURNS + 2})
    replies = [m for m in out["messages"] if m.type == "ai"]
    call_ids = [[c["id"] for c in m.tool_calls] for m in replies]
    usage = [(m.usage_metadata["input_tokens"], m.usage_metadata["input_token_details"]["cache_read"]) for m in replies]
    assert not replies[-1].tool_calls and isinstance(replies[-1].content, str)
    return Loop(weather, bodies, call_ids, usage, replies[-1].content)


# ---------------------------------------------------------------------------- what is checked


def _tool_results_sent(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(call id, result) of every tool result a request carries, chat completions or Responses."""
    if "messages" in body:
        return [(m["tool_call_id"], m["content"]) for m in body["messages"] if m.get("role") == "tool"]
    return [(item["call_id"], item["output"]) for item in body["input"] if isinstance(item, dict)
            and item.get("type") == "function_call_output"]


def _calls_sent(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(call id, arguments) of every earlier tool call a request replays."""
    if "messages" in body:
        return [(c["id"], json.loads(c["function"]["arguments"])) for m in body["messages"] if m.get("role") == "assistant"
                for c in m.get("tool_calls") or []]
    return [(item["call_id"], json.loads(item["arguments"])) for item in body["input"] if isinstance(item, dict)
            and item.get("type") == "function_call"]


def check_loop(loop: Loop) -> None:
    tool = loop.tool
    # the local tool ran on every forced turn, with arguments its schema accepts
    assert len(tool.calls) == TOOL_TURNS, tool.calls
    for args in tool.calls:
        jsonschema.validate(args, TOOL_SCHEMA)
    # three model turns, one call in each forced one; each later turn sends the tool's own results
    # back under the ids of the calls they answer, with the earlier calls replayed (or, chained
    # to a stored response, only the results that response is waiting for)
    assert len(loop.bodies) == TOOL_TURNS + 1 and len(loop.usage) == TOOL_TURNS + 1
    assert [len(ids) for ids in loop.call_ids] == [1] * TOOL_TURNS + [0]
    ids = [ids[0] for ids in loop.call_ids[:TOOL_TURNS]]
    for turn, body in enumerate(loop.bodies):
        calls, results = _calls_sent(body), _tool_results_sent(body)
        chained = body.get("previous_response_id") is not None
        replayed, first = (0, turn - 1) if chained else (turn, 0)  # calls it carries: [:replayed]; results: [first:turn]
        assert calls == list(zip(ids[:replayed], tool.calls[:replayed], strict=True))
        assert [call_id for call_id, _ in results] == ids[first:turn]
        assert [json.loads(output) for _, output in results] == [json.loads(r) for r in tool.results[first:turn]]
    assert loop.bodies[-1]["tool_choice"] == "none" and all(b["tool_choice"] != "none" for b in loop.bodies[:-1])
    # the later turns reuse the prefix: most of each prompt came from the cache
    for prompt, cached in loop.usage[1:]:
        assert 0 < cached <= prompt and cached >= prompt // 2, loop.usage


async def cached_tokens_counted(addr: str) -> float:
    """agent_runtime_cached_tokens_total, as GET /metrics reports it."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://{addr}/metrics")).text
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "agent_runtime_cached_tokens_total")


async def served_model(addr: str) -> str:
    async with openai.AsyncOpenAI(base_url=f"http://{addr}/v1", api_key="unused", max_retries=0) as client:
        return (await client.models.list()).data[0].id


async def run_checked(addr: str, loop_fn: Any, **kwargs: Any) -> Loop:
    before = await cached_tokens_counted(addr)
    loop = await loop_fn(f"http://{addr}/v1", await served_model(addr), **kwargs)
    check_loop(loop)
    # what the framework reports is what the server counted
    assert await cached_tokens_counted(addr) - before == sum(cached for _, cached in loop.usage)
    return loop


def has_responses_api(app: Any) -> bool:
    return any(getattr(r, "path", None) == "/v1/responses" for r in app.router.routes)


# ---------------------------------------------------------------------------- on the real engine


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_openai_agents_chat_completions(server, stream):
    addr, _ = server
    await run_checked(addr, openai_agents_loop, max_tokens=ENGINE_MAX_TOKENS, stream=stream)


@pytest.mark.engine
@pytest.mark.parametrize(("chained", "stream"), [(False, False), (True, True)], ids=["history-plain", "previous_response_id-streamed"])
async def test_openai_agents_responses(server, chained, stream):
    addr, app = server
    if not has_responses_api(app):
        pytest.skip("the server has no /v1/responses route yet")
    await run_checked(addr, openai_agents_loop, max_tokens=ENGINE_MAX_TOKENS, responses=True, chained=chained, stream=stream)


@pytest.mark.engine
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_langgraph_chat_openai_bind_tools(server, stream):
    addr, _ = server
    await run_checked(addr, langgraph_loop, max_tokens=ENGINE_MAX_TOKENS, stream=stream)


# ---------------------------------------------------------------------------- on the fake backend


@pytest.fixture
def scripted(fake):
    """The fake backend scripted for the loop: two get_weather calls, then the answer."""
    fake.replies.extend([fake.call_text("get_weather", {"city": "Paris", "unit": "celsius"}),
                         fake.call_text("get_weather", {"city": "Rome", "unit": "celsius"}),
                         "Clear in Paris, clear in Rome."])
    return fake


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_openai_agents_chat_completions_shapes(fake_server, scripted, stream):
    addr, _ = fake_server
    loop = await run_checked(addr, openai_agents_loop, max_tokens=FAKE_MAX_TOKENS, stream=stream)
    assert [c["city"] for c in loop.tool.calls] == ["Paris", "Rome"] and loop.final_text == "Clear in Paris, clear in Rome."


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("chained", [False, True], ids=["history", "previous_response_id"])
async def test_openai_agents_responses_shapes(fake_server, scripted, chained, stream):
    addr, app = fake_server
    if not has_responses_api(app):
        pytest.skip("the server has no /v1/responses route yet")
    loop = await run_checked(addr, openai_agents_loop, max_tokens=FAKE_MAX_TOKENS, responses=True, chained=chained, stream=stream)
    assert loop.final_text == "Clear in Paris, clear in Rome."


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_langgraph_chat_openai_shapes(fake_server, scripted, stream):
    addr, _ = fake_server
    loop = await run_checked(addr, langgraph_loop, max_tokens=FAKE_MAX_TOKENS, stream=stream)
    assert [c["city"] for c in loop.tool.calls] == ["Paris", "Rome"] and loop.final_text == "Clear in Paris, clear in Rome."
