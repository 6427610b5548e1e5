"""Several API processes on one port, each building the app from an import string.

uvicorn's own `--workers N` listener was bound with `proto` 0 up to uvicorn 0.54; the accepted
sockets inherit it and asyncio only turns on TCP_NODELAY for sockets that say IPPROTO_TCP, so
Nagle's algorithm stayed on and every keep-alive response after the first waited ~40 ms for the
client's delayed ACK (Linux; uvicorn issue #3149). Measured then: 2 processes served 318 req/s
at a 48 ms median, 16 connections / 48 ms. uvicorn 0.55 sets TCP_NODELAY itself. So the
listener is uvicorn's own when its accepted connections already have TCP_NODELAY, and one bound
as asyncio's single-process path binds it otherwise: the workaround applies only where the
installed uvicorn needs it."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from typing import Any

import uvicorn
from uvicorn.supervisors import Multiprocess

log = logging.getLogger("uvicorn.error")


class TcpConfig(uvicorn.Config):
    """uvicorn's config with a listener that says IPPROTO_TCP (see the module's docstring)."""

    def bind_socket(self) -> socket.socket:
        family = socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.set_inheritable(True)
        log.info("API on http://%s:%d, %d processes", self.host, self.port, self.workers)
        return sock


def nodelay_of_accepted(listener: socket.socket) -> int:
    """TCP_NODELAY of a connection asyncio accepts on `listener` (what a request is served on)."""
    seen: asyncio.Future[int]

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def run() -> int:
        nonlocal seen
        loop = asyncio.get_running_loop()
        seen = loop.create_future()
        server = await loop.create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    with listener:
        return asyncio.run(run())


@functools.cache
def uvicorn_needs_nodelay_fix() -> bool:
    """Whether the installed uvicorn's own listener leaves Nagle on (asked once, on loopback)."""
    theirs = uvicorn.Config("x:y", host="127.0.0.1", port=0, workers=2).bind_socket()
    return nodelay_of_accepted(theirs) == 0


def listener_config(app: str, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's own config where its listener is right, TcpConfig where it is not."""
    config_type = TcpConfig if uvicorn_needs_nodelay_fix() else uvicorn.Config
    return config_type(app, **kwargs)


def serve_processes(
    app: str,
    host: str,
    port: int,
    processes: int,
    log_level: str = "info",
    access_log: bool = True,
) -> None:
    """Run `processes` uvicorn workers of the app factory `module:function` until stopped."""
    config = listener_config(
        app,
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level=log_level,
        access_log=access_log,
    )
    Multiprocess(config, sockets=[config.bind_socket()]).run()
