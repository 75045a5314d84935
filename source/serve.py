"""REST API for programs: predictions, health and model metadata over HTTP (FastAPI + uvicorn).

    python source/serve.py              # http://127.0.0.1:8000, docs at /docs and /redoc (offline)
    python source/serve.py --host 0.0.0.0 --port 8080 --model-path m.pth

    curl -F files=@photo.jpg 'http://127.0.0.1:8000/predict?topk=3'
    curl http://127.0.0.1:8000/health
    curl http://127.0.0.1:8000/metadata
    curl http://127.0.0.1:8000/metrics                      # Prometheus text format

POST /predict takes one or more images as multipart field `files` and returns, for each,
the decision and the top-k classes with probabilities. An image that cannot be read gets an
`error` entry while the others are still classified; when no upload is a readable image the
answer is 400 with the reason for each file. Requests larger than --max-upload-mb get 413.
Concurrent requests share forward passes (batching.py): up to --max-batch images, waiting at
most --max-wait-ms for more; past --max-queue waiting requests the answer is 503 with
Retry-After. The forward passes (with decoding and top-k) run in a child process that loads
the model too (model_process.py), off the web server's GIL; `--worker thread` keeps them in
this process (less memory, slower under concurrent load). A request whose batch the child
died with gets 503 with Retry-After; the next batch starts a new child. GET /metrics:
requests by status, latency, batch sizes, queue depth, model version.
Every answer other than 2xx is JSON {"detail": "..."}, a 500 included. A request's headers must
arrive within --header-timeout s and its body within --body-timeout s (slow clients are
disconnected), idle connections close after --keep-alive s, and past --limit-concurrency
connections the answer is 503. Images are decoded one at a time within a pixel budget
($MAX_IMAGE_PIXELS, see imagesafe.py) into the model's input size.
The model is loaded once at start-up, and the server refuses to start (exit 2, one line) with
a checkpoint it cannot serve, e.g. one whose output on a blank image is not finite.
MODEL_PATH and MAX_UPLOAD_MB are read from the environment when the options are not given;
MODEL_PATH may name an export: a .onnx file is served by ONNX Runtime without torch (also
PREDICT_BACKEND=onnx with a checkpoint path: model.onnx beside it), a .pt file as TorchScript. /docs (Swagger UI) and /redoc load their scripts
from this server (the fastapi-offline package ships them), never from a CDN, so they work
offline and on air-gapped clusters.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from api_metrics import API_VERSION, ApiMetrics
from backends import resolve_backend
from batching import Batcher, QueueFull
from cli import HelpFormatter, default_model_path
from http_limits import (
    DEFAULT_MAX_UPLOAD_MB,
    BodySizeLimit,
    internal_error,
    max_upload_bytes_from_env,
    timed_protocol,
)
from model_process import ModelProcess, ModelProcessError, PredictorSpec
from predict import Predictor
from tracking_mlflow import resolve_model_uri  # MODEL_URI=models:/NAME@alias

DEFAULT_MAX_BATCH = 32  # images per forward pass: past ~32, small ViTs gain little on CPU
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUE = 256
# Requests with at most this many bytes of images are decoded by the model worker with its
# batch (no thread hand-over a request; docs/benchmarks/serving-sweep.md measures the gain);
# larger ones in FastAPI's thread pool, where decoders run in parallel.
INLINE_DECODE_BYTES = 256 * 1024
DEFAULT_HEADER_TIMEOUT = 10.0  # s; a slow-header (slowloris) client is disconnected after it
DEFAULT_BODY_TIMEOUT = 60.0  # s; 10 MB at 170 KB/s
DEFAULT_KEEP_ALIVE = 5.0  # s; uvicorn's default
DEFAULT_LIMIT_CONCURRENCY = 512  # connections; beyond the queue, so the queue's 503 comes first
DEFAULT_MAX_HEADER_KB = 16  # h11's default
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"  # Swagger UI, ReDoc, favicon
DOCS_ASSETS_URL = "/docs-assets"
log = logging.getLogger("serve")


# ---- the answers, as the OpenAPI schema shows them -------------------------------------------


class Schema(BaseModel):
    model_config = ConfigDict(protected_namespaces=(), populate_by_name=True)


class ClassProbability(Schema):
    class_: str = Field(alias="class", description="class name")
    probability: float


class ImagePrediction(Schema):
    source: str = Field(description="the uploaded file's name (upload[i] when it has none)")
    predicted: str | None = Field(description="the decision; null when the image failed")
    probability: float | None = Field(description="probability of `predicted`")
    topk: list[ClassProbability] = Field(description="best first; empty when the image failed")
    error: str | None = Field(description="why this image could not be classified")


class PredictResponse(Schema):
    classes: list[str] = Field(description="every class the model knows, in its order")
    threshold: float | None = Field(description="binary models: the decision threshold")
    predictions: list[ImagePrediction] = Field(description="one per uploaded file, in order")


class Health(Schema):
    status: str = Field(examples=["ok"])
    model_path: str


class Metadata(Schema):
    api_version: str
    model_path: str
    backend: str = Field(description="torch or onnx")
    num_classes: int
    classes: list[str]
    image_size: int = Field(description="pixels; inputs are resized and cropped to it")
    mean: list[float]
    std: list[float]
    num_parameters: int | None = Field(description="null for an ONNX file exported without it")
    threshold: float | None
    metrics: dict = Field(description="the metrics stored at training, per split")
    provenance: dict = Field(description="when and from which commit the model was trained")
    config: dict = Field(description="the training config")


class Problem(Schema):
    detail: str = Field(description="what was wrong, in one sentence")


ERRORS = {
    400: {"model": Problem, "description": "no readable image, or a malformed request"},
    413: {"model": Problem, "description": "request body over --max-upload-mb"},
    500: {"model": Problem, "description": "an unexpected error (the server log has it)"},
    503: {
        "model": Problem,
        "description": "the queue is full (--max-queue), or the model process died with this "
        "request's batch (a new one takes the next); see Retry-After",
    },
}


# ---- the routes (the app's state holds the predictor, the batcher and the metrics) ------------

router = APIRouter()


async def bad_request(request: Request, exc: RequestValidationError):
    # FastAPI answers 422 by default; a malformed request is the client's error: 400.
    problems = [
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
        for e in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=400)


@router.get("/health", response_model=Health)
def health(request: Request) -> dict:
    predictor: Predictor = request.app.state.predictor
    return {"status": "ok", "model_path": str(predictor.model_path)}


@router.get("/metadata", response_model=Metadata)
def metadata(request: Request) -> dict:
    predictor: Predictor = request.app.state.predictor
    return {"api_version": API_VERSION, **predictor.metadata()}


@router.post("/predict", response_model=PredictResponse, responses=ERRORS)
async def predict(
    request: Request,
    files: list[UploadFile] | None = File(None, description="one or more images"),
    topk: int = Query(5, ge=1, description="classes to return per image"),
) -> dict:
    predictor: Predictor = request.app.state.predictor
    batcher: Batcher = request.app.state.batcher
    if not files:
        raise HTTPException(400, "no image uploaded; send images as multipart form field 'files'")
    items = [(f.filename or f"upload[{i}]", await f.read()) for i, f in enumerate(files)]
    try:
        if sum(len(data) for _, data in items) <= INLINE_DECODE_BYTES:
            # Small uploads go to the model worker as bytes: it decodes them with its batch,
            # and the event loop waits on the Future, with no thread-pool hand-over.
            predictions = await asyncio.wrap_future(batcher.submit(items, topk=topk))
        else:  # large ones are decoded in the thread pool, in parallel, never in the loop
            predictions = await run_in_threadpool(batcher.predict, items, topk)
    except QueueFull as err:
        headers = {"Retry-After": str(err.retry_after)}
        raise HTTPException(503, str(err), headers=headers) from None
    except ModelProcessError as err:  # it died with this batch; the next one starts anew
        raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
    if all(not p.ok for p in predictions):
        raise HTTPException(
            400, "; ".join(f"{p.source}: {p.error}" for p in predictions) or "no image"
        )
    return {
        "classes": predictor.classes,
        "threshold": predictor.threshold,
        "predictions": [p.as_dict() for p in predictions],
    }


@router.get("/metrics", response_class=Response)
def prometheus_metrics(request: Request) -> Response:
    """Prometheus text format: requests, latency, batch sizes, queue depth, model."""
    return request.app.state.metrics.render()


def create_app(
    model_path: str | Path | None = None,
    *,
    max_upload_bytes: int | None = None,
    device: str = "auto",
    max_batch: int = DEFAULT_MAX_BATCH,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_queue: int = DEFAULT_MAX_QUEUE,
    predictor: Predictor | None = None,
    model_process: PredictorSpec | ModelProcess | None = None,
) -> FastAPI:
    """The API for one checkpoint (MODEL_PATH or the default when not given), loaded once
    when the app starts (FastAPI lifespan; TestClient as a context manager runs it) unless
    `predictor` is given, checked (Predictor.check), with its request batcher (max_batch=1:
    one request a forward pass). With `model_process` (a PredictorSpec, or a ModelProcess
    already launched), the batches run in a child process that loads that model
    (model_process.py); else in a thread of this process."""
    model_path = Path(model_path or default_model_path())
    if max_upload_bytes is None:
        max_upload_bytes = max_upload_bytes_from_env()

    metrics = ApiMetrics()
    given = predictor

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            predictor = given or Predictor(model_path, device=device)
            predictor.check()
        except Exception as err:  # CheckpointError, OnnxError: logged, and the app does not start
            log.error("cannot serve: %s", err)
            raise
        app.state.predictor = predictor
        runner = model_process
        if isinstance(runner, PredictorSpec):
            runner = ModelProcess(runner)
        if runner is not None:
            runner.start()  # waits for the child's model, loaded and checked; or raises
        app.state.batcher = Batcher(
            predictor, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue,
            on_batch=metrics.batch_size.observe, runner=runner,
        )  # fmt: skip
        metrics.describe(predictor, app.state.batcher)
        app.state.batcher.start()
        where = f"model process {runner.pid}" if runner else "a thread"
        log.info("serving %s (%d classes; %s)", model_path, len(predictor.classes), where)
        yield
        app.state.batcher.stop()
        if runner is not None:
            runner.stop()

    app = FastAPI(
        title="ViT image classifier",
        version=API_VERSION,
        description="Top-k predictions of a Vision Transformer checkpoint.",
        lifespan=lifespan,
        docs_url=None,  # served below from local files instead of a CDN
        redoc_url=None,
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)
    app.add_middleware(metrics.middleware)  # outermost: it also counts the 413s
    add_offline_docs(app)

    app.state.metrics = metrics
    app.add_exception_handler(RequestValidationError, bad_request)
    app.add_exception_handler(Exception, internal_error)  # JSON, not Starlette's plain text
    app.include_router(router)
    app.openapi = lambda: openapi_without_422(app)
    return app


def add_offline_docs(app: FastAPI) -> None:
    """/docs and /redoc from the assets installed with fastapi-offline (FastAPI's self-hosted
    docs recipe); the pages name no other host, not even Google Fonts."""
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=DOCS_ASSETS), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )


def openapi_without_422(app: FastAPI) -> dict:
    """FastAPI's schema, less the 422 it documents on every route with parameters: this API
    answers a malformed request with 400 (see `bad_request`), which ERRORS documents."""
    if app.openapi_schema is None:
        schema = FastAPI.openapi(app)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--model-path", default=default_model_path(),
        help="checkpoint, or an export: .onnx (no torch needed), .pt (TorchScript) (env "
        "MODEL_PATH; PREDICT_BACKEND=onnx serves model.onnx beside a checkpoint)",
    )  # fmt: skip
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=float(os.environ.get("MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)),
        help="largest request body, in MB (env MAX_UPLOAD_MB); larger ones get 413",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="most images in one forward pass (1: no batching)",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="longest wait for more requests to batch, after the first (only while others "
        "are still arriving)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
        help="requests that may wait for the model; past it they get 503 with Retry-After",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of the forward pass (torch, or ONNX Runtime's intra-op; 0 = one "
        "per core); 1 suits small models on busy or small machines",
    )
    parser.add_argument(
        "--worker", choices=("process", "thread"), default="process",
        help="where the forward passes run: a child process (off the web server's GIL: "
        "faster under concurrent load with 2+ cores) or a thread of the server process",
    )  # fmt: skip
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT,
                        help="seconds a client has to send a request's headers")  # fmt: skip
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT,
                        help="seconds a client has to send a request's body, after its headers")  # fmt: skip
    parser.add_argument("--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE,
                        help="seconds an idle connection is kept open")  # fmt: skip
    parser.add_argument("--limit-concurrency", type=int, default=DEFAULT_LIMIT_CONCURRENCY,
                        help="open connections at most; past it, new requests get 503")  # fmt: skip
    parser.add_argument("--max-header-kb", type=int, default=DEFAULT_MAX_HEADER_KB,
                        help="largest request line and headers, in KB; larger ones get 400")  # fmt: skip
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ValueError as err:  # a non-numeric MAX_UPLOAD_MB in the environment
        print(f"error: {err}", file=sys.stderr)
        return 2
    limits = (args.header_timeout, args.body_timeout, args.keep_alive)
    if args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or min(limits) <= 0:
        print("error: --max-batch and --max-queue must be at least 1, --max-wait-ms at least 0, "
              "the timeouts above 0", file=sys.stderr)  # fmt: skip
        return 2
    if args.limit_concurrency < 1 or args.max_header_kb < 1:
        print("error: --limit-concurrency and --max-header-kb must be at least 1", file=sys.stderr)
        return 2
    try:
        args.model_path = str(resolve_model_uri(args.model_path))  # MODEL_URI=models:/NAME@alias
        backend = resolve_backend(None, Path(args.model_path))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if backend == "torch" and not Path(args.model_path).is_file():
        print(
            f"error: no model file at {args.model_path}; train one with `make all` or pass "
            "--model-path",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    spec = PredictorSpec(
        args.model_path, device=args.device, threads=args.threads,
        no_model=os.environ.get("SERVE_NO_MODEL") == "1",  # benchmarks/load.py's ceiling only
    )  # fmt: skip
    runner = ModelProcess(spec) if args.worker == "process" else None
    if runner is not None:
        runner.launch()  # the child loads the model while this process does
    try:  # before the server starts: a model it cannot serve is one line and exit 2
        predictor = spec.load()
    except Exception as err:  # noqa: BLE001 - whatever the checkpoint's fault, one line
        reason = " ".join(str(err).split()) or type(err).__name__
        print(f"error: cannot serve {args.model_path}: {reason}", file=sys.stderr)
        if runner is not None:
            runner.stop()
        return 2
    app = create_app(
        args.model_path, max_upload_bytes=int(args.max_upload_mb * 1e6), device=args.device,
        max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
        predictor=predictor, model_process=runner,
    )  # fmt: skip
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level,
        http=timed_protocol(args.header_timeout, args.body_timeout),
        timeout_keep_alive=args.keep_alive, limit_concurrency=args.limit_concurrency,
        h11_max_incomplete_event_size=args.max_header_kb * 1024,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
