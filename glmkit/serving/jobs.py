"""What both decoding engines share: a request's Job (its prompt, settings and the channel its tokens go back
through), the stop tokens of a family, and OpenAI's logprobs entries."""

from __future__ import annotations

import asyncio
import collections
import threading
from dataclasses import dataclass, field
from typing import Any

from glmkit.core import chat
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


class JobQueue:
    """What both decoding engines share on the event-loop side: a bounded FIFO of submitted Jobs (503 when full or
    closing), the condition their decoding thread waits on, and that thread's lifecycle. Subclasses give `_run`."""

    def __init__(self, max_queue: int, thread_name: str) -> None:
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()  # submitted, not yet taken by the thread
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise shutting_down()
            if self.queued() >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                               type="server_error", code="server_busy")
            self._pending.append(job)
            self._cond.notify()

    def _stop(self) -> list[Job]:
        """Marks the queue closing, wakes the thread and returns the jobs it had not taken yet."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        return waiting

    def _join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)


def send_all(events: list[tuple[Job, str, Any]]) -> None:
    """Delivers (job, kind, value) events in order with one wake-up per event loop instead of one per event: each
    `call_soon_threadsafe` writes to the loop's self-pipe, a system call that cost the continuous engine ~6% of a
    step when every row of a step sent its token on its own."""
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


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the ones model.chat stops at for this family."""
    return [int(i) for i in chat.stop_token_ids(model, tokenizer, chat.family_of(tokenizer)) if i is not None]
