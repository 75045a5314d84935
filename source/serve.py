"""REST API for programs: predictions, health and model metadata over HTTP (FastAPI + uvicorn).

    python source/serve.py                                  # http://127.0.0.1:8000, docs at /docs
    python source/serve.py --host 0.0.0.0 --port 8080 --model-path m.pth

    curl -F files=@photo.jpg 'http://127.0.0.1:8000/predict?topk=3'
    curl http://127.0.0.1:8000/health
    curl http://127.0.0.1:8000/metadata

POST /predict takes one or more images as multipart field `files` and returns, for each,
the decision and the top-k classes with probabilities. An image that cannot be read gets an
`error` entry while the others are still classified; when no upload is a readable image the
answer is 400 with the reason for each file. Requests larger than --max-upload-mb get 413.
The model is loaded once at start-up. MODEL_PATH and MAX_UPLOAD_MB are read from the
environment when the options are not given.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from checkpoint import CheckpointError
from predict import DEFAULT_MODEL_PATH, Predictor

API_VERSION = "1"
DEFAULT_MAX_UPLOAD_MB = 10.0
log = logging.getLogger("serve")


class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, told by Content-Length before any
    of it is read, or counted while it streams in when the client sends it chunked."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def too_large(self) -> HTTPException:
        return HTTPException(
            413,
            f"request body over the {self.max_bytes / 1e6:g} MB limit; send fewer or smaller "
            "images, or raise --max-upload-mb",
        )

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = self.too_large()
            response = JSONResponse({"detail": err.detail}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes through FastAPI's body parsing unchanged and
                    # becomes the 413 answer.
                    raise self.too_large()
            return message

        return await self.app(scope, limited_receive, send)


def max_upload_bytes_from_env() -> int:
    value = os.environ.get("MAX_UPLOAD_MB", str(DEFAULT_MAX_UPLOAD_MB))
    try:
        return int(float(value) * 1e6)
    except ValueError:
        raise ValueError(f"MAX_UPLOAD_MB={value!r} is not a number of megabytes") from None


def create_app(
    model_path: str | Path | None = None,
    *,
    max_upload_bytes: int | None = None,
    device: str = "auto",
) -> FastAPI:
    """The API for one checkpoint (MODEL_PATH or the default when not given), loaded once
    when the app starts (FastAPI lifespan; TestClient as a context manager runs it)."""
    model_path = Path(model_path or os.environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH)
    if max_upload_bytes is None:
        max_upload_bytes = max_upload_bytes_from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            app.state.predictor = Predictor(model_path, device=device)
        except CheckpointError as err:
            log.error("cannot serve: %s", err)
            raise
        log.info("serving %s (%d classes)", model_path, len(app.state.predictor.classes))
        yield

    app = FastAPI(
        title="ViT image classifier",
        version=API_VERSION,
        description="Top-k predictions of a Vision Transformer checkpoint.",
        lifespan=lifespan,
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError):
        # FastAPI answers 422 by default; a malformed request is the client's error: 400.
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return JSONResponse({"detail": "; ".join(problems)}, status_code=400)

    @app.get("/health")
    def health(request: Request) -> dict:
        predictor: Predictor = request.app.state.predictor
        return {"status": "ok", "model_path": str(predictor.model_path)}

    @app.get("/metadata")
    def metadata(request: Request) -> dict:
        predictor: Predictor = request.app.state.predictor
        return {"api_version": API_VERSION, **predictor.metadata()}

    @app.post("/predict")
    def predict(
        request: Request,
        files: list[UploadFile] | None = File(None, description="one or more images"),
        topk: int = Query(5, ge=1, description="classes to return per image"),
    ) -> dict:
        predictor: Predictor = request.app.state.predictor
        if not files:
            raise HTTPException(
                400, "no image uploaded; send images as multipart form field 'files'"
            )
        # A sync endpoint runs in FastAPI's thread pool, so the model never blocks the loop.
        items = [(f.filename or f"upload[{i}]", f.file.read()) for i, f in enumerate(files)]
        predictions = predictor.predict(items, topk=topk)
        if all(not p.ok for p in predictions):
            raise HTTPException(
                400, "; ".join(f"{p.source}: {p.error}" for p in predictions) or "no image"
            )
        return {
            "classes": predictor.classes,
            "threshold": predictor.threshold,
            "predictions": [p.as_dict() for p in predictions],
        }

    return app


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Option defaults listed, and the docstring's examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="interface (0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument(
        "--model-path",
        default=os.environ.get("MODEL_PATH", DEFAULT_MODEL_PATH),
        help="checkpoint (env MODEL_PATH)",
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=float(os.environ.get("MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD_MB)),
        help="largest request body, in MB (env MAX_UPLOAD_MB); larger ones get 413",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0 = torch's default, one per core); 1 suits small models "
        "on busy or small machines",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level")
    return parser


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except ValueError as err:  # a non-numeric MAX_UPLOAD_MB in the environment
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not Path(args.model_path).is_file():
        print(
            f"error: no model file at {args.model_path}; train one with `make all` or pass "
            "--model-path",
            file=sys.stderr,
        )
        return 2
    import uvicorn

    from runtime import set_torch_threads

    set_torch_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = create_app(
        args.model_path, max_upload_bytes=int(args.max_upload_mb * 1e6), device=args.device
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
