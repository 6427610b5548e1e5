"""Several API processes share one listener; its accepted connections must have TCP_NODELAY,
or each keep-alive response waits ~40 ms on the client's delayed ACK (uvicorn issue #3149).
The workaround is applied only where the installed uvicorn needs it: these tests hold on a
uvicorn with the bug (0.54) and on one without it (0.55)."""

from __future__ import annotations

import socket

import uvicorn

from service.api.serving import (
    TcpConfig,
    listener_config,
    nodelay_of_accepted,
    uvicorn_needs_nodelay_fix,
)


def test_our_listener_gives_connections_tcp_nodelay() -> None:
    ours = TcpConfig("x:y", host="127.0.0.1", port=0, workers=2).bind_socket()
    assert ours.proto == socket.IPPROTO_TCP
    assert nodelay_of_accepted(ours) == 1


def test_the_listener_serve_uses_gives_tcp_nodelay_whatever_uvicorn_is_installed() -> None:
    config = listener_config("x:y", host="127.0.0.1", port=0, workers=2)
    assert nodelay_of_accepted(config.bind_socket()) == 1


def test_the_workaround_is_chosen_by_what_uvicorns_own_listener_does() -> None:
    theirs = uvicorn.Config("x:y", host="127.0.0.1", port=0, workers=2).bind_socket()
    needs_fix = nodelay_of_accepted(theirs) == 0
    assert uvicorn_needs_nodelay_fix() is needs_fix
    chosen = type(listener_config("x:y", host="127.0.0.1", port=0, workers=2))
    assert chosen is (TcpConfig if needs_fix else uvicorn.Config)
