"""The web page and the HTTP API: `fmnist serve RUN` answers `POST /v1/predict` and serves `GET /`.

One model, one inference thread. Requests that arrive while the model is busy are answered together in the next
forward pass (micro-batching without an added wait), so 16 clients cost about one batch of 16, not 16 batches, and
torch's intra-op threads never compete with each other. Uploads are decoded and prepared in a small bounded thread
pool with the same `fmnist.images.prepare` as `fmnist predict`, so the CLI and the service answer alike. Every user
mistake is a 4xx JSON `{"error": "..."}` naming the problem and the fix; a 500 means a bug.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from fmnist import images
from fmnist.checkpoint import META_FILE
from fmnist.errors import FmnistError
from fmnist.hardware import usable_cores
from fmnist.predict import UNSURE_BELOW, Classifier

WEB_DIR = Path(__file__).with_name("web")
MiB = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    """Limits and pool sizes; the defaults suit a laptop and the CLI exposes each one."""

    max_bytes: int = 10 * MiB  # whole request body
    max_pixels: int = 25_000_000  # per image, checked from the header before decoding
    max_images: int = 64  # per request (files or JSON images)
    prepare_workers: int = 2  # threads decoding and preparing uploads
    max_batch: int = 256  # images per forward pass when requests pile up
    torch_threads: int | None = None  # None: one per core (only one forward pass runs at a time)


class ApiError(Exception):
    """A request the service cannot answer, with the HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------- body limit
class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` from Content-Length, and stop reading once a streamed
    (chunked) body passes it, so a huge upload is never held in memory or spooled to disk."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over the limit of {self.max_bytes / MiB:g} MB; send smaller "
                             "or fewer images (the server's --max-mb sets the limit)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                response = _error_response(ApiError(400, "the Content-Length header is not a number"))
                return await response(scope, receive, send)
            if too_large:
                return await _error_response(self._too_large())(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, limited_receive, send)


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


# ----------------------------------------------------------------------------------------------- batching
class Batcher:
    """Feeds the model from one thread; whatever queued during a forward pass goes into the next one together."""

    def __init__(self, classifier: Classifier, max_batch: int):
        self.classifier = classifier
        self.max_batch = max_batch
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fmnist-model")
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0  # forward passes run, for /healthz and the load benchmark
        self.images = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    async def answer(self, batch: np.ndarray) -> list[dict[str, Any]]:
        """The classifier's answers (all classes ranked) for a uint8 batch (n, 28, 28)."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((batch, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        classes = len(self.classifier.classes)
        while True:
            pending = [await self._queue.get()]
            count = len(pending[0][0])
            while count < self.max_batch and not self._queue.empty():
                pending.append(self._queue.get_nowait())
                count += len(pending[-1][0])
            batch = np.concatenate([item[0] for item in pending])
            try:
                answers = await loop.run_in_executor(self._executor, self.classifier.answer, batch, classes)
            except Exception as error:  # a bug, not a user mistake: every waiting request learns of it
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.batches += 1
            self.images += len(batch)
            start = 0
            for items, future in pending:
                if not future.done():  # the client may have gone away
                    future.set_result(answers[start:start + len(items)])
                start += len(items)


# ----------------------------------------------------------------------------------------------- inputs
def _json_images(body: Any, max_images: int) -> tuple[np.ndarray, list[str]]:
    """`{"image": 28x28}` or `{"images": [28x28, ...]}`, values 0..255 (or 0..1 with `"scale": 1`), dataset form."""
    if not isinstance(body, dict) or ("image" in body) == ("images" in body):
        raise ApiError(422, 'send a JSON object with "image" (one 28x28 array) or "images" (a list of them)')
    raw = [body["image"]] if "image" in body else body["images"]
    if not isinstance(raw, list) or not raw:
        raise ApiError(422, '"images" must be a non-empty list of 28x28 arrays')
    if len(raw) > max_images:
        raise ApiError(413, f"{len(raw)} images in one request, over the limit of {max_images}; send them in batches")
    scale = body.get("scale", 255)
    if scale not in (1, 255) or isinstance(scale, bool):
        raise ApiError(422, '"scale" must be 255 (pixels 0..255, the default) or 1 (pixels 0..1)')
    try:
        array = np.asarray(raw, dtype=np.float64)
    except (ValueError, TypeError):
        raise ApiError(422, "each image must be a 28x28 array of numbers (28 rows of 28 pixel values)") from None
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        shape = "x".join(map(str, array.shape[1:])) or "a single number"
        raise ApiError(422, f"each image must be 28x28 pixels, got {shape}; resize it or upload it as a file")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > scale:
        raise ApiError(422, f"pixel values must be numbers from 0 to {scale}"
                            + ("; send 0..1 values with \"scale\": 1" if scale == 255 else ""))
    pixels = np.rint(array * (255 / scale)).astype(np.uint8)
    return pixels, [f"image {i}" for i in range(len(pixels))]


def _prepare_upload(payload: bytes, name: str, max_pixels: int) -> images.Prepared:
    try:
        return images.prepare(payload, name=name, max_pixels=max_pixels)
    except FmnistError as error:
        raise ApiError(422, str(error)) from None


async def _uploaded_images(request: Request, settings: ServeSettings,
                           pool: ThreadPoolExecutor) -> tuple[np.ndarray, list[str], list[bool]]:
    try:
        form = await request.form(max_files=settings.max_images + 1, max_fields=settings.max_images + 16)
    except StarletteHTTPException as error:  # Starlette's multipart limits and malformed bodies
        status = 413 if "too many" in str(error.detail).lower() else 400
        raise ApiError(status, f"{str(error.detail).rstrip('.')}; send at most {settings.max_images} files "
                               "in the field 'file'") from None
    try:
        uploads = [value for value in form.getlist("file") if hasattr(value, "read")]
        if not uploads:
            raise ApiError(400, "no image in the form; send each image as a file in the field 'file'")
        if len(uploads) > settings.max_images:
            raise ApiError(413, f"{len(uploads)} files in one request, over the limit of {settings.max_images}; "
                                "send them in batches")
        payloads = [(await upload.read(), upload.filename or f"file {i}") for i, upload in enumerate(uploads)]
    finally:
        await form.close()
    loop = asyncio.get_running_loop()
    prepared = await asyncio.gather(*(loop.run_in_executor(pool, _prepare_upload, payload, name, settings.max_pixels)
                                      for payload, name in payloads))
    return (np.stack([p.image for p in prepared]), [p.name for p in prepared], [p.inverted for p in prepared])


# ----------------------------------------------------------------------------------------------- app
def model_info(classifier: Classifier) -> dict[str, Any]:
    """What `GET /v1/model` answers and the page shows: enough to know which model is talking."""
    meta = classifier.meta
    metrics = meta.metrics
    architecture = meta.architecture
    config = architecture.config
    shape = "-".join(map(str, config.get("widths") or config.get("hidden") or []))
    return {
        "name": " ".join(part for part in (architecture.name, shape) if part),
        "architecture": architecture.model_dump(),
        "preset": meta.preset,
        "classes": classifier.classes,
        "test_accuracy": metrics.get("test_accuracy"),
        "parameters": metrics.get("parameters"),
        "created": meta.created,
        "calibrated": classifier.calibrated,
        "temperature": classifier.temperature,
        "input": "28x28 grayscale, light garment on black (photos are converted like `fmnist predict` does)",
        "unsure_below": UNSURE_BELOW,
    }


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application for one loaded model (tests use it with FastAPI's TestClient)."""
    settings = settings or ServeSettings()
    torch.set_num_threads(settings.torch_threads or usable_cores())
    batcher = Batcher(classifier, settings.max_batch)
    pool = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="fmnist-prepare")
    info = model_info(classifier)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="fmnist", version="1", lifespan=lifespan,
                  description="Fashion-MNIST classifier: upload a photo or send 28x28 arrays, get class probabilities.")
    app.state.batcher = batcher
    app.state.settings = settings
    app.add_middleware(BodyLimit, max_bytes=settings.max_bytes)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body"))
        return _error_response(ApiError(422, f"{where}: {first.get('msg', 'invalid value')}"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(error.detail)}, status_code=error.status_code, headers=error.headers)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/healthz", summary="Liveness: the model is loaded and the inference thread runs")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "model": info["name"], "batches": batcher.batches, "images": batcher.images}

    @app.get("/v1/model", summary="The model being served: architecture, preset, classes, test accuracy, created")
    async def model() -> dict[str, Any]:
        return info

    @app.post("/v1/predict", summary="Class probabilities for uploaded images or 28x28 arrays",
              openapi_extra=_PREDICT_BODY)
    async def predict(request: Request,
                      top: int = Query(3, ge=1, le=len(classifier.classes), description="classes to rank per image"),
                      include_input: bool = Query(False, description="also return the 28x28 the model saw")):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        inverted = None
        if content_type == "multipart/form-data":
            batch, names, inverted = await _uploaded_images(request, settings, pool)
        elif content_type == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ApiError(400, f"the body is not valid JSON ({error}); "
                                    'send {"image": [[...28 values], ...]}') from None
            batch, names = _json_images(body, settings.max_images)
        else:
            raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                                "with image files in the field 'file', or application/json with 28x28 arrays")
        answers = await batcher.answer(batch)
        predictions = []
        for index, (name, answer) in enumerate(zip(names, answers, strict=True)):
            item = {"name": name, **answer, "top": answer["top"][:top]}
            if inverted is not None:
                item["inverted"] = inverted[index]
            if include_input:
                item["input"] = batch[index].tolist()
            predictions.append(item)
        return {"model": info["name"], "predictions": predictions}

    return app


_ARRAY_EXAMPLE = [[0] * 28 for _ in range(28)]
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                 "description": "one or more images (PNG, JPEG, WebP, GIF, BMP, TIFF); repeat the field"}}}},
    "application/json": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "description": "one 28x28 array, light garment on black",
                  "items": {"type": "array", "items": {"type": "number"}}},
        "images": {"type": "array", "description": "several 28x28 arrays",
                   "items": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}},
        "scale": {"type": "integer", "enum": [255, 1], "default": 255,
                  "description": "pixel values run 0..255 (default) or 0..1"}}},
        "example": {"image": _ARRAY_EXAMPLE}}}}}


def latest_run(root: str | os.PathLike = "runs") -> Path:
    """The run `fmnist serve` uses when none is named: runs/demo when `make demo` made it, else the newest model."""
    root = Path(root)
    if (root / "demo" / META_FILE).is_file():
        return root / "demo"
    models = sorted(root.glob("*/model.json"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not models:
        raise FileNotFoundError(root)
    return models[-1].parent


def run_server(run_dir: str | os.PathLike, host: str, port: int, settings: ServeSettings,
               log_level: str = "info") -> None:
    """Load the model and serve until Ctrl-C (uvicorn, one process, HTTP/1.1 keep-alive)."""
    import uvicorn

    classifier = Classifier.load(run_dir)
    app = create_app(classifier, settings)
    accuracy = classifier.meta.metrics.get("test_accuracy")
    shown = f", test accuracy {accuracy:.2%}" if isinstance(accuracy, float) and math.isfinite(accuracy) else ""
    print(f"serving {run_dir} ({model_info(classifier)['name']}{shown}) on http://{host}:{port}/  "
          f"(API docs: /docs, Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, limit_concurrency=1024, timeout_graceful_shutdown=5)
