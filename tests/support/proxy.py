"""A pass-through HTTP proxy in front of Synapse that can hold chosen requests in flight.

It decides nothing: every request it lets through reaches the real Synapse
unchanged. Holding one (e.g. the kick) lets a test kill the service at an
exact point of the workflow, or stand in for a Synapse that is briefly down.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
from aiohttp import web

from tests.support.synapse import free_port


class HoldingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.held: list[str] = []
        self.held_event = asyncio.Event()
        self._hold: Callable[[web.Request], bool] = lambda request: False
        self._release = asyncio.Event()
        self.down = False
        self._drop = False
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def hold(self, predicate: Callable[[web.Request], bool]) -> None:
        self._hold = predicate
        self._release.clear()

    def release(self, *, drop: bool = False) -> None:
        """Let held requests go on to Synapse, or (drop) fail them as a dead connection would."""
        self._drop = drop
        self._hold = lambda request: False
        self._release.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.Response(status=502, text="upstream down")
        if self._hold(request):
            self.held.append(f"{request.method} {request.path}")
            self.held_event.set()
            await self._release.wait()
            if self._drop:
                return web.Response(status=502, text="dropped")
        assert self._session is not None
        async with self._session.request(
            request.method,
            f"{self.upstream}{request.rel_url}",
            headers={k: v for k, v in request.headers.items() if k.lower() != "host"},
            data=await request.read(),
        ) as upstream:
            body = await upstream.read()
            return web.Response(
                status=upstream.status,
                body=body,
                content_type=upstream.content_type,
                charset=upstream.charset,
            )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=True)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
