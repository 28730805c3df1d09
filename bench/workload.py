"""The benchmark's workload: S sessions x T turns of tool-calling agents, seeded and deterministic.

G agent definitions, each a system prompt plus K tool schemas drawn from `tools_pool`. The
system prompt is padded with policy paragraphs until the rendered prefix (system prompt +
tools, as `programs.Renderer.prefix_ids` renders it) reaches `prefix_tokens`. Session i runs
agent i % G. Each turn is one model turn with a planned `tool_choice` ("required", a named
function, "auto" or "none") and a `max_tokens`; its input is the tool results for the calls
of the previous model turn when there were any, else the session's next user message. Tool
results and user messages are generated here, from the seed, the session, the turn and the
tool name only, never from the model's arguments, so every mode sees the same content.

Everything is a plain function of (WorkloadSpec, tokenizer): two processes that build the
workload from the same spec get identical messages (the worker modes rely on it, and the
JSON form travels to them anyway).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.tools_pool import TOOL_POOL


@dataclass(frozen=True)
class WorkloadSpec:
    sessions: int = 4
    turns: int = 8
    agents: int = 2
    tools: int = 5  # ~300 tokens each as rendered (compact JSON schema); the system prompt fills the rest
    concurrency: int = 4
    prefix_tokens: int = 2000
    result_tokens: int = 120  # size of one tool result message's content
    user_tokens: int = 40  # size of one user message's content
    call_max_tokens: int = 96  # max_tokens of turns that may call a tool
    text_max_tokens: int = 32  # max_tokens of turns answered in text (tool_choice none)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "agents", "tools", "concurrency", "prefix_tokens",
                     "result_tokens", "user_tokens", "call_max_tokens", "text_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.tools > len(TOOL_POOL):
            raise ValueError(f"--tools must be at most {len(TOOL_POOL)} (the size of the tool pool), not {self.tools}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, WorkloadSpec] = {
    # Finishes within 3 minutes on 2 CPU cores, all five modes, engine starts included.
    "quick": WorkloadSpec(sessions=2, turns=2, agents=1, tools=2, concurrency=2, prefix_tokens=800,
                          result_tokens=60, user_tokens=30, call_max_tokens=64, text_max_tokens=16),
    # The documented run (docs/BENCHMARKS.md): within 20 minutes on 2 CPU cores.
    "default": WorkloadSpec(),
    # The test suite's end-to-end run: as small as still exercises every code path.
    "tiny": WorkloadSpec(sessions=2, turns=2, agents=1, tools=1, concurrency=2, prefix_tokens=400,
                         result_tokens=24, user_tokens=16, call_max_tokens=64, text_max_tokens=8),
}


@dataclass
class Agent:
    name: str
    system_prompt: str
    tools: list[dict[str, Any]]


@dataclass
class TurnPlan:
    tool_choice: Any  # "required" | "auto" | "none" | {"type": "function", "function": {"name": ...}}
    max_tokens: int
    parallel_tool_calls: bool = False


@dataclass
class SessionPlan:
    index: int
    agent: int
    user_messages: list[str]  # one per turn at most; a turn takes the next unused one
    turns: list[TurnPlan]


@dataclass
class Workload:
    spec: WorkloadSpec
    agents: list[Agent]
    sessions: list[SessionPlan]
    prefix_lengths: list[int] = field(default_factory=list)  # rendered prefix tokens per agent
    _result_cache: dict[tuple, str] = field(default_factory=dict, repr=False)

    @property
    def total_turns(self) -> int:
        return len(self.sessions) * self.spec.turns

    def tool_result(self, session: int, turn: int, index: int, name: str) -> str:
        """The content of the tool message answering call `index` of turn `turn` (0-based)."""
        key = (session, turn, index, name)
        if key not in self._result_cache:
            self._result_cache[key] = _tool_result(self.spec, key, self._count)
        return self._result_cache[key]

    # set by build(); kept out of to_dict
    _count: Callable[[str], int] = field(default=len, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec.to_dict(),
            "agents": [dataclasses.asdict(a) for a in self.agents],
            "sessions": [dataclasses.asdict(s) for s in self.sessions],
            "prefix_lengths": list(self.prefix_lengths),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], count_tokens: Callable[[str], int]) -> Workload:
        spec = WorkloadSpec(**data["spec"])
        agents = [Agent(**a) for a in data["agents"]]
        sessions = [
            SessionPlan(index=s["index"], agent=s["agent"], user_messages=list(s["user_messages"]),
                        turns=[TurnPlan(**t) for t in s["turns"]])
            for s in data["sessions"]
        ]
        w = cls(spec=spec, agents=agents, sessions=sessions, prefix_lengths=list(data.get("prefix_lengths", [])))
        w._count = count_tokens
        return w

    def warmup(self) -> Workload:
        """One session of one turn (session 0's first, at most 8 tokens): run through a mode before it is
        measured, so one-time costs (imports, first batches, compiled grammars) are not."""
        first = self.sessions[0]
        turn = dataclasses.replace(first.turns[0], max_tokens=min(8, first.turns[0].max_tokens))
        w = Workload(spec=dataclasses.replace(self.spec, sessions=1, turns=1, concurrency=1), agents=self.agents,
                     sessions=[SessionPlan(index=0, agent=first.agent, user_messages=first.user_messages[:1],
                                           turns=[turn])],
                     prefix_lengths=self.prefix_lengths)
        w._count = self._count
        return w

    def summary(self) -> dict[str, Any]:
        choices: dict[str, int] = {}
        for s in self.sessions:
            for t in s.turns:
                key = t.tool_choice if isinstance(t.tool_choice, str) else "named"
                choices[key] = choices.get(key, 0) + 1
        return {
            **self.spec.to_dict(),
            "total_turns": self.total_turns,
            "prefix_tokens_per_agent": list(self.prefix_lengths),
            "tool_choice_mix": choices,
            "agents_detail": [{"name": a.name, "tools": [t["function"]["name"] for t in a.tools]} for a in self.agents],
        }


# --------------------------------------------------------------------------- generation


def _rng(spec: WorkloadSpec, *key: Any) -> random.Random:
    digest = hashlib.sha256(json.dumps([spec.seed, *key], default=str).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


DOMAINS = [
    ("platform-ops", "the platform operations team", "keep production services healthy, investigate incidents and ship fixes safely"),
    ("customer-success", "the customer success team", "resolve customer problems quickly, keep accounts healthy and escalate what needs people"),
    ("dev-assistant", "the developer productivity team", "help engineers read, change, test and ship code in the monorepo"),
    ("travel-desk", "the company travel desk", "plan and book business travel within the travel policy"),
]

POLICY_SUBJECTS = [
    "production changes", "customer data", "refunds", "incident communication", "access to credentials",
    "database queries", "calendar invitations", "outgoing e-mail", "deploys outside business hours",
    "feature flags", "log retention", "third-party services", "cost controls", "code review",
    "on-call handover", "travel bookings", "escalations", "personal information", "test failures",
    "service level objectives", "rollbacks", "documentation", "security reports", "data exports",
]
POLICY_RULES = [
    "Before acting on {s}, state the plan in one sentence and call exactly one tool for the next step.",
    "Never guess about {s}: look the facts up with the tools first and quote what the tool returned.",
    "When a request about {s} is ambiguous, ask one short clarifying question instead of calling a tool.",
    "Keep every answer about {s} under five sentences, with concrete names, numbers and dates.",
    "For {s}, prefer the least privileged action that solves the problem and say what you did.",
    "If a tool call about {s} fails, report the error verbatim and propose one alternative.",
    "Record every decision about {s} in the ticket so the next person on shift can follow it.",
    "Do not combine {s} with unrelated work in the same step; finish one thing at a time.",
    "Treat {s} as auditable: include identifiers, not descriptions, in tool arguments.",
    "Escalate {s} to a human when the change is irreversible or affects more than one customer.",
]

SERVICES = ["checkout-api", "search-indexer", "auth-gateway", "billing-worker", "notifications", "media-transcoder",
            "recommendations", "ledger", "inventory-sync", "graphql-edge"]
PEOPLE = ["Ana Ruiz", "Kenji Sato", "Priya Nair", "Tom Becker", "Lena Novak", "Omar Haddad", "Mia Chen", "Jonas Berg"]
COMPANIES = ["Northwind Traders", "Globex", "Initech", "Umbrella Health", "Stark Logistics", "Wayne Media", "Acme Robotics"]
CITIES = [("Berlin", "DE"), ("Lisbon", "PT"), ("Osaka", "JP"), ("Toronto", "CA"), ("Nairobi", "KE"), ("Austin", "US")]

USER_OPENERS = [
    "The {svc} service started returning errors for {co} about twenty minutes ago.",
    "{person} from {co} says their last invoice was charged twice.",
    "We need to ship the fix for the timeout in {svc} before the release freeze.",
    "{person} has to be in {city} next Tuesday for the {co} kickoff.",
    "Latency on {svc} doubled since the last deploy and the on-call is asking for help.",
    "{co} cannot log in to the dashboard since this morning; {person} opened a chat.",
]
USER_FOLLOWUPS = [
    "Thanks. What should we check next, and who needs to know?",
    "Good. Please also look at {svc} for the same time window.",
    "That matches what {person} saw. Can you prepare the next step?",
    "Okay, keep going, but do not touch production without a ticket.",
    "Can you summarize where we are for the handover to {person}?",
    "Now check whether {co} is affected by the same problem.",
    "Fine. Let us move on to the remaining item on the list.",
]
FILLER = [
    "For context, this is the {n}th report this week and the customer is on the enterprise plan.",
    "The change went out at {h}:{m:02d} UTC together with two unrelated configuration updates.",
    "Earlier today {person} mentioned a similar symptom in the {svc} staging environment.",
    "Please keep the answer short; I will forward it to the incident channel as is.",
]


def _fill(template: str, rng: random.Random) -> str:
    city = rng.choice(CITIES)
    return template.format(svc=rng.choice(SERVICES), co=rng.choice(COMPANIES), person=rng.choice(PEOPLE),
                           city=city[0], n=rng.randint(3, 9), h=rng.randint(0, 23), m=rng.randint(0, 59))


def _grow(base: str, target: int, count: Callable[[str], int], rng: random.Random, pool: list[str]) -> str:
    text = base
    while count(text) < target:
        text += " " + _fill(rng.choice(pool), rng)
    return text


def _tool_result(spec: WorkloadSpec, key: tuple, count: Callable[[str], int]) -> str:
    session, turn, index, name = key
    rng = _rng(spec, "result", *key)
    records: list[dict[str, Any]] = []
    payload: dict[str, Any] = {"tool": name, "status": "ok", "request_id": f"req-{rng.randrange(16**8):08x}", "results": records}
    while count(json.dumps(payload, separators=(",", ":"))) < spec.result_tokens:
        records.append({
            "id": f"{name[:3]}-{rng.randrange(10_000):04d}",
            "service": rng.choice(SERVICES),
            "owner": rng.choice(PEOPLE),
            "value": round(rng.uniform(0, 1000), 2),
            "note": _fill(rng.choice(FILLER), rng),
        })
    return json.dumps(payload, separators=(",", ":"))


def _system_prompt(spec: WorkloadSpec, agent: int, tools: list[dict], prefix_len: Callable[[str, list], int]) -> str:
    name, team, mission = DOMAINS[agent % len(DOMAINS)]
    rng = _rng(spec, "system", agent)
    head = (
        f"You are {name}-agent-{agent}, the assistant of {team}. Your job is to {mission}. "
        "You can call the tools listed below. Call a tool when it gives you facts or performs an action you need; "
        "answer in plain text when you can. Follow the operating policies exactly."
    )
    paragraphs: list[str] = []
    subjects = POLICY_SUBJECTS[:]
    rng.shuffle(subjects)

    def render(n: int) -> str:
        while len(paragraphs) < n:
            s = subjects[len(paragraphs) % len(subjects)]
            rules = rng.sample(POLICY_RULES, 3)
            paragraphs.append(f"Policy {len(paragraphs) + 1} ({s}): " + " ".join(r.format(s=s) for r in rules))
        return head + ("\n\nOperating policies:\n" + "\n".join(paragraphs[:n]) if n else "")

    # Smallest number of policy paragraphs that reaches the target (lengths grow monotonically).
    lo, hi = 0, 1
    while prefix_len(render(hi), tools) < spec.prefix_tokens:
        lo, hi = hi, hi * 2
        if hi > 4096:
            break
    while lo < hi:
        mid = (lo + hi) // 2
        if prefix_len(render(mid), tools) >= spec.prefix_tokens:
            hi = mid
        else:
            lo = mid + 1
    return render(hi)


def _turn_plans(spec: WorkloadSpec, session: int, tools: list[dict]) -> list[TurnPlan]:
    rng = _rng(spec, "plan", session)
    names = [t["function"]["name"] for t in tools]
    plans: list[TurnPlan] = []
    for t in range(spec.turns):
        if t == 0:
            kind = "required"  # an agent's first step is a tool call
        else:
            kind = rng.choices(["required", "named", "auto", "none"], weights=[40, 25, 15, 20])[0]
        if kind == "named":
            choice: Any = {"type": "function", "function": {"name": rng.choice(names)}}
        else:
            choice = kind
        plans.append(TurnPlan(tool_choice=choice, max_tokens=spec.text_max_tokens if kind == "none" else spec.call_max_tokens))
    return plans


def build_workload(
    spec: WorkloadSpec,
    *,
    count_tokens: Callable[[str], int],
    prefix_len: Callable[[str, list], int],
) -> Workload:
    """The workload for `spec`. `count_tokens(text)` sizes messages; `prefix_len(system, tools)`
    is the rendered prefix length (programs.Renderer.prefix_ids) that `prefix_tokens` targets."""
    agents: list[Agent] = []
    lengths: list[int] = []
    for g in range(spec.agents):
        rng = _rng(spec, "tools", g)
        tools = [json.loads(json.dumps(t)) for t in rng.sample(TOOL_POOL, spec.tools)]
        system = _system_prompt(spec, g, tools, prefix_len)
        name = DOMAINS[g % len(DOMAINS)][0]
        agents.append(Agent(name=f"{name}-{g}", system_prompt=system, tools=tools))
        lengths.append(prefix_len(system, tools))
    sessions: list[SessionPlan] = []
    for i in range(spec.sessions):
        agent = i % spec.agents
        rng = _rng(spec, "user", i)
        # Session-specific opener: sessions of one agent share the prefix, not the first message.
        opener = f"[ticket {1000 + i}] " + _fill(rng.choice(USER_OPENERS), rng)
        users = [_grow(opener, spec.user_tokens, count_tokens, rng, FILLER)]
        for _ in range(spec.turns - 1):
            users.append(_grow(_fill(rng.choice(USER_FOLLOWUPS), rng), spec.user_tokens, count_tokens, rng, FILLER))
        sessions.append(SessionPlan(index=i, agent=agent, user_messages=users, turns=_turn_plans(spec, i, agents[agent].tools)))
    w = Workload(spec=spec, agents=agents, sessions=sessions, prefix_lengths=lengths)
    w._count = count_tokens
    return w
