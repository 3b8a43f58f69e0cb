"""The on-call webhook (bot.ports.Webhook) over aiohttp."""

from __future__ import annotations

from typing import Any

import aiohttp


class HttpWebhook:
    def __init__(self, timeout: float = 10.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def post_json(self, url: str, payload: dict[str, Any]) -> str | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.post(url, json=payload) as response,
            ):
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"
