"""The web page and the HTTP API: `fmnist serve RUN` answers `POST /v1/predict` and serves `GET /`.

One model, one inference thread. Requests that arrive while the model is busy are answered together in the next
forward pass (micro-batching without an added wait), so 16 clients cost about one batch of 16, not 16 batches, and
torch's intra-op threads never compete with each other. Uploads are decoded and prepared in a small bounded thread
pool with the same `fmnist.images.prepare` as `fmnist predict`, so the CLI and the service answer alike. Every user
mistake is a 4xx JSON `{"error": "..."}` naming the problem and the fix; a 500 means a bug. JSON bodies are parsed
and validated by a declared pydantic model (which is also their OpenAPI schema) in that same pool, off the event loop.

Every request has a bounded cost, whoever sends it (all limits live in `ServeSettings`, each with its flag):
bytes per body (a tighter one for JSON, whose parsing costs ~30 bytes of memory per byte), files per request,
pixels per image (from the header, before decoding), pixels decoded at once across all requests, bodies in progress
at once, seconds to receive a body, idle keep-alive seconds and open connections. Each image's full-size decode is
dropped as soon as its 28x28 exists. Other web sites get nothing: the Host must be local, an IP address or allowed
(`--allow-host`, against DNS rebinding), and a POST from a page of another origin is refused (against CSRF).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import math
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, BinaryIO, Literal
from urllib.parse import urlsplit

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

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
          "torch_threads": "--threads", "decode_pixels": "--max-decode-pixels", "max_uploads": "--max-uploads",
          "body_timeout": "--body-timeout", "keep_alive": "--keep-alive", "max_connections": "--max-connections",
          "allowed_hosts": "--allow-host", "docs": "--docs"}
_KINDS = {"host": "a string", "body_timeout": "a number of seconds", "allowed_hosts": "host names",
          "docs": "true or false"}
PIXELS_PER_IMAGE = 28 * 28
JSON_BYTES_PER_PIXEL = 32  # "0.12345678901234567, " is 21; room for indentation. Parsing costs ~30x the bytes.
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


class ServeSettings(BaseModel):
    """Address, limits and pool sizes. The ranges live here, once, so `fmnist serve` and callers of `create_app`
    get the same one-line `ConfigError`; the defaults suit a laptop and the CLI exposes each one.

    Memory, worst case, with the defaults: decoding takes about 6-10 bytes per pixel (gray to RGBA), so 50 M pixels
    decoded at once cost about 0.5 GB; 32 bodies in progress hold at most 32 x 10 MB; a JSON body is parsed in the
    pool, at most 2 at once, about 30 bytes per byte of a 1.6 MB body. With the model (~0.3 GB) that stays under
    1.5 GB whatever the clients send."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    max_bytes: int = Field(10 * MiB, ge=round(0.001 * MiB), le=10_000 * MiB)  # whole request body (--max-mb)
    max_pixels: int = Field(25_000_000, ge=1, le=10**10)  # per image, checked from the header before decoding
    max_images: int = Field(64, ge=1, le=100_000)  # per request (files or JSON images)
    prepare_workers: int = Field(2, ge=1, le=256)  # threads parsing JSON bodies, decoding and preparing uploads
    max_batch: int = Field(256, ge=1, le=65536)  # images per forward pass when requests pile up
    torch_threads: int | None = Field(None, ge=1, le=1024)  # None: one per core (one forward pass at a time)
    decode_pixels: int = Field(50_000_000, ge=1, le=10**11)  # decoded at once across all requests: 2 largest images
    max_uploads: int = Field(32, ge=1, le=4096)  # requests with a body in progress at once; more wait, then 503
    body_timeout: float = Field(60.0, ge=0.1, le=3600)  # seconds to receive a whole body: 10 MB at 1.4 Mbit/s
    keep_alive: int = Field(5, ge=1, le=600)  # seconds an idle keep-alive connection stays open (uvicorn's default)
    max_connections: int = Field(256, ge=1, le=65536)  # open connections; more are answered 503 by uvicorn
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides localhost, IP addresses and --host; "*": any
    docs: bool = False  # /docs loads Swagger UI from a public CDN, so it is off unless asked for

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

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        """Names as a Host header carries them, without a port: lower case, no trailing dot."""
        cleaned = tuple(name.strip().lower().rstrip(".") for name in names)
        for name in cleaned:
            if not name or len(name) > 253 or any(c in name for c in "/:@ \t") and not _is_ip(name):
                raise ValueError(f"--allow-host {name!r} is not a host name; give a name like myhost.lan, without "
                                 "scheme or port (\"*\" allows any)")
        return cleaned

    @model_validator(mode="after")
    def _room_for_one_image(self) -> ServeSettings:
        if self.decode_pixels < self.max_pixels:
            raise ValueError(f"--max-decode-pixels {self.decode_pixels} is below --max-pixels {self.max_pixels}; "
                             "the largest allowed image must fit in the decoding budget")
        return self

    @property
    def json_bytes(self) -> int:
        """The largest JSON body: what `max_images` images of pixel values take, far below `max_bytes`, because
        parsing JSON costs about 30 bytes of memory per byte (a 10 MB body took 0.37 GB)."""
        return min(self.max_bytes, self.max_images * PIXELS_PER_IMAGE * JSON_BYTES_PER_PIXEL + 64 * 1024)


def _settings_problem(error: ValidationError) -> str:
    """The first problem in the CLI's words, e.g. `--port 70000 is out of range; use 0..65535`."""
    problem = error.errors()[0]
    if problem["type"] == "value_error":  # our own checks say it in the CLI's words already
        return str(problem["ctx"]["error"])
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
    return f"{_FLAGS[name]} must be {_KINDS.get(name, 'a whole number')}, got {value!r}"


def _in_flag_units(name: str, value: float) -> str:
    """`max_bytes` is set in megabytes on the command line; the rest as they are."""
    if name != "max_bytes" or abs(value) >= 1e300:  # an int that large has no float to divide
        return str(value)
    return f"{round(value / MiB, 6):g}"


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class ApiError(Exception):
    """A request the service cannot answer, with the HTTP status and a one-line reason for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ----------------------------------------------------------------------------------------------- budgets
class Budget:
    """Units (pixels being decoded, bodies in progress) handed out first come, first served across all requests.

    Not an asyncio.Semaphore: a request may need many units at once, and FIFO order keeps a large image from being
    overtaken forever by small ones. Waiting holds no memory: the body stays in the socket until admitted.
    """

    def __init__(self, total: int):
        self.total = total
        self.free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    async def acquire(self, units: int) -> None:
        """Wait until `units` are free and no earlier request is still waiting, then take them."""
        if units > self.total:  # it would wait forever; the settings make this impossible (decode >= max pixels)
            raise ValueError(f"{units} units asked of a budget of {self.total}")
        if not self._waiting and self.free >= units:
            self.free -= units
            return
        entry = (units, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry in self._waiting:
                self._waiting.remove(entry)
            elif entry[1].done() and not entry[1].cancelled():  # granted just as the request gave up
                self.free += units
            self._wake()
            raise

    def release(self, units: int) -> None:
        self.free += units
        self._wake()

    def _wake(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            units, future = self._waiting.popleft()
            if not future.done():
                self.free -= units
                future.set_result(None)


# ----------------------------------------------------------------------------------------------- guards
_PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_DOCS_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
                "style-src 'self' https://cdn.jsdelivr.net; img-src 'self' data: https://fastapi.tiangolo.com; "
                "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_SLOT_WAIT = 10.0  # seconds a body waits for one of --max-uploads slots before a 503


class SecurityHeaders:
    """ASGI middleware: every response says what it is (nosniff), may not be framed, leaks no referrer, and the
    page may run only its own script and style (the docs page also Swagger UI's, when --docs turns it on)."""

    def __init__(self, app, docs: bool):
        self.app = app
        self.docs = docs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        policy = _DOCS_POLICY if self.docs and scope["path"] == "/docs" else _PAGE_POLICY

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers["X-Content-Type-Options"] = "nosniff"
                headers["Content-Security-Policy"] = policy
                headers["X-Frame-Options"] = "DENY"
                headers["Referrer-Policy"] = "no-referrer"
                headers["Cross-Origin-Resource-Policy"] = "same-origin"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """The name part of a Host header or URL authority: no port, no brackets, lower case, no trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return (host.rsplit(":", 1)[0] if host.count(":") == 1 else host).rstrip(".")


class HostGuard:
    """ASGI middleware against other web sites. DNS rebinding: a page of evil.example re-points its name at
    127.0.0.1 and reads this server as its own, so the Host must be localhost, an IP address (rebinding needs a
    name), the bound --host or an --allow-host name. CSRF: any page may POST a form here, so a POST whose Origin is
    another site's is refused (same origin, or an allowed name's page, is fine; no Origin is a script, not a page).
    """

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.any_host = "*" in settings.allowed_hosts
        self.names = LOCAL_NAMES | {_host_name(settings.host)} | set(settings.allowed_hosts)

    def _named(self, name: str) -> bool:
        return name in self.names or name.endswith(".localhost")  # browsers resolve *.localhost themselves

    def _problem(self, scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = _host_name(host)
        if host and not (self.any_host or self._named(name) or _is_ip(name)):
            return ApiError(400, f"the Host {host!r} is not served here (a page of another site may be trying to "
                                 f"reach it); start the server with --allow-host {name or 'NAME'} to accept it")
        origin = headers.get("origin")
        if origin is None or scope["method"] in _SAFE_METHODS:
            return None
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and (parts.netloc.lower() == host.lower()
                                                  or self._named(_host_name(parts.netloc))):
            return None
        return ApiError(403, f"a request from the page {origin!r} is refused: only this server's own page may post "
                             "here; start the server with --allow-host NAME to accept that site's pages")

    async def __call__(self, scope, receive, send):
        problem = self._problem(scope) if scope["type"] == "http" else None
        if problem is not None:
            return await _error_response(problem)(scope, receive, send)
        await self.app(scope, receive, send)


class BodyGuard:
    """ASGI middleware bounding what a body costs before the app sees it: its size (from Content-Length, and again
    while a streamed body arrives, so a huge upload is never held or spooled), how many are in progress at once
    (--max-uploads; more wait up to 10 s, then 503) and how long one may take to arrive (--body-timeout, so a slow
    client cannot hold a slot and its buffers forever)."""

    def __init__(self, app, settings: ServeSettings):
        self.app = app
        self.settings = settings
        self.slots = Budget(settings.max_uploads)

    def _limit(self, headers: Headers) -> tuple[int, str]:
        if headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            return self.settings.json_bytes, (f"JSON bodies carry at most {self.settings.max_images} images of 28x28 "
                                              "numbers; send fewer images per request or upload image files")
        return self.settings.max_bytes, ("send smaller or fewer images (the server's --max-mb sets the limit)")

    async def __call__(self, scope, receive, send):
        headers = Headers(scope=scope) if scope["type"] == "http" else None
        if headers is None or (headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers):
            return await self.app(scope, receive, send)
        limit, hint = self._limit(headers)
        too_large = ApiError(413, f"the request body is over the limit of {limit / MiB:.3g} MB; {hint}")
        try:
            declared = int(headers.get("content-length", "0"))
        except ValueError:
            return await _error_response(ApiError(400, "the Content-Length header is not a number"))(scope, receive,
                                                                                                       send)
        if declared > limit:
            return await _error_response(too_large)(scope, receive, send)
        try:
            await asyncio.wait_for(self.slots.acquire(1), _SLOT_WAIT)
        except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
            busy = ApiError(503, f"the server is busy with {self.settings.max_uploads} other uploads; retry in a "
                                 "moment (the server's --max-uploads sets how many)")
            return await _error_response(busy)(scope, receive, send)
        try:
            await self.app(scope, self._guarded(receive, limit, too_large), send)
        finally:
            self.slots.release(1)

    def _guarded(self, receive, limit: int, too_large: ApiError):
        """`receive`, refusing a body that grows past `limit` or is still arriving after --body-timeout."""
        loop = asyncio.get_running_loop()
        timeout = self.settings.body_timeout
        deadline = loop.time() + timeout
        received, complete = 0, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # after the body, only a disconnect can come: no deadline on waiting for it
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11
                raise ApiError(408, f"the request body did not arrive within {timeout:g} s; send it faster or "
                                    "smaller (the server's --body-timeout sets the limit)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise too_large
                complete = not message.get("more_body", False)
            return message

        return guarded_receive


def _error_response(error: ApiError) -> JSONResponse:
    """The one shape of every refusal; after a refused body the connection is closed, not read to its end."""
    closing = {"Connection": "close"} if error.status in (408, 413, 503) else None
    return JSONResponse({"error": error.message}, status_code=error.status, headers=closing)


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


def _header_pixels(file: BinaryIO) -> int:
    """Width x height from the image's header, no pixels decoded; 0 when Pillow cannot tell (`prepare` says why)."""
    try:
        with Image.open(file) as image:
            return image.width * image.height
    except Exception:  # any unreadable header: the decode that follows reports it in the user's words
        return 0
    finally:
        file.seek(0)


def _prepare_upload(file: BinaryIO, name: str, max_pixels: int, upright: bool = False) -> tuple[np.ndarray, bool]:
    """The 28x28 of one upload (turned upright when asked) and whether it was inverted. The decoded photo and every
    intermediate image die with this call: a request of 16 large images holds 16 small results, not 16 full-size
    decodes."""
    try:
        prepared = images.prepare(file, name=name, max_pixels=max_pixels, upright=upright)
    except FmnistError as error:
        raise ApiError(422, str(error)) from None
    return np.array(prepared.image, dtype=np.uint8, copy=True), prepared.inverted


SMALL_PIXELS = 2_000_000  # drawings, screenshots, small photos: their own lane, never queued behind huge decodes


class Preparer:
    """Two thread pools and the decoding budget shared by every request, so that what decoding costs is bounded and
    a flood of huge images cannot starve anyone else:

    - the quick lane (`--workers` threads) reads headers, parses JSON bodies and decodes images up to 2 MP: at most
      workers x 2 MP decoded at once, about 40 MB;
    - the large lane (`--workers` threads) decodes the rest, each waiting, first come first served, until the pixels
      its header declares fit in `--max-decode-pixels`; one large image per request at a time, so requests take
      turns instead of one request's 64 images queueing ahead of everybody's.
    """

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.quick = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="fmnist-quick")
        self.large = ThreadPoolExecutor(settings.prepare_workers, thread_name_prefix="fmnist-prepare")
        self.pixels = Budget(settings.decode_pixels)

    def shutdown(self) -> None:
        for pool in (self.quick, self.large):
            pool.shutdown(wait=False, cancel_futures=True)

    @staticmethod
    async def run(pool: ThreadPoolExecutor, function, *args):
        """`function(*args)` in `pool`. If the request is cancelled meanwhile, wait for the thread anyway: it may
        be reading an uploaded file that the request is about to close."""
        future = pool.submit(function, *args)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            await asyncio.wait([asyncio.wrap_future(future)])
            raise

    async def upload(self, file: BinaryIO, name: str, turn: asyncio.Lock,
                     upright: bool = False) -> tuple[np.ndarray, str, bool]:
        """One uploaded file as (28x28, name, inverted), straightened with `upright`. `turn` is the request's own:
        one large image at a time."""
        limit = self.settings.max_pixels
        pixels = await self.run(self.quick, _header_pixels, file)
        if not SMALL_PIXELS < pixels <= limit:  # small, or refused from its header (too large, unreadable): cheap
            image, inverted = await self.run(self.quick, _prepare_upload, file, name, limit, upright)
            return image, name, inverted
        async with turn:
            await self.pixels.acquire(pixels)
            try:
                image, inverted = await self.run(self.large, _prepare_upload, file, name, limit, upright)
            finally:
                self.pixels.release(pixels)
        return image, name, inverted


async def _disconnected(receive) -> None:
    """Returns when the client has gone away (to be awaited only once the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _uploaded_images(request: Request, preparer: Preparer,
                           upright: bool = False) -> tuple[np.ndarray, list[str], list[bool]]:
    """Every file of a multipart body as a 28x28 (straightened with `upright`); the first bad file is the answer, and
    a client that disconnects stops the work on its remaining images (abandoned requests must not keep the decoders
    busy)."""
    settings = preparer.settings
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
        turn = asyncio.Lock()
        tasks = [asyncio.ensure_future(preparer.upload(upload.file, upload.filename or f"file {i}", turn, upright))
                 for i, upload in enumerate(uploads)]
        results = await _unless_disconnected(tasks, request.receive)
    finally:
        await form.close()
    return np.stack([image for image, _, _ in results]), [name for _, name, _ in results], [i for _, _, i in results]


async def _unless_disconnected(tasks: list[asyncio.Future], receive) -> list[Any]:
    """The tasks' results. The first failure is the answer and a client that leaves is answered by nobody: either
    way the other tasks are cancelled and awaited (their threads finish the image in hand, then stop)."""
    work = asyncio.gather(*tasks)
    watcher = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ApiError(499, "the client closed the connection")
        return work.result()
    finally:
        for task in (*tasks, watcher):
            task.cancel()
        await asyncio.gather(work, watcher, *tasks, return_exceptions=True)


async def _request_images(request: Request, preparer: Preparer,
                          upright: bool = False) -> tuple[np.ndarray, list[str], list[bool] | None]:
    """The images of a predict request, by content type; `inverted` and `upright` only for uploads (arrays are taken
    as is)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _uploaded_images(request, preparer, upright)
    if content_type == "application/json":  # parsed in the pool: a big body must not hold up the event loop
        raw = await request.body()
        batch, names = await preparer.run(preparer.quick, _json_images, raw, preparer.settings.max_images)
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

    @app.exception_handler(ClientDisconnect)
    async def client_left(request: Request, error: ClientDisconnect) -> JSONResponse:
        """A client that leaves mid-body is not a server error: no traceback in the log, nobody reads the answer."""
        return _error_response(ApiError(499, "the client closed the connection before sending the whole body"))


def _finite(value: Any) -> Any:
    """A number as JSON can carry it: NaN and infinities (a damaged metrics block) become null, not a 500."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


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
        "test_accuracy": _finite(metrics.get("test_accuracy")),
        "parameters": _finite(metrics.get("parameters")),
        "created": meta.created,
        "calibrated": classifier.calibrated,
        "temperature": classifier.temperature,
        "input": "28x28 grayscale, light garment on black (photos are converted like `fmnist predict` does)",
        "unsure_below": UNSURE_BELOW,
    }


_DOCS_OFF = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fmnist API</title>
<link rel="stylesheet" href="/static/style.css"></head><body><main><section class="card">
<h1>fmnist HTTP API</h1><p>The interactive docs are off: they load Swagger UI from a public CDN. The API's schema is
<a href="/openapi.json">/openapi.json</a>; start the server with <code>fmnist serve --docs</code> for the
interactive page.</p><p><code>POST /v1/predict</code> (image files in the multipart field <code>file</code>, or JSON
<code>{"image": [[...28 values], ...]}</code>) · <code>GET /v1/model</code> · <code>GET /healthz</code></p>
</section></main></body></html>"""


def _add_pages(app: FastAPI, settings: ServeSettings) -> None:
    """The page (GET and HEAD), its static files, and /docs: Swagger UI when asked for, else a local note."""

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    if not settings.docs:
        @app.get("/docs", include_in_schema=False)
        async def docs_off() -> HTMLResponse:
            return HTMLResponse(_DOCS_OFF)


_UPRIGHT_HELP = ("turn a tilted garment upright before classifying (uploads only; helps photos tilted by a few "
                 "degrees, slightly worse on upright ones: docs/photos.md)")


def create_app(classifier: Classifier, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application for one loaded model (tests use it with FastAPI's TestClient). The model must answer
    a blank image with finite probabilities first: a service that would answer 500 to everything never starts."""
    settings = settings or ServeSettings()
    classifier.check(str(getattr(classifier, "run_dir", "the model")))
    torch.set_num_threads(settings.torch_threads or usable_cores())
    batcher = Batcher(classifier, settings.max_batch)
    preparer = Preparer(settings)
    info = model_info(classifier)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()
            preparer.shutdown()

    app = FastAPI(title="fmnist", version="1", lifespan=lifespan, docs_url="/docs" if settings.docs else None,
                  redoc_url=None,  # ReDoc, like Swagger UI, would load its script from a public CDN
                  description="Fashion-MNIST classifier: upload a photo or send 28x28 arrays, get class probabilities.")
    app.state.batcher = batcher
    app.state.settings = settings
    app.state.preparer = preparer
    app.add_middleware(BodyGuard, settings=settings)  # added first: innermost, after the host is known good
    app.add_middleware(HostGuard, settings=settings)
    app.add_middleware(SecurityHeaders, docs=settings.docs)  # outermost: refusals carry the headers too
    _add_error_handlers(app)
    _add_pages(app, settings)

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
                      include_input: bool = Query(False, description="also return the 28x28 the model saw"),
                      upright: bool = Query(False, description=_UPRIGHT_HELP)):
        batch, names, inverted = await _request_images(request, preparer, upright)
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


def run_server(run_dir: str | os.PathLike, settings: ServeSettings, log_level: str = "info",
               trust_code: bool = False) -> None:
    """Load the model, check it answers, and serve until Ctrl-C (uvicorn, one process, HTTP/1.1 keep-alive).
    A run of your own network imports the code it names, which runs it: only with `trust_code=True`."""
    import uvicorn

    classifier = Classifier.load(run_dir, trust_code=trust_code)
    app = create_app(classifier, settings)
    accuracy = classifier.meta.metrics.get("test_accuracy")
    shown = f", test accuracy {accuracy:.2%}" if isinstance(accuracy, float) and math.isfinite(accuracy) else ""
    docs = "API docs: /docs" if settings.docs else "API schema: /openapi.json"
    print(f"serving {run_dir} ({model_info(classifier)['name']}{shown}) on http://{settings.host}:{settings.port}/  "
          f"({docs}, Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level,
                limit_concurrency=settings.max_connections, timeout_keep_alive=settings.keep_alive,
                timeout_graceful_shutdown=5, server_header=False)
