"""The FastAPI application: OpenAI's transcription routes, the realtime WebSocket, health, metrics and models.

:class:`Server` owns the loaded model, the engine thread (warm-up, then the :class:`Scheduler` loop), the
metrics and the admission limits; :func:`build_app` puts routes on top of it. ``/health`` answers 503 until the
warm-up has compiled what a first short request needs (other shapes compile when first used), then 200. With an
API key, every ``/v1`` route wants ``Authorization: Bearer KEY`` (compared in constant time); ``/health`` and
``/metrics`` stay open for probes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import logging
import signal
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI, WebSocket
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.decoding.longform import Piece
from qasr_jax.decoding.pipeline import token_limit
from qasr_jax.decoding.request import Request
from qasr_jax.modeling.config import MAX_AUDIO_SECONDS
from qasr_jax.server import realtime
from qasr_jax.server.metrics import Metrics
from qasr_jax.server.openai_format import APIError
from qasr_jax.server.scheduler import STEP_SECONDS, Event, Job, Scheduler
from qasr_jax.server.transcriptions import CLIENT_CLOSED, transcribe

log = logging.getLogger("qasr_jax.server")


@dataclasses.dataclass
class ServerConfig:
    """What ``qasr-jax serve`` was started with (see its --help)."""

    model_id: str
    max_slots: int = 32
    api_key: str | None = None
    max_upload_mb: float = 25.0
    max_audio_seconds: float = MAX_AUDIO_SECONDS
    max_queue: int = 256
    realtime_slots: int = 8
    piece_seconds: float = 30.0
    kv_cache_gb: float = 1.0
    strict_model_name: bool = False
    step_seconds: float = STEP_SECONDS


class Server:
    """The model, its engine thread, the metrics, and admission (queue depth) for one served model."""

    def __init__(self, asr, config: ServerConfig):
        self.asr, self.config = asr, config
        self.model_id = config.model_id
        self.token_limit = token_limit(asr.model.config)
        self._compiles = contextlib.ExitStack()
        self.compiles = self._compiles.enter_context(count_compilations())
        self.scheduler = Scheduler(asr.model, asr.tokenizer, self.compiles, config.max_slots, config.realtime_slots,
                                   config.step_seconds, int(config.kv_cache_gb * 2**30))
        self.metrics = Metrics(self.scheduler, self.compiles)
        self.ready = threading.Event()
        self.failed: str | None = None  # why the engine thread stopped, if it did
        self.in_flight: set[int] = set()  # ids of admitted transcription jobs (event loop only)
        self._thread = threading.Thread(target=self._engine, name="qasr-engine", daemon=True)

    def start(self) -> None:
        """Start the engine thread: warm-up, then the scheduler loop."""
        self._thread.start()

    def _engine(self) -> None:
        try:
            start = time.perf_counter()
            self.scheduler.warm_up()
            log.info("warm-up: %d compilations, %.1f s; ready (other shapes compile when first used)",
                     self.compiles.count, time.perf_counter() - start)
            self.ready.set()
            self.scheduler.run()
        except Exception as e:  # nothing can be served without the engine: stop the server, which exits with 1
            log.exception("the engine thread failed")
            self.failed = f"{type(e).__name__}: {e}"
            self.ready.clear()
            signal.raise_signal(signal.SIGTERM)

    def close(self) -> None:
        """Stop the engine thread (after the jobs in flight) and the compilation counter."""
        self.scheduler.stop()
        self._thread.join()
        self._compiles.close()

    def require_ready(self) -> None:
        """Raise a 503 (with Retry-After) while the warm-up runs."""
        if not self.ready.is_set():
            raise APIError(503, "the server is warming up (compiling its programs); retry shortly", code="not_ready",
                           type="server_error", headers={"Retry-After": "5"})

    def admit(self, request: Request, pieces: list[Piece], budgets: list[int], deliver: Callable[[Event], None],
              beam_size: int = 1, stream: bool = False) -> Job:
        """Take a prepared request on (``Scheduler.submit``) -> its Job, or refuse it with a 503 when
        ``max_queue`` requests are in flight already."""
        if len(self.in_flight) >= self.config.max_queue:
            raise APIError(503, f"the server is busy: {len(self.in_flight)} requests in flight (--max-queue "
                                f"{self.config.max_queue}); retry later", code="server_busy", type="server_error",
                           headers={"Retry-After": "1"})
        job = self.scheduler.submit(request, pieces, budgets, deliver, beam_size, stream)
        self.in_flight.add(job.id)
        return job

    def release(self, job: Job) -> None:
        """A job is answered (or abandoned): it no longer counts against ``max_queue``."""
        self.in_flight.discard(job.id)

    def authorized(self, header: str | None) -> bool:
        """True when no key is set or ``header`` is ``Bearer <key>`` (compared in constant time)."""
        if self.config.api_key is None:
            return True
        given = (header or "").removeprefix("Bearer ").strip().encode()
        return hmac.compare_digest(given, self.config.api_key.encode())

    def check_auth(self, header: str | None) -> None:
        """Raise a 401 in OpenAI's shape unless the Authorization header carries the key."""
        if not self.authorized(header):
            problem = "no API key" if not header else "a wrong API key"
            raise APIError(401, f"{problem}: send the server's key as 'Authorization: Bearer KEY' (the openai "
                                "client's api_key)", code="invalid_api_key")


class _Metered:
    """ASGI middleware: counts each HTTP request by endpoint and status and times it to its last byte; a client
    that leaves before the last byte counts as 499."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/health"):
            return await self.app(scope, receive, send)
        start, status, finished = time.perf_counter(), [CLIENT_CLOSED], [False]

        async def metered_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                finished[0] = True
            await send(message)

        try:
            await self.app(scope, receive, metered_send)
        finally:
            code = status[0] if finished[0] else CLIENT_CLOSED
            route = scope.get("route")
            endpoint = route.path if route is not None else "other"
            self.server.metrics.requests.labels(endpoint, str(code)).inc()
            self.server.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(server: Server) -> FastAPI:
    """The ASGI app serving ``server`` (see the module doc); its lifespan starts and stops the engine thread."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="qasr-jax", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(_Metered, server=server)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code=code))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return _error(APIError(400, f"invalid request: {e.errors()}", code="invalid_request"))

    def auth(request: HTTPRequest) -> None:
        server.check_auth(request.headers.get("authorization"))

    @app.get("/health")
    async def health():
        """200 once the warm-up is done (ready for requests), 503 before."""
        if server.ready.is_set():
            return {"status": "ok", "model": server.model_id}
        if server.failed:
            return JSONResponse({"status": "failed", "error": server.failed}, status_code=500)
        return JSONResponse({"status": "warming up", "model": server.model_id}, status_code=503,
                            headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics():
        """Prometheus text format."""
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        """The served model, as OpenAI lists models."""
        auth(request)
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "qasr-jax"}]}

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: HTTPRequest):
        """OpenAI's transcription endpoint (see qasr_jax.server.transcriptions)."""
        auth(request)
        server.require_ready()
        return await transcribe(request, server)

    @app.post("/v1/audio/translations")
    async def translations(request: HTTPRequest):
        """Not served: the model transcribes in the spoken language; it does not translate."""
        auth(request)
        raise APIError(404, "translation is not supported: Qwen3-ASR transcribes speech in the language spoken "
                            "and does not translate; use POST /v1/audio/transcriptions", code="unsupported_endpoint")

    @app.websocket("/v1/realtime")
    async def realtime_session(ws: WebSocket):
        """OpenAI's realtime transcription session (see qasr_jax.server.realtime)."""
        await realtime.session(ws, server)

    return app
