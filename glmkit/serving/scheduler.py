"""Continuous batching over a paged KV cache: the decoding engine of `glmkit serve`.

One thread owns the model. Every step it
  1. retires cancelled requests (a client that left, a stop string, a timeout) and gives their KV blocks back;
  2. admits waiting requests while rows and KV blocks allow (the oldest first; preempted ones first of all);
  3. prefills admitted prompts, at most `prefill_chunk` tokens per step in total and, as vLLM's
     max_num_batched_tokens, at most `max_batched_tokens` minus the rows decoding this step (never less than a
     block), so a long prompt never stalls the rows already decoding and a full batch keeps a steady pace
     (ChatGLM-6B's bidirectional context, everything before <sop>, is one chunk: its tokens see each other);
  4. runs one decode forward for every row whose prompt is in the cache (its last token is fed there, so a request's
     first token comes from the same place as every other), samples each row with its own SamplingParams
     (temperature, top-p/k, penalties, seed, max_tokens, a forced tool-call line, logprobs) and retires finished
     rows.
Keys/values live in a core.paged_cache.BlockPool sized from `kv_cache_memory` (bytes) or, by default, from free
memory. When a row needs a block and none is free, the newest request is preempted: its blocks are freed and it
goes back to the front of the queue with the tokens it has generated, to be recomputed later; it is never failed.
With prefix caching (on by default) the full blocks of prompts stay cached after their requests end and a new
request sharing a prefix (a system prompt, a tool list) starts from them (PrefixCache).
A greedy request gets the tokens it gets alone: rows never see each other's keys (the mask), positions are each
request's own (2D for ChatGLM-6B), and a seeded request owns its random generator.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from glmkit.core.chat import INVALID_SCORE_TOKEN_ID, stop_token_ids
from glmkit.core.generate import (
    apply_presence_frequency_penalty,
    frozen_rows,
    invalid_score_guard,
    next_positions,
    sample,
)
from glmkit.core.paged_cache import BlockPool, bytes_per_block
from glmkit.serving.jobs import (
    MAX_BATCH_SIZE,
    MAX_QUEUE,
    Job,
    generation_failed,
    logprob_entry,
    send_all,
    shutting_down,
)
from glmkit.serving.protocol import APIError

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per KV block
PREFILL_CHUNK = 512  # most prompt tokens prefilled per step
MAX_BATCHED_TOKENS = 256  # most tokens (decode rows + prefill) one step computes
CUDA_FREE_FRACTION = 0.5  # default pool on CUDA: this share of the free memory (the rest: activations)
CPU_RAM_FRACTION = 0.25  # default pool on CPU: at most this share of the available RAM


@dataclass(eq=False)  # identity: the scheduler's `in` / remove() must not compare token lists field by field
class SeqState:
    """The scheduler's state of one admitted-or-waiting request: its tokens (prompt + generated), positions, blocks
    and cache progress."""

    job: Job
    tokens: list[int]
    prompt_len: int
    positions: list[list[int]]  # one list per position channel (2 for ChatGLM-6B / the original GLM), per token
    ctx: int  # prefix-LM: tokens [0, ctx) see each other (ChatGLM-6B's context before <sop>); 0 = causal
    order: int  # arrival order: preemption takes the largest
    generator: torch.Generator | None = None
    frozen: bool = False  # 1-D positions that stay put while generating (GLM-130B's Part B)
    blocks: list[int] = field(default_factory=list)
    cached: int = 0  # tokens whose keys/values are in the blocks
    table: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # slots of `blocks`

    @property
    def generated(self) -> int:
        return len(self.tokens) - self.prompt_len


def pool_size(model: Any, block_size: int, kv_cache_memory: int | None, max_batch_size: int) -> int:
    """Blocks in the pool: `kv_cache_memory` bytes' worth, else a share of free memory, capped at max_batch_size
    full contexts (more could never be used). At least one full context is required."""
    config = model.config
    per_block = bytes_per_block(config, block_size, model.dtype)
    context_blocks = -(-int(config.max_seq_len) // block_size)
    if kv_cache_memory is not None:
        blocks = int(kv_cache_memory) // per_block
    else:
        if model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = int(free * CUDA_FREE_FRACTION)
        else:
            budget = int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * CPU_RAM_FRACTION)
        blocks = min(budget // per_block, max_batch_size * context_blocks)
    if blocks < context_blocks:
        raise ValueError(f"the KV cache holds {blocks * block_size} tokens ({blocks} blocks of {block_size}, "
                         f"{per_block} bytes each); one full context of {config.max_seq_len} tokens needs "
                         f"{context_blocks * per_block} bytes: raise kv_cache_memory")
    return blocks


class PrefixCache:
    """Full KV blocks of prompts, kept after their requests end and found again by a hash chained over every token
    up to each block's end, so requests sharing a prefix (a long system prompt, a tool list) skip its prefill.

    A cached block is shared read-only: a sequence only writes to blocks past its matched ones. Blocks no request
    holds stay cached (least recently used first out) until the pool needs them. Not for a prefix-LM context
    (ChatGLM-6B): there a token's keys depend on the context tokens after it, so only whole contexts could match.
    """

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_of: dict[int, int] = {}  # chain hash -> block
        self.hash_of: dict[int, int] = {}  # block -> chain hash
        self.refs: collections.Counter[int] = collections.Counter()  # registered block -> sequences holding it
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # registered, held by none (LRU)
        self.hits = 0  # tokens whose prefill was skipped

    def chain(self, tokens: list[int], n_blocks: int) -> list[int]:
        bs, hashes, h = self.pool.block_size, [], 0
        for i in range(n_blocks):
            h = hash((h, tuple(tokens[i * bs:(i + 1) * bs])))
            hashes.append(h)
        return hashes

    def match(self, tokens: list[int], limit: int) -> list[int]:
        """The cached blocks holding the longest prefix of tokens[:limit] (whole blocks), now held once more."""
        blocks = []
        for h in self.chain(tokens, limit // self.pool.block_size):
            block = self.block_of.get(h)
            if block is None:
                break
            self.idle.pop(block, None)
            self.refs[block] += 1
            blocks.append(block)
        self.hits += len(blocks) * self.pool.block_size
        return blocks

    def register(self, tokens: list[int], blocks: list[int], n_tokens: int) -> None:
        """Makes the full blocks among the first n_tokens findable (the first copy of a prefix wins)."""
        for h, block in zip(self.chain(tokens, n_tokens // self.pool.block_size), blocks):
            if block in self.hash_of or h in self.block_of:
                continue
            self.block_of[h], self.hash_of[block] = block, h
            self.refs[block] = 1

    def release(self, blocks: list[int]) -> None:
        """A sequence gives its blocks back: cached ones go idle when nobody holds them, the others to the pool."""
        private = []
        for block in blocks:
            if block in self.hash_of:
                self.refs[block] -= 1
                if self.refs[block] == 0:
                    del self.refs[block]
                    self.idle[block] = None
            else:
                private.append(block)
        self.pool.free(private)
        blocks.clear()

    def allocate(self, n: int) -> list[int] | None:
        """n blocks from the pool, evicting idle cached blocks (least recently used first) if it runs short."""
        while self.pool.num_free < n and self.idle:
            block, _ = self.idle.popitem(last=False)
            del self.block_of[self.hash_of.pop(block)]
            self.pool.free([block])
        return self.pool.allocate(n)

    @property
    def available(self) -> int:
        return self.pool.num_free + len(self.idle)


class ContinuousEngine:
    """The decoding thread of the server and its queue. `submit` is called from the event loop (503 when the queue
    is full or closing), everything else runs in the thread. Its counters: `queued()`, `active` (rows admitted),
    `stats`, `kv_blocks()`."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE, kv_cache_memory: int | None = None, block_size: int = BLOCK_SIZE,
                 prefill_chunk: int = PREFILL_CHUNK, prefix_caching: bool = True,
                 max_batched_tokens: int = MAX_BATCHED_TOKENS) -> None:
        if prefill_chunk < 1 or block_size < 1 or max_batched_tokens < 1:
            raise ValueError(f"need prefill_chunk, block_size and max_batched_tokens >= 1, got {prefill_chunk}, "
                             f"{block_size} and {max_batched_tokens}")
        self.max_batched_tokens = max_batched_tokens
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue, self.prefill_chunk = max_batch_size, max_queue, prefill_chunk
        self.context = int(model.config.max_seq_len)
        self.eos_ids = set(stop_token_ids(model, tokenizer))
        self.device = model.device
        self.block_size = block_size
        self.num_blocks = pool_size(model, block_size, kv_cache_memory, max_batch_size)
        # the model's cache while the engine runs (a model call: every tensor-parallel rank mirrors it)
        self.pool: BlockPool | None = None
        self.cache: PrefixCache | None = None  # with prefix_caching off it only allocates and frees
        self.prefix_caching = prefix_caching
        self._pending: collections.deque[Job] = collections.deque()  # submitted, not yet seen by the thread
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="glmkit-scheduler", daemon=True)
        self._waiting: collections.deque[SeqState] = collections.deque()  # seen, waiting for a row (thread only)
        self._running: list[SeqState] = []  # admitted: prefilling or decoding (thread only)
        self._outbox: list[tuple[Job, str, Any]] = []  # events of this step, delivered together at its end
        self._arrivals = 0
        self.active = 0  # rows admitted (prefilling or decoding)
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0, "steps": 0, "preempted": 0,
                      "cached_tokens": 0}

    # ---- event-loop side
    def start(self) -> None:
        """Sets the paged KV cache up as the model's cache and starts the decoding thread."""
        # Here, not in the thread: a thread whose process has not yet run a parallel torch op on the main thread
        # runs small ops many times slower (OpenMP), and allocating the pool is such an op.
        self.pool = self.model.setup_paged_cache(self.num_blocks, self.block_size)
        self.cache = PrefixCache(self.pool)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def queued(self) -> int:
        return len(self._pending) + len(self._waiting)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise shutting_down()
            if self.queued() >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                               type="server_error", code="server_busy")
            self._pending.append(job)
            self._cond.notify()

    def kv_blocks(self) -> tuple[int, int]:
        """(used, free) KV blocks: held by requests / free or only cached (reusable at once)."""
        if self.cache is None:
            return 0, self.num_blocks
        return self.num_blocks - self.cache.available, self.cache.available

    def close(self, timeout: float = 30.0) -> None:
        """Stops taking work, fails what waits with 503, ends running rows as cancelled, joins the thread."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in waiting:
            job.send("error", shutting_down())
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- decoding-thread side
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._pending or self._waiting or self._running or self._closing):
                        self._cond.wait()
                    if self._closing:
                        break
                    jobs = list(self._pending)
                    self._pending.clear()
                for job in jobs:
                    try:
                        self._waiting.append(self._sequence(job))
                    except Exception as err:
                        log.exception("a request could not be set up")
                        job.send("error", generation_failed(err))
                try:
                    with torch.inference_mode():
                        self._step()
                    self._flush()
                except Exception as err:  # a failed step fails the requests in it, never the server
                    self._flush()  # what the step produced before it failed goes out first
                    log.exception("generation failed")
                    for seq in self._running:
                        seq.job.send("error", generation_failed(err))
                        self._release(seq)
                    self._running.clear()
                    self.active = 0
        finally:
            self._flush()
            shutting = shutting_down()
            with self._cond:
                jobs = list(self._pending)
                self._pending.clear()
            for job in jobs + [seq.job for seq in self._waiting]:
                job.send("error", shutting)
            for seq in self._running:
                seq.job.send("end", "cancelled")
                self._release(seq)
            self._waiting.clear()
            self._running.clear()
            self.active = 0
            self.model.clear_cache()

    def _sequence(self, job: Job) -> SeqState:
        ids = torch.tensor([job.input_ids], dtype=torch.long, device=self.device)
        positions = self.model.default_position_ids(ids)[0]  # (T,) or (2, T)
        positions = positions[None] if positions.dim() == 1 else positions
        ctx = 0
        config = self.model.config
        if config.attention == "prefix_lm" and config.bos_token_id in job.input_ids:  # as default_attention_mask
            ctx = job.input_ids.index(config.bos_token_id)
        generator = None
        if job.params.do_sample and job.params.seed is not None:  # as generate_stream seeds it
            generator = torch.Generator(device=self.device).manual_seed(int(job.params.seed))
        frozen = frozen_rows(self.model, ids)  # as generate_stream reads it
        self._arrivals += 1
        self.stats["requests"] += 1
        return SeqState(job, list(job.input_ids), len(job.input_ids), positions.tolist(), ctx, self._arrivals,
                        generator, frozen=bool(frozen[0]) if frozen is not None else False)

    def _step(self) -> None:
        self._retire_cancelled()
        was_idle = not self._running
        self._admit()
        if was_idle and self._running:
            self.stats["batches"] += 1  # decoding started from idle
        self._prefill()
        self._decode()
        self.active = len(self._running)

    def _emit(self, job: Job, kind: str, value: Any) -> None:
        self._outbox.append((job, kind, value))

    def _flush(self) -> None:
        events, self._outbox = self._outbox, []
        send_all(events)

    def _release(self, seq: SeqState) -> None:
        self.cache.release(seq.blocks)
        seq.table = seq.table[:0]

    def _finish(self, seq: SeqState, kind: str, value: Any) -> None:
        self._release(seq)
        if seq in self._running:
            self._running.remove(seq)
        self.active = len(self._running)
        self._emit(seq.job, kind, value)

    def _retire_cancelled(self) -> None:
        for seq in [s for s in self._running if s.job.cancelled.is_set()]:
            self._finish(seq, "end", "cancelled")
        for seq in [s for s in self._waiting if s.job.cancelled.is_set()]:
            self._waiting.remove(seq)
            self._emit(seq.job, "end", "cancelled")

    def _admit(self) -> None:
        while self._waiting and len(self._running) < self.max_batch_size:
            seq = self._waiting[0]
            if self.pool.blocks_for(len(seq.tokens)) > self.cache.available:
                break
            self._waiting.popleft()
            self._running.append(seq)
            if self.prefix_caching and seq.ctx == 0:  # skip the prefill of a cached prefix (never the last token)
                seq.blocks = self.cache.match(seq.tokens, len(seq.tokens) - 1)
                seq.table = self.pool.block_slots(seq.blocks)
                seq.cached = len(seq.blocks) * self.pool.block_size
                self.stats["cached_tokens"] = self.cache.hits

    def _grow(self, seq: SeqState, n_tokens: int) -> bool:
        """Gives `seq` blocks for n_tokens, preempting requests newer than it while none are free. False: it was
        itself the newest (and is now preempted) or nothing newer is left to free."""
        need = self.pool.blocks_for(n_tokens) - len(seq.blocks)
        while need > 0:
            got = self.cache.allocate(need)
            if got is not None:
                seq.blocks.extend(got)
                seq.table = torch.cat((seq.table, self.pool.block_slots(got)))
                return True
            newer = [s for s in self._running if s.order > seq.order and s.blocks]
            if not newer:
                return False
            self._preempt(max(newer, key=lambda s: s.order))
        return True

    def _preempt(self, seq: SeqState) -> None:
        """Frees the request's blocks; it waits at the front of the queue and is recomputed from its tokens."""
        self._release(seq)
        seq.cached = 0
        self._running.remove(seq)
        self._waiting.appendleft(seq)
        self.stats["preempted"] += 1

    def _prefill(self) -> None:
        decoding = sum(seq.cached == len(seq.tokens) - 1 for seq in self._running)
        # the step's token budget less its decode rows; at least a block, so prompts still move under a full batch
        budget = min(self.prefill_chunk, max(self.max_batched_tokens - decoding, self.block_size))
        for seq in sorted(self._running, key=lambda s: s.order):
            if budget <= 0:
                break
            if seq not in self._running or seq.cached >= len(seq.tokens) - 1:
                continue
            start = seq.cached
            end = min(len(seq.tokens) - 1, start + budget)
            end = max(end, min(seq.ctx, len(seq.tokens) - 1))  # the bidirectional context goes in one piece
            if not self._grow(seq, end):
                break  # no block free and nothing newer to preempt: wait for older rows to free theirs
            self._forward([seq], start, end)
            seq.cached = end
            if self.prefix_caching and seq.ctx == 0:
                self.cache.register(seq.tokens, seq.blocks, min(end, seq.prompt_len))
            budget -= end - start

    def _forward(self, rows: list[SeqState], start: int | None = None, end: int | None = None) -> torch.Tensor:
        """One forward: with start/end, tokens [start, end) of one sequence (prefill); without, the token at
        `cached` of every row (decode). Returns the last position's logits [B, V]."""
        dev = self.device
        if start is not None:
            seq = rows[0]
            T = end - start
            ids = torch.tensor([seq.tokens[start:end]], dtype=torch.long, device=dev)  # (1, T)
            pos = torch.tensor([[p[start:end] for p in seq.positions]], dtype=torch.long, device=dev)  # (1, C, T)
            write = seq.table[start:end][None]  # (1, T)
            read = seq.table[:end][None]  # (1, S)
            q = torch.arange(start, end, device=dev)[:, None]
            k = torch.arange(end, device=dev)[None]
            mask = ((k <= q) | (k < seq.ctx))[None, None]  # (1, 1, T, S): causal, + the prefix-LM context
        else:
            T = 1
            S = max(seq.cached for seq in rows) + 1
            ids = torch.tensor([[seq.tokens[seq.cached]] for seq in rows], dtype=torch.long, device=dev)  # (B, 1)
            pos = torch.tensor([[[p[seq.cached]] for p in seq.positions] for seq in rows], dtype=torch.long,
                               device=dev)  # (B, C, 1)
            bs = self.pool.block_size
            write = torch.tensor([[seq.blocks[seq.cached // bs] * bs + seq.cached % bs] for seq in rows])  # (B, 1)
            # (B, S): each row's slots, padded with slot 0 (a valid slot, masked out)
            read = torch.nn.utils.rnn.pad_sequence([seq.table[:seq.cached + 1] for seq in rows], batch_first=True)
            lengths = torch.tensor([seq.cached + 1 for seq in rows])
            mask = (torch.arange(S)[None] < lengths[:, None]).to(dev)[:, None, None]  # (B, 1, 1, S)
        if pos.shape[1] == 1:
            pos = pos[:, 0]  # (B, T) for 1-D positions
        self.model.bind_paged_cache(write, read, None if start is not None else lengths.tolist())
        S = read.shape[1]
        logits = self.model(ids, pos, mask, input_pos=torch.arange(S - T, S, device=dev), last_logits_only=True)
        return logits[:, -1]  # (B, V)

    def _decode(self) -> None:
        rows = []
        for seq in sorted(self._running, key=lambda s: s.order):
            if seq not in self._running or seq.cached != len(seq.tokens) - 1:
                continue
            if self._grow(seq, seq.cached + 1):
                rows.append(seq)
            elif seq.order == max(s.order for s in self._running):
                self._preempt(seq)  # the newest request, and no block for it: recompute it later
        rows = [seq for seq in rows if seq in self._running]
        if not rows:
            return
        logits = self._forward(rows)
        self.stats["steps"] += 1
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        last = torch.tensor([[p[seq.cached] for p in seq.positions] for seq in rows])  # (B, C)
        if last.shape[1] == 1:
            following = next_positions(last[:, 0], torch.tensor([seq.frozen for seq in rows]))
        else:
            following = next_positions(last)
        following = following[:, None] if following.dim() == 1 else following  # (B, C)
        tokens = self._choose(rows, logits)
        for b, seq in enumerate(rows):
            seq.cached += 1
            token, entry = tokens[b]
            if token in self.eos_ids:
                self._finish(seq, "end", "stop")
                continue
            self._emit(seq.job, "token", (token, entry))
            seq.tokens.append(token)
            for channel, value in zip(seq.positions, following[b].tolist()):
                channel.append(value)
            if seq.generated >= seq.job.params.max_new_tokens or len(seq.tokens) >= self.context:
                self._finish(seq, "end", "length")

    def _choose(self, rows: list[SeqState], logits: torch.Tensor) -> list[tuple[int, dict | None]]:
        """Each row's next token under its own settings, in generate.py's order: presence/frequency penalties ->
        ChatGLM's NaN/inf guard -> the forced tool-call line -> (logprobs) -> temperature/top-k/top-p -> sample."""
        scores = logits.float()  # (B, V)
        plain = [not s.job.params.do_sample and not s.job.params.presence_penalty and
                 not s.job.params.frequency_penalty and s.job.constraint is None and s.job.params.logprobs is None
                 for s in rows]
        finite = torch.isfinite(scores).all(dim=-1).tolist()
        greedy = scores.argmax(dim=-1).tolist() if any(plain) else None
        out: list[tuple[int, dict | None]] = []
        for b, seq in enumerate(rows):
            if plain[b] and finite[b]:
                out.append((int(greedy[b]), None))
                continue
            p = seq.job.params
            row = scores[b:b + 1]  # (1, V)
            generated = seq.tokens[seq.prompt_len:]
            if generated and (p.presence_penalty or p.frequency_penalty):
                row = apply_presence_frequency_penalty(torch.tensor([generated], device=row.device), row,
                                                       p.presence_penalty, p.frequency_penalty)
            row = invalid_score_guard(None, row, INVALID_SCORE_TOKEN_ID)
            if seq.job.constraint is not None:
                row = seq.job.constraint(generated, row[0].clone())[None]
            token = int(sample(row, do_sample=p.do_sample, temperature=p.temperature, top_k=p.top_k,
                               top_p=p.top_p, generator=seq.generator)[0])
            entry = None
            if p.logprobs is not None:
                entry = logprob_entry(self.tokenizer, row[0].log_softmax(dim=-1), token, p.logprobs)
            out.append((token, entry))
        return out
