"""Request bodies bounded before any route reads them (`deltaw serve --max-request-bytes`).

    client ──headers──► Content-Length > limit?  ──yes──► 413 at once, the body never read
              ──body──► bytes so far > limit?    ──yes──► 413 once past the limit (chunked uploads)
                        otherwise                ──────► the route gets the body, unchanged

The check runs after the API key's (an unauthenticated client never makes the server read a byte).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltaw.serve.protocol import error_body


class BodyLimitMiddleware:
    """Answers 413 to an HTTP request whose body exceeds `max_bytes`, declared or streamed.

    Args:
        app: the ASGI application the accepted requests go on to.
        max_bytes: the largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            return await self._refuse(scope, receive, send, declared)
        body = await self._read(receive)
        if body is None:
            return await self._refuse(scope, receive, send, None)
        sent = False

        async def replay() -> Message:  # the body as one message, then the client's own messages
            nonlocal sent
            if sent:
                return await receive()
            sent = True
            return body

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> Message | None:
        """The whole body as one "http.request" message (or the disconnect that cut it short);
        None as soon as it passes max_bytes."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return message
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return None
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, size: int | None) -> None:
        """413, naming the body's declared size (None: it passed the limit while being sent)."""
        scope["app"].state.server.metrics.record_error(413)
        what = f"is {size:,} bytes, more than" if size is not None else "is larger than"
        message = (f"the request body {what} this server's limit of {self.max_bytes:,} bytes "
                   "(deltaw serve --max-request-bytes); send a shorter prompt")
        response = JSONResponse(error_body(message, "invalid_request_error", None, "request_too_large"), 413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


def _content_length(scope: Scope) -> int | None:
    """The Content-Length header's value (None when absent or unreadable: the streamed count decides)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
