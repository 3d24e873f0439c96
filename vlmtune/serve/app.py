"""Routes and wire format of `vlmtune serve` (FastAPI on uvicorn), and its CLI entry.

Bodies are read by hand (capped at MAX_BODY bytes) so a malformed body is an OpenAI-style 400, as is every
field wire.parse refuses. With --api-key, /v1 routes need `Authorization: Bearer KEY` (compared with
hmac.compare_digest; the key is never logged); / and /health are open.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from vlmtune.serve.batcher import Batcher, Job
from vlmtune.serve.wire import ApiError, Limits, parse

MAX_BODY = 32 << 20  # bytes: a few large base64 images
PAGE = Path(__file__).with_name("page.html")


def build_app(generator, batcher: Batcher, name: str, limits: Limits, api_key: str | None, timeout_s: float) -> FastAPI:
    """The FastAPI app over a started Batcher."""
    app = FastAPI(title="vlmtune serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, **batcher.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, api_key)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vlmtune",
                                            "max_tokens": limits.max_tokens}]}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        _check_key(request, api_key)
        parsed = parse(await _json_body(request), generator, limits)
        job = Job(parsed.ids, parsed.images, parsed.max_tokens, (parsed.temperature, parsed.top_p, parsed.seed),
                  parsed.stop, time.monotonic() + timeout_s, asyncio.get_running_loop())
        batcher.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if parsed.stream:
            return StreamingResponse(_events(job, head, request), media_type="text/event-stream")
        return await _answer(job, head, request)

    return app


def _check_key(request: Request, api_key: str | None) -> None:
    """401 unless the bearer token equals the key (constant-time)."""
    if api_key is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        raise ApiError(401, "a valid 'Authorization: Bearer' API key is required", None, "authentication_error")


async def _json_body(request: Request):
    """The parsed JSON body; 413 over MAX_BODY bytes, 400 when it is not JSON."""
    if int(request.headers.get("content-length") or 0) > MAX_BODY:
        raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"the request body is over {MAX_BODY} bytes")
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON ({e})") from None


async def _next_event(job: Job, request: Request) -> tuple | None:
    """The job's next event, or None once the client has disconnected (checked every 0.25 s: uvicorn only
    reports a closed connection when asked, or when a write fails)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                return None


async def _answer(job: Job, head: dict, request: Request) -> JSONResponse:
    """Wait for the job; a client that disconnects cancels it."""
    while True:
        if (event := await _next_event(job, request)) is None:
            return JSONResponse({}, status_code=499)
        if event[0] == "done":
            _, text, reason, usage = event
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": usage})
        if event[0] == "error":
            raise _generation_error(event[1])


def _generation_error(message: str) -> ApiError:
    """The worker's error event as an API error: timeout 504, a failure of ours 500, else the prompt's 400."""
    if message == "timeout":
        return ApiError(504, "generation timed out (--timeout)", None, "timeout")
    if message.startswith("generation failed"):
        return ApiError(500, message, None, "server_error")
    return ApiError(400, message, "messages")


async def _events(job: Job, head: dict, request: Request):
    """Server-sent events: a role chunk, one chunk per new text, the finish chunk with usage, [DONE]. A closed
    connection ends this generator, which cancels the job."""
    def chunk(delta: dict, reason=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            if (event := await _next_event(job, request)) is None:
                return
            if event[0] == "delta":
                yield chunk({"content": event[1]})
            elif event[0] == "done":
                _, text, reason, usage = event
                if text.startswith(job.sent) and len(text) > len(job.sent):
                    yield chunk({"content": text[len(job.sent):]})
                yield chunk({}, reason, usage=usage)
                break
            else:
                yield f"data: {json.dumps(_generation_error(event[1]).body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True


class _Server:
    """uvicorn's Server whose SIGTERM/SIGINT drain in-flight requests and then return (exit 0) instead of
    re-raising the signal after shutdown, as uvicorn does by default."""

    @staticmethod
    def make(app: FastAPI, host: str, port: int):
        import contextlib
        import signal

        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                old = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGTERM, signal.SIGINT)}
                try:
                    yield
                finally:
                    for sig, handler in old.items():
                        signal.signal(sig, handler)

        config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=120)
        return Server(config)


def main(args) -> int:
    """CLI entry: load the model as chat does, start the batcher, serve until SIGTERM/SIGINT."""
    from vlmtune.data.templates import get_template
    from vlmtune.errors import UserError
    from vlmtune.loading import load_generator

    if args.prompt_template:
        get_template(args.prompt_template)
    local = Path(args.allow_local_images).resolve() if args.allow_local_images else None
    if local is not None and not local.is_dir():
        raise UserError(f"--allow-local-images {args.allow_local_images}: not a folder")
    if args.max_batch_size < 1:
        raise UserError("--max-batch-size must be at least 1")
    generator = load_generator(args)
    limits = Limits(args.max_images, args.max_image_pixels, local, args.max_new_tokens or 2048)
    batcher = Batcher(generator, args.max_batch_size)
    batcher.start()
    name = args.model_name or Path(args.model_name_or_path).name
    app = build_app(generator, batcher, name, limits, args.api_key, args.timeout)
    print(f"vlmtune serve: {name} on http://{args.host}:{args.port} (max batch {args.max_batch_size})", flush=True)
    _Server.make(app, args.host, args.port).run()
    batcher.stop()
    return 0
