"""`ChatService`: a loaded model ready to answer requests (its name, its decoding engine, its chat format and its
metrics), and the Updates its answers stream as.

The decoding engine is glmkit.serving.scheduler.ContinuousEngine (continuous batching over a paged KV cache), on one
process or on rank 0 of a tensor-parallel model (the other ranks mirror its model calls, glmkit.distributed.tp).
Log-probabilities are those of the scores the sampler sees before temperature / top-k / top-p: the model's, after
the penalties, ChatGLM's NaN/inf guard and a forced tool-call line (the tokens it excludes get -9999.0).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from glmkit.core.chat import find_stop, partial_stop
from glmkit.core.tools import ForcedCall
from glmkit.serving.detokenize import IncrementalDetokenizer
from glmkit.serving.jobs import MAX_BATCH_SIZE, MAX_QUEUE, Job
from glmkit.serving.metrics import ServerMetrics
from glmkit.serving.protocol import APIError, ChatFormat, SamplingParams
from glmkit.serving.scheduler import ContinuousEngine


class ChatService:
    """A loaded model ready to answer: its name, its decoding engine, its chat format and its metrics.

    `engine_options` are the ContinuousEngine's kv_cache_memory, block_size, prefill_chunk, prefix_caching,
    max_batched_tokens.
    request_timeout: seconds a request may take from arrival to its last token (None = no limit); past it the
    request ends with a 504 error and its row is freed.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE, request_timeout: float | None = None, **engine_options: Any) -> None:
        self.name = name
        self.created = int(time.time())
        self.engine = ContinuousEngine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                                       **engine_options)
        if request_timeout is not None and request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive seconds, got {request_timeout}")
        self.request_timeout = request_timeout
        self.context = self.engine.context
        self.format = ChatFormat(tokenizer, self.context)
        self.metrics = ServerMetrics(self.engine)

    async def generate(self, ids: list[int], params: SamplingParams, stop: list[str] = (), *,
                       incremental: bool = True) -> AsyncIterator[Update]:
        """Yields Updates (text so far, finish reason or None, tokens, logprobs); the last carries the finish reason.

        Text that might still turn into a stop string is held back, so the texts only ever grow and the last one
        (cut before the first stop string) extends them all. The text is decoded incrementally (serving.detokenize:
        a tail that may still change, such as half a UTF-8 character, waits for the next token) and the last one
        from all the tokens. With incremental=False (and no stop strings) only the
        final item is produced, saving a decode per token.
        """
        constraint = ForcedCall(self.engine.tokenizer, params.forced_tools) if params.forced_tools else None
        job = Job(ids, params, asyncio.get_running_loop(), constraint=constraint)
        self.engine.submit(job)
        started = time.monotonic()
        deadline = None if self.request_timeout is None else started + self.request_timeout
        tokens: list[int] = []
        logprobs: list[dict] = []
        detokenizer = IncrementalDetokenizer(self.engine.tokenizer)
        try:
            while True:
                try:
                    left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                    kind, value = await asyncio.wait_for(job.events.get(), left)
                except asyncio.TimeoutError:
                    self.metrics.finished("timeout")
                    raise APIError(504, f"the request took longer than {self.request_timeout:g} s "
                                        f"({len(tokens)} tokens generated)", type="server_error",
                                   code="timeout") from None
                if kind == "error":
                    self.metrics.finished("error")
                    raise value
                if kind == "token" and not tokens:
                    self.metrics.first_token(time.monotonic() - started)
                if kind == "token":
                    self.metrics.tokens(1)
                if kind == "end":
                    self.metrics.finished(value)
                    text = self.format.text(tokens)
                    cut = find_stop(text, stop) if stop else None
                    reason = "stop" if value == "cancelled" or cut is not None else value
                    yield Update(text if cut is None else text[:cut], reason, list(tokens), list(logprobs))
                    return
                token, entry = value
                tokens.append(token)
                if entry is not None:
                    logprobs.append(entry)
                if not (incremental or stop):
                    continue
                text = self.format.finish(detokenizer.push(token))
                if stop:
                    whole = self.format.finish(detokenizer.current())  # a stop string may end in the held tail
                    cut = find_stop(whole, stop)
                    if cut is not None:
                        job.cancel()
                        yield Update(whole[:cut], "stop", list(tokens), list(logprobs))
                        return
                    text = text[:len(text) - partial_stop(text, stop)]
                yield Update(text, None, list(tokens), list(logprobs))
        finally:
            job.cancel()  # a client that went away (or a stop string) frees its batch row


@dataclass
class Update:
    """One step of an answer: its text so far (post-processed as chat() does, cut before a stop string), the finish
    reason on the last update, the answer's tokens (stop token excluded) and their logprobs entries (if asked)."""

    text: str
    reason: str | None
    tokens: list[int]
    logprobs: list[dict]

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)
