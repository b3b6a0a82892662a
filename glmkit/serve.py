"""`glmkit serve`: an OpenAI-compatible HTTP API plus ChatGLM-6B's `POST /`, on FastAPI + uvicorn.

Routes
  POST /v1/chat/completions  OpenAI chat completions: system/user/assistant messages, `stream` (server-sent events
                             ending in `data: [DONE]`), max_tokens, temperature (0 = greedy), top_p, stop, seed, usage.
  GET  /v1/models            the one model served (GET /v1/models/{id} too).
  POST /                     ChatGLM-6B's api.py: {prompt, history, max_length, top_p, temperature} ->
                             {response, history, status: 200, time: "YYYY-MM-DD HH:MM:SS"}; missing or null fields
                             take api.py's defaults (2048, 0.7, 0.95). Unlike api.py, temperature 0 means greedy
                             (api.py silently replaced it by 0.95) and max_length is capped at the model's context.
  GET  /health               {"status": "ok", ...}; 503 once the decoding thread has died.

Concurrency: one decoding thread owns the model (its KV cache is per model). Requests wait in a FIFO queue; each
round the thread takes the oldest request plus every waiting request it can decode together (greedy ones, or
sampled ones with the same settings and no seed), left-pads them into one batch and runs it through
`glmkit.generate.generate_stream`, which gives each row what it would get alone. A seeded sampled request runs
alone so its seed means the same thing whatever else is queued. Per-request state (tokens, stop strings, limits,
cancellation) lives in its own Job; a client that goes away cancels its row.

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for invalid JSON, wrong
types, unknown roles, bad limits and over-long prompts, 401 for a wrong API key, 413 for a body over
--max-body-bytes, 503 when the queue is full. None of them affects other requests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

# FastAPI resolves route annotations from module globals, so these imports live here.
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmkit.chat_cli import TextDelta, add_model_arguments, context_length, load_from_args, model_name

log = logging.getLogger("glmkit.serve")

MAX_BODY_BYTES = 1 << 20
MAX_BATCH_SIZE = 16
MAX_QUEUE = 256
GATHER_SECONDS = 0.02  # how long a new batch waits for more requests to join it
MAX_STOP_SEQUENCES = 4
# ChatGLM-6B's api.py defaults for POST /
LEGACY_DEFAULTS = {"max_length": 2048, "top_p": 0.7, "temperature": 0.95}


class APIError(Exception):
    """An error answered to the client as `{"error": {...}}` with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ============================================================================================ the decoding engine
@dataclass
class SamplingParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys can share a batch; None runs alone."""
        if not self.do_sample:
            return ("greedy",)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k)


def sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int | None = None) -> SamplingParams:
    """Request settings -> SamplingParams as model.chat() would sample: temperature (or top_p) 0 is greedy, and
    sampling keeps the 50 most likely tokens first (transformers' top_k default, which ChatGLM's chat inherits)."""
    if temperature == 0 or top_p == 0:
        return SamplingParams(max_new_tokens=max_new_tokens, do_sample=False, seed=seed)
    from glmkit.chat import HF_DEFAULT_TOP_K

    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, top_p=top_p,
                          top_k=HF_DEFAULT_TOP_K, seed=seed)


@dataclass
class Job:
    """One request's generation: its prompt, its settings, and the channel its tokens go back through."""

    input_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, value: Any = None) -> None:
        # Called from the decoding thread; the queue belongs to the request's event loop.
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class Engine:
    """The decoding thread and its queue. `submit` is called from the event loop, everything else runs in the thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.gather_s = GATHER_SECONDS
        self.context = context_length(model)
        self.eos_ids = set(_stop_token_ids(model, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = model.config.pad_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._pending: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self.active = 0  # rows in the batch being decoded
        self.stats = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._thread = threading.Thread(target=self._run, name="glmkit-decoder", daemon=True)

    # ---- event-loop side
    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def queued(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if len(self._pending) >= self.max_queue:
                raise APIError(503, f"the server is busy ({self.max_queue} requests waiting); retry shortly",
                               type="server_error", code="server_busy")
            self._pending.append(job)
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Stops taking work, cancels what waits, lets the running batch see its cancellations, joins the thread."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for job in waiting:
            job.send("error", APIError(503, "the server is shutting down", type="server_error",
                                       code="shutting_down"))
        if self._thread.is_alive():
            self._thread.join(timeout)

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

        from glmkit.chat import INVALID_SCORE_TOKEN_ID
        from glmkit.generate import generate_stream, invalid_score_guard

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
        stream = generate_stream(
            self.model, ids.to(device), mask.to(device),
            max_new_tokens=max(job.params.max_new_tokens for job in live),
            do_sample=params.do_sample, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            eos_token_id=sorted(self.eos_ids) or None, pad_token_id=self.pad_id, seed=params.seed,
            # chat()'s NaN/inf guard, so a request gets what model.chat would give it
            logits_processors=[lambda seen, scores: invalid_score_guard(seen, scores, INVALID_SCORE_TOKEN_ID)],
        )
        running = set(range(len(live)))
        produced = [0] * len(live)
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
                        job.send("token", token)
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


def _stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end an answer: the ones model.chat stops at for this family."""
    from glmkit import chat

    return [int(i) for i in chat.stop_token_ids(model, tokenizer, chat.family_of(tokenizer)) if i is not None]


# ============================================================================================ request handling
class ChatService:
    """What the routes need: the model, its name, the engine, and turning prompts into text."""

    def __init__(self, model: Any, tokenizer: Any, name: str, *, api_key: str | None = None,
                 max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = MAX_BATCH_SIZE,
                 max_queue: int = MAX_QUEUE) -> None:
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.api_key = api_key or None
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())
        from glmkit.chat import DEFAULTS, family_of

        self.family = family_of(tokenizer)
        self.defaults = DEFAULTS[self.family]  # the family's chat temperature / top_p
        self.engine = Engine(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue)
        self.context = self.engine.context

    def prompt_ids(self, query: str, history: list, system: str | None) -> list[int]:
        from glmkit.chat import build_chat_input

        if system is not None and self.family in ("chatglm", "chatglm2"):
            # no system role in these families: fold it into the query, as ChatGLM2-6B's openai_api.py did
            query, system = f"{system}\n{query}", None
        try:
            ids = build_chat_input(self.tokenizer, query, history, system=system)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_prompt") from None
        ids = [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        if len(ids) >= self.context:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is {self.context} tokens "
                                "(prompt and answer together). Shorten the messages.",
                           param="messages", code="context_length_exceeded")
        return ids

    def text(self, token_ids: list[int]) -> str:
        """The answer text of the generated tokens (stop token excluded), post-processed as the family's chat()
        does it. ChatGLM3/GLM-4 answers start with a metadata line, empty for a plain answer; a non-empty one
        (a tool call) is returned as the model wrote it."""
        from glmkit import chat

        text = self.tokenizer.decode(token_ids)
        if self.family == "chatglm":
            return chat.process_chatglm_response(text)
        if self.family == "chatglm2":
            return chat.process_chatglm2_response(text)
        metadata, _, content = text.partition("\n")
        if not metadata.strip():
            return content.strip().replace("[[训练时间]]", "2023年")
        return text.strip()

    async def generate(self, ids: list[int], params: SamplingParams, stop: list[str] = (), *,
                       incremental: bool = True) -> AsyncIterator[tuple[str, str | None, int]]:
        """Yields (text so far, finish reason or None, tokens so far); the last item carries the finish reason.

        Text that might still turn into a stop string is held back, so the texts only ever grow and the last one
        (cut before the first stop string) extends them all. With incremental=False (and no stop strings) only the
        final item is produced, saving a decode per token.
        """
        job = Job(ids, params, asyncio.get_running_loop())
        self.engine.submit(job)
        tokens: list[int] = []
        try:
            while True:
                kind, value = await job.events.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    text = self.text(tokens)
                    cut = _find_stop(text, stop) if stop else None
                    reason = "stop" if value == "cancelled" or cut is not None else value
                    yield (text if cut is None else text[:cut]), reason, len(tokens)
                    return
                tokens.append(value)
                if not (incremental or stop):
                    continue
                text = self.text(tokens)
                if stop:
                    cut = _find_stop(text, stop)
                    if cut is not None:
                        job.cancel()
                        yield text[:cut], "stop", len(tokens)
                        return
                    text = text[:len(text) - _partial_stop(text, stop)]
                yield text, None, len(tokens)
        finally:
            job.cancel()  # a client that went away (or a stop string) frees its batch row


def _find_stop(text: str, stop: list[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _partial_stop(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that begins some stop string (it may still become one)."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


# ---- validation of OpenAI request bodies (explicit, so every message names the field and what was wrong)
def _number(body: dict, name: str, lo: float, hi: float, default: float | None) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", param=name, code="invalid_type")
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name,
                       code="invalid_value")
    return float(value)


def _integer(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", param=name, code="invalid_type")
    return value


def _content(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        if message["role"] == "assistant":
            return ""
        raise APIError(400, f"messages[{index}].content is missing", param=f"messages.{index}.content",
                       code="missing_content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones make sense to a text model
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{index}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                    "are supported", param=f"messages.{index}.content", code="invalid_content")
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"messages[{index}].content must be a string or a list of text parts, got "
                        f"{type(content).__name__}", param=f"messages.{index}.content", code="invalid_type")


def parse_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]], str]:
    """OpenAI messages -> (system, [(user, assistant), ...], query). The last message must be the user's."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages",
                       code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    systems: list[str] = []
    turns: list[tuple[str, str]] = []  # (role, content) of the conversation proper
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'",
                           param=f"messages.{i}", code="invalid_type")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {json.dumps(role)} is not supported; use 'system', 'user' or "
                                "'assistant'", param=f"messages.{i}.role", code="invalid_role")
        text = _content(message, i)
        if role in ("system", "developer"):
            systems.append(text)
        elif turns and turns[-1][0] == role:  # two in a row from the same side read as one message
            turns[-1] = (role, turns[-1][1] + "\n" + text)
        else:
            turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise APIError(400, "the last message (after any system messages) must have role 'user'",
                       param="messages", code="invalid_value")
    query = turns.pop()[1]
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for role, text in turns:
        if role == "user":
            pending_user = text
        else:
            history.append((pending_user or "", text))
            pending_user = None
    if pending_user is not None:  # cannot happen (roles alternate and the last user turn was popped)
        query = pending_user + "\n" + query
    return ("\n".join(systems) if systems else None), history, query


@dataclass
class ChatRequest:
    ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    stop: list[str]


def parse_chat_request(body: Any, service: ChatService) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_type")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise APIError(400, "'model' must be a string", param="model", code="invalid_type")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise APIError(400, f"'stream' must be true or false, got {json.dumps(stream)}", param="stream",
                       code="invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise APIError(400, "'stream_options' must be an object", param="stream_options", code="invalid_type")
    n = _integer(body, "n")
    if n is not None and n != 1:
        raise APIError(400, f"'n' must be 1 (one answer per request), got {n}", param="n", code="invalid_value")
    for unsupported in ("tools", "functions"):
        if body.get(unsupported):
            raise APIError(400, f"'{unsupported}' is not supported by this server", param=unsupported,
                           code="unsupported_parameter")
    if body.get("logprobs"):
        raise APIError(400, "'logprobs' is not supported by this server", param="logprobs",
                       code="unsupported_parameter")
    temperature = _number(body, "temperature", 0.0, 2.0, service.defaults["temperature"])
    top_p = _number(body, "top_p", 0.0, 1.0, service.defaults["top_p"])
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(400, f"'seed' must be between 0 and 2**63 - 1, got {seed}", param="seed", code="invalid_value")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "'stop' must be a string or a list of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_SEQUENCES or any(not s for s in stop):
        raise APIError(400, f"'stop' takes up to {MAX_STOP_SEQUENCES} non-empty strings", param="stop",
                       code="invalid_value")

    system, history, query = parse_messages(body.get("messages"))
    ids = service.prompt_ids(query, history, system)
    room = service.context - len(ids)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, name)
    if max_tokens is None:
        max_tokens = room
    elif max_tokens < 1:
        raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", param=name, code="invalid_value")
    elif max_tokens > room:
        raise APIError(400, f"'{name}' is {max_tokens}, but the prompt takes {len(ids)} of the model's "
                            f"{service.context} tokens, leaving {room}. Lower '{name}' or shorten the messages.",
                       param=name, code="context_length_exceeded")
    params = sampling(max_tokens, temperature, top_p, seed)
    include_usage = bool(options.get("include_usage", False))
    return ChatRequest(ids, params, stream, include_usage, stop)


# ============================================================================================ the app
def create_app(service: ChatService):
    """The FastAPI app serving `service`; its lifespan starts and stops the decoding thread."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.engine.close)

    app = FastAPI(title="glmkit", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return JSONResponse(APIError(err.status_code, str(err.detail), code=code).body(),
                            status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        log.exception("unexpected error")
        return JSONResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body(),
                            status_code=500)

    async def authorize(request: Request) -> None:
        if service.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), service.api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > service.max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {service.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > service.max_body_bytes:
                raise APIError(413, f"the request body is over the {service.max_body_bytes}-byte limit",
                               code="request_too_large")
            chunks.append(chunk)
        raw = b"".join(chunks)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body is JSON nested too deeply", code="invalid_json") from None

    def require_engine() -> None:
        if not service.engine.alive():
            raise APIError(503, "the decoding thread is not running", type="server_error", code="unavailable")

    @app.get("/health")
    async def health():
        ok = service.engine.alive()
        body = {"status": "ok" if ok else "unavailable", "model": service.name, "queued": service.engine.queued(),
                "decoding": service.engine.active, **service.engine.stats}
        return JSONResponse(body, status_code=200 if ok else 503)

    def model_card() -> dict:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "glmkit",
                "context_length": service.context}

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(authorize)])
    async def get_model(model_id: str):
        if model_id != service.name:
            raise APIError(404, f"model {model_id!r} is not served here; this server serves {service.name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat_completions(request: Request):
        body = await read_json(request)
        req = parse_chat_request(body, service)
        require_engine()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(
                _sse(service, req, completion_id, created), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        text, reason, n_tokens = "", "length", 0
        async for text, reason, n_tokens in service.generate(req.ids, req.params, req.stop, incremental=False):
            pass
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": service.name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason}],
            "usage": _usage(len(req.ids), n_tokens),
        }

    @app.post("/", dependencies=[Depends(authorize)])
    async def legacy_chat(request: Request):
        body = await read_json(request)
        ids, params, query, history = parse_legacy_request(body, service)
        require_engine()
        text = ""
        async for text, _, _ in service.generate(ids, params, incremental=False):
            pass
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info("[%s] prompt: %r, response: %r", now, query, text)
        return {"response": text, "history": [list(turn) for turn in history] + [[query, text]], "status": 200,
                "time": now}

    return app


async def _sse(service: ChatService, req: ChatRequest, completion_id: str, created: int) -> AsyncIterator[str]:
    def chunk(delta: dict, reason: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": service.name,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    delta = TextDelta()
    text, reason, n_tokens = "", "length", 0
    try:
        async for text, reason, n_tokens in service.generate(req.ids, req.params, req.stop):
            piece = delta.update(text) if reason is None else delta.finish(text)
            if piece:
                yield chunk({"content": piece})
    except APIError as err:  # headers are already sent: report in-band, as OpenAI does
        yield f"data: {json.dumps(err.body())}\n\n"
        yield "data: [DONE]\n\n"
        return
    yield chunk({}, reason)
    if req.include_usage:
        yield chunk({}, usage=_usage(len(req.ids), n_tokens), choices=False)
    yield "data: [DONE]\n\n"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parse_legacy_request(body: Any, service: ChatService) -> tuple[list[int], SamplingParams, str, list]:
    """ChatGLM-6B's POST / body -> prompt ids and settings; api.py's defaults where a field is missing or null."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object with at least 'prompt'", code="invalid_type")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise APIError(400, f"'prompt' must be a string, got {json.dumps(prompt)}", param="prompt",
                       code="invalid_type")
    history = body.get("history") or []
    if not isinstance(history, list):
        raise APIError(400, "'history' must be a list of [query, response] pairs", param="history",
                       code="invalid_type")
    pairs: list[tuple[str, str]] = []
    for i, turn in enumerate(history):
        if isinstance(turn, list) and not turn:
            continue  # api.py's own default was [[]]
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise APIError(400, f"history[{i}] must be a [query, response] pair of strings", param="history",
                           code="invalid_type")
        pairs.append((turn[0], turn[1]))
    max_length = _integer(body, "max_length") or LEGACY_DEFAULTS["max_length"]
    if max_length < 1:
        raise APIError(400, f"'max_length' must be positive, got {max_length}", param="max_length",
                       code="invalid_value")
    top_p = _number(body, "top_p", 0.0, 1.0, None)
    temperature = _number(body, "temperature", 0.0, 100.0, None)
    top_p = LEGACY_DEFAULTS["top_p"] if top_p is None else top_p
    temperature = LEGACY_DEFAULTS["temperature"] if temperature is None else temperature
    # as model.chat does: history that does not fit is dropped oldest turn first (the reply keeps all of it)
    from glmkit.chat import fit_history

    limit = min(max_length, service.context)
    try:
        ids, _ = fit_history(service.tokenizer, prompt, pairs, limit)
    except ValueError as err:
        raise APIError(400, str(err), param="prompt", code="context_length_exceeded") from None
    return ids, sampling(limit - len(ids), temperature, top_p), prompt, pairs


def _version() -> str:
    from glmkit import __version__

    return __version__


# ============================================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glmkit serve",
        description="Serve a GLM model over HTTP: OpenAI-compatible /v1/chat/completions and /v1/models, "
                    "ChatGLM-6B's POST / and GET /health.",
    )
    add_model_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes it)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--api-key", default=os.environ.get("GLMKIT_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on every route but /health "
                             "(default: $GLMKIT_API_KEY; unset = no key)")
    parser.add_argument("--max-batch-size", type=int, default=MAX_BATCH_SIZE,
                        help=f"most requests decoded together (default {MAX_BATCH_SIZE})")
    parser.add_argument("--max-queue", type=int, default=MAX_QUEUE,
                        help=f"most requests waiting before new ones get 503 (default {MAX_QUEUE})")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES,
                        help=f"largest request body accepted (default {MAX_BODY_BYTES})")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return parser


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("port", "max_batch_size", "max_queue", "max_body_bytes"):
        if getattr(args, name) < (0 if name == "port" else 1):
            print(f"glmkit serve: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(message)s")
    import uvicorn

    loaded = load_from_args("glmkit serve", args)
    if loaded is None:
        return 1
    model, tokenizer = loaded
    service = ChatService(model, tokenizer, model_name(args.model), api_key=args.api_key,
                          max_body_bytes=args.max_body_bytes, max_batch_size=args.max_batch_size,
                          max_queue=args.max_queue)
    app = create_app(service)
    print(f"glmkit serve: {service.name} on http://{args.host}:{args.port} "
          f"(OpenAI API at /v1, ChatGLM-6B API at /, health at /health"
          f"{', API key required' if service.api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=30, server_header=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (finishing in-flight requests), then re-raises the signal to
    # the handler that was installed before it; a no-op one here lets that clean shutdown exit with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
