"""The decoding engine behind the HTTP API, and `ChatService`: a loaded model ready to answer requests.

One decoding thread owns the model (its KV cache is per model). Requests wait in a FIFO queue; each round the thread
takes the oldest request plus every waiting request it can decode together (greedy ones, or sampled ones with the
same settings and no seed), left-pads them into one batch and runs it through
`glmkit.core.generate.generate_stream`, which gives each row what it would get alone. A seeded sampled request runs
alone so its seed means the same thing whatever else is queued. Per-request state (tokens, stop strings, limits,
cancellation, a forced tool-call line, log-probabilities) lives in its own Job; a client that goes away cancels its
row. Every setting of a request comes from its protocol.SamplingParams.

Log-probabilities are those of the scores the sampler sees before temperature / top-k / top-p: the model's, after
the penalties, ChatGLM's NaN/inf guard and a forced tool-call line (the tokens it excludes get -9999.0).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from glmkit.core.chat import INVALID_SCORE_TOKEN_ID, find_stop, partial_stop
from glmkit.core.generate import generate_stream, invalid_score_guard
from glmkit.core.tools import ForcedCall
from glmkit.serving.jobs import MAX_BATCH_SIZE, MAX_QUEUE, Job, JobQueue, logprob_entry, shutting_down, stop_token_ids
from glmkit.serving.metrics import ServerMetrics
from glmkit.serving.protocol import APIError, ChatFormat, SamplingParams
from glmkit.serving.scheduler import ContinuousEngine

log = logging.getLogger(__name__)

GATHER_SECONDS = 0.02  # how long a new batch waits for more requests to join it


class Engine(JobQueue):
    """The decoding thread and its queue. `submit` is called from the event loop, everything else runs in the thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE) -> None:
        super().__init__(max_queue, "glmkit-decoder")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size = max_batch_size
        self.gather_s = GATHER_SECONDS
        self.context = int(model.config.max_seq_len)
        self.eos_ids = set(stop_token_ids(model, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.active = 0  # rows in the batch being decoded
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}

    # ---- event-loop side
    def close(self, timeout: float = 30.0) -> None:
        """Stops taking work, cancels what waits, lets the running batch see its cancellations, joins the thread."""
        for job in self._stop():
            job.send("error", shutting_down())
        self._join(timeout)

    # ---- decoding-thread side
    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if self._closing:
                return None
            first = self._pending.popleft()
            batch = [first]
            key = first.params.batch_key()
            if key is None:
                return batch
            # Clients that connect together reach the queue a few milliseconds apart (each request is parsed and
            # tokenized first): a short wait lets them share this batch instead of queueing behind it.
            deadline = time.monotonic() + self.gather_s
            while len(self._pending) + 1 < self.max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            longest, most_new = len(first.input_ids), first.params.max_new_tokens
            for job in list(self._pending):
                if len(batch) >= self.max_batch_size:
                    break
                if job.params.batch_key() != key:
                    continue
                # a left-padded batch runs max(prompt) + max(new) positions: it must fit the context
                if max(longest, len(job.input_ids)) + max(most_new, job.params.max_new_tokens) > self.context:
                    continue
                longest = max(longest, len(job.input_ids))
                most_new = max(most_new, job.params.max_new_tokens)
                self._pending.remove(job)
                batch.append(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self.active = len(batch)
            self.stats["requests"] += len(batch)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(batch))
            try:
                self._decode(batch)
            except Exception as err:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for job in batch:
                    job.send("error", APIError(500, f"generation failed: {type(err).__name__}: {err}",
                                               type="server_error", code="generation_failed"))
            finally:
                self.active = 0

    def _decode(self, batch: list[Job]) -> None:
        import torch

        live = [job for job in batch if not job.cancelled.is_set()]
        for job in batch:
            if job.cancelled.is_set():
                job.send("end", "cancelled")
        if not live:
            return
        width = max(len(job.input_ids) for job in live)
        ids = torch.full((len(live), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(live), width), dtype=torch.long)
        for row, job in enumerate(live):
            n = len(job.input_ids)
            ids[row, width - n:] = torch.tensor(job.input_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        params = live[0].params
        device = next(self.model.parameters()).device
        running = set(range(len(live)))
        produced = [0] * len(live)
        observed: dict[str, Any] = {}

        def constrain(seen, scores):  # each row's forced tool-call line, on the tokens it generated
            scores = scores.clone()
            for row, job in enumerate(live):
                if job.constraint is not None and row in running:
                    scores[row] = job.constraint(seen[row, width:].tolist(), scores[row])
            return scores

        def observe(seen, scores):  # the scores the sampler picks from, for logprobs
            observed["logprobs"] = scores.float().log_softmax(dim=-1)
            return scores

        # chat()'s NaN/inf guard, so a request gets what model.chat would give it
        processors = [lambda seen, scores: invalid_score_guard(seen, scores, INVALID_SCORE_TOKEN_ID)]
        if any(job.constraint is not None for job in live):
            processors.append(constrain)
        if any(job.params.logprobs is not None for job in live):
            processors.append(observe)
        stream = generate_stream(
            self.model, ids.to(device), mask.to(device),
            max_new_tokens=max(job.params.max_new_tokens for job in live),
            do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id, seed=params.seed,
            logits_processors=processors,
        )
        try:
            with torch.inference_mode():
                for tokens in stream:
                    tokens = tokens.tolist()
                    for row in sorted(running):
                        job = live[row]
                        if job.cancelled.is_set() or self._closing:
                            job.send("end", "cancelled")
                            running.discard(row)
                            continue
                        token = int(tokens[row])
                        if token in self.eos_ids:
                            job.send("end", "stop")
                            running.discard(row)
                            continue
                        entry = None
                        if job.params.logprobs is not None:
                            entry = self._logprob_entry(observed["logprobs"][row], token, job.params.logprobs)
                        job.send("token", (token, entry))
                        produced[row] += 1
                        if produced[row] >= job.params.max_new_tokens:
                            job.send("end", "length")
                            running.discard(row)
                    if not running:
                        break
        finally:
            stream.close()
        for row in running:  # the stream ran out (context or max_new_tokens reached)
            live[row].send("end", "length")

    def _logprob_entry(self, logprobs, token: int, top: int) -> dict:
        return logprob_entry(self.tokenizer, logprobs, token, top)


class ChatService:
    """A loaded model ready to answer: its name, its decoding engine, its chat format and its metrics.

    engine: "continuous" (glmkit.serving.scheduler.ContinuousEngine: continuous batching over a paged KV cache;
    `engine_options` are its kv_cache_memory, block_size, prefill_chunk) or "batch" (Engine above: one left-padded
    batch at a time). request_timeout: seconds a request may take from arrival to its last token (None = no
    limit); past it the request ends with a 504 error and its row is freed.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE, engine: str = "continuous", request_timeout: float | None = None,
                 **engine_options: Any) -> None:
        self.name = name
        self.created = int(time.time())
        if engine == "continuous":
            self.engine = ContinuousEngine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                                           **engine_options)
        elif engine == "batch":
            if engine_options:
                raise ValueError(f"the batch engine takes no {', '.join(sorted(engine_options))}")
            self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
        else:
            raise ValueError(f"engine must be 'continuous' or 'batch', got {engine!r}")
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
        (cut before the first stop string) extends them all. With incremental=False (and no stop strings) only the
        final item is produced, saving a decode per token.
        """
        constraint = ForcedCall(self.engine.tokenizer, params.forced_tools) if params.forced_tools else None
        job = Job(ids, params, asyncio.get_running_loop(), constraint=constraint)
        self.engine.submit(job)
        started = time.monotonic()
        deadline = None if self.request_timeout is None else started + self.request_timeout
        tokens: list[int] = []
        logprobs: list[dict] = []
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
                text = self.format.text(tokens)
                if stop:
                    cut = find_stop(text, stop)
                    if cut is not None:
                        job.cancel()
                        yield Update(text[:cut], "stop", list(tokens), list(logprobs))
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
