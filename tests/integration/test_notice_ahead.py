"""The member's notice sent ahead of their case, against a real Synapse: told once, whatever
dies when (bot/steps/notify_ahead.py).

With rooms made ahead (the default), a flag decided from what is known as its push is
recorded reserves a room in that record and sends the notice the moment it commits; the
case is opened after. These tests kill the service between the two — after the notice
went (the attempt that took effect), and after the reservation committed but before
anything was sent — and check that the next run opens the case, records the notice as
sent, and the member has one invite and one notice. Both kinds of DM: in the clear, and
end-to-end encrypted (the default).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from appservice.config import load_config
from appservice.database import create_engine
from bot.referral.decision import Referral
from bot.steps.notify_ahead import NoticesAhead
from bot.store import ready_rooms
from tests.integration.test_faults import all_referrals_done
from tests.support.scene import (
    BOT,
    Scene,
    build_scene,
    export_json,
    open_group_room,
    running_service,
    scene_config,
    until,
)

pytestmark = [pytest.mark.synapse, pytest.mark.faults]
ENCRYPTED = pytest.mark.parametrize("encrypted", [False, True], ids=["clear", "encrypted"])


def ahead_config(scene: Scene, encrypted: bool) -> Path:
    return scene_config(
        scene,
        policy={"ready_dm_rooms": 2},
        encryption={"private_rooms": encrypted},
        reconcile={"interval": "2s"},
    )


async def flag_member(scene: Scene) -> str:
    said = await scene.member.send_text(scene.group, "I don't think I can go on")
    return await scene.moderator.react(scene.group, said, "🚨")


async def rooms_ready(service: Any) -> bool:
    return service.ready_rooms.ready >= 1 and service.homeserver.direct_rooms_known("x") is not None


async def reservations(config: Path) -> list[ready_rooms.Reservation]:
    engine = create_engine(load_config(config).database_url)
    try:
        async with engine.connect() as conn:
            return await ready_rooms.reservations(conn)
    finally:
        await engine.dispose()


def held_before_the_case() -> tuple[asyncio.Event, Any]:
    """A stand-in for `Referral._open` that never opens the case (the service as killed
    before it), and the event set once the flag reached it."""
    reached = asyncio.Event()

    async def never_opens(self: Referral, *args: Any) -> None:
        reached.set()
        await asyncio.Event().wait()

    return reached, never_opens


async def assert_told_once_then_removed(scene: Scene, config: Path) -> dict[str, Any]:
    """One invite, one notice (whatever its encryption), one kick after it; the case's
    record says the notice went ahead of it. Returns the case as exported."""
    invites = await scene.member.invites()
    assert len(invites) == 1, f"{len(invites)} DM invites"
    (dm,) = invites
    await scene.member.join(dm)
    notices = [
        e
        for e in await scene.member.messages(dm)
        if e["sender"] == BOT and e["type"] in ("m.room.message", "m.room.encrypted")
    ]
    assert len(notices) == 1, f"{len(notices)} notices"
    kicks = [
        e
        for e in await scene.owner.messages(scene.group, limit=200)
        if e["type"] == "m.room.member"
        and e.get("state_key") == scene.member.user_id
        and e["content"].get("membership") == "leave"
    ]
    assert len(kicks) == 1, f"removed {len(kicks)} times"
    assert notices[0]["origin_server_ts"] <= kicks[0]["origin_server_ts"], "told first"
    (case,) = (await export_json(config))["cases"]
    flagged = next(e for e in case["entries"] if e["kind"] == "flagged")
    assert flagged["facts"].get("told_ahead") is True, "decided and told as the push came"
    notify = next(e for e in case["entries"] if e["kind"] == "step.notify")
    assert notify["facts"]["event"] == notices[0]["event_id"]
    assert notify["facts"]["room_made_ahead"] is True
    assert await reservations(config) == [], "taken over by the case"
    return case


@ENCRYPTED
async def test_a_notice_sent_ahead_is_the_case_notice(synapse, tmp_path, encrypted):
    scene = await build_scene(synapse, tmp_path)
    config = ahead_config(scene, encrypted)
    async with running_service(config) as service:
        await open_group_room(scene)
        await until(lambda: rooms_ready(service), what="a room made ahead, m.direct read")
        await flag_member(scene)
        await until(lambda: all_referrals_done(config, 1), within=60, what="the case")
    await assert_told_once_then_removed(scene, config)


@ENCRYPTED
async def test_killed_after_the_notice_went_ahead_before_the_case_opened(
    synapse, tmp_path, monkeypatch, encrypted
):
    """The attempt that took effect: invite and notice sent, no case yet. The next run
    opens it and finds both, and sends neither again."""
    scene = await build_scene(synapse, tmp_path)
    config = ahead_config(scene, encrypted)
    reached, never_opens = held_before_the_case()

    async with running_service(config) as service:
        await open_group_room(scene)
        await until(lambda: rooms_ready(service), what="a room made ahead, m.direct read")
        with monkeypatch.context() as patched:
            patched.setattr(Referral, "_open", never_opens)
            await flag_member(scene)
            await asyncio.wait_for(reached.wait(), 20)
            (notice,) = service.notices_ahead._pending.values()
            assert notice.sending is not None
            invited, sent = await asyncio.wait_for(asyncio.shield(notice.sending), 30)
            assert not isinstance(invited, BaseException) and not isinstance(sent, BaseException)
        # Stopped with the flag's case never opened: as killed there.
    assert len(await reservations(config)) == 1, "the reservation outlives the run"
    assert (await export_json(config))["cases"] == []
    async with running_service(config):
        await until(lambda: all_referrals_done(config, 1), within=60, what="the case")
    await assert_told_once_then_removed(scene, config)


@ENCRYPTED
async def test_killed_after_the_reservation_before_anything_was_sent(
    synapse, tmp_path, monkeypatch, encrypted
):
    """The room reserved with the push, nothing sent: the next run tells the member once."""
    scene = await build_scene(synapse, tmp_path)
    config = ahead_config(scene, encrypted)
    reached, never_opens = held_before_the_case()

    async def never_sends(self: NoticesAhead, notice: Any) -> tuple[Any, Any]:
        await asyncio.Event().wait()  # killed before its calls were made
        raise AssertionError("unreachable")

    async with running_service(config) as service:
        await open_group_room(scene)
        await until(lambda: rooms_ready(service), what="a room made ahead, m.direct read")
        with monkeypatch.context() as patched:
            patched.setattr(Referral, "_open", never_opens)
            patched.setattr(NoticesAhead, "_send", never_sends)
            await flag_member(scene)
            await asyncio.wait_for(reached.wait(), 20)
            (notice,) = service.notices_ahead._pending.values()
            assert notice.reserved, "the push's record reserved the room"
    assert notice.sending is not None
    notice.sending.cancel()
    assert len(await reservations(config)) == 1, "the reservation outlives the run"
    assert await scene.member.invites() == {}, "nothing was sent"
    async with running_service(config):
        await until(lambda: all_referrals_done(config, 1), within=60, what="the case")
    await assert_told_once_then_removed(scene, config)


async def test_a_reply_written_before_the_case_opened_reaches_staff(synapse, tmp_path, monkeypatch):
    """The member answers the notice before their case exists (its flag held in its lane):
    what they wrote waits for the case, and staff read it then."""
    scene = await build_scene(synapse, tmp_path)
    config = ahead_config(scene, False)
    release = asyncio.Event()
    opened = Referral._open

    async def held(self: Referral, *args: Any) -> None:
        await release.wait()
        await opened(self, *args)

    async with running_service(config) as service:
        await open_group_room(scene)
        await until(lambda: rooms_ready(service), what="a room made ahead, m.direct read")
        monkeypatch.setattr(Referral, "_open", held)
        await flag_member(scene)
        (notice,) = await until(lambda: list(service.notices_ahead._pending.values()))
        assert notice.sending is not None
        await asyncio.wait_for(asyncio.shield(notice.sending), 30)
        (dm,) = await scene.member.invites()
        await scene.member.join(dm)
        await scene.member.send_text(dm, "ok I will call them")
        await asyncio.sleep(1.5)  # its turn comes while the case is still held
        assert (await export_json(config))["cases"] == [], "still held"
        release.set()
        await until(
            lambda: scene.staff_matching(lambda m: "Case #1" in m and "ok I will call them" in m),
            within=60,
            what="the relayed reply",
        )
