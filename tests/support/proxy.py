"""A pass-through HTTP proxy, in front of Synapse or of the service, that can misbehave on cue.

It decides nothing: every request it lets through reaches the real upstream
unchanged unless a test says otherwise. It can:
- hold chosen requests in flight (kill the service at an exact point, or keep a
  Synapse transaction in flight so the next events queue in Synapse's memory);
- stand in for an upstream that is down (502);
- let a request take effect upstream and lose the answer (502 to the caller);
- rewrite a request on its way (Synapse created the room but never sent the invite);
- swallow a request: answer it 200 without passing it on (a transaction Synapse
  believes delivered that never arrived).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.synapse import free_port

Predicate = Callable[[web.Request], bool]


class HoldingProxy:
    def __init__(
        self, upstream: str, *, port: int | None = None, cancel_with_caller: bool = False
    ) -> None:
        self.upstream = upstream
        # A caller that hangs up ends its request upstream too (as Synapse ends a /sync
        # whose caller left); otherwise the request runs on to its answer.
        self._cancel_with_caller = cancel_with_caller
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.held: list[str] = []
        self.held_event = asyncio.Event()
        self.forwarded: list[tuple[str, str, bytes]] = []  # (method, path, body) let through
        self._hold: Predicate = lambda request: False
        self._release = asyncio.Event()
        self.down = False
        self._drop = False
        self._lose_answer: Predicate = lambda request: False
        self._rewrite: list[tuple[Predicate, Callable[[dict[str, Any]], dict[str, Any]]]] = []
        self.lost_answers: list[str] = []
        self._swallow: Callable[[web.Request, bytes], bool] = lambda request, body: False
        self.swallowed: list[tuple[str, bytes]] = []  # (path, body) answered 200, not passed on
        self.swallowed_event = asyncio.Event()
        self.answers: list[tuple[str, int]] = []  # (path, status) of what upstream answered
        self.requested: list[str] = []  # every request's path and query, as it came
        self.in_flight: Counter[str] = Counter()  # requests by path, waiting upstream now
        self.most_in_flight: Counter[str] = Counter()  # the most ever waiting at once
        # (path and query, bytes) of what upstream answered
        self.answer_sizes: list[tuple[str, int]] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    def hold(self, predicate: Predicate) -> None:
        self._hold = predicate
        self._release.clear()
        self.held_event.clear()

    def release(self, *, drop: bool = False) -> None:
        """Let held requests go on upstream, or (drop) fail them as a dead connection would."""
        self._drop = drop
        self._hold = lambda request: False
        self._release.set()

    def lose_answer(self, predicate: Predicate, *, once: bool = True) -> None:
        """The next matching request takes effect upstream; its caller gets a 502."""

        def matching(request: web.Request) -> bool:
            if not predicate(request):
                return False
            if once:
                self._lose_answer = lambda request: False
            return True

        self._lose_answer = matching

    def swallow(self, predicate: Callable[[web.Request, bytes], bool]) -> None:
        """Answer the next request matching (request, body) 200 `{}`; pass nothing on."""

        def matching(request: web.Request, body: bytes) -> bool:
            if not predicate(request, body):
                return False
            self._swallow = lambda request, body: False
            return True

        self.swallowed_event.clear()
        self._swallow = matching

    def rewrite(
        self, predicate: Predicate, change: Callable[[dict[str, Any]], dict[str, Any]]
    ) -> None:
        """Change the JSON body of the next matching request before it goes upstream."""
        self._rewrite.append((predicate, change))

    def bodies(self, path_part: str) -> list[bytes]:
        return [body for _method, path, body in self.forwarded if path_part in path]

    def delivered(self) -> set[str]:
        """The ids of the events in the transactions let through (a proxy in front of the
        service: what Synapse pushed and the service received)."""
        return {
            event.get("event_id")
            for body in self.bodies("/transactions/")
            for event in json.loads(body).get("events", [])
        }

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        self.requested.append(str(request.rel_url))
        path = request.path
        self.in_flight[path] += 1
        self.most_in_flight[path] = max(self.most_in_flight[path], self.in_flight[path])
        try:
            return await self._pass_on(request)
        finally:
            self.in_flight[path] -= 1

    async def _pass_on(self, request: web.Request) -> web.StreamResponse:
        if self.down:
            return web.Response(status=502, text="upstream down")
        if self._hold(request):
            self.held.append(f"{request.method} {request.path}")
            self.held_event.set()
            await self._release.wait()
            if self._drop:
                return web.Response(status=502, text="dropped")
        body = await request.read()
        if self._swallow(request, body):
            self.swallowed.append((request.path, body))
            self.swallowed_event.set()
            return web.json_response({})
        for index, (predicate, change) in enumerate(self._rewrite):
            if predicate(request):
                body = json.dumps(change(json.loads(body))).encode()
                del self._rewrite[index]
                break
        lose = self._lose_answer(request)
        assert self._session is not None
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
        }
        async with self._session.request(
            request.method, f"{self.upstream}{request.rel_url}", headers=headers, data=body
        ) as upstream:
            answer = await upstream.read()
            self.forwarded.append((request.method, request.path, body))
            self.answers.append((request.path, upstream.status))
            self.answer_sizes.append((request.path_qs, len(answer)))
            if lose:
                self.lost_answers.append(f"{request.method} {request.path}")
                return web.Response(status=502, text="answer lost")
            return web.Response(
                status=upstream.status,
                body=answer,
                content_type=upstream.content_type,
                charset=upstream.charset,
            )

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=True)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=self._cancel_with_caller,
            # Stopped, it is gone, as a homeserver that died is: what is in flight is cut
            # within a second, not served for a minute of graceful shutdown (a long poll
            # still answered, or a request on a kept connection taken and held).
            shutdown_timeout=1.0,
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> HoldingProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
