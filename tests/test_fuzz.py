"""A long fuzz run against the live endpoint (fake backend): seeded frames, valid and invalid
JSON-RPC, batches, random params. Every request id gets exactly one answer (with id null where
the id cannot be echoed), every generate that passes the envelope gets exactly one stream_end
before its response, and the server stays up and responsive (stall probe).

    FUZZ_FRAMES=10000 .venv/bin/python -m pytest -q -s tests/test_fuzz.py

FUZZ_FRAMES (default 400) sets the number of frames, FUZZ_SEED (default 0) the seed: the same
frames every run (derandomized for CI).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from typing import Any

from conftest import running_server, stall_probe
from protocol.errors import ERROR_CODES

FRAMES = int(os.environ.get("FUZZ_FRAMES", "400"))
SEED = int(os.environ.get("FUZZ_SEED", "0"))
WINDOW = 16  # frames sent before their answers are awaited (pipelined)
KNOWN_CODES = {e.code for e in ERROR_CODES}
METHODS = ["server.info", "rpc.discover", "cancel", "session.open", "session.close", "generate", "nope", "rpc.other"]


class Gen:
    """Seeded frames. Ids are unique per run (except null), so each answer can be attributed."""

    def __init__(self, seed: int, max_id_chars: int):
        self.r = random.Random(seed)
        self.n = 0
        self.max_id_chars = max_id_chars
        self.sessions: list[str] = []

    def text(self, k: int = 12) -> str:
        alphabet = "abc xyz\u00e9\u4e2d\"\\\n\t{}[]:,\ud800\U0001f600"
        return "".join(self.r.choice(alphabet) for _ in range(self.r.randint(0, k)))

    def value(self, depth: int = 0) -> Any:
        r = self.r
        kinds = ["none", "bool", "int", "float", "str"] + (["list", "dict"] if depth < 3 else [])
        kind = r.choice(kinds)
        if kind == "none":
            return None
        if kind == "bool":
            return r.random() < 0.5
        if kind == "int":
            return r.choice([0, 1, -1, 7, 2**31, 2**63, -(2**70), r.randint(-1000, 1000)])
        if kind == "float":
            return r.choice([0.5, -1.25, 1e300, 3.0])
        if kind == "str":
            return self.text()
        if kind == "list":
            return [self.value(depth + 1) for _ in range(r.randint(0, 3))]
        return {self.text(6): self.value(depth + 1) for _ in range(r.randint(0, 3))}

    def new_id(self) -> Any:
        self.n += 1
        r = self.r.random()
        if r < 0.45:
            return self.n
        if r < 0.85:
            return f"id-{self.n}"
        if r < 0.88:
            return None
        if r < 0.91:
            return self.n + 0.5  # a fractional id: fine except for generate
        if r < 0.93:
            return "L" * (self.max_id_chars + 1) + str(self.n)  # too long: answered with id null
        if r < 0.96:
            return self.r.choice([True, [1], {"a": 1}])  # invalid: answered with id null
        tail = str(self.n)
        return "x" * (self.max_id_chars - len(tail)) + tail  # at the limit: fine (and unique)

    def params(self, method: str) -> Any:
        r = self.r
        if r.random() < 0.15:
            return self.value()  # anything at all
        if method == "generate":
            roles = ["user"] * 6 + ["system", "tool", "bogus"]
            p: dict[str, Any] = {"messages": [{"role": r.choice(roles), "content": self.text(30)}
                                              for _ in range(r.choice([0, 1, 1, 1, 2, 3]))],
                                 "max_tokens": r.choice([1, 2, 4, 8, 8, 4, 9, 0, -1, "4"]),
                                 "tool_choice": r.choice(["none", "none", "auto", "x"])}
            if self.sessions and r.random() < 0.4:
                p["session_id"] = r.choice(self.sessions)
            if r.random() < 0.2:
                p["temperature"] = r.choice([0, 0.7, 3, None])
            if r.random() < 0.1:
                p["stop"] = [self.text(4) for _ in range(r.randint(0, 3))]
            if r.random() < 0.1:
                p[self.text(5)] = self.value()
            return p
        if method == "cancel":
            return {"request_id": r.choice([self.n, f"id-{self.n - 1}", self.value(), "L" * 300])}
        if method == "session.open":
            return r.choice([{}, {"system_prompt": self.text(20)}, {"system_prompt": 5}, {"tools": self.value()}])
        if method == "session.close":
            return {"session_id": r.choice(self.sessions) if self.sessions and r.random() < 0.5 else self.text(8)}
        return r.choice([{}, [], None, {"x": 1}])

    def call(self) -> dict[str, Any]:
        r = self.r
        method = r.choice(METHODS)
        obj: dict[str, Any] = {"jsonrpc": "2.0" if r.random() < 0.93 else r.choice(["1.0", 2.0, None]),
                               "method": method if r.random() < 0.97 else self.value()}
        params = self.params(method)
        if params is not None or r.random() < 0.5:
            obj["params"] = params
        if r.random() < 0.85:
            obj["id"] = self.new_id()
        return obj

    def frame(self) -> str:
        r = self.r
        x = r.random()
        if x < 0.05:
            return self.text(40).encode("utf-8", "replace").decode()  # not JSON, mostly (no lone surrogate: a text frame is UTF-8)
        if x < 0.08:
            return json.dumps(self.value())  # JSON, not a request
        if x < 0.10:
            return "[" * r.randint(60, 80) + "]" * r.randint(0, 80)  # deep nesting
        if x < 0.11:
            return "[]"
        if x < 0.70:
            return json.dumps(self.call())
        batch: list[Any] = [self.call() if r.random() < 0.9 else self.value() for _ in range(r.randint(1, 8))]
        return json.dumps(batch)


def _valid_id(v: Any) -> bool:
    return v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool))


def _too_long(v: Any, limit: int) -> bool:
    return (isinstance(v, str) and len(v) > limit) or (isinstance(v, int) and not isinstance(v, bool) and len(str(abs(v))) > limit)


def expected(text: str, limit: int, max_batch: int) -> tuple[list[Any], list[Any]]:
    """(ids that must be answered, None for an answer with id null; generate ids that must get a
    stream_end), from the protocol's rules (PROTOCOL.md section 2)."""
    try:
        value = json.loads(text)
    except ValueError:
        return [None], []
    if isinstance(value, list) and (not value or len(value) > max_batch):
        return [None], []
    depth_bad = _depth(value) > 64
    if depth_bad:
        return [None], []
    answers: list[Any] = []
    streams: list[Any] = []
    for item in value if isinstance(value, list) else [value]:
        if not isinstance(item, dict):
            answers.append(None)
            continue
        ok_envelope = (item.get("jsonrpc") == "2.0" and isinstance(item.get("method"), str)
                       and ("params" not in item or isinstance(item["params"], (dict, list))))
        if "id" not in item:
            # A notification is never answered, but an invalid one is an Invalid Request (whether
            # it was meant as a notification cannot be known): -32600 with id null, per the spec.
            if not ok_envelope:
                answers.append(None)
            continue
        rid = item["id"]
        if _too_long(rid, limit) or not _valid_id(rid):
            answers.append(None)
            continue
        answers.append(rid)
        if ok_envelope and item["method"] == "generate" and isinstance(rid, (str, int)) and not isinstance(rid, bool):
            streams.append(rid)
    return answers, streams


def _depth(v: Any) -> int:
    best, stack = 0, [(v, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, (list, dict)):
            best = max(best, d)
            stack.extend((c, d + 1) for c in (node.values() if isinstance(node, dict) else node))
    return best


def _key(v: Any) -> str:
    return json.dumps(v)


def _fuzz(addr: str, frames: int, seed: int, limit: int, max_batch: int) -> dict[str, Any]:
    from websockets.sync.client import connect as sync_connect

    gen = Gen(seed, limit)
    stats: Counter[str] = Counter()
    failures: list[str] = []
    with sync_connect(f"ws://{addr}/ws", max_size=None) as ws:
        sent = 0
        while sent < frames:
            want: Counter[str] = Counter()
            streams: dict[str, int] = {}
            for _ in range(min(WINDOW, frames - sent)):
                text = gen.frame()
                answers, gens = expected(text, limit, max_batch)
                want.update(_key(a) for a in answers)
                for g in gens:
                    streams[_key(g)] = 0
                ws.send(text)
                sent += 1
                stats["frames"] += 1
                stats["ids_sent"] += len(answers)
            got: Counter[str] = Counter()
            while sum(got.values()) < sum(want.values()):
                reply = json.loads(ws.recv(timeout=60))
                for item in reply if isinstance(reply, list) else [reply]:
                    if "method" in item:
                        assert item["method"] in ("text_chunk", "reasoning_chunk", "function_call_request", "stream_end"), item
                        if item["method"] == "stream_end":
                            k = _key(item["params"]["request_id"])
                            if k not in streams or got[k]:
                                failures.append(f"stream_end for {k} unexpected or after its response")
                            streams[k] = streams.get(k, 0) + 1
                        continue
                    if ("result" in item) == ("error" in item):
                        failures.append(f"malformed response {str(item)[:200]}")
                    if "error" in item:
                        stats[f"error {item['error']['code']}"] += 1
                        if item["error"]["code"] not in KNOWN_CODES:
                            failures.append(f"unknown code {item['error']['code']}")
                    else:
                        stats["results"] += 1
                        if isinstance(item["result"], dict) and "session_id" in item["result"]:
                            gen.sessions.append(item["result"]["session_id"])
                    got[_key(item.get("id"))] += 1
                    stats["ids_answered"] += 1
            if got != want:
                failures.append(f"answers {dict(got - want)} unexpected, {dict(want - got)} missing")
            for k, count in streams.items():
                if count != 1 or not got[k]:
                    failures.append(f"generate {k}: {count} stream_end")
            stats["stream_ends"] += sum(streams.values())
        # Still up and answering.
        ws.send(json.dumps({"jsonrpc": "2.0", "id": "last", "method": "server.info"}))
        while True:
            reply = json.loads(ws.recv(timeout=30))
            if isinstance(reply, dict) and reply.get("id") == "last":
                assert "result" in reply
                break
    return {"stats": stats, "failures": failures}


async def test_fuzz_every_id_answered_and_server_stays_up(cfg, fake):
    fake.token_delay_s = 0.0
    tight = cfg.replace(max_tokens_cap=8, default_max_tokens=4)
    async with running_server(tight, fake) as (addr, _):
        t0 = time.monotonic()
        async with stall_probe(addr, interval_s=0.05) as probe:
            out = await asyncio.to_thread(_fuzz, addr, FRAMES, SEED, tight.max_id_chars, tight.max_batch)
        wall = time.monotonic() - t0
        stats, failures = out["stats"], out["failures"]
        print(f"\n[fuzz] seed {SEED}: {stats['frames']} frames, {stats['ids_sent']} ids sent, "
              f"{stats['ids_answered']} answered, {stats['stream_ends']} stream_ends, {len(failures)} failures, "
              f"{wall:.1f} s, probe {len(probe.round_trips_ms)} round trips, worst {probe.worst_ms:.1f} ms")
        print("[fuzz] outcomes:", dict(sorted((k, v) for k, v in stats.items() if k.startswith(("error", "results")))))
        assert not failures, failures[:10]
        assert stats["frames"] == FRAMES and stats["ids_answered"] == stats["ids_sent"]
        assert probe.round_trips_ms and probe.unanswered == 0
        assert probe.worst_ms < 250, probe.worst_ms
