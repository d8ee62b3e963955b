"""The Starlette application: routes parse, call the service, and map errors. Nothing else."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.jobs import ImageEngine
from stream import sse
from stream.auth import ApiKeyMiddleware, load_api_keys
from stream.errors import (
    APIError,
    InvalidRequest,
    NotFound,
    ServerError,
    error_body,
    error_response,
)
from stream.image_inputs import decode_upload
from stream.images import MEDIA_TYPES
from stream.job_service import JobService
from stream.limits import BodyLimitMiddleware
from stream.loras import LoraFolder
from stream.metrics import Metrics, MetricsMiddleware
from stream.openapi import Operation, openapi_document
from stream.params import (
    ImageEditRequest,
    ImageGenerationRequest,
    ImagePlan,
    parse_generation_request,
    parse_request,
    plan_edit,
    plan_generation,
)
from stream.serving import ImageService
from stream.settings import Settings
from stream.shutdown import InFlight, InFlightMiddleware
from stream.state import build_stores
from stream.store import ResultStore
from stream.uploads import EditUpload, read_edit_upload, read_json
from stream.webhooks import check_webhook_url

logger = logging.getLogger(__name__)
WEB_DIR = Path(__file__).resolve().parent.parent / "web"
VERSION = version("fluxstream")
MAX_EVENT_ID_DIGITS = 18
# Printable ASCII without spaces: UUIDs, `req_...`, base64 ids all pass.
REQUEST_ID = re.compile(r"[!-~]{1,128}")
ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def read_json_object(request: Request) -> dict[str, object]:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


async def is_edit(request: Request) -> bool:
    """Edits come as multipart forms, or as JSON that carries `images`."""
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return True
    body = await read_json(request)
    return isinstance(body, dict) and "images" in body


def last_event_id(request: Request) -> int:
    """Where a resuming `EventSource` left off (0: from the start)."""
    text = request.headers.get("last-event-id", "").strip()
    if not text:
        return 0
    # `isdigit` alone lets through "²" and numbers too long for `int`.
    if not (text.isascii() and text.isdigit() and len(text) <= MAX_EVENT_ID_DIGITS):
        raise InvalidRequest("Last-Event-ID must be an event id", param="Last-Event-ID")
    return int(text)


def create_app(settings: Settings, engine: ImageEngine) -> Starlette:
    """The app serving `engine`; where results and jobs live follows `settings.state_store`."""
    store, job_store = build_stores(settings)
    metrics = Metrics(engine.load)
    service = ImageService(settings, engine, store, metrics)
    in_flight = InFlight()
    jobs = JobService(service, job_store, in_flight)

    async def generations(request: Request) -> Response:
        plan = plan_generation(
            parse_generation_request(await read_json(request)), settings, engine.profile
        )
        return await service.respond(request, plan, kind="image_generation")

    async def edit_plan(upload: EditUpload) -> tuple[ImageEditRequest, ImagePlan]:
        edit_request = parse_request(upload.fields, ImageEditRequest)
        inputs = await decode_upload(upload, engine.profile.max_input_images, settings)
        return edit_request, plan_edit(edit_request, inputs, settings, engine.profile)

    async def edits(request: Request) -> Response:
        _, plan = await edit_plan(await read_edit_upload(request, settings))
        return await service.respond(request, plan, kind="image_edit")

    async def create_job(request: Request) -> Response:
        """A generation body, or an edit (multipart, or JSON with `images`), as a job."""
        upload = await read_edit_upload(request, settings) if await is_edit(request) else None
        fields = upload.fields if upload is not None else await read_json_object(request)
        webhook_url = check_webhook_url(fields.pop("webhook_url", None), settings)
        fields.pop("stream", None)  # a job streams through its events URL, whatever it asks
        parsed: ImageGenerationRequest
        if upload is None:
            parsed = parse_generation_request(fields)
            plan, kind = plan_generation(parsed, settings, engine.profile), "image_generation"
        else:
            (parsed, plan), kind = await edit_plan(upload), "image_edit"
        base_url = service.base_url(request)
        record = await jobs.submit(
            plan,
            kind=kind,
            partial_images=parsed.partial_images or 0,
            base_url=base_url,
            webhook_url=webhook_url,
        )
        return JSONResponse(jobs.snapshot(record, base_url), status_code=202)

    async def job(request: Request) -> Response:
        record = await jobs.get(request.path_params["job_id"])
        return JSONResponse(jobs.snapshot(record, service.base_url(request)))

    async def cancel_job(request: Request) -> Response:
        record = await jobs.cancel(request.path_params["job_id"])
        return JSONResponse(jobs.snapshot(record, service.base_url(request)))

    async def job_events(request: Request) -> Response:
        frames = await jobs.event_frames(request.path_params["job_id"], last_event_id(request))
        return sse.event_stream(frames, keepalive_s=settings.keepalive_s, headers={})

    async def result_file(request: Request) -> Response:
        stored = await store.read(request.path_params["name"])
        if stored is None:
            raise NotFound("this image does not exist or has expired", code="not_found")
        return Response(stored.data, media_type=stored.media_type)

    async def models(request: Request) -> Response:
        examples = engine.profile.example_prompts
        return JSONResponse(
            {"object": "list", "data": [_model_card(m, examples) for m in settings.model_ids]}
        )

    async def model(request: Request) -> Response:
        model_id = request.path_params["model"]
        if model_id not in settings.model_ids:
            raise NotFound(f"the model {model_id!r} does not exist", code="model_not_found")
        return JSONResponse(_model_card(model_id, engine.profile.example_prompts))

    async def loras(request: Request) -> Response:
        """The LoRAs a request may name; none without --lora-dir."""
        data: list[dict[str, object]] = []
        if settings.lora_dir is not None:
            folder = LoraFolder(settings.lora_dir, settings.lora_max_bytes)
            data = await anyio.to_thread.run_sync(folder.listing, engine.loaded_loras())
        return JSONResponse({"object": "list", "data": data})

    async def unknown_route(request: Request) -> Response:
        """As OpenAI answers any method and path it lacks; without this route a POST would
        fall through to the demo page's static files, which answer 405."""
        raise NotFound(f"Invalid URL ({request.method} {request.url.path})")

    async def health(request: Request) -> Response:
        status = engine.status
        body = {
            "status": status,
            "replica": settings.replica_name,
            "pid": os.getpid(),
            "model": engine.profile.model_id,
            "speedups": engine.profile.speedups,
            "max_partial_images": settings.max_partial_images,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    operations = [
        Operation(
            "POST",
            "/v1/images/generations",
            "text to image; `stream: true` answers text/event-stream",
            body=ImageGenerationRequest,
            streams=True,
        ),
        Operation(
            "POST",
            "/v1/images/edits",
            "img2img, inpainting or reference editing: these fields plus the files `image` "
            "(or `image[]`) and `mask`; also JSON with data URLs in `images` and `mask`",
            body=ImageEditRequest,
            media_type="multipart/form-data",
            files=("image", "image[]", "mask"),
            streams=True,
        ),
        Operation(
            "POST",
            "/v1/images/jobs",
            "the generations body, or an edit (multipart or JSON with images), plus"
            " webhook_url, as a job; 202 at once",
            body=ImageGenerationRequest,
            status=202,
        ),
        Operation("GET", "/v1/images/jobs/{job_id}", "the job, with its result once finished"),
        Operation("DELETE", "/v1/images/jobs/{job_id}", "cancels the job; answers the job"),
        Operation(
            "GET",
            "/v1/images/jobs/{job_id}/events",
            "the job's events as SSE with ids; resumes after Last-Event-ID",
            answers=("text/event-stream",),
        ),
        Operation(
            "GET",
            "/v1/images/files/{name}",
            "a url result; open (its name is unguessable)",
            answers=tuple(MEDIA_TYPES.values()),
            public=True,
        ),
        Operation(
            "GET",
            "/v1/models",
            "the served model id and its aliases, each with the model's example_prompts",
        ),
        Operation("GET", "/v1/models/{model}", "one model id, with its example_prompts"),
        Operation(
            "GET",
            "/v1/loras",
            "the LoRAs requests may name in `loras`: id (the name to send), size_bytes, rank, "
            "valid, loaded; an empty list without --lora-dir",
        ),
        Operation(
            "GET",
            "/health",
            "readiness; 503 while warming up or draining",
            unavailable=True,
        ),
        Operation("GET", "/metrics", "Prometheus metrics, text format", answers=("text/plain",)),
        Operation("GET", "/openapi.json", "this document"),
    ]

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(operations, title="fluxstream", version=VERSION))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as group:
            group.start_soon(_sweep_forever, store, jobs, settings.sweep_interval_s)
            try:
                async with jobs.running():
                    yield
            finally:
                group.cancel_scope.cancel()
                await engine.aclose()

    routes: list[BaseRoute] = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/images/jobs", create_job, methods=["POST"]),
        Route("/v1/images/jobs/{job_id}", job, methods=["GET"]),
        Route("/v1/images/jobs/{job_id}", cancel_job, methods=["DELETE"]),
        Route("/v1/images/jobs/{job_id}/events", job_events, methods=["GET"]),
        Route("/v1/images/files/{name}", result_file, methods=["GET", "HEAD"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/v1/loras", loras, methods=["GET"]),
        Route("/v1/{path:path}", unknown_route, methods=ANY_METHOD),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ]
    if WEB_DIR.is_dir():
        routes.append(Mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web"))
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _crash},
    )
    # Added innermost first: CORS sees every answer, the request id is on every answer
    # (401, 413 and 500 included), and the metrics count them.
    app.state.in_flight = in_flight
    app.add_middleware(InternalErrorMiddleware)
    app.add_middleware(InFlightMiddleware, in_flight=in_flight)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=load_api_keys(settings))
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(IdentityHeadersMiddleware, replica_name=settings.replica_name)
    if settings.cors_allow_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_allow_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "X-Request-Id", "Last-Event-ID"],
            expose_headers=[
                "x-request-id",
                "x-fluxstream-replica",
                "retry-after",
                "retry-after-ms",
                "x-should-retry",
            ],
        )
    return app


def _model_card(model_id: str, example_prompts: tuple[str, ...]) -> dict[str, object]:
    """OpenAI's model object, plus the prompts the demo page offers a newcomer (empty
    where the model names none, and the page falls back to its own)."""
    return {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "fluxstream",
        "example_prompts": list(example_prompts),
    }


async def _sweep_forever(store: ResultStore, jobs: JobService, interval_s: float) -> None:
    """Delete what expired, forever. A failed sweep (the data folder deleted, Redis gone) is
    logged and tried again: this task shares the lifespan's group, whose end closes the
    engine."""
    while True:
        try:
            await store.sweep()
            await jobs.sweep()
        except Exception:
            logger.exception("sweep failed; retrying in %g s", interval_s)
        await anyio.sleep(interval_s)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = error_body(exc.detail, type="invalid_request_error")
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _crash(request: Request, exc: Exception) -> Response:
    return _internal_error(request.method, request.url.path)


def _internal_error(method: str, path: str) -> Response:
    """The generic 500 for a bug; called while handling it, so the log has its traceback."""
    logger.exception("unhandled error on %s %s", method, path)
    return error_response(ServerError("the server hit an internal error"))


class InternalErrorMiddleware:
    """Answers an unhandled exception with the generic 500 inside the middleware stack, so
    that the answer carries `x-request-id` and is counted like any other: Starlette's own
    handler for `Exception` (`_crash`, kept for faults in the outer middlewares) runs
    outside all of them. Once the response has started there is no answer left to send,
    so the exception goes on."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception:
            if started:
                raise
            response = _internal_error(scope["method"], scope["path"])
            await response(scope, receive, send)


class IdentityHeadersMiddleware:
    """Adds `x-request-id` (the client's own id if it sent a usable one) and
    `x-fluxstream-replica` (which process answered, behind a load balancer) to every
    response. A client's id goes into the access log as it is, so one with spaces or
    control characters (which could forge `key=value` fields) or over 128 characters is
    replaced by one of ours."""

    def __init__(self, app: ASGIApp, replica_name: str) -> None:
        self.app = app
        self.replica = replica_name.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode("latin-1")
        request_id = sent if REQUEST_ID.fullmatch(sent) else f"req_{secrets.token_hex(12)}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id.encode("latin-1")),
                    (b"x-fluxstream-replica", self.replica),
                ]
            await send(message)

        await self.app(scope, receive, send_with_id)
