"""An OpenAI-compatible HTTP API plus ChatGLM-6B's `POST /`, on FastAPI + uvicorn: `create_app` builds the app for a
loaded model, `serve` runs it (`glmkit serve` is glmkit.commands.serve).

Routes
  POST /v1/chat/completions  OpenAI chat completions: system/user/assistant messages, `stream` (server-sent events
                             ending in `data: [DONE]`), max_tokens, temperature (0 = greedy), top_p, stop, seed, usage.
  GET  /v1/models            the one model served (GET /v1/models/{id} too).
  POST /                     ChatGLM-6B's api.py: {prompt, history, max_length, top_p, temperature} ->
                             {response, history, status: 200, time: "YYYY-MM-DD HH:MM:SS"}; missing or null fields
                             take api.py's defaults (2048, 0.7, 0.95). Unlike api.py, temperature 0 means greedy
                             (api.py silently replaced it by 0.95) and max_length is capped at the model's context.
  GET  /health               {"status": "ok", ...}; 503 once the decoding thread has died.

Concurrent requests are decoded together in batches (glmkit.serving.engine).

Errors are JSON in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: 400 for invalid JSON, wrong
types, unknown roles, bad limits and over-long prompts, 401 for a wrong API key, 413 for a body over
max_body_bytes, 503 when the queue is full. None of them affects other requests.
"""

from __future__ import annotations

import asyncio
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
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from glmkit.core.chat import TextDelta
from glmkit.serving.engine import MAX_BATCH_SIZE, MAX_QUEUE, ChatService
from glmkit.serving.protocol import APIError, ChatRequest, parse_chat_request, parse_legacy_request, usage

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


def create_app(model: Any, tokenizer: Any, name: str, *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = MAX_BATCH_SIZE,
               max_queue: int = MAX_QUEUE) -> FastAPI:
    """The FastAPI app serving a loaded chat model (e.g. from glmkit.loading.tools.load_chat_model) as `name`.

    api_key: when set, every route but /health requires `Authorization: Bearer <api_key>`.
    max_body_bytes: largest request body accepted (413 above it).
    max_batch_size: most requests decoded together; max_queue: most requests waiting before new ones get 503.
    The app's lifespan starts and stops the decoding thread; its ChatService is `app.state.service`.
    """
    service = ChatService(model, tokenizer, name, max_batch_size=max_batch_size, max_queue=max_queue)
    api_key = api_key or None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.engine.close)

    # no version: it would only show in the OpenAPI schema, which is off
    app = FastAPI(title="glmkit", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

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
        req = parse_chat_request(body, service.format)
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
            "usage": usage(len(req.ids), n_tokens),
        }

    @app.post("/", dependencies=[Depends(authorize)])
    async def legacy_chat(request: Request):
        body = await read_json(request)
        ids, params, query, history = parse_legacy_request(body, service.format)
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
        yield chunk({}, usage=usage(len(req.ids), n_tokens), choices=False)
    yield "data: [DONE]\n\n"


def serve(model: Any, tokenizer: Any, name: str, host: str = "127.0.0.1", port: int = 8000, *,
          api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES, max_batch_size: int = MAX_BATCH_SIZE,
          max_queue: int = MAX_QUEUE, log_level: str = "info") -> None:
    """Serves `create_app(model, tokenizer, name, ...)` on host:port with uvicorn until SIGINT/SIGTERM, which finish
    the requests in flight (up to 30 s) and return. Call it from the main thread."""
    import uvicorn

    app = create_app(model, tokenizer, name, api_key=api_key, max_body_bytes=max_body_bytes,
                     max_batch_size=max_batch_size, max_queue=max_queue)
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
