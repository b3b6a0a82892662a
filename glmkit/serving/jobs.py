"""A request as the decoding thread sees it: its Job (prompt, settings and the channel its tokens go back through),
the errors it can end with, and OpenAI's logprobs entries of its tokens."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from glmkit.core.tools import ForcedCall
from glmkit.serving.protocol import APIError, SamplingParams

MAX_BATCH_SIZE = 16
MAX_QUEUE = 256


@dataclass
class Job:
    """One request's generation: its prompt, its settings, and the channel its tokens go back through."""

    input_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    constraint: ForcedCall | None = None  # tool_choice "required" / named: the answer's first line

    def send(self, kind: str, value: Any = None) -> None:
        # Called from the decoding thread; the queue belongs to the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


def generation_failed(err: Exception) -> APIError:
    """The 500 a request gets when the model failed on it (the server goes on serving the others)."""
    return APIError(500, f"generation failed: {type(err).__name__}: {err}", type="server_error",
                    code="generation_failed")


def send_all(events: list[tuple[Job, str, Any]]) -> None:
    """Delivers (job, kind, value) events in order with one wake-up per event loop instead of one per event: each
    `call_soon_threadsafe` writes to the loop's self-pipe, a system call per event otherwise."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, Any]]] = {}
    for event in events:
        by_loop.setdefault(event[0].loop, []).append(event)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            pass


def _put_all(events: list[tuple[Job, str, Any]]) -> None:
    for job, kind, value in events:
        job.events.put_nowait((kind, value))


def _token_info(tokenizer: Any, token: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": max(float(logprob), -9999.0),
            "bytes": list(raw)}


def logprob_entry(tokenizer: Any, logprobs, token: int, top: int) -> dict:
    """OpenAI's logprobs entry of one chosen token: its log-probability and the `top` most likely tokens."""
    entry = _token_info(tokenizer, token, logprobs[token])
    entry["top_logprobs"] = []
    if top:
        values, index = logprobs.topk(top)
        entry["top_logprobs"] = [_token_info(tokenizer, int(i), float(v)) for v, i in zip(values, index)]
    return entry
