"""The HTTP API (FastAPI): classify audio with any served task, list tasks, health, the try-it page,
and the API docs at ``/docs``, which work offline.

Every client mistake is answered with a 4xx and a JSON body ``{"error": CODE, "message": TEXT}``
naming the problem; only real faults give a 500 (and are logged with their traceback).
Uploads are decoded by the same code as ``predict`` (``load_audio`` on a temporary file,
the same features and the same answer record), so both give the same answer for a file.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..experiments.inference import prediction_record
from ..frontend import AudioError, channel_policy, load_audio
from .batching import Batcher
from .tasks import Engine, Task

logger = logging.getLogger("audiopetl.serve")


@dataclass(frozen=True)
class ServeLimits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_batch: int = 32
    max_wait_ms: float = 10.0

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ValueError(f"--max-upload-mb must be positive, got {self.max_upload_bytes} bytes")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch must be at least 1, got {self.max_batch}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"--max-wait-ms must be 0 or more, got {self.max_wait_ms}")


class ClientError(Exception):
    """A request we refuse: HTTP status, a short code, and a message naming the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Ranked(BaseModel):
    label: str
    score: float


class Prediction(BaseModel):
    """The record ``predict --format json`` writes for a file, plus the task and truncation notice."""

    path: str | None
    label: str
    top_k: list[Ranked]
    task: str
    truncated: bool
    warning: str | None = None


class TaskInfo(BaseModel):
    name: str
    method: str
    methods: list[dict]
    classes: list[str]
    trainable_parameters: int
    sample_rate: int
    max_seconds: float
    file: str


class ErrorBody(BaseModel):
    error: str
    message: str


AUDIO_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "audio/wav": {"schema": {"type": "string", "format": "binary"}},
            "audio/flac": {"schema": {"type": "string", "format": "binary"}},
            "audio/ogg": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
ERRORS = {status: {"model": ErrorBody} for status in (400, 404, 413, 415, 422, 500)}


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse bodies over ``limit`` bytes, by Content-Length or while streaming."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = _error(413, "too_large", self._message(int(declared)))
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge(self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"the upload ({size} bytes or more) is over the size limit of {self.limit} bytes (--max-upload-mb)"


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


def create_app(tasks: dict[str, Task], limits: ServeLimits = ServeLimits(), lora_batching: str = "shared") -> FastAPI:
    engine = Engine(tasks, lora_batching)
    batcher = Batcher(engine, limits.max_batch, limits.max_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        logger.info("serving %d task(s): %s", len(tasks), ", ".join(tasks))
        yield
        await batcher.stop()

    # FastAPIOffline is FastAPI whose /docs loads Swagger UI and the favicon from copies it serves itself:
    # FastAPI's own page fetches them from CDNs, so it is blank on machines without internet. No /redoc:
    # ReDoc 2's sidebar always loads its logo from Redocly's CDN, and /docs shows the same schema.
    app = FastAPIOffline(
        redoc_url=None,
        title="audiopetl",
        summary="Audio classification with PETL adapters sharing one backbone",
        version="1",
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher = engine, batcher
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)

    @app.exception_handler(ClientError)
    async def client_error(request: Request, error: ClientError):
        return _error(error.status, error.code, error.message)

    @app.exception_handler(_BodyTooLarge)
    async def too_large(request: Request, error: _BodyTooLarge):
        return _error(413, "too_large", str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        return _error(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, "not_found" if error.status_code == 404 else "http_error", str(error.detail))

    @app.exception_handler(Exception)
    async def fault(request: Request, error: Exception):
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"internal error ({type(error).__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())

    @app.get("/healthz", summary="the process is up")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="models loaded and the batcher running", responses={503: {"model": ErrorBody}})
    async def readyz():
        if not batcher.running:
            return _error(503, "not_ready", "the batching worker is not running")
        return {"status": "ready", "tasks": len(tasks)}

    @app.get("/v1/tasks", response_model=list[TaskInfo], summary="the served tasks")
    async def list_tasks() -> list[dict]:
        return [task.describe() for task in tasks.values()]

    @app.get("/v1/stats", summary="requests, batches and backbone passes run so far")
    async def stats() -> dict:
        return {
            "samples": engine.samples,
            "batches": batcher.batches,
            "passes": engine.passes,
            "lora_batching": lora_batching,
            "shared_lora_tasks": list(engine.shared_index),
        }

    @app.post(
        "/v1/tasks/{task}/classify",
        response_model=Prediction,
        responses=ERRORS,
        openapi_extra=AUDIO_BODY,
        summary="top-k labels of one audio clip (WAV/FLAC/OGG, any rate and channels)",
    )
    async def classify(
        request: Request, task: str, top_k: int = Query(5, ge=1, description="labels to return, best first")
    ) -> dict:
        if task not in tasks:
            raise ClientError(404, "unknown_task", f"no task {task!r}; served tasks: {sorted(tasks)}")
        served = tasks[task]
        data, filename = await _read_upload(request)
        wave, truncated, warning = await run_in_threadpool(_decode, served, data, filename)
        features = await run_in_threadpool(served.features, wave)
        probabilities = await batcher.submit(task, features)
        record = prediction_record(filename, probabilities, served.model.class_names, min(top_k, len(probabilities)))
        return {**record, "task": task, "truncated": truncated, "warning": warning}

    return app


async def _read_upload(request: Request) -> tuple[bytes, str | None]:
    """The audio bytes and the file name: multipart field ``file``, or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise ClientError(400, "missing_file", "multipart request without a file field named 'file'")
        data, filename = await upload.read(), upload.filename
    else:
        data, filename = await request.body(), None
    if not data:
        raise ClientError(400, "empty_body", "the request holds no audio: send a WAV, FLAC or OGG file")
    return data, filename


def _decode(task: Task, data: bytes, filename: str | None) -> tuple[torch.Tensor, bool, str | None]:
    """Waveform at the task's rate via ``load_audio`` (as ``predict`` reads files), and a truncation notice."""
    name = filename or "the request body"
    suffix = Path(filename).suffix if filename and len(Path(filename).suffix) <= 8 else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        try:
            wave = load_audio(handle.name, sample_rate=task.frontend.sample_rate, channels=channel_policy(task.frontend.settings))
        except AudioError as error:
            reason = error.reason.replace(handle.name, name)  # the temporary file's name means nothing to the client
            if reason.startswith("cannot decode"):
                message = f"{name} is not audio we can decode (WAV, FLAC or OGG): {reason}"
                raise ClientError(415, "not_audio", message) from None
            raise ClientError(422, "bad_audio", f"cannot use {name}: {reason}") from None
    frontend, warning = task.frontend, None
    if len(wave) > frontend.max_samples:  # every frontend cuts there (filterbank and waveform alike)
        rate = frontend.sample_rate
        warning = (
            f"the clip is {len(wave) / rate:.2f} s long; only its first {frontend.max_samples / rate:.2f} s "
            f"({frontend.settings['max_frames']} frames) were used, as in training"
        )
    return torch.from_numpy(wave), warning is not None, warning
