"""A lean HTTP/1.1 server on :class:`asyncio.Protocol` and ``httptools``: the gateway's HTTP transport.

What a KServe route needs, and no more: keep-alive (``Connection: close`` and HTTP/1.0 as
they say), pipelined requests answered in order (reading pauses while a complete request waits
behind the one being answered), ``Expect: 100-continue``, a ``Content-Length`` on every answer
(chunked transfer encoding for a stream), a cap on a request's head (64 KiB: 431), the header
and body timeouts and the connection cap of :class:`~tdask.gateway.limits.Limits`, TLS, and
accepting through :func:`~tdask.gateway.limits.accept_with_backoff`. Every answer it makes
itself is a JSON ``{"error": ...}`` (a request it cannot parse: 400 and close).

The routes are the caller's: a *router* gets each :class:`Request` once its headers are in and
returns a :class:`Handler` (which may refuse the request before its body is read, sees the body
as it arrives and then answers) or an :class:`Answer` (a refusal).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import httptools

from tdask.gateway.limits import Limits, accept_with_backoff

logger = logging.getLogger(__name__)

__all__ = ["Answer", "Handler", "HttpServer", "MAX_HEAD_BYTES", "Request", "json_answer"]

#: The most a request's line and headers may take (tornado's default); past it, 431 and close.
MAX_HEAD_BYTES = 64 * 1024

_REASONS = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Answer:
    """A whole answer made before the handler runs (a refusal): status, body, headers, whether to close."""

    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.close = close


def json_answer(status: int, body: Any, headers: Sequence[tuple[str, str]] = (), close: bool = False) -> Answer:
    """An :class:`Answer` of ``body`` as JSON."""
    return Answer(status, json.dumps(body).encode(), "application/json", headers, close)


_MALFORMED = json_answer(
    400, {"error": "malformed HTTP request (its framing: Content-Length, chunks, headers)"}, close=True
)
_HEAD_TOO_LARGE = json_answer(
    431, {"error": f"the request's line and headers are over {MAX_HEAD_BYTES} bytes"}, close=True
)

_date_cache: list[Any] = [0, ""]


def _date() -> str:
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, formatdate(now, usegmt=True)
    return str(_date_cache[1])


class Request:
    """One HTTP request, and how its answer is written.

    ``method``, ``path`` (undecoded, without the query), ``query``, ``headers`` (names in lower
    case; repeated ones joined by commas), ``version`` (``"1.1"``, ``"1.0"``). Answer with
    :meth:`send` (whole), or :meth:`start_stream`, :meth:`write` and :meth:`finish`.
    """

    __slots__ = (
        "method",
        "path",
        "query",
        "headers",
        "version",
        "keep_alive",
        "handler",
        "refusal",
        "complete",
        "answered",
        "_continue",
        "_chunked",
        "_finished",
        "_conn",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        version: str,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.version = version
        self.keep_alive = keep_alive
        self.handler: Handler | None = None
        self.refusal: Answer | None = None
        self.complete = False
        self.answered = False
        self._continue = version == "1.1" and headers.get("expect", "").lower() == "100-continue"
        self._chunked = False
        self._finished = False
        self._conn = conn

    @property
    def closed(self) -> bool:
        """True once the connection is closing or gone (what is written then goes nowhere)."""
        return self._conn.closing

    def _head(self, status: int, content_type: str | None, headers: Iterable[tuple[str, str]], close: bool) -> str:
        if close:
            self.keep_alive = False
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\nDate: {_date()}\r\n"]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}\r\n")
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n")
        if not self.keep_alive:
            lines.append("Connection: close\r\n")
        elif self.version == "1.0":
            lines.append("Connection: keep-alive\r\n")
        return "".join(lines)

    def send(
        self,
        status: int,
        body: bytes | memoryview | Sequence[bytes | memoryview] = b"",
        content_type: str | None = None,
        headers: Iterable[tuple[str, str]] = (),
        close: bool = False,
    ) -> None:
        """Write the whole answer: ``body`` (bytes, or pieces written one after the other), with its length."""
        if self.answered:
            raise RuntimeError(f"{self.method} {self.path} is answered already")
        self.answered = self._finished = True
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body)
        length = sum(len(part) for part in parts)
        head = self._head(status, content_type, headers, close) + f"Content-Length: {length}\r\n\r\n"
        self._conn.write(b"".join([head.encode("latin-1"), *parts]))

    def send_answer(self, answer: Answer) -> None:
        """Write ``answer`` (a refusal)."""
        self.send(answer.status, answer.body, answer.content_type, answer.headers, answer.close)

    def start_stream(self, status: int, headers: Iterable[tuple[str, str]] = ()) -> None:
        """Write the head of an answer whose body follows in pieces (:meth:`write`, then :meth:`finish`).

        Chunked on HTTP/1.1; on HTTP/1.0 the body ends with the connection.
        """
        if self.answered:
            raise RuntimeError(f"{self.method} {self.path} is answered already")
        self.answered = True
        self._chunked = self.version != "1.0"
        extra = "Transfer-Encoding: chunked\r\n" if self._chunked else ""
        head = self._head(status, None, headers, close=not self._chunked) + extra + "\r\n"
        self._conn.write(head.encode("latin-1"))

    async def write(self, data: bytes) -> None:
        """Write a piece of a streamed answer and wait while the peer is slow to read it.

        Raises ``ConnectionResetError`` once the connection is gone.
        """
        if self._conn.closing:
            raise ConnectionResetError(f"the client of {self.method} {self.path} went away")
        if data:
            self._conn.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        await self._conn.drain()

    def finish(self) -> None:
        """End a streamed answer (a no-op once ended)."""
        if self._finished:
            return
        self._finished = True
        if self._chunked:
            self._conn.write(b"0\r\n\r\n")


class Handler:
    """How one request is handled: made by the router once its headers are in.

    :meth:`start` may refuse the request before its body is read; :meth:`feed` takes each
    piece of the body (by default, kept up to ``limit`` bytes: :meth:`body`) and may refuse it
    as it runs over; :meth:`respond` answers through :attr:`request`. An exception that escapes
    :meth:`respond` goes to :meth:`uncaught`.
    """

    def __init__(self, request: Request, limit: int) -> None:
        self.request = request
        self.limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def start(self) -> Answer | None:
        """A refusal made from the headers alone, or ``None`` to read the body."""
        return None

    def feed(self, chunk: bytes) -> Answer | None:
        """Take a piece of the body; a refusal if it runs over."""
        return self.add(chunk, self.limit)

    def add(self, data: bytes, limit: int) -> Answer | None:
        """Keep ``data``, or a 413 once what is kept would be over ``limit`` bytes."""
        self._size += len(data)
        if self._size > limit:
            return self.over(limit)
        if data:
            self._parts.append(data)
        return None

    def over(self, limit: int) -> Answer:
        """Drop what is kept; the 413 of a body over ``limit`` bytes."""
        self._parts.clear()
        return json_answer(413, {"error": f"the body is over the gateway's limit of {limit} bytes"}, close=True)

    def body(self) -> bytes:
        """The body kept, as one ``bytes`` (and no longer kept here)."""
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self._parts = []
        return body

    async def respond(self) -> None:
        """Answer the request (its body is in)."""
        raise NotImplementedError

    def uncaught(self, exc: Exception) -> None:
        """Answer an exception that escaped :meth:`respond` (logged; 500)."""
        logger.error("%s %s failed", self.request.method, self.request.path, exc_info=exc)
        self.request.send_answer(json_answer(500, {"error": str(exc)}))


Router = Callable[[Request], "Handler | Answer"]


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the head too large, or no more requests wanted)."""


class _Connection(asyncio.Protocol):
    """One client connection: parses requests, runs their handlers one at a time, writes answers in order."""

    def __init__(self, server: HttpServer, refuse: bool = False) -> None:
        self.server = server
        self.refuse = refuse
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.loop = server.loop
        self.queue: deque[Request] = deque()  # requests with their headers in, in order; [0] is answered next
        self.current: Request | None = None  # the request whose body is being read
        self.url = b""
        self.head: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0  # of the request line and headers, counted by the callbacks
        self.head_raw = 0  # bytes received while a head was incomplete (a header that never ends)
        self.in_head = False
        self.began = False  # a request began in the data being parsed
        self.too_large = False
        self.no_more = False  # take no more requests (a close asked for, an error, a refusal)
        self.running: asyncio.Task[None] | None = None
        self.upgrade_left = 0  # body bytes still to come of a request that asked for a protocol switch
        self.closing = False
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_kind = ""

    # -- the transport's side --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.refuse:
            cap = self.server.limits.max_connections
            answer = json_answer(503, {"error": f"the gateway has {cap} connections open; try later"}, close=True)
            request = Request(self, "", "", "", {}, "1.1", False)
            request.send_answer(answer)
            transport.close()
            self.closing = True
            return
        self._arm("header")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._disarm()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        self.queue.clear()
        self.current = None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)
        self._advance()

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused and not self.closing:
            self.drain_waiter = self.loop.create_future()
            await self.drain_waiter

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self._disarm()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.upgrade_left:
            self._upgrade_body(data)
        if self.no_more or self.closing:
            return self._advance()
        self.began = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            # A protocol switch asked for (an Upgrade header, CONNECT): the request is answered in
            # HTTP/1.1, then the connection closes. httptools leaves its body unparsed: read here.
            if self.upgrade_left:
                self.no_more = True
                self._upgrade_body(data[exc.args[0] :])
            else:
                self._refuse(None)
        except httptools.HttpParserError:
            if self.too_large:
                self._refuse(_HEAD_TOO_LARGE)
            elif not self.no_more:
                self._refuse(_MALFORMED)
        else:
            if self.in_head:  # a head still coming: count what it took (a header that never ends)
                if self.began:  # this data began it: what follows the previous message's end (its last blank line)
                    end = data.rfind(b"\r\n\r\n")
                    self.head_raw = len(data) - (end + 4 if end >= 0 else 0)
                else:
                    self.head_raw += len(data)
                if max(self.head_raw, self.head_bytes) > MAX_HEAD_BYTES:
                    self._refuse(_HEAD_TOO_LARGE)
            elif self.current is not None and self.timer_kind != "body" and not self.read_paused:
                self._arm("body")
        self._advance()

    # -- the parser's callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.no_more:
            raise _Stop
        self.url = b""
        self.head = []
        self.head_bytes = self.head_raw = 0
        self.in_head = self.began = True

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_bytes += len(url)
        if self.head_bytes > MAX_HEAD_BYTES:
            self.too_large = True
            raise _Stop

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > MAX_HEAD_BYTES:
            self.too_large = True
            raise _Stop
        self.head.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.timer_kind == "header":
            self._disarm()
        parser = self.parser
        headers: dict[str, str] = {}
        for raw_name, raw_value in self.head:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        path, _, query = self.url.decode("latin-1").partition("?")
        upgrade = parser.should_upgrade()
        keep_alive = parser.should_keep_alive() and not upgrade
        request = Request(
            self, parser.get_method().decode("ascii"), path, query, headers, parser.get_http_version(), keep_alive
        )
        self.current = request
        self.queue.append(request)
        if upgrade and headers.get("content-length", "0") != "0":
            if not headers["content-length"].isdigit():
                request.refusal = _MALFORMED
            self.upgrade_left = int(headers["content-length"]) if headers["content-length"].isdigit() else 0
        try:
            routed = self.server.router(request)
            if isinstance(routed, Answer):
                request.refusal = routed
                return
            request.handler = routed
            request.refusal = routed.start()
            length = headers.get("content-length", "")
            if request.refusal is None and length.isdigit() and int(length) > routed.limit:
                request.refusal = json_answer(
                    413,
                    {"error": f"the body ({length} bytes) is over the gateway's limit of {routed.limit} bytes"},
                    close=True,
                )
        except Exception as exc:  # a bug of the router's or the handler's: its 500, not a parser error
            logger.error("%s %s failed", request.method, request.path, exc_info=exc)
            request.refusal = json_answer(500, {"error": str(exc)})

    def on_body(self, chunk: bytes) -> None:
        request = self.current
        if request is None or request.refusal is not None or request.handler is None:
            return
        try:
            request.refusal = request.handler.feed(chunk)
        except Exception as exc:
            logger.error("%s %s failed", request.method, request.path, exc_info=exc)
            request.refusal = json_answer(500, {"error": str(exc)}, close=True)

    def on_message_complete(self) -> None:
        request = self.current
        if request is None or self.upgrade_left:
            return
        request.complete = True
        self.current = None
        if self.timer_kind == "body":
            self._disarm()
        if not request.keep_alive:
            self.no_more = True

    def _upgrade_body(self, data: bytes) -> None:
        piece = data[: self.upgrade_left]
        self.upgrade_left -= len(piece)
        if piece:
            self.on_body(bytes(piece))
        if not self.upgrade_left:
            self.on_message_complete()

    # -- answering ---------------------------------------------------------------------------

    def _refuse(self, answer: Answer | None) -> None:
        """Take no more requests; answer the one being read with ``answer`` (or, with none, the last one in)."""
        self.no_more = True
        request = self.current
        if answer is None:
            if request is None and self.queue:
                self.queue[-1].keep_alive = False
                return
            answer = _MALFORMED
        if request is None:
            request = Request(self, "", "", "", {}, "1.1", False)
            self.queue.append(request)
        if request.refusal is None:
            request.refusal = answer
        request.keep_alive = False

    def _advance(self) -> None:
        """Answer what can be answered now, in order; pause or resume reading."""
        queue = self.queue
        while self.running is None and queue and not self.closing:
            request = queue[0]
            if request.refusal is not None:
                if not request.complete:  # its body unread: nothing after it can be read
                    request.keep_alive = False
                    self.no_more = True
                request.send_answer(request.refusal)
                self._done(request)
                continue
            if not request.complete:
                if request._continue:
                    request._continue = False
                    self.write(_CONTINUE)
                break
            if self.write_paused:  # the peer does not read its answers: start no more
                break
            self.running = self.loop.create_task(self._run(request))
        if self.closing:
            return
        if self.no_more and not queue and self.running is None:
            self.close()
            return
        waiting = len(queue) - (self.current is not None) - (self.running is not None)
        pause = (
            waiting > 0
            or (self.no_more and not self.upgrade_left)
            or (self.current is not None and self.current.refusal is not None)
        )
        if pause and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()
            if self.timer_kind == "body":
                self._disarm()
        elif not pause and self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
            if self.current is not None:
                self._arm("body")

    async def _run(self, request: Request) -> None:
        handler = request.handler
        assert handler is not None
        try:
            await handler.respond()
        except Exception as exc:
            if self.closing:
                logger.debug("%s %s: the client went away (%s)", request.method, request.path, exc)
            elif request.answered:  # mid-stream: nothing can be said any more
                logger.debug("%s %s failed mid-answer: %r", request.method, request.path, exc)
                request.keep_alive = False
            else:
                try:
                    handler.uncaught(exc)
                except Exception:
                    logger.exception("%s %s: answering an error failed", request.method, request.path)
        finally:
            self.running = None
        if self.closing:
            return
        if not request.answered:
            request.send(200)
        elif not request._finished:
            request.finish()
        self._done(request)
        self._advance()

    def _done(self, request: Request) -> None:
        if self.queue and self.queue[0] is request:
            self.queue.popleft()
        if not request.keep_alive or (self.no_more and not self.queue):
            self.close()
        elif not self.queue:
            self._arm("header")

    # -- timeouts ----------------------------------------------------------------------------

    def _arm(self, kind: str) -> None:
        if self.timer is not None:
            self.timer.cancel()
        limits = self.server.limits
        seconds = limits.header_timeout if kind == "header" else limits.body_timeout
        self.timer = self.loop.call_later(seconds, self._expire, kind)
        self.timer_kind = kind

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_kind = ""

    def _expire(self, kind: str) -> None:
        self.timer = None
        self.timer_kind = ""
        logger.debug("closing a connection: no %s within its timeout", "request" if kind == "header" else "body")
        self.close()


class HttpServer:
    """HTTP/1.1 on the running event loop: requests go to ``router``, within ``limits``.

    Parameters
    ----------
    router
        Called with each :class:`Request` once its headers are in; returns its :class:`Handler`
        or an :class:`Answer` (a refusal: an unknown route, a wrong method).
    limits
        The header, body and idle timeouts and the connection cap (past it: 503 and close).
    ssl_context
        Serve TLS with it (``None``: plain text).
    """

    def __init__(self, router: Router, limits: Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self.router = router
        self.limits = limits
        self.ssl_context = ssl_context
        self.connections: set[_Connection] = set()
        self.loop = asyncio.get_running_loop()
        self._sockets: list[socket.socket] = []
        self._stoppers: list[Callable[[], None]] = []
        self._starting: set[asyncio.Task[None]] = set()

    def listen(self, host: str, port: int, backlog: int = 128) -> int:
        """Bind ``host:port`` (every address it names; port 0: a free one) and accept; returns the port."""
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        seen: set[Any] = set()
        bound = port
        for family, kind, proto, _, address in sorted(infos, key=lambda info: info[0]):
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                # Port 0: the port the first address got, on every address.
                target: tuple[Any, ...] = (address[0], bound or address[1], *address[2:])
                sock.bind(target)
                sock.listen(backlog)
                sock.setblocking(False)
            except BaseException:
                sock.close()
                raise
            bound = sock.getsockname()[1]
            self._sockets.append(sock)
            self._stoppers.append(accept_with_backoff(sock, self._accept))
        return int(bound)

    def _accept(self, sock: socket.socket, address: Any) -> None:
        sock.setblocking(False)
        refuse = len(self.connections) >= self.limits.max_connections
        conn = _Connection(self, refuse=refuse)
        if not refuse:
            self.connections.add(conn)
        task = self.loop.create_task(self._connect(conn, sock))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)

    async def _connect(self, conn: _Connection, sock: socket.socket) -> None:
        try:
            if self.ssl_context is None:
                await self.loop.connect_accepted_socket(lambda: conn, sock)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: conn, sock, ssl=self.ssl_context, ssl_handshake_timeout=self.limits.header_timeout
                )
        except Exception as exc:  # a failed TLS handshake (OSError, TimeoutError), a peer gone
            logger.debug("a connection failed to start: %r", exc)
            self.connections.discard(conn)
            sock.close()

    def stop(self) -> None:
        """Stop accepting and close the listening sockets and the open connections."""
        for stop in self._stoppers:
            stop()
        for task in list(self._starting):
            task.cancel()
        for sock in self._sockets:
            sock.close()
        self._stoppers.clear()
        self._sockets.clear()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.close()
