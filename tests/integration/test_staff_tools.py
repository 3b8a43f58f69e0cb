"""Staff act from the staff room: commands, acknowledgements, escalation — all recorded."""

from __future__ import annotations

import asyncio
import csv
import io
import json

import pytest
import yaml
from aiohttp import web

from bot.store import audit
from tests.support.checkins import (
    checkin_config,
    checkin_rooms,
    flag_member,
    flagged_and_scheduled,
)
from tests.support.scene import (
    build_scene,
    export_json,
    open_group_room,
    recorded,
    running_service,
    safeguard_cli,
    until,
)
from tests.support.synapse import free_port

pytestmark = pytest.mark.synapse


async def command(scene, user, text: str) -> str:
    """Send a command; return the bot's reply to it."""
    sent = await user.send_text(scene.staff_room, text)

    async def reply():
        for event in await scene.bot_messages(scene.staff, scene.staff_room):
            relation = event["content"].get("m.relates_to", {})
            if relation.get("m.in_reply_to", {}).get("event_id") == sent:
                return event["content"]["body"]
        return None

    return await until(reply, what=f"the reply to {text!r}")


async def kinds(config) -> list[str]:
    (case,) = (await export_json(config))["cases"]
    return [entry["kind"] for entry in case["entries"]]


async def test_staff_commands_end_to_end(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1s")
    async with running_service(config) as service:
        await open_group_room(scene)
        await scene.staff.invite(scene.staff_room, scene.moderator.user_id)
        await scene.moderator.join(scene.staff_room)  # in the staff room, but not staff
        await flag_member(scene)
        await until(lambda: checkin_rooms(scene), within=30, what="the check-in")

        assert "!case N es" in await command(scene, scene.staff, "!case help")
        listing = await command(scene, scene.staff, "!case list")
        assert "#1" in listing and scene.member.user_id in listing
        assert f"in Group chat ({scene.group})" in listing, "the room by its name"
        assert f"({scene.member.user_id}) in Group chat" in listing, "the member by name too"
        timeline = await command(scene, scene.staff, "!case 1")
        assert "staff alerted" in timeline and f"in Group chat ({scene.group})" in timeline
        assert "(times: Europe/London)" in timeline and "UTC" not in timeline
        rooms = await command(scene, scene.staff, "!rooms")
        assert f"Group chat ({scene.group}) — added by" in rooms
        reply = await command(scene, scene.staff, "!case 1 es CAD-4471 Metropolitan Police")
        assert "CAD-4471" in reply and "vital interests" in reply
        assert "note added" in await command(scene, scene.staff, "!case 1 note seemed calmer")
        assert "claimed" in await command(scene, scene.staff, "!case 1 claim")
        assert "acknowledged" in await command(scene, scene.staff, "!case 1 ack")
        assert "on hold" in await command(scene, scene.staff, "!case 1 hold police enquiry")
        closed = await command(scene, scene.staff, "!case 1 close referred to CAMHS")
        assert "closed" in closed and "audit verify --head" in closed
        assert "reopened" in await command(scene, scene.staff, "!case 1 reopen new information")
        wrong = await command(scene, scene.staff, "!case 1 es")
        assert "!case 1 es <reference> [service]" in wrong
        assert "no case #9" in (await command(scene, scene.staff, "!case 9")).lower()

        # Someone in the staff room who is not staff: no effect, but every one recorded.
        attempts = [
            "!case 1 close not my call",
            "!case 1 es REF-X",
            "!case 1 note mine",
            "!case 1 claim",
            "!case 1 ack",
            "!case 1 hold mine",
            "!case 1 reopen x",
            "!case 1",
            "!case list all",
            "!case help",
            "!case 1 frobnicate",
        ]
        for text in attempts:
            await scene.moderator.send_text(scene.staff_room, text)

        async def all_refused() -> bool:
            async with service.engine.connect() as conn:
                entries = await audit.entries(conn)
            return sum(e.kind == "command_refused" for e in entries) == len(attempts)

        await until(all_refused, what="every refusal recorded")
        replies_to_moderator = [
            e
            for e in await scene.bot_messages(scene.staff, scene.staff_room)
            if "REF-X" in e["content"]["body"] or "mine" in e["content"]["body"]
        ]
        assert replies_to_moderator == []
        # The one usage hint in the room answered staff's own malformed `!case 1 es`.
        assert len(await scene.staff_matching(lambda m: "did not understand" in m)) == 1

    written = await kinds(config)
    for kind in (
        "emergency_services_informed",
        "note",
        "checkin_claimed",
        "alert_acknowledged",
        "held",
        "closed",
        "reopened",
        "command_refused",
    ):
        assert kind in written, kind
    (case,) = (await export_json(config))["cases"]
    assert case["state"] == "open" and case["on_hold"] is True  # reopened by staff, not closed
    assert sum(e["kind"] == "emergency_services_informed" for e in case["entries"]) == 1
    es = next(e for e in case["entries"] if e["kind"] == "emergency_services_informed")
    assert es["personal"]["reference"] == "CAD-4471"
    assert es["personal"]["service"] == "Metropolitan Police" and "service" not in es["facts"]
    assert es["facts"]["lawful_basis"] == "vital interests" and es["facts"]["data_shared"]
    note = next(e for e in case["entries"] if e["kind"] == "note")
    assert note["facts"]["kind"] == "opinion" and note["personal"]["text"] == "seemed calmer"
    refused = next(e for e in case["entries"] if e["kind"] == "command_refused")
    assert refused["personal"]["by"] == scene.moderator.user_id


async def test_tick_reaction_acknowledges_the_alert(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1h")
    async with running_service(config):
        await open_group_room(scene)
        await flag_member(scene)
        alert = await until(
            lambda: scene.last_staff_event(lambda body: body.startswith("Case #1")),
            what="the alert",
        )
        await scene.staff.react(scene.staff_room, alert["event_id"], "✅")
        await until(lambda: recorded(config, "alert_acknowledged"), what="the acknowledgement")


async def test_unacknowledged_alert_is_raised_again_and_paged(synapse, tmp_path):
    """Paged once, signed: the pager can tell the page came from this service."""
    import hashlib
    import hmac
    import json

    received: list[dict] = []
    signed: list[bool] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        expected = "sha256=" + hmac.new(b"pager-secret", body, hashlib.sha256).hexdigest()
        signed.append(request.headers.get("X-Safeguard-Signature") == expected)
        received.append(json.loads(body))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/page", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        scene = await build_scene(synapse, tmp_path)
        config = checkin_config(scene, after="1h")
        data = yaml.safe_load(config.read_text())
        data["policy"] |= {
            "ack_within": "2s",
            "alert_webhook": f"http://127.0.0.1:{port}/page",
            "alert_webhook_secret": "pager-secret",
        }
        config.write_text(yaml.safe_dump(data))
        async with running_service(config):
            await open_group_room(scene)
            await flag_member(scene)
            raised = await until(
                lambda: scene.staff_matching(lambda m: "has not been acknowledged" in m),
                within=30,
                what="the second alert",
            )
            assert scene.staff.user_id in raised[0]
            await until(lambda: recorded(config, "alert_raised_again"), what="the record")
            assert received and received[0]["case"] == 1
            assert received[0]["event"] == "safeguard.alert_unacknowledged"
            assert signed == [True], "signed with policy.alert_webhook_secret"
            await asyncio.sleep(2.5)  # raised once, not every ack_within
            again = await scene.staff_matching(lambda m: "has not been acknowledged" in m)
            assert len(again) == 1 and len(received) == 1
    finally:
        await runner.cleanup()


async def test_export_round_trips_and_audit_verifies(synapse, tmp_path):
    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1h")
    async with running_service(config):
        await flagged_and_scheduled(scene, config)
    document = await export_json(config)
    code, out, _ = await safeguard_cli("cases", "export", "-c", str(config), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    entries = [e for c in document["cases"] for e in c["entries"]] + document["refusals"]
    assert len(rows) == len(entries) and rows[0].keys() >= {"case", "seq", "kind", "hash"}
    assert [int(r["seq"]) for r in rows] == [e["seq"] for e in entries]
    assert json.loads(rows[0]["facts"]) == entries[0]["facts"]
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0 and "audit log OK" in out
    head = document["audit_head"]
    code, out, _ = await safeguard_cli(
        "audit", "verify", "-c", str(config), "--head", f"{head['seq']}:{head['hash']}"
    )
    assert code == 0, out
    code, out, _ = await safeguard_cli("cases", "list", "-c", str(config))
    assert code == 0 and scene.member.user_id in out and "CHECK-IN DUE" in out


async def test_staff_see_their_own_communitys_cases_alone(synapse, tmp_path):
    """Another community's case, in the same database: to these staff its number is one
    that does not exist (shown, acted on, listed or counted), and to the CLI it is there
    with --community naming it, and not with another."""
    from bot.store import cases

    scene = await build_scene(synapse, tmp_path)
    config = checkin_config(scene, after="1h")
    async with running_service(config) as service:
        await open_group_room(scene)
        await flag_member(scene)
        await until(
            lambda: scene.last_staff_event(lambda body: body.startswith("Case #1")),
            what="the alert",
        )
        theirs = cases.NewFlag(
            room_id="!theirs:localhost",
            member_id="@someone:localhost",
            flagger="@their-moderator:localhost",
            method="reaction",
            flag_event_id="$their-flag",
            target_event_id="$their-message",
            reason=None,
            flagged_at=_now(),
            received_at=_now(),
            community="wales",
        )
        async with service.engine.begin() as conn:
            opened = await cases.open_or_corroborate(
                conn,
                service.deployment.provenance,
                theirs,
                steps=["notify"],
                dry_run=False,
                due_at=None,
            )
            # Recorded, not run: this service's steps are not that community's to run.
            await cases.set_fields(conn, opened.case_id, next_attempt_at=None)
        assert opened.case_id == 2

        missing = await command(scene, scene.staff, "!case 99")
        assert await command(scene, scene.staff, "!case 2") == missing.replace("99", "2")
        assert "no case #2" in await command(scene, scene.staff, "!case 2 ack")
        assert "no case #2" in await command(scene, scene.staff, "!case 2 note see them")
        listing = await command(scene, scene.staff, "!case list all")
        assert "#1 " in listing and "#2" not in listing
        stats = await command(scene, scene.staff, "!case stats")
        assert ": 1 " in stats.splitlines()[0], stats
        assert "their-moderator" not in stats and "!theirs" not in stats

    assert not await recorded(config, "alert_acknowledged")
    assert not await recorded(config, "note")
    code, out, _ = await safeguard_cli(
        "cases", "list", "-c", str(config), "--community", "wales", "--json"
    )
    assert code == 0 and [c["number"] for c in json.loads(out)["cases"]] == [2]
    code, _, err = await safeguard_cli(
        "cases", "show", "2", "-c", str(config), "--community", "default"
    )
    assert code == 1 and "no case #2" in err
    code, out, _ = await safeguard_cli(
        "cases", "export", "-c", str(config), "--community", "default"
    )
    assert code == 0 and [c["number"] for c in json.loads(out)["cases"]] == [1]
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0 and "audit log OK" in out, "one chain, verified whole"


def _now():
    import datetime as dt

    return dt.datetime.now(dt.UTC)
