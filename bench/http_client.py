"""A minimal HTTP/1.1 keep-alive client on asyncio streams, for load generation. On a 2-core box
the load generator shares the CPU with the server; httpx spends several times more CPU per
request than this, which would be measured as the server's slowness. It speaks only what the
benchmarks need: one request at a time per connection, Content-Length or chunked bodies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """(status, body) of one request; reconnects if the server closed the connection."""
        if self.writer is None or self.writer.is_closing():
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(_request_bytes(self.host, method, path, body, headers))
        status, head = await _read_head(self.reader)
        if head.get("transfer-encoding") == "chunked":
            payload = b"".join([chunk async for chunk in _chunks(self.reader)])
        else:
            payload = await self.reader.readexactly(int(head.get("content-length", "0")))
        if head.get("connection") == "close":
            await self.close()
            self.writer = None
        return status, payload

    async def stream(
        self, path: str, headers: dict[str, str] | None = None
    ) -> AsyncIterator[bytes]:
        """The chunks of a streamed (chunked) response, as they arrive, after one empty chunk
        that says the response has begun; closes the connection when the stream ends or the
        caller stops."""
        await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.write(_request_bytes(self.host, "GET", path, None, headers))
        status, _ = await _read_head(self.reader)
        if status != 200:
            raise RuntimeError(f"stream answered {status}")
        try:
            yield b""
            async for chunk in _chunks(self.reader):
                yield chunk
        finally:
            await self.close()


def _request_bytes(
    host: str, method: str, path: str, body: Any, headers: dict[str, str] | None
) -> bytes:
    data = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(data)}"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + data


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    head = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            head[key.strip().lower()] = value.strip()
    return status, head


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return
        chunk = await reader.readexactly(size)
        await reader.readexactly(2)
        yield chunk
