"""Serving logic for image requests: submit a planned job, answer as JSON or as SSE.

Routes only parse, call this, and map errors; everything about how results are shaped
for the OpenAI SDKs lives here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pipeline.jobs import (
    ContentFiltered,
    EngineClosed,
    EngineError,
    Event,
    ImageEngine,
    InvalidLora,
    JobFailed,
    JobHandle,
    JobRejected,
    JobTimedOut,
    Preview,
    Queued,
    QueueFull,
    QueueTimeout,
    Result,
)
from stream import sse
from stream.errors import (
    APIError,
    InvalidRequest,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    retry_after,
)
from stream.images import MEDIA_TYPES, encode_all, encode_async, to_b64
from stream.metrics import Metrics
from stream.params import ImagePlan
from stream.settings import Settings
from stream.store import ResultStore
from stream.watch import OUTCOMES, JobWatch

LOSSY_FORMATS = ("jpeg", "webp", "avif")
logger = logging.getLogger(__name__)


class ImageService:
    def __init__(
        self, settings: Settings, engine: ImageEngine, store: ResultStore, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.store = store
        self.metrics = metrics

    def submit(self, plan: ImagePlan) -> JobHandle:
        """Queue the job, or answer 429/503 before any byte of the response is sent."""
        try:
            return self.engine.submit(plan.job)
        except QueueFull as full:
            raise RateLimited(
                "the server is busy; retry shortly",
                retry_after_s=full.retry_after_s,
                code="rate_limit_exceeded",  # OpenAI's code, which clients match on
            ) from None
        except EngineClosed:
            raise ServiceUnavailable("the server is shutting down", code="shutdown") from None

    def base_url(self, request: Request) -> str:
        """Where url results are served from, as clients reach this server."""
        return self.settings.public_base_url or str(request.base_url)

    async def respond(self, request: Request, plan: ImagePlan, kind: str) -> Response:
        """`kind` is the event prefix: `image_generation` or `image_edit`."""
        handle = self.submit(plan)
        watch = JobWatch(self.metrics, request.state.request_id, plan)
        events = watch.events(handle)
        base_url = self.base_url(request)
        if plan.stream:
            frames = self._stream(events, watch, plan, kind, base_url)
            return sse.event_stream(frames, keepalive_s=self.settings.keepalive_s, headers={})
        result = await _result_unless_disconnected(events, handle, request, plan)
        return JSONResponse(await self.result_body(result, plan, base_url))

    async def _stream(
        self,
        events: AsyncGenerator[Event, None],
        watch: JobWatch,
        plan: ImagePlan,
        kind: str,
        base_url: str,
    ) -> AsyncIterator[sse.Frame]:
        """While queued, `: queued position=N estimated_wait_s=S` comments (no estimate
        before a job has been timed); then the OpenAI frames."""
        try:
            async for event in events:
                if isinstance(event, Queued):
                    yield sse.comment(_queued_text(event))
                elif isinstance(event, Preview):
                    yield sse.event_frame(await self.partial_payload(event, plan, kind))
                elif isinstance(event, Result):
                    yield sse.event_frame(
                        await self._completed_payload(event, plan, kind, base_url)
                    )
        except (ContentFiltered, JobRejected) as refused:
            error = refusal(refused, plan)
            yield sse.error_frame(error.message, code=error.code, type=error.type)
        except EngineError as error:
            yield sse.error_frame(
                str(error) or "image generation failed", code=OUTCOMES.get(type(error))
            )
        except Exception:
            # A fault of ours (encoding, storing the url result): the 200 is already sent,
            # so the client learns of it from the error frame the SDKs raise on.
            logger.exception("stream failed after it started")
            watch.server_fault()
            await events.aclose()  # counts the job now; nothing else would close it
            yield sse.error_frame("the server hit an internal error")

    async def partial_payload(self, preview: Preview, plan: ImagePlan, kind: str) -> dict[str, Any]:
        preview_format = plan.output_format if plan.output_format in LOSSY_FORMATS else "jpeg"
        data = await encode_async(preview.image, preview_format, plan.quality)
        return {
            "type": f"{kind}.partial_image",
            "b64_json": to_b64(data),
            "partial_image_index": preview.index,
            "step": preview.step,
            "total_steps": preview.total_steps,
            **self._common_fields(plan, preview_format),
        }

    async def _completed_payload(
        self, result: Result, plan: ImagePlan, kind: str, base_url: str
    ) -> dict[str, Any]:
        (item,) = await self._items(result, plan, base_url, always_b64=True)
        return {
            "type": f"{kind}.completed",
            **item,
            **self._common_fields(plan, plan.output_format),
            **_end_user(plan),
            **_applied(result, plan),
            "usage": _usage(plan),
        }

    async def result_body(
        self, result: Result, plan: ImagePlan, base_url: str, files: list[str] | None = None
    ) -> dict[str, Any]:
        """The plain (non-streaming) response; names of stored url files go to `files`."""
        return {
            "created": int(time.time()),
            "data": await self._items(result, plan, base_url, always_b64=False, files=files),
            "model": plan.model,
            "size": plan.size_text,
            "output_format": plan.output_format,
            "quality": plan.quality_name,
            "background": "opaque",
            **_end_user(plan),
            **_applied(result, plan),
            "usage": _usage(plan),
        }

    async def _items(
        self,
        result: Result,
        plan: ImagePlan,
        base_url: str,
        *,
        always_b64: bool,
        files: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        items = []
        encoded = await encode_all(result.images, plan.size, plan.output_format, plan.quality)
        for data, seed in zip(encoded, result.seeds, strict=True):
            item: dict[str, Any] = {}
            if plan.response_format == "b64_json" or always_b64:
                item["b64_json"] = to_b64(data)
            if plan.response_format == "url" and plan.sync_mode:
                item["url"] = f"data:{MEDIA_TYPES[plan.output_format]};base64,{to_b64(data)}"
            elif plan.response_format == "url":
                name = await self.store.put(data, plan.output_format)
                if files is not None:
                    files.append(name)
                item["url"] = f"{base_url.rstrip('/')}/v1/images/files/{name}"
            item["revised_prompt"] = plan.job.prompt
            item["seed"] = seed
            items.append(item)
        return items

    def _common_fields(self, plan: ImagePlan, output_format: str) -> dict[str, Any]:
        return {
            "created_at": int(time.time()),
            "size": plan.size_text,
            "quality": plan.quality_name,
            "background": "opaque",
            "output_format": output_format,
        }


def _queued_text(event: Queued) -> str:
    if event.estimated_wait_s is None:
        return f"queued position={event.position}"
    return f"queued position={event.position} estimated_wait_s={round(event.estimated_wait_s)}"


def _end_user(plan: ImagePlan) -> dict[str, Any]:
    """OpenAI echoes the request's `safety_identifier` (else its deprecated `user`) on the
    response and the completed event; the SDKs type it there. Absent when neither was sent."""
    if plan.safety_identifier is None:
        return {}
    return {"safety_identifier": plan.safety_identifier}


def _applied(result: Result, plan: ImagePlan) -> dict[str, Any]:
    """What the server did beyond OpenAI's fields: the speed-up that ran, images the safety
    checker withheld, the LoRAs that ran (with any part of their files that did not), and
    request fields that were not used."""
    applied: dict[str, Any] = {"acceleration": result.acceleration, "speedup": result.speedup}
    if plan.job.safety_check:
        applied["filtered_images"] = result.filtered
    if plan.job.loras:
        applied["loras"] = [
            {"path": lora.name, "scale": lora.scale}
            | ({"not_applied": list(lora.not_applied)} if lora.not_applied else {})
            for lora in result.loras
        ]
    applied["ignored_parameters"] = list(plan.ignored_parameters)
    return applied


def refusal(error: ContentFiltered | JobRejected, plan: ImagePlan) -> APIError:
    """The client-facing error for a job the model side refused (a 400, not a 500)."""
    if isinstance(error, ContentFiltered):
        return InvalidRequest(
            "every generated image was flagged by the safety checker and withheld",
            code="content_policy_violation",
        )
    if isinstance(error, InvalidLora):
        return InvalidRequest(str(error), param="loras", code="invalid_lora")
    names = sorted(plan.job.pipeline_kwargs)
    return InvalidRequest(str(error), param=names[0] if len(names) == 1 else None)


def _usage(plan: ImagePlan) -> dict[str, Any]:
    """FLUX has no billing tokens; we count prompt words and 16x16 patches of the images
    read (an edit's inputs, at the generation size) and written."""
    job = plan.job
    patches = (job.width // 16) * (job.height // 16)
    text_tokens = len(job.prompt.split())
    image_tokens = 0 if job.edit is None else len(job.edit.images) * patches
    output_tokens = job.num_images * patches
    return {
        "total_tokens": text_tokens + image_tokens + output_tokens,
        "input_tokens": text_tokens + image_tokens,
        "output_tokens": output_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens},
    }


async def _result_unless_disconnected(
    events: AsyncIterator[Event], handle: JobHandle, request: Request, plan: ImagePlan
) -> Result:
    """Wait for the job's result; if the client hangs up first, cancel the job."""
    result: Result | None = None
    error: EngineError | None = None

    async with anyio.create_task_group() as group:

        async def consume() -> None:
            nonlocal result, error
            try:
                async for event in events:
                    if isinstance(event, Result):
                        result = event
            except EngineError as failure:
                error = failure
            group.cancel_scope.cancel()

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                continue
            handle.cancel()
            group.cancel_scope.cancel()

        group.start_soon(consume)
        group.start_soon(watch_disconnect)

    if result is not None:
        return result
    raise _plain_error(error, plan)


def _plain_error(error: EngineError | None, plan: ImagePlan) -> APIError:
    """The HTTP answer for a job that ended without a result (no byte was sent yet)."""
    if isinstance(error, ContentFiltered | JobRejected):
        return refusal(error, plan)
    if isinstance(error, JobFailed):
        return ServerError(str(error))
    if error is None:
        return ServiceUnavailable("the job was cancelled before it finished", code="cancelled")
    if isinstance(error, QueueTimeout):
        return ServiceUnavailable(
            str(error), code=OUTCOMES[QueueTimeout], headers=retry_after(error.retry_after_s)
        )
    if isinstance(error, JobTimedOut):
        # The same job would only time out again: the SDKs must not rerun it.
        return ServiceUnavailable(
            str(error), code=OUTCOMES[JobTimedOut], headers={"x-should-retry": "false"}
        )
    return ServiceUnavailable(str(error), code=OUTCOMES.get(type(error)))
