"""The Application Service API over HTTP: parse, authenticate, hand on — nothing else.

Decisions live in `bot/`. This module's promises to Synapse, which retries any
answer but 200 for ever and holds everything behind it: every transaction we
acknowledge is durably recorded first (503 if it cannot be, so Synapse
retries); one malformed or poisoned event never fails a transaction (it is
skipped and counted); no input gets a 500. Only a body that is not a
transaction at all (not JSON, not an object, nesting the parser refuses) gets a 400.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bot.core.metrics import Metrics
from bot.intake.accept import Intake, StorageUnavailable, well_formed, without_lone_surrogates
from bot.intake.json_body import parse_body
from bot.intake.stranded import StrandedWatch

log = logging.getLogger(__name__)

# A legal Synapse transaction (100 PDUs of up to 64 KiB, plus EDUs) fits with room to spare.
MAX_BODY_BYTES = 32 * 1024 * 1024
APP_PREFIX = "/_matrix/app/"
# The health checks' report (`fresh`: not one reused from moments ago).
HealthReport = Callable[..., Awaitable[tuple[bool, dict[str, dict[str, Any]]]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def matrix_error(status: int, errcode: str, error: str) -> web.Response:
    return web.json_response({"errcode": errcode, "error": error}, status=status)


async def _method_not_allowed(request: web.Request) -> web.Response:
    return matrix_error(405, "M_UNRECOGNIZED", "Method not allowed on this endpoint")


async def _unrecognized(request: web.Request) -> web.Response:
    return matrix_error(404, "M_UNRECOGNIZED", "Unrecognized request")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip()
    return None


def _presented_token(request: web.Request) -> str | None:
    # Older homeservers send the token as a query parameter.
    return _bearer(request) or request.query.get("access_token")


def _token_matches(presented: str | None, expected: bytes) -> bool:
    # Constant time: the comparison must not leak how much of a guess was right.
    return hmac.compare_digest((presented or "").encode(), expected)


# What must work for the service to take a flag and act on it now: /ready's checks.
READY_CHECKS = ("database", "homeserver", "encryption", "inbox")


def summary(checks: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What anyone who can reach /health may read: each check's name and whether it is
    ok — no room or case, no error text (those name rooms, people and URLs)."""
    return {name: {"ok": bool(check.get("ok"))} for name, check in checks.items()}


class AppServiceServer:
    def __init__(
        self,
        intake: Intake,
        hs_token: str,
        metrics: Metrics,
        health: HealthReport,
        refresh_metrics: Callable[[], Awaitable[None]] | None = None,
        admin_token: str | None = None,
        stranded: StrandedWatch | None = None,
    ) -> None:
        self._intake = intake
        self._stranded = stranded
        self._hs_token = hs_token.encode()
        self._admin_token = admin_token.encode() if admin_token else None
        self._metrics = metrics
        self._health = health
        self._refresh_metrics = refresh_metrics

    def app(self) -> web.Application:
        # No middleware: aiohttp runs middlewares on every request, and the transaction
        # route is the hot path. The token check and Matrix-shaped errors are wrapped
        # around each route instead, and a catch-all route answers what nothing else does.
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        routes = (
            ("PUT", "/_matrix/app/v1/transactions/{txn_id}", self.transaction),
            ("GET", "/_matrix/app/v1/users/{user_id}", self.query_user),
            ("GET", "/_matrix/app/v1/rooms/{alias}", self.query_alias),
            ("POST", "/_matrix/app/v1/ping", self.ping),
            ("GET", "/health", self.health),
            ("GET", "/live", self.live),
            ("GET", "/ready", self.ready),
            ("GET", "/metrics", self.metrics),
        )
        for method, path, handler in routes:
            app.router.add_route(method, path, self._guarded(handler))
            if method == "GET":  # as aiohttp's add_get does: load balancers probe with HEAD
                app.router.add_route("HEAD", path, self._guarded(handler))
            # Any other method on a known path (the same resource, matched second).
            app.router.add_route("*", path, self._guarded(_method_not_allowed))
        app.router.add_route("*", "/{tail:.*}", self._guarded(_unrecognized))
        return app

    def _guarded(self, handler: Handler) -> Handler:
        """The handler behind the Application Service API's token check, its errors in
        Matrix's shape."""
        expected = self._hs_token
        forbidden = self._metrics.transactions.labels("forbidden")

        async def guarded(request: web.Request) -> web.StreamResponse:
            if request.path.startswith(APP_PREFIX) and not _token_matches(
                _presented_token(request), expected
            ):
                forbidden.inc()
                return matrix_error(403, "M_FORBIDDEN", "Missing or invalid hs_token")
            try:
                return await handler(request)
            except web.HTTPRequestEntityTooLarge:
                return matrix_error(413, "M_TOO_LARGE", f"Body larger than {MAX_BODY_BYTES} bytes")

        return guarded

    # ---- the Application Service API ------------------------------------------------

    async def transaction(self, request: web.Request) -> web.Response:
        txn_id = request.match_info["txn_id"]
        body = await request.read()
        try:
            payload, may_hold_surrogates = parse_body(body)
        except (ValueError, RecursionError):  # not JSON, bad UTF-8, or nested past the parser
            self._metrics.transactions.labels("bad_json").inc()
            return matrix_error(400, "M_NOT_JSON", "Body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("events", []), list):
            self._metrics.transactions.labels("bad_json").inc()
            return matrix_error(400, "M_BAD_JSON", "'events' must be a list of events")
        events = payload.get("events", [])
        if may_hold_surrogates:
            # A lone surrogate in content cannot be stored or hashed: replace it. (An id
            # holding one is malformed: it is left as it is, for the intake to skip.)
            events = [
                without_lone_surrogates(event) if well_formed(event) else event for event in events
            ]
        stranded = self._stranded
        if stranded is not None and stranded.refuse(txn_id):
            # A nudge: not recorded, so Synapse keeps it and resends it after the one it
            # stranded (bot/intake/stranded.py). Nothing is lost.
            self._metrics.transactions.labels("nudged").inc()
            return matrix_error(503, "M_UNKNOWN", "Resend from the oldest transaction")
        try:
            await self._intake.accept(txn_id, events, valid_text=not may_hold_surrogates, body=body)
        except Exception as exc:
            # Not acknowledged, so Synapse retries: nothing recorded is nothing lost.
            self._metrics.transactions.labels("unrecorded").inc()
            self._metrics.errors.labels("database").inc()
            if isinstance(exc, StorageUnavailable):
                log.error("transaction %s not recorded, asking for a retry: %s", txn_id, exc)
            else:
                log.exception("transaction %s could not be recorded; asking for a retry", txn_id)
            return matrix_error(503, "M_UNKNOWN", "Cannot record the transaction now; retry")
        if stranded is not None:
            stranded.recorded(txn_id)
        return web.Response(body=b"{}", content_type="application/json")

    async def query_user(self, request: web.Request) -> web.Response:
        # The bot creates no users on demand.
        return matrix_error(404, "M_NOT_FOUND", "No such user")

    async def query_alias(self, request: web.Request) -> web.Response:
        return matrix_error(404, "M_NOT_FOUND", "No such room alias")

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({})

    # ---- operations -----------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        """Whether the service can keep its promises, for anyone (a load balancer, a
        monitor); with `?detail=1` and the admin token, why not, for an operator."""
        detail = request.query.get("detail", "0") not in ("", "0", "false")
        if detail:
            if self._admin_token is None:
                return matrix_error(
                    403, "M_FORBIDDEN", "Set appservice.admin_token to read the detail"
                )
            if not _token_matches(_bearer(request), self._admin_token):
                return matrix_error(403, "M_FORBIDDEN", "Missing or invalid admin token")
        healthy, checks = await self._health(fresh=detail)
        return web.json_response(
            {
                "status": "ok" if healthy else "unavailable",
                "checks": checks if detail else summary(checks),
            },
            status=200 if healthy else 503,
        )

    async def live(self, request: web.Request) -> web.Response:
        """200 while the process runs its event loop (this answer is the proof): for a
        supervisor deciding whether to restart it. Nothing else is asked."""
        return web.json_response({"status": "live"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 only when a flag would be acted on now: the database records, the
        homeserver answers, encryption (if on) works, the flag lane is not stalled.
        From the shared health report (reused for moments: as cheap as /health), and
        as free of ids: only each check's name and whether it is ok."""
        _healthy, checks = await self._health()
        needed = {name: checks[name] for name in READY_CHECKS if name in checks}
        ready = all(check.get("ok") for check in needed.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready", "checks": summary(needed)},
            status=200 if ready else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        if self._refresh_metrics is not None:
            try:
                await asyncio.wait_for(self._refresh_metrics(), timeout=5)
            except Exception:  # stale gauges beat a failed scrape
                log.warning("could not refresh database gauges for /metrics", exc_info=True)
        return web.Response(
            body=generate_latest(self._metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )
