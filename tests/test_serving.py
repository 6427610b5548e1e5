"""Several API processes share one listener; its accepted connections must have TCP_NODELAY,
or each keep-alive response waits ~40 ms on the client's delayed ACK (uvicorn issue #3149)."""

from __future__ import annotations

import asyncio
import socket

import uvicorn

from service.api.serving import TcpConfig


def _nodelay_of_accepted(listener: socket.socket) -> int:
    """TCP_NODELAY of a connection asyncio accepts on `listener`."""
    seen: asyncio.Future[int]

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            sock = transport.get_extra_info("socket")
            seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    async def run() -> int:
        nonlocal seen
        seen = asyncio.get_running_loop().create_future()
        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        port = listener.getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        value = await asyncio.wait_for(seen, 10)
        writer.close()
        server.close()
        return value

    return asyncio.run(run())


def test_the_shared_listener_gives_connections_tcp_nodelay() -> None:
    ours = TcpConfig("x:y", host="127.0.0.1", port=0, workers=2).bind_socket()
    assert ours.proto == socket.IPPROTO_TCP
    assert _nodelay_of_accepted(ours) == 1


def test_uvicorns_own_listener_does_not() -> None:
    """Why TcpConfig exists; when uvicorn fixes it, this fails and TcpConfig can go."""
    theirs = uvicorn.Config("x:y", host="127.0.0.1", port=0, workers=2).bind_socket()
    assert _nodelay_of_accepted(theirs) == 0
