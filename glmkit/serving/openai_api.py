"""An OpenAI-compatible HTTP API plus ChatGLM-6B's `POST /`, on FastAPI + uvicorn: `create_app` builds the app for a
loaded model, `serve` runs it (`glmkit serve` is glmkit.commands.serve).

Routes
  POST /v1/chat/completions  OpenAI chat completions: system/user/assistant messages, `stream` (server-sent events
                             ending in `data: [DONE]`), max_tokens, temperature (0 = greedy), top_p, stop, seed,
                             presence/frequency_penalty, n, logprobs/top_logprobs, usage; for ChatGLM3 and GLM-4
                             also tools/tool_choice (and the legacy functions/function_call), assistant tool_calls
                             and role "tool" results (glmkit.serving.protocol). A tool call comes back as
                             message.tool_calls with finish_reason "tool_calls"; streamed, as tool_calls deltas
                             (name first, then the arguments) once the call is complete; a plain answer streams as
                             text as soon as its first line shows it is not a call. Reasoning models (GLM-4.5
                             /4.6/4.7, GLM-Z1): message.reasoning_content and XML calls as tool_calls, streamed as
                             reasoning_content / content / tool_calls deltas (glmkit.core.reasoning.AnswerStream);
                             chat_template_kwargs (e.g. {"enable_thinking": false}) reach the template.
  GET  /v1/models            the one model served (GET /v1/models/{id} too).
  POST /                     ChatGLM-6B's api.py: {prompt, history, max_length, top_p, temperature} ->
                             {response, history, status: 200, time: "YYYY-MM-DD HH:MM:SS"}; missing or null fields
                             take api.py's defaults (2048, 0.7, 0.95). Unlike api.py, temperature 0 means greedy
                             (api.py silently replaced it by 0.95) and max_length is capped at the model's context.
  GET  /health               {"status": "ok", ...}; 503 once the decoding thread has died.
  GET  /openapi.json         the OpenAPI document of these routes, request bodies included.
  GET  /metrics              Prometheus text: queue depth, running rows, KV blocks used/free, tokens/s, a
                             time-to-first-token histogram (glmkit.serving.metrics).

Concurrent requests are decoded together, with continuous batching over a paged KV cache (glmkit.serving.scheduler).

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for invalid JSON, wrong
types, unknown roles, bad limits and over-long prompts, 401 for a wrong API key, 413 for a body over
max_body_bytes, 503 (with Retry-After) when the queue is full, 504 past request_timeout. None of them affects other
requests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hmac
import json
import logging
import signal
import sys
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

# FastAPI resolves route annotations from module globals, so these imports live here.
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmkit.core.chat import TextDelta
from glmkit.core.reasoning import AnswerStream
from glmkit.core.tools import tool_names
from glmkit.serving.jobs import MAX_BATCH_SIZE, MAX_QUEUE, generation_failed
from glmkit.serving.metrics import CONTENT_TYPE, RETRY_AFTER_S
from glmkit.serving.service import ChatService, Update
from glmkit.serving.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    ChatRequest,
    LegacyChatRequest,
    SamplingParams,
    parse_chat_request,
    parse_legacy_request,
    usage,
)

log = logging.getLogger(__name__)


def create_app(model: Any, tokenizer: Any, name: str, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = MAX_BATCH_SIZE,
               max_queue: int = MAX_QUEUE, request_timeout: float | None = None, **engine_options: Any) -> FastAPI:
    """The FastAPI app serving a loaded chat model (e.g. from glmkit.loading.checkpoint_ops.load_chat_model) as `name`.

    api_key: when set, every route but /health requires `Authorization: Bearer <api_key>`.
    max_body_bytes: largest request body accepted (413 above it).
    max_batch_size: most requests decoded together; max_queue: most requests waiting before new ones get 503
    (with Retry-After). engine_options: the continuous engine's kv_cache_memory (bytes), block_size, prefill_chunk,
    prefix_caching, max_batched_tokens (glmkit.serving.scheduler.ContinuousEngine). request_timeout: seconds per request (504 past it;
    None = no limit).
    The app's lifespan starts and stops the decoding thread; its ChatService is `app.state.service`.
    """
    service = ChatService(model, tokenizer, name, max_batch_size=max_batch_size, max_queue=max_queue,
                          request_timeout=request_timeout, **engine_options)
    api_key = api_key or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.engine.close)

    # /openapi.json only: the docs pages would load their scripts from a CDN
    app = FastAPI(title="glmkit", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.service = service
    _document_bodies(app)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

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
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise APIError(413, f"the request body is {declared} bytes; the limit is {max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"the request body is over the {max_body_bytes}-byte limit",
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

    @app.get("/metrics", dependencies=[Depends(authorize)])
    async def metrics():
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

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

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)], openapi_extra=_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await read_json(request)
        req = parse_chat_request(body, service.format)
        require_engine()
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return StreamingResponse(
                _sse(service, req, completion_id, created), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        async def one(i: int) -> Update:
            last = None
            async for last in service.generate(req.ids, choice_params(req.params, i), req.stop, incremental=False):
                pass
            assert last is not None
            return last

        tasks = [asyncio.ensure_future(one(i)) for i in range(req.n)]
        try:
            updates = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
        choices = [choice_body(service, req, i, u) for i, u in enumerate(updates)]
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": service.name,
            "system_fingerprint": None, "choices": choices,
            "usage": usage(len(req.ids), sum(u.n_tokens for u in updates)),
        }

    @app.post("/", dependencies=[Depends(authorize)], openapi_extra=_body(LegacyChatRequest))
    async def legacy_chat(request: Request):
        body = await read_json(request)
        ids, params, query, history = parse_legacy_request(body, service.format)
        require_engine()
        text = ""
        async for update in service.generate(ids, params, incremental=False):
            text = update.text
        now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        log.info("[%s] prompt: %r, response: %r", now, query, text)
        return {"response": text, "history": [list(turn) for turn in history] + [[query, text]], "status": 200,
                "time": now}

    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("glmkit")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _body(model: type[BaseModel]) -> dict:
    """The OpenAPI requestBody of a route that reads its JSON itself (for the 413 / invalid-JSON errors)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _document_bodies(app: FastAPI) -> None:
    """Adds the request models' JSON Schemas to the app's OpenAPI document, where _body's references point."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            _, defs = models_json_schema([(ChatCompletionRequest, "validation"), (LegacyChatRequest, "validation")],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index` of n: a seeded request's choices use seed, seed + 1, ... (so they differ yet repeat)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**63)


def _message(req: ChatRequest, answer) -> dict:
    reasoning = {} if answer.reasoning is None else {"reasoning_content": answer.reasoning}
    if not answer.tool_calls:
        return {"role": "assistant", "content": answer.content, **reasoning}
    if req.legacy_functions:
        return {"role": "assistant", "content": None, "function_call": answer.tool_calls[0]["function"], **reasoning}
    return {"role": "assistant", "content": answer.content, "tool_calls": answer.tool_calls, **reasoning}


def _finish_reason(req: ChatRequest, answer, reason: str) -> str:
    if answer.tool_calls and reason != "length":
        return "function_call" if req.legacy_functions else "tool_calls"
    return reason


def choice_body(service: ChatService, req: ChatRequest, index: int, update: Update) -> dict:
    answer = service.format.answer(update.tokens, update.text, req.tools, req.forced, req.thinking_open)
    return {"index": index, "message": _message(req, answer),
            "logprobs": {"content": update.logprobs} if req.params.logprobs is not None else None,
            "finish_reason": _finish_reason(req, answer, update.reason or "stop")}


@dataclasses.dataclass
class _ChoiceStream:
    """What one streamed choice has sent so far."""

    delta: TextDelta = dataclasses.field(default_factory=TextDelta)
    mode: str | None = None  # "text": streaming text; "hold": a possible tool call, kept until the answer ends
    logprobs_sent: int = 0
    answer: AnswerStream | None = None  # reasoning models: reasoning, text and XML calls as they complete
    calls_sent: int = 0


def _reasoning_deltas(req: ChatRequest, state: _ChoiceStream, update: Update, style: str) -> list[dict]:
    """The deltas one update adds to a reasoning model's streamed choice: reasoning_content, content, then each
    tool call once its </tool_call> arrived (name and arguments, as vLLM's glm45 tool parser sends them)."""
    if state.answer is None:
        state.answer = AnswerStream(req.tools, req.thinking_open, calls=style == "xml" and bool(req.tools))
    reasoning, content, calls = state.answer.feed(update.text, final=update.reason is not None)
    deltas = ([{"reasoning_content": reasoning}] if reasoning else []) + ([{"content": content}] if content else [])
    offered = tool_names(req.tools) if req.tools else []
    for call in calls:
        if call["function"]["name"] not in offered:
            continue
        k, state.calls_sent = state.calls_sent, state.calls_sent + 1
        deltas.append({"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"], "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]})
    return deltas


async def _sse(service: ChatService, req: ChatRequest, completion_id: str, created: int) -> AsyncIterator[str]:
    def chunk(index: int, delta: dict, reason: str | None = None, logprobs: list | None = None) -> str:
        choice = {"index": index, "delta": delta, "logprobs": None if logprobs is None else {"content": logprobs},
                  "finish_reason": reason}
        return _event(completion_id, created, service.name, [choice])

    queue: asyncio.Queue = asyncio.Queue()

    async def produce(i: int) -> None:
        try:
            async for update in service.generate(req.ids, choice_params(req.params, i), req.stop):
                await queue.put((i, update))
        except APIError as err:
            await queue.put((i, err))
        except Exception as err:  # never leave the stream waiting for a choice that died
            log.exception("streaming a choice failed")
            await queue.put((i, generation_failed(err)))

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    states = [_ChoiceStream() for _ in range(req.n)]
    tasks = [asyncio.ensure_future(produce(i)) for i in range(req.n)]
    finished, total_tokens = 0, 0
    try:
        while finished < req.n:
            i, update = await queue.get()
            if isinstance(update, APIError):  # headers are already sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(update.body())}\n\n"
                yield "data: [DONE]\n\n"
                return
            state = states[i]
            new_logprobs = None
            if req.params.logprobs is not None:
                new_logprobs = update.logprobs[state.logprobs_sent:]
            if service.format.style is not None:
                for delta in _reasoning_deltas(req, state, update, service.format.style):
                    state.logprobs_sent = len(update.logprobs)
                    yield chunk(i, delta, logprobs=new_logprobs)
                    new_logprobs = [] if new_logprobs is not None else None
                if update.reason is not None:
                    finished += 1
                    total_tokens += update.n_tokens
                    reason = "tool_calls" if state.calls_sent and update.reason != "length" else update.reason
                    yield chunk(i, {}, reason, logprobs=new_logprobs)
                continue
            if state.mode is None:
                line = service.format.tool_line(update.tokens) if req.tools else ""
                state.mode = None if line is None else ("text" if line == "" else "hold")
            if update.reason is None:
                if state.mode == "text":
                    piece = state.delta.update(update.text)
                    if piece:
                        state.logprobs_sent = len(update.logprobs)
                        yield chunk(i, {"content": piece}, logprobs=new_logprobs)
                continue
            finished += 1
            total_tokens += update.n_tokens
            answer = service.format.answer(update.tokens, update.text, req.tools, req.forced, req.thinking_open)
            if answer.tool_calls:
                for k, call in enumerate(answer.tool_calls):
                    fn = call["function"]
                    if req.legacy_functions:
                        if k == 0:
                            yield chunk(i, {"function_call": {"name": fn["name"], "arguments": ""}})
                            yield chunk(i, {"function_call": {"arguments": fn["arguments"]}})
                        continue
                    yield chunk(i, {"tool_calls": [{"index": k, "id": call["id"], "type": "function",
                                                    "function": {"name": fn["name"], "arguments": ""}}]})
                    yield chunk(i, {"tool_calls": [{"index": k, "function": {"arguments": fn["arguments"]}}]})
            else:
                piece = state.delta.finish(update.text)
                if piece:
                    yield chunk(i, {"content": piece})
            yield chunk(i, {}, _finish_reason(req, answer, update.reason), logprobs=new_logprobs)
    finally:
        for task in tasks:
            task.cancel()
    if req.include_usage:
        yield _event(completion_id, created, service.name, [], usage=usage(len(req.ids), total_tokens))
    yield "data: [DONE]\n\n"


def _event(completion_id: str, created: int, model: str, choices: list, **extra: Any) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None, "choices": choices, **extra}
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def serve(model: Any, tokenizer: Any, name: str, host: str = "127.0.0.1", port: int = 8000, *,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = MAX_BATCH_SIZE,
          max_queue: int = MAX_QUEUE, log_level: str = "info", request_timeout: float | None = None,
          **engine_options: Any) -> None:
    """Serves `create_app(model, tokenizer, name, ...)` on host:port with uvicorn until SIGINT/SIGTERM, which finish
    the requests in flight (up to 30 s) and return. Call it from the main thread."""
    import uvicorn

    app = create_app(model, tokenizer, name, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_batch_size=max_batch_size, max_queue=max_queue, request_timeout=request_timeout,
                     **engine_options)
    print(f"glmkit serve: {name} on http://{host}:{port} "
          f"(OpenAI API at /v1, ChatGLM-6B API at /, health at /health"
          f"{', API key required' if api_key else ''}); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                            server_header=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM (finishing in-flight requests), then re-raises the signal to
    # the handler that was installed before it; a no-op one here lets that clean shutdown return normally.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
