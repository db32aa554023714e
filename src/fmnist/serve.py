"""The web page and the HTTP API: `fmnist serve RUN` answers `POST /v1/predict` and serves `GET /`.

One model, one inference thread. Requests that arrive while the model is busy are answered together in the next
forward pass (micro-batching without an added wait), so 16 clients cost about one batch of 16, not 16 batches, and
torch's intra-op threads never compete with each other. Uploads are decoded and prepared in a small bounded thread
pool with the same `fmnist.images.prepare` as `fmnist predict`, so the CLI and the service answer alike. Every user
mistake is a 4xx JSON `{"error": "..."}` naming the problem and the fix; a 500 means a bug. JSON bodies are parsed
and validated by a declared pydantic model (which is also their OpenAPI schema) in that same pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from fmnist import images
from fmnist.checkpoint import META_FILE
from fmnist.errors import ConfigError, FmnistError, did_you_mean
from fmnist.hardware import usable_cores
from fmnist.predict import UNSURE_BELOW, Classifier

WEB_DIR = Path(__file__).with_name("web")
MiB = 1024 * 1024


# ----------------------------------------------------------------------------------------------- settings
# The `fmnist serve` flag behind each setting: a bad value is reported as the flag the user typed.
_FLAGS = {"host": "--host", "port": "--port", "max_bytes": "--max-mb", "max_pixels": "--max-pixels",
          "max_images": "--max-images", "prepare_workers": "--workers", "max_batch": "--max-batch",
          "torch_threads": "--threads"}


class ServeSettings(BaseModel):
    """Address, limits and pool sizes. The ranges live here, once, so `fmnist serve` and callers of `create_app`
    get the same one-line `ConfigError`; the defaults suit a laptop and the CLI exposes each one."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    max_bytes: int = Field(10 * MiB, ge=round(0.001 * MiB), le=10_000 * MiB)  # whole request body (--max-mb)
    max_pixels: int = Field(25_000_000, ge=1, le=10**10)  # per image, checked from the header before decoding
    max_images: int = Field(64, ge=1, le=100_000)  # per request (files or JSON images)
    prepare_workers: int = Field(2, ge=1, le=256)  # threads parsing JSON bodies, decoding and preparing uploads
    max_batch: int = Field(256, ge=1, le=65536)  # images per forward pass when requests pile up
    torch_threads: int | None = Field(None, ge=1, le=1024)  # None: one per core (one forward pass at a time)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise ConfigError(_settings_problem(error)) from None

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _whole_bytes(cls, value: Any) -> Any:
        """The CLI passes `--max-mb` times MiB, a float; a fraction of a byte means nothing."""
        return round(value) if isinstance(value, float) and math.isfinite(value) else value


def _settings_problem(error: ValidationError) -> str:
    """The first problem in the CLI's words, e.g. `--port 70000 is out of range; use 0..65535`."""
    problem = error.errors()[0]
    name = str(problem["loc"][0]) if problem["loc"] else ""
    value = problem.get("input")
    if name not in _FLAGS:
        return f"unknown serve setting {name!r}{did_you_mean(name, _FLAGS)}"
    bounds = {key: getattr(rule, key) for rule in ServeSettings.model_fields[name].metadata
              for key in ("ge", "le") if hasattr(rule, key)}
    unbounded = isinstance(value, float) and not math.isfinite(value)  # nan and inf fail the type check first
    if bounds and (problem["type"] in ("greater_than_equal", "less_than_equal") or unbounded):
        low, high = (_in_flag_units(name, bounds[key]) for key in ("ge", "le"))
        return f"{_FLAGS[name]} {_in_flag_units(name, value)} is out of range; use {low}..{high}"
    return f"{_FLAGS[name]} must be {'a string' if name == 'host' else 'a whole number'}, got {value!r}"


def _in_flag_units(name: str, value: float) -> str:
    """`max_bytes` is set in megabytes on the command line; the rest as they are."""
    if name != "max_bytes" or abs(value) >= 1e300:  # an int that large has no float to divide
        return str(value)
    return f"{round(value / MiB, 6):g}"


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
# Rows and images are documented as 28 long but measured after parsing (`_json_images`), so a wrong size is reported
# as a shape ("got 27x28"), not as the first short row. FailFast: one bad value is enough, and collecting an error
# for each of a 10 MB body's values took 20 s of CPU.
_Row = Annotated[list[float], Field(fail_fast=True, json_schema_extra={"minItems": 28, "maxItems": 28})]
_Image28 = Annotated[list[_Row], Field(fail_fast=True, json_schema_extra={"minItems": 28, "maxItems": 28})]
_ONE_OF = 'send a JSON object with "image" (one 28x28 array) or "images" (a list of them)'
_SEND = 'send {"image": [[...28 values], ...]}'


def _document_body(schema: dict[str, Any]) -> None:
    """What the schema cannot infer: "image" and "images" may be left out but are never null, and an example."""
    for name in ("image", "images"):
        field = schema["properties"][name]
        field.update(field.pop("anyOf")[0])
        field.pop("default", None)
    schema["examples"] = [{"image": [[0] * 28] * 28}]


class PredictJson(BaseModel):
    """The JSON body of `POST /v1/predict`: arrays already in dataset form (light garment on black), taken as is."""

    model_config = ConfigDict(json_schema_extra=_document_body)

    # `X | None`, not a union with a hidden None: a union would name its branch in every error and try both.
    image: _Image28 | None = Field(None, description="one 28x28 array, light garment on black")
    images: Annotated[list[_Image28], Field(min_length=1, fail_fast=True)] | None = Field(
        None, description="several 28x28 arrays")
    scale: Literal[255, 1] = Field(255, description="pixel values run 0..255 (default) or 0..1")

    @model_validator(mode="after")
    def _exactly_one(self) -> PredictJson:
        """"image" or "images", never both, neither or null: which one the client meant would be a guess. Checked
        after the fields: a "before" check would turn the body into Python objects first, slower, and 10**400 would
        then fail as "not a number" instead of reading as inf and failing the pixel range."""
        given = self.model_fields_set & {"image", "images"}
        if len(given) != 1 or getattr(self, given.pop()) is None:
            raise ValueError(_ONE_OF)
        return self

    @field_validator("scale", mode="before")
    @classmethod
    def _not_boolean(cls, scale: Any) -> Any:
        """JSON `true` is not the number 1, though lax validation would take it as 1."""
        if isinstance(scale, bool):
            raise ValueError("scale is true or false")
        return scale

    def arrays(self) -> list[list[list[float]]]:
        """The images sent, one or several alike."""
        return [self.image] if self.image is not None else self.images or []


class PredictUpload(BaseModel):
    """The multipart body of `POST /v1/predict`, for the API docs: Starlette reads the form itself, with limits on
    files and fields, and each file is decoded in the prepare pool."""

    file: list[bytes] = Field(description="one or more images (PNG, JPEG, WebP, GIF, BMP, TIFF); repeat the field")


def _body_problem(error: ValidationError) -> ApiError:
    """Pydantic's first complaint about a JSON body, as one line that says what to send instead."""
    problem = error.errors(include_url=False, include_input=False)[0]
    where = problem["loc"]
    if problem["type"] == "json_invalid":  # the parser bounds nesting (200) and integer length (4,300 digits)
        reason = problem["msg"].removeprefix("Invalid JSON: ")
        if "recursion limit" in reason:
            return ApiError(400, f"the JSON is nested too deeply ({reason}); an image is 28 rows of 28 numbers: "
                                 f"{_SEND}")
        if "number out of range" in reason:
            return ApiError(400, f"the JSON holds a number too long to read ({reason}); pixel values run 0..255, "
                                 'or 0..1 with "scale": 1')
        return ApiError(400, f"the body is not valid JSON ({reason}); {_SEND}")
    if not where:  # not an object, or not exactly one of "image" and "images"
        return ApiError(422, _ONE_OF)
    if where[0] == "scale":
        return ApiError(422, '"scale" must be 255 (pixels 0..255, the default) or 1 (pixels 0..1)')
    if where == ("images",):
        return ApiError(422, '"images" must be a non-empty list of 28x28 arrays')
    return ApiError(422, "each image must be a 28x28 array of numbers (28 rows of 28 pixel values)")


def _json_images(raw: bytes, max_images: int) -> tuple[np.ndarray, list[str]]:
    """A JSON body parsed and checked in one pass of pydantic's parser (run in a worker thread), values 0..255 (or
    0..1 with `"scale": 1`) turned into the uint8 dataset form."""
    try:
        body = PredictJson.model_validate_json(raw)
    except ValidationError as error:
        raise _body_problem(error) from None
    arrays = body.arrays()
    if len(arrays) > max_images:
        raise ApiError(413, f"{len(arrays)} images in one request, over the limit of {max_images}; "
                            "send them in batches")
    try:
        array = np.asarray(arrays, dtype=np.float64)
    except ValueError:  # rows of different lengths
        raise ApiError(422, "each image must be a 28x28 array of numbers (28 rows of 28 pixel values)") from None
    if array.ndim != 3 or array.shape[1:] != (28, 28):
        shape = "x".join(map(str, array.shape[1:])) or "a single number"
        raise ApiError(422, f"each image must be 28x28 pixels, got {shape}; resize it or upload it as a file")
    scale = body.scale
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


async def _request_images(request: Request, settings: ServeSettings,
                          pool: ThreadPoolExecutor) -> tuple[np.ndarray, list[str], list[bool] | None]:
    """The images of a predict request, by content type; `inverted` only for uploads (arrays are taken as is)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _uploaded_images(request, settings, pool)
    if content_type == "application/json":  # parsed in the pool: a big body must not hold up the event loop
        raw = await request.body()
        batch, names = await asyncio.get_running_loop().run_in_executor(pool, _json_images, raw, settings.max_images)
        return batch, names, None
    raise ApiError(415, f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data "
                        "with image files in the field 'file', or application/json with 28x28 arrays")


# ----------------------------------------------------------------------------------------------- app
def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours, FastAPI's and Starlette's, answers as `{"error": "one line"}` with its 4xx status."""

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
    _add_error_handlers(app)

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
        batch, names, inverted = await _request_images(request, settings, pool)
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


# Two bodies on one route, so FastAPI cannot infer them from parameters: their schemas come from the models above.
_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": PredictUpload.model_json_schema()},
    "application/json": {"schema": PredictJson.model_json_schema()}}}}


def latest_run(root: str | os.PathLike = "runs") -> Path:
    """The run `fmnist serve` uses when none is named: runs/demo when `make demo` made it, else the newest model."""
    root = Path(root)
    if (root / "demo" / META_FILE).is_file():
        return root / "demo"
    models = sorted(root.glob(f"*/{META_FILE}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not models:
        raise FileNotFoundError(root)
    return models[-1].parent


def run_server(run_dir: str | os.PathLike, settings: ServeSettings, log_level: str = "info") -> None:
    """Load the model and serve until Ctrl-C (uvicorn, one process, HTTP/1.1 keep-alive)."""
    import uvicorn

    classifier = Classifier.load(run_dir)
    app = create_app(classifier, settings)
    accuracy = classifier.meta.metrics.get("test_accuracy")
    shown = f", test accuracy {accuracy:.2%}" if isinstance(accuracy, float) and math.isfinite(accuracy) else ""
    print(f"serving {run_dir} ({model_info(classifier)['name']}{shown}) on http://{settings.host}:{settings.port}/  "
          f"(API docs: /docs, Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, limit_concurrency=1024,
                timeout_graceful_shutdown=5)
