"""Completion webhooks: which targets a plan may call back, and how each call is signed.

Targets (SSRF): only http(s) URLs whose host resolves to public addresses. Loopback, private
(RFC 1918, unique-local), link-local (169.254.0.0/16: cloud metadata endpoints), shared,
multicast, reserved and unspecified addresses are refused unless the operator allows private
targets (`TRAINPLAN_WEBHOOK_ALLOW_PRIVATE`). The check runs at submit and again before every
send (the name may resolve elsewhere by then), and senders never follow redirects.

Signatures: every call carries `Trainplan-Signature: t=<unix seconds>,v1=<hex>` where the hex is
HMAC-SHA256 over `<t>.<body>` with the tenant's secret, itself HMAC-SHA256 of the tenant's name
under the operator's `TRAINPLAN_WEBHOOK_SECRET` (so each tenant's secret differs and none is
stored). A receiver recomputes it and rejects a timestamp older than a few minutes (replay).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

SIGNATURE_HEADER = "Trainplan-Signature"
DELIVERY_HEADER = "Trainplan-Delivery"
TOLERANCE_S = 300  # what `verify` accepts between the signed time and now


class RefusedTarget(ValueError):
    """A callback URL the service will not call."""


def check_target(url: str, *, allow_private: bool) -> None:
    """Raise RefusedTarget unless `url` is an http(s) URL whose host resolves only to
    addresses the operator lets the service call."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RefusedTarget(f"scheme {parts.scheme!r}: only http and https are called back")
    if not parts.hostname:
        raise RefusedTarget("the URL has no host")
    if parts.username or parts.password:
        raise RefusedTarget("credentials in the URL are not sent: sign-checking is the auth")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as exc:
        raise RefusedTarget(f"host {parts.hostname!r} does not resolve ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not allow_private and not address.is_global:
            raise RefusedTarget(
                f"host {parts.hostname!r} resolves to {address}, a private, loopback, "
                "link-local or reserved address (the operator may allow private targets)"
            )


def tenant_secret(operator_secret: str, tenant: str) -> str:
    """The tenant's signing secret: derived, never stored."""
    return hmac.new(operator_secret.encode(), tenant.encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for `body` sent at `timestamp` (now by default)."""
    stamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={stamp},v1={digest}"


def verify(secret: str, body: bytes, header: str, now: float | None = None) -> bool:
    """What a receiver runs: the signature matches and is recent (no replays)."""
    try:
        fields = dict(part.split("=", 1) for part in header.split(","))
        stamp = int(fields["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - stamp) > TOLERANCE_S:
        return False
    expected = sign(secret, body, stamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, fields.get("v1", ""))
