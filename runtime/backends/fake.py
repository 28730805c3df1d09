"""A scripted token backend behind the same seam as the engine: for fast tests and demos.

No model: what it "generates" is a script's text, tokenized with a real (tiny, byte-level)
Hugging Face tokenizer built in memory with a ChatML chat template, and streamed one token
per step with cumulative text, as SGLang streams. It keeps a bounded record of the token
sequences it has seen, so `cached_tokens` behaves like a prefix cache (the longest prefix of
the prompt it computed before), and with radix_cache=False it reports 0.

    backend = FakeBackend(reply=lambda request, prompt_text: "Hello!")
    backend.replies.append(backend.call_text("get_weather", {"city": "Paris"}))  # next reply

The end-of-turn token ends every reply unless the reply is cut by max_new_tokens ('length')
or an abort. The decoding constraint is not applied: a script writes what the test needs; a
scripted call whose opening the prompt already ends with (jump-forward) continues after it.
`INFERENCE_BACKEND=fake` serves it (replies "Hello from the fake backend.").
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

from runtime.backends.base import BackendInfo, BackendUnavailable, GenRequest, GenUpdate, TokenBackend
from runtime.config import Config

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
DEFAULT_REPLY = "Hello from the fake backend."
SEEN_SEQUENCES = 256  # token sequences remembered for cached_tokens

Reply = Callable[[GenRequest, str], str]


@functools.lru_cache(maxsize=1)
def fake_tokenizer() -> Any:
    """A byte-level BPE tokenizer with no merges (one token per byte) and ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
        unk_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS, clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML_TEMPLATE
    return fast


CALL_TRIGGER = "<tool_call>"


def _forced_overlap(prompt_text: str, reply: str) -> int:
    """How much of a scripted call the prompt already ends with: a runtime that jump-forwards
    appends the forced opening of a call to the prompt (runtime.turn.jump_forward), and a
    constrained engine continues after it; so does this backend."""
    start = prompt_text.rfind(CALL_TRIGGER)
    if start < 0 or not reply.startswith(CALL_TRIGGER):
        return 0
    tail = prompt_text[start:]
    return len(tail) if reply.startswith(tail) else 0


class FakeBackend(TokenBackend):
    def __init__(self, cfg: Config | None = None, *, reply: Reply | None = None, context_length: int = 32768,
                 radix_cache: bool = True, token_delay_s: float = 0.0):
        self.reply = reply or (lambda _request, _prompt: DEFAULT_REPLY)
        self.replies: collections.deque[str] = collections.deque()  # taken before `reply`, one per request
        self.token_delay_s = token_delay_s
        # Test hooks: after this many tokens of a reply the stream waits (for a cancel or an abort)
        # instead of going on; and a killed engine whose streams never return (as SGLang's do when
        # its scheduler process is killed) instead of failing.
        self.stall_after: int | None = None
        self.stalled: set[str] = set()  # rids of the streams waiting at stall_after now
        self.hang_when_killed = False
        self.requests: list[GenRequest] = []  # every request streamed, in order (warm-ups included)
        self._context_length = cfg.context_length if cfg is not None and cfg.context_length else context_length
        self._radix = cfg.radix_cache if cfg is not None else radix_cache
        self._seen: collections.deque[tuple[int, ...]] = collections.deque(maxlen=SEEN_SEQUENCES)
        self._inflight: set[str] = set()
        self._aborted: set[str] = set()
        self._ready = False
        self._alive = True

    # ------------------------------------------------------------------ lifecycle
    @property
    def info(self) -> BackendInfo:
        if not self._ready:
            raise BackendUnavailable("the fake backend has not started")
        return BackendInfo(name="fake", model="fake-chatml", device="cpu", dtype="none", attention_backend="none",
                           context_length=self._context_length, kv_capacity_tokens=self._context_length * 4,
                           radix_cache=self._radix)

    @property
    def tokenizer(self) -> Any:
        return fake_tokenizer()

    async def start(self) -> None:
        fake_tokenizer()
        self._ready, self._alive = True, True

    async def stop(self) -> None:
        self._ready = False

    def is_ready(self) -> bool:
        return self._ready and self._alive

    def supervised(self) -> bool:
        return True

    def check_alive(self) -> bool:
        return self._alive or not self._ready

    def kill(self) -> None:
        """Behave like an engine whose process died: streams fail, the supervisor restarts it."""
        self._alive = False

    def inflight(self) -> int:
        return len(self._inflight)

    async def engine_requests(self) -> int | None:
        return len(self._inflight)

    async def flush_cache(self) -> bool:
        if self._inflight:
            return False
        self._seen.clear()
        return True

    # ------------------------------------------------------------------ generation
    def call_text(self, name: str, arguments: dict[str, Any]) -> str:
        """One tool call in the syntax of this backend's format (the project's default)."""
        from programs import format_for

        return format_for(self.tokenizer).call_text(name, arguments)

    def _cached(self, prompt: tuple[int, ...]) -> int:
        if not self._radix:
            return 0
        best = 0
        for seq in self._seen:
            n = 0
            for a, b in zip(seq, prompt, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(prompt) - 1) if prompt else 0

    async def stream(self, request: GenRequest) -> AsyncIterator[GenUpdate]:
        if not self.is_ready():
            raise BackendUnavailable("the fake backend is not ready")
        self.requests.append(request)
        tok = self.tokenizer
        prompt = tuple(request.input_ids)
        cached = self._cached(prompt)
        prompt_text = tok.decode(list(prompt))
        # A prefix warm-up (runtime.warmup: rid warm-*) never takes a scripted reply.
        scripted = self.replies and not request.rid.startswith("warm-")
        text = self.replies.popleft() if scripted else self.reply(request, prompt_text)
        text = text[_forced_overlap(prompt_text, text):]
        ids = list(tok.encode(text, add_special_tokens=False)) + [tok.eos_token_id]
        budget = request.sampling.max_new_tokens
        self._inflight.add(request.rid)
        out: list[int] = []
        decoded: list[Any] = [0, ""]
        try:
            for i, token in enumerate(ids[:budget]):
                await asyncio.sleep(self.token_delay_s)
                while (self.stall_after is not None and i >= self.stall_after and self._alive
                       and request.rid not in self._aborted):
                    self.stalled.add(request.rid)
                    await asyncio.sleep(0.01)
                self.stalled.discard(request.rid)
                if not self._alive:
                    if self.hang_when_killed:
                        await asyncio.Event().wait()
                    raise BackendUnavailable("the fake engine died")
                if request.rid in self._aborted:
                    yield self._update(out, len(prompt), cached, "abort", decoded)
                    return
                out.append(token)
                last = i == len(ids) - 1
                finish = "stop" if last else ("length" if len(out) == budget else None)
                yield self._update(out, len(prompt), cached, finish, decoded)
                if finish is not None:
                    return
        finally:
            self._inflight.discard(request.rid)
            self._aborted.discard(request.rid)
            self.stalled.discard(request.rid)
            self._seen.append(prompt + tuple(out))

    def _update(self, out: list[int], prompt_tokens: int, cached: int, finish: str | None,
                decoded: list[Any]) -> GenUpdate:
        # Decoded incrementally (each step decodes only the ids since the last complete
        # character; `decoded` is this stream's [ids done, their text]), so a long reply costs
        # linear time, as an engine's detokenizer does.
        done, text = decoded
        tail = self.tokenizer.decode(out[done:], skip_special_tokens=False)
        if not tail.endswith("\ufffd"):
            decoded[0], decoded[1], text, tail = len(out), text + tail, text + tail, ""
        return GenUpdate(text=text + tail, output_ids=list(out),
                         prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=len(out),
                         finish_reason=finish)

    async def abort(self, rid: str) -> None:
        if rid in self._inflight:
            self._aborted.add(rid)
