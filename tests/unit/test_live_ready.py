"""/live and /ready: for supervisors and load balancers, cheap and naming nothing."""

from __future__ import annotations

import json
from typing import Any

from appservice.server import AppServiceServer
from bot.core.metrics import Metrics


def server(checks: dict[str, dict[str, Any]]) -> AppServiceServer:
    async def report(**_: Any) -> tuple[bool, dict[str, dict[str, Any]]]:
        return all(check["ok"] for check in checks.values()), checks

    return AppServiceServer(None, "hs-token", Metrics(), report)  # type: ignore[arg-type]


WORKING = {
    "database": {"ok": True, "inbox_backlog": 0},
    "homeserver": {"ok": True, "connected": True},
    "encryption": {"ok": True, "enabled": True, "device_id": "SAFEGUARDX"},
    "inbox": {"ok": True, "lanes": {}},
    "staff_room": {"ok": False, "room": "!staff:example.org", "problem": "not joined"},
}


async def test_ready_while_a_flag_would_be_acted_on_even_if_staff_cannot_be_reached():
    """Members are told and removed while the staff room is away (alerts wait): ready."""
    response = await server(WORKING).ready(None)  # type: ignore[arg-type]
    body = json.loads(response.body)
    assert response.status == 200 and body["status"] == "ready"
    assert body["checks"] == {name: {"ok": True} for name in WORKING if name != "staff_room"}
    assert "example.org" not in response.body.decode()


async def test_not_ready_when_what_a_flag_needs_fails():
    for failing in ("database", "homeserver", "encryption", "inbox"):
        checks = {**WORKING, failing: {"ok": False, "problem": "!room:example.org is away"}}
        response = await server(checks).ready(None)  # type: ignore[arg-type]
        body = json.loads(response.body)
        assert response.status == 503 and body["checks"][failing] == {"ok": False}
        assert "example.org" not in response.body.decode()


async def test_live_asks_nothing():
    async def report(**_: Any) -> Any:
        raise AssertionError("/live ran the health checks")

    response = await AppServiceServer(None, "t", Metrics(), report).live(None)  # type: ignore[arg-type]
    assert response.status == 200
