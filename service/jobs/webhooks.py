"""Signed webhooks to allowed hosts only, retried with exponential backoff a bounded number of times.

Signature (Stripe's convention): header `flux-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
keyed with FLUX_WEBHOOK_SECRET; `flux-webhook-id` is the same on every retry of one event.
"""

import asyncio
import hashlib
import hmac
import ipaddress
import socket
import time
from urllib.parse import urlsplit

import httpx

from service.observe import WEBHOOK_FAILURES, logger
from service.schema import Refused

SIGNATURE_HEADER, ID_HEADER = "flux-signature", "flux-webhook-id"
TIMEOUT_S = 10


def sign(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """For receivers: the `flux-signature` header matches the body, and is recent."""
    parts = dict(part.split("=", 1) for part in header.split(",") if "=" in part)
    if not parts.get("t", "").isdigit() or abs(time.time() - int(parts["t"])) > tolerance_s:
        return False
    return hmac.compare_digest(parts.get("v1", ""), sign(secret, int(parts["t"]), body))


class Webhooks:
    def __init__(self, hosts: tuple[str, ...], secret: str | None, attempts: int, backoff_s: float) -> None:
        self.names = {host.lower() for host in hosts if not _network(host)}
        self.networks = [network for host in hosts if (network := _network(host))]
        self.secret, self.attempts, self.backoff_s = secret, attempts, backoff_s

    def check(self, url: str) -> None:
        """Refuse (naming the `webhook` field) a destination outside FLUX_WEBHOOK_HOSTS."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Refused("webhook", f"{url!r} is not an http(s) URL")
        host = parts.hostname.lower()
        address = _address(host)
        listed = host in self.names if address is None else any(address in net for net in self.networks)
        if not listed:
            allowed = ", ".join(sorted(self.names) + [str(net) for net in self.networks]) or "none (webhooks off)"
            raise Refused("webhook", f"host {host!r} is not allowed (FLUX_WEBHOOK_HOSTS: {allowed})")

    async def _resolves_safely(self, host: str) -> bool:
        """Every address of `host` is public, or inside a listed network (no requests into private ranges
        through a listed name that resolves there)."""
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
        return all(addr.is_global or any(addr in net for net in self.networks) for addr in addresses)

    async def deliver(self, url: str, event_id: str, body: bytes) -> bool:
        """POST `body` until a 2xx answer or the attempts run out; False when given up."""
        host = urlsplit(url).hostname or ""
        if not await self._resolves_safely(host):
            logger.warning("webhook %s: %s resolves to a private address that is not listed", event_id, host)
            WEBHOOK_FAILURES.labels(reason="private_address").inc()
            return False
        async with httpx.AsyncClient(timeout=TIMEOUT_S, follow_redirects=False) as client:
            for attempt in range(self.attempts):
                if attempt:
                    await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
                timestamp = int(time.time())
                headers = {
                    "content-type": "application/json",
                    ID_HEADER: event_id,
                    SIGNATURE_HEADER: f"t={timestamp},v1={sign(self.secret or '', timestamp, body)}",
                }
                try:
                    answer = await client.post(url, content=body, headers=headers)
                    if answer.is_success:
                        return True
                    reason = f"HTTP {answer.status_code}"
                except httpx.HTTPError as error:
                    reason = type(error).__name__
                logger.warning("webhook %s attempt %d/%d: %s", event_id, attempt + 1, self.attempts, reason)
                WEBHOOK_FAILURES.labels(reason="attempt").inc()
        WEBHOOK_FAILURES.labels(reason="given_up").inc()
        return False


def _network(host: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    try:
        return ipaddress.ip_network(host, strict=False)
    except ValueError:
        return None


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None
