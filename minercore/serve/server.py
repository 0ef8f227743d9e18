"""An OpenAI-compatible HTTP API over a backend: ``python -m minercore serve``.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (answered by ``openai_api.OpenAIApi``),
``GET /v1/models`` and ``GET /health``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from ..backends import Backend, build_backend
from ..contract.config import EngineOptions, ModelOptions
from ..contract.config import served_model_name as default_served_name
from .openai_api import ApiError, OpenAIApi, model_list

if TYPE_CHECKING:
    from .metrics import Metrics

log = logging.getLogger(__name__)

# An idle keep-alive connection stays open longer than clients keep one in their pools (aiohttp, under bittensor
# 10's Dendrite: 15 s; httpx: 5 s), so the client is the side that closes it. With uvicorn's default, 5 s, a
# request sent on a pooled connection as the server's idle timer fires is lost: the caller reads "Server
# disconnected" though the miner never saw its request.
KEEP_ALIVE_S = 75


# ---- the app --------------------------------------------------------------------------------------------
def create_app(backend: Backend, served_model_name: str, *, metrics: Metrics | None = None,
               shutdown_grace: float = 5.0) -> FastAPI:
    """The API over ``backend``, which the app's lifespan starts and shuts down."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await backend.start()
        if metrics is not None:
            metrics.bind(backend)
        log.info("serving %s: backend %s, %s", served_model_name, backend.backend_name, backend.runner_description)
        yield
        await backend.shutdown(shutdown_grace)

    app = FastAPI(title="minercore", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # A bug here must still answer in the shape OpenAI clients parse; Starlette logs the traceback.
        return ApiError(500, f"internal error: {type(exc).__name__}", "server_error", code="internal_error").response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return model_list(served_model_name, started)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "backend": backend.backend_name, "model": served_model_name,
                "runner": backend.runner_description, "serving": backend.serving,
                "stream_loop": backend.stream_loop, "warmup_seconds": backend.warmup_seconds,
                "stats": backend.stats().as_dict()}

    api = OpenAIApi(backend, served_model_name, metrics=metrics)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.handle(request, chat=True)

    return app


@contextlib.asynccontextmanager
async def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                  shutdown_grace: float = 1.0) -> AsyncIterator[str]:
    """Run ``app`` with uvicorn on the current event loop for the duration of the block; yields its base URL.

    For tests, benchmarks and embedding; ``port=0`` takes a free port. The app's lifespan (backend start and
    shutdown) runs inside, so a backend that fails to start raises here.
    """
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning", timeout_keep_alive=KEEP_ALIVE_S,
                                           timeout_graceful_shutdown=shutdown_grace))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped while starting (see its log)")
            await asyncio.sleep(0.01)
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def serve(model: ModelOptions, options: EngineOptions, *, host: str = "127.0.0.1", port: int = 8000,
          served_model_name: str | None = None, metrics_port: int | None = None, log_level: str = "info",
          shutdown_grace: float = 5.0) -> None:
    """Run the API until interrupted (blocking). Metrics are served on ``metrics_port`` when one is given."""
    import uvicorn

    metrics = None
    if metrics_port is not None:
        from .metrics import Metrics

        metrics = Metrics()
        bound = metrics.start_http(metrics_port, addr=host)
        log.info("metrics on http://%s:%d/metrics", host, bound)
    backend = build_backend(model, options, metrics=metrics)
    app = create_app(backend, served_model_name or default_served_name(model), metrics=metrics,
                     shutdown_grace=shutdown_grace)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_keep_alive=KEEP_ALIVE_S,
                    timeout_graceful_shutdown=shutdown_grace)
    finally:
        if metrics is not None:
            metrics.stop_http()
