"""An OpenAI-compatible HTTP API for one model of the zoo (``medzoo serve``).

``GET /v1/models`` and ``POST /v1/chat/completions`` (whole answers, or ``stream: true`` as server-sent
events ``data: {chunk}`` ending with ``data: [DONE]``), so the ``openai`` package, curl and every tool built
on them talk to a zoo model. The chat messages become the recipe's own template: earlier user/assistant
turns are the history, the last user message is the query, and a system message is put before that query.

Requests are answered one at a time (the model's lock in :mod:`medzoo.generate`); the others wait their turn.
Every error is JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}`` with a 4xx status for a
bad request, and the server keeps serving.
"""

import hmac
import json
import logging
import time
import uuid
from typing import Any

from medzoo.objects import MedzooError

log = logging.getLogger("medzoo.serve")

EXTRA_SETTINGS = ("top_k", "num_beams", "repetition_penalty", "do_sample")  # beyond OpenAI's own fields


class RequestError(MedzooError):
    def __init__(self, message: str, status: int = 400, code: str | None = None,
                 type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.type, self.param = status, code, type_, param


def error_body(message: str, type_: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _text(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"messages[{index}].content: only text parts are supported by this model",
                                   param=f"messages[{index}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{index}].content must be a string or a list of text parts",
                       param=f"messages[{index}].content")


def conversation(messages: Any) -> tuple[str, list[tuple[str, str]]]:
    """(query, history pairs) from OpenAI chat messages."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content}", param="messages")
    system, turns = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with role and content", param=f"messages[{i}]")
        role = message.get("role")
        text = _text(message.get("content"), i)
        if role in ("system", "developer"):
            if turns:
                raise RequestError(f"messages[{i}]: a system message must come before the conversation",
                                   param=f"messages[{i}].role")
            system.append(text)
        elif role in ("user", "assistant"):
            expected = "user" if len(turns) % 2 == 0 else "assistant"
            if role != expected:
                raise RequestError(f"messages[{i}]: expected a {expected} message (user and assistant turns "
                                   "alternate, starting with user)", param=f"messages[{i}].role")
            turns.append(text)
        else:
            raise RequestError(f"messages[{i}].role {role!r}: expected system, user or assistant",
                               param=f"messages[{i}].role")
    if len(turns) % 2 == 0:
        raise RequestError("the last message must be the user's question", param="messages")
    history = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    query = turns[-1]
    if not query.strip():
        raise RequestError("empty prompt: the last user message has no text", param="messages", code="empty_prompt")
    if system:
        query = "\n".join(system + [query])
    return query, history


def _settings(body: dict) -> dict:
    settings = {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        settings["max_new_tokens"] = max_tokens
    for key in ("temperature", "top_p", *EXTRA_SETTINGS):
        if body.get(key) is not None:
            settings[key] = body[key]
    for key, value in settings.items():
        if isinstance(value, bool) != (key == "do_sample") or not isinstance(value, (int, float)):
            raise RequestError(f"{key}: expected a number" if key != "do_sample" else "do_sample: expected true/false",
                               param=key)
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("n: only one choice per request is supported", param="n")
    return settings


def _stops(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise RequestError("stop: expected a string or a list of up to 4 strings", param="stop")


def create_app(lm, *, api_key: str | None = None, model_id: str | None = None):
    """The FastAPI application serving ``lm`` (a :class:`medzoo.modeling.LoadedModel`)."""
    import anyio
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from medzoo import generate

    model_id = model_id or lm.name
    created = int(time.time())
    app = FastAPI(title=f"medzoo serve: {model_id}", docs_url=None, redoc_url=None, openapi_url=None)

    def fail(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error",
             param: str | None = None):
        return JSONResponse(error_body(message, type_, code, param), status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return fail(exc.status, str(exc), exc.code, exc.type, exc.param)

    @app.exception_handler(MedzooError)
    async def _medzoo_error(request, exc: MedzooError):
        text = str(exc)
        code = "context_length_exceeded" if text.startswith("prompt too long") else \
            "empty_prompt" if text.startswith("empty prompt") else None
        return fail(400, text, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return fail(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return fail(400, f"invalid request: {exc.errors()[0].get('msg', 'bad body') if exc.errors() else 'bad body'}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):  # never a stack trace to the client; the log keeps it
        log.exception("internal error on %s", request.url.path)
        return fail(500, f"internal error: {type(exc).__name__}", "internal_error", "server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                return fail(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                            "invalid_api_key")
        return await call_next(request)

    def model_card():
        m = lm.manifest
        return {"id": model_id, "object": "model", "created": created, "owned_by": "medzoo",
                "recipe": m.get("recipe"), "method": m.get("method"), "base_model": m.get("base_model"),
                "template": lm.template.name}

    @app.get("/")
    def root():
        return {"medzoo": "serve", "model": model_id, "endpoints": ["/v1/models", "/v1/chat/completions"]}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    def model(name: str):
        if name != model_id:
            raise RequestError(f"model {name!r} is not served here; this server serves {model_id!r}", 404,
                               "model_not_found", param="model")
        return model_card()

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as exc:
            raise RequestError(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        name = body.get("model")
        if name not in (None, model_id):
            raise RequestError(f"model {name!r} is not served here; this server serves {model_id!r} "
                               "(GET /v1/models)", 404, "model_not_found", param="model")
        query, history = conversation(body.get("messages"))
        settings, stops = _settings(body), _stops(body)
        # encoding and the context check happen here, so a bad prompt is a 400 before any stream starts
        gen = await anyio.to_thread.run_sync(
            lambda: generate.Generation(lm, query, history, stop=stops, **settings))
        cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_events(gen, cid, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        answer = await anyio.to_thread.run_sync(gen.result)
        return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                             "finish_reason": answer.finish_reason}],
                "usage": _usage(answer)}

    async def _events(gen, cid: str, include_usage: bool):
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            data = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        end = object()
        pieces = iter(gen)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                try:
                    piece = await anyio.to_thread.run_sync(next, pieces, end)
                except MedzooError as exc:
                    yield f"data: {json.dumps(error_body(str(exc)), ensure_ascii=False)}\n\n"
                    break
                except Exception as exc:  # the stream already started: report in-band, keep serving
                    log.exception("generation failed")
                    yield f"data: {json.dumps(error_body(f'internal error: {type(exc).__name__}', 'server_error'))}\n\n"
                    break
                if piece is end:
                    answer = gen.answer
                    yield chunk({}, answer.finish_reason)
                    if include_usage:
                        data = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                                "model": model_id, "choices": [], "usage": _usage(answer)}
                        yield f"data: {json.dumps(data)}\n\n"
                    break
                if piece:
                    yield chunk({"content": piece})
            yield "data: [DONE]\n\n"
        finally:
            # a client that went away: stop the model at its next token and let the generation end, so the
            # model's lock is free for the next request
            gen.cancel.set()
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_drain, pieces)

    return app


def _drain(pieces) -> None:
    try:
        for _ in pieces:
            pass
    except Exception:  # the error was reported (or nobody is listening any more)
        pass


def _usage(answer) -> dict:
    return {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.tokens,
            "total_tokens": answer.prompt_tokens + answer.tokens}


def server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info"):
    """A uvicorn server for ``app`` (``.run()`` blocks; tests run it in a thread)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)
