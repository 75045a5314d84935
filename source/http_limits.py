"""The REST API's limits at the HTTP level: body size, slow clients, errors as JSON.

    app.add_middleware(BodySizeLimit, max_bytes=10_000_000)       # 413 past 10 MB
    app.add_exception_handler(Exception, internal_error)         # 500 as JSON, logged
    uvicorn.run(app, http=timed_protocol(header_timeout=10, body_timeout=60), ...)

uvicorn closes an idle kept-alive connection after timeout_keep_alive, but has no deadline for
a request that is still arriving: a client sending one header byte a second holds its
connection (and a place under limit_concurrency) forever. `timed_protocol` is uvicorn's h11
protocol with one: a request's headers must arrive within header_timeout seconds of the
connection (or of the previous answer), its body within body_timeout after them, or the
connection is closed. Its own answers (400 for a malformed request, 503 past
limit_concurrency) are JSON like every other answer of the API.
"""

from __future__ import annotations

import json
import logging
import os

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger("serve")
DEFAULT_MAX_UPLOAD_MB = 10.0


def problem(status: int, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers, body) of a JSON {"detail": ...} answer that closes the connection."""
    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    return headers, body


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    """An unexpected exception: logged with its traceback, answered 500 in JSON."""
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    detail = "internal error while answering this request; the server log has the details"
    return JSONResponse({"detail": detail}, status_code=500)


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


async def service_unavailable(scope, receive, send) -> None:
    """uvicorn's answer past limit_concurrency, in JSON."""
    headers, body = problem(503, "the server is at its connection limit; retry shortly")
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def timed_protocol(header_timeout: float, body_timeout: float):
    """uvicorn's h11 protocol class with deadlines for a request's headers and body, and
    JSON for the answers uvicorn gives itself (pass it as uvicorn.run(..., http=...))."""
    import h11
    from uvicorn.protocols.http import h11_impl

    # uvicorn looks this up in its module for each request past limit_concurrency
    h11_impl.service_unavailable = service_unavailable

    class TimedH11Protocol(h11_impl.H11Protocol):
        deadline = None  # the timer that closes the connection
        waiting_for = None  # "headers" or "body"

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.watch()

        def data_received(self, data: bytes) -> None:
            self.watch()  # a client sending the next request after a kept-alive answer
            super().data_received(data)
            self.watch()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.watch()

        def connection_lost(self, exc) -> None:
            self.arm(None)
            super().connection_lost(exc)

        def watch(self) -> None:
            """What the connection waits for now, and its deadline."""
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                self.arm("headers")
            elif cycle.more_body:
                self.arm("body")
            else:  # the request is in: the model's time is not the client's
                self.arm(None)

        def arm(self, waiting_for: str | None) -> None:
            if waiting_for == self.waiting_for:
                return
            if self.deadline is not None:
                self.deadline.cancel()
            self.waiting_for, self.deadline = waiting_for, None
            if waiting_for is not None:
                timeout = header_timeout if waiting_for == "headers" else body_timeout
                self.deadline = self.loop.call_later(timeout, self.too_slow)

        def too_slow(self) -> None:
            log.warning("closing a connection: its request %s took too long", self.waiting_for)
            self.deadline = None
            if not self.transport.is_closing():
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            headers, body = problem(400, f"malformed HTTP request: {msg}")
            event = h11.Response(status_code=400, headers=headers, reason=b"Bad Request")
            for part in (event, h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(part))
            self.transport.close()

    return TimedH11Protocol
