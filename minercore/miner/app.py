"""The miner's HTTP server, on minercore's own ASGI app whichever bittensor SDK is installed.

Routes:

* ``POST /StreamPrompting``: what an unmodified bittensor-10 Dendrite sends. The v10 signature, freshness and
  replay are checked as bt.Axon checks them (``auth.DendriteVerifier``), then the blacklist, the rate limit and
  the priority; the answer is the completion as raw UTF-8 in chunks of whole characters, with the
  ``bt_header_axon_*`` response headers the dendrite reads its status from.
* ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``: the OpenAI shapes of
  ``minercore serve`` (``openai_api.OpenAIApi``), signed with btauth/1 by a hotkey the blacklist admits, for this
  miner's hotkey.
  ``X-Client-Timeout`` (seconds, ``max_timeout`` when absent) is the caller's deadline.
* ``GET /health``; ``GET /metrics`` (Prometheus) when the miner keeps metrics.

Statuses before an answer starts: 400 malformed request, 401 failed authentication, 403 refused by the blacklist,
411/413 body without a length or too large, 415 not JSON, 429 over the rate limit (and, on the OpenAI routes,
a full queue), 503 shutting down or overloaded (nothing was accepted), 500 the backend failed before any text.
Once a request is accepted its answer is a 200: an answer that cannot finish before the caller's deadline (minus
``deadline_margin``) ends early with the exact text so far and a normal end of stream (outcome ``deadline``). On
StreamPrompting only a fault after the first byte (the model failed, the miner shut down mid-answer) cuts the
connection, so that the caller's HTTP client reports an incomplete answer instead of taking it for a whole one;
the OpenAI routes answer as ``minercore serve`` does (an error event, or finish reason ``length``, then
``[DONE]``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..contract.generation import GenerationRequest, SamplingParams
from ..contract.observe import RequestTimer
from ..serve.metrics import Metrics
from ..serve.openai_api import OpenAIApi, model_list
from .admission import Admission, BodyLimit, Refusal, arrival, client_timeout
from .auth import AuthError, BtAuthVerifier, DendriteVerifier
from .blacklist import BlacklistPolicy
from .config import ServerSettings
from .streamprompting import STREAMPROMPTING, TextStream, conversation_of, json_object, v10_error, v10_headers

CLIENT_TIMEOUT_HEADER = "x-client-timeout"


class MinerServer:
    """The routes over ``backend``, admitting callers through ``policy`` (whose view the miner refreshes)."""

    def __init__(self, backend: Any, policy: BlacklistPolicy, settings: ServerSettings, *,
                 metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.policy = policy
        self.settings = settings
        self.metrics = metrics
        self.admission = Admission(policy, metrics, settings.deadline_margin)
        self.dendrites = DendriteVerifier(settings.hotkey, max_timeout=settings.max_timeout)
        self.btauth = BtAuthVerifier(settings.hotkey)
        self.sampling = SamplingParams(max_new_tokens=settings.max_new_tokens)
        self.openai = OpenAIApi(backend, settings.served_model_name, metrics=metrics)
        self._started = int(time.time())

    def build(self) -> FastAPI:
        app = FastAPI(title="minercore miner", docs_url=None, redoc_url=None, openapi_url=None)
        app.add_middleware(BodyLimit, max_body_bytes=self.settings.max_body_bytes)
        app.add_api_route(f"/{STREAMPROMPTING}", self.stream_prompting, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/health", self.health, methods=["GET"])
        if self.metrics is not None:
            app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        return app

    # ---- StreamPrompting (bittensor 10 Dendrites) -----------------------------------------------------------
    async def stream_prompting(self, request: Request) -> Response:
        arrived = arrival(request)
        caller_class = "unverified"
        try:
            headers = request.headers
            self.admission.admit_unverified(headers.get("bt_header_dendrite_hotkey"))
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json" and not media_type.endswith("+json"):
                raise Refusal(415, f"send the request body as application/json, not {media_type or 'no type'}",
                              "invalid")
            document = json_object(await request.body())
            roles, messages = document.get("roles"), document.get("messages")
            conversation = conversation_of(roles, messages, self.settings.max_prompt_chars)
            try:
                caller = self.dendrites.verify(headers, messages)
            except AuthError as exc:
                raise Refusal(401, f"Not Verified with error: {exc}", "unauthorized",
                              blacklist_kind=exc.kind) from None
            caller_class = self.policy.caller_class(caller.hotkey)
            self.admission.charge(caller.hotkey)
        except Refusal as refusal:
            self.admission.refused(refusal, caller_class)
            return v10_error(self.settings, request, refusal)
        ends_at = arrived + self.admission.budget(caller.timeout)
        generation = GenerationRequest(messages=conversation, sampling=self.sampling,
                                       timeout=max(0.0, ends_at - time.monotonic()),  # the engine's counts from now
                                       priority=self.policy.priority(caller.hotkey))
        timer = RequestTimer(caller_class, arrived=arrived)
        headers = v10_headers(self.settings, request, caller, 200, "Success")
        return TextStream(self.backend, self.settings, self.metrics, generation, timer, headers, ends_at)

    # ---- OpenAI shapes (btauth/1) -------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._openai(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._openai(request, chat=False)

    async def models(self, request: Request) -> Response:
        try:
            await self._btauth_caller(request)
        except Refusal as refusal:
            self.admission.refused(refusal, "unverified")
            return _openai_refusal(refusal)
        return JSONResponse(model_list(self.settings.served_model_name, self._started))

    async def _btauth_caller(self, request: Request) -> tuple[str, bytes]:
        """The verified, admitted and charged hotkey of a btauth/1 request, and its body; Refusal otherwise."""
        self.admission.admit_unverified(request.headers.get("x-bittensor-hotkey"))
        body = await request.body()
        target = request.scope.get("raw_path", request.url.path.encode()).decode("latin-1")
        if request.scope.get("query_string"):
            target += "?" + request.scope["query_string"].decode("latin-1")
        try:
            hotkey = self.btauth.verify(request.headers, body, method=request.method, target=target)
        except AuthError as exc:
            raise Refusal(401, str(exc), "unauthorized", blacklist_kind=exc.kind) from None
        self.admission.charge(hotkey)
        return hotkey, body

    async def _openai(self, request: Request, chat: bool) -> Response:
        arrived = arrival(request)
        caller_class = "unverified"
        try:
            hotkey, body = await self._btauth_caller(request)
            caller_class = self.policy.caller_class(hotkey)
            timeout = client_timeout(request.headers.get(CLIENT_TIMEOUT_HEADER), self.settings.max_timeout)
        except Refusal as refusal:
            self.admission.refused(refusal, caller_class)
            return _openai_refusal(refusal)
        budget = self.admission.budget(timeout)
        return await self.openai.handle(request, chat, body=body, deadline=lambda _: budget,
                                        caller_class=caller_class, priority=self.policy.priority(hotkey),
                                        arrived=arrived)

    # ---- health and metrics -----------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        backend = self.backend
        return {"status": "closing" if self.policy.closing else "ok", "hotkey": self.settings.hotkey,
                "model": self.settings.served_model_name, "runner": backend.runner_description,
                "serving": backend.serving, "stream_loop": backend.stream_loop,
                "stats": backend.stats().as_dict()}

    async def prometheus(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def _openai_refusal(refusal: Refusal) -> Response:
    headers = {"retry-after": "1"} if refusal.status in (429, 503) else None
    return JSONResponse({"error": {"message": refusal.message, "type": refusal.outcome, "param": None,
                                   "code": refusal.outcome}}, status_code=refusal.status, headers=headers)


