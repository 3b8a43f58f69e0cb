"""The on-call webhook (bot.core.ports.Webhook) over aiohttp.

What it sends says a safeguarding case needs someone: it goes only where the operator
said, as the operator said. Plain http only to this machine (anything further would
cross a network in the clear); redirects are not followed (the page would go where a
third party says); each request is signed, so the receiver can tell it came from this
service: `X-Safeguard-Signature: sha256=<hex HMAC-SHA256 of the body>` with
`policy.alert_webhook_secret`. What went wrong is said without the URL (it may hold a
token), so it can go in the audit log and on /health.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

SIGNATURE_HEADER = "X-Safeguard-Signature"


def webhook_problem(url: str) -> str | None:
    """Why the service must not post to `url` (None: it may): https, or http to loopback."""
    parts = urlsplit(url)
    if parts.scheme == "https":
        return None
    if parts.scheme == "http" and _loopback(parts.hostname or ""):
        return None
    return "the webhook must be https (plain http only to this machine: localhost, 127.0.0.1, ::1)"


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class HttpWebhook:
    def __init__(self, secret: str | None = None, timeout: float = 10.0) -> None:
        self._secret = secret
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def post_json(self, url: str, payload: dict[str, Any]) -> str | None:
        refused = webhook_problem(url)
        if refused is not None:
            return refused
        body = orjson.dumps(payload)
        headers = {"Content-Type": "application/json"}
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(url, data=body, headers=headers, allow_redirects=False) as response,
            ):
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return type(exc).__name__  # its text may name the URL (and a token in it)
