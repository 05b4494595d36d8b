"""HTTP and HTTPS GET check on asyncio streams.

Up when the response status equals ``expect_status`` and, if ``expect_body`` is set,
the body contains it. HTTPS verifies the certificate against the system CAs (or
``ca_file``) and the backend's address or ``host`` unless ``verify_tls`` is false.
The request sends ``Host`` (``host``, default the backend address) and
``Connection: close``; bodies are read up to ``max_body`` bytes (Content-Length,
chunked, or until close), so a huge page cannot stall the checker.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time

from halb.checks.base import CheckResult, error_reason, host_port
from halb.model import IPAddress

__all__ = ["HttpChecker", "HttpError"]

MAX_BODY = 64 * 1024
MAX_HEADER_LINES = 100


class HttpError(Exception):
    """The server answered something that is not an HTTP/1.x response."""


class HttpChecker:
    def __init__(
        self,
        address: IPAddress | str,
        port: int,
        *,
        path: str = "/",
        expect_status: int = 200,
        expect_body: str | None = None,
        tls: bool = False,
        verify_tls: bool = True,
        host: str | None = None,
        ca_file: str | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        self.address = str(address)
        self.port = port
        self.path = path
        self.expect_status = expect_status
        self.expect_body = expect_body
        self.tls = tls
        self.verify_tls = verify_tls
        self.host = host
        self.max_body = max_body
        self._ssl = _tls_context(verify_tls, ca_file) if tls else None

    @property
    def target(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host_port(self.address, self.port)}{self.path}"

    def _host_header(self) -> str:
        host = self.host or (f"[{self.address}]" if ":" in self.address else self.address)
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"

    def _request(self) -> bytes:
        return (
            f"GET {self.path} HTTP/1.1\r\n"
            f"Host: {self._host_header()}\r\n"
            "User-Agent: halb-check\r\n"
            "Accept: */*\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")

    async def check(self, timeout: float) -> CheckResult:
        start = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                up, reason = await self._probe()
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            up, reason = False, error_reason(exc, timeout)
        except HttpError as exc:
            up, reason = False, f"bad HTTP response: {exc}"
        except asyncio.IncompleteReadError:
            up, reason = False, "connection closed before the response was complete"
        except asyncio.LimitOverrunError:
            up, reason = False, "bad HTTP response: header line too long"
        return CheckResult(up, reason, time.monotonic() - start)

    async def _probe(self) -> tuple[bool, str]:
        reader, writer = await asyncio.open_connection(
            self.address,
            self.port,
            ssl=self._ssl,
            server_hostname=(self.host or self.address) if self._ssl else None,
        )
        try:
            writer.write(self._request())
            await writer.drain()
            status = await _read_status(reader)
            headers = await _read_headers(reader)
            if status != self.expect_status:
                return False, f"HTTP {status}, expected {self.expect_status}"
            if self.expect_body is None:
                return True, f"HTTP {status}"
            body = await _read_body(reader, headers, self.max_body)
            if self.expect_body.encode() not in body:
                return False, f"HTTP {status} but the body lacks {self.expect_body!r}"
            return True, f"HTTP {status}, body matches"
        finally:
            await _close(writer)


@functools.cache
def _tls_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    """Shared by every checker with the same settings: loading the system CA store once
    instead of once per backend."""
    ctx = ssl.create_default_context(cafile=ca_file)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        # A TLS peer may never answer close_notify: do not wait for it forever.
        async with asyncio.timeout(1.0):
            await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass
    except TimeoutError:
        writer.transport.abort()


async def _read_status(reader: asyncio.StreamReader) -> int:
    line = await reader.readline()
    if not line:
        raise HttpError("connection closed without a response")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"status line {line[:60]!r}")
    return int(parts[1])


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n"):
            return headers
        if not line:
            raise HttpError("connection closed inside the headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    raise HttpError(f"more than {MAX_HEADER_LINES} header lines")


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], limit: int) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, limit)
    length = headers.get("content-length")
    if length is not None and length.isdigit():
        return await reader.readexactly(min(int(length), limit))
    body = b""
    while len(body) < limit:
        more = await reader.read(limit - len(body))
        if not more:
            break
        body += more
    return body


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes:
    body = b""
    while len(body) < limit:
        size_line = await reader.readline()
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError(f"chunk size {size_line[:20]!r}") from None
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after each chunk
    return body[:limit]
