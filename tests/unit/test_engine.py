"""The step engine: every step of a case exactly once, whatever fails, and someone is told.

A fake homeserver "kills the process" at the N-th call (before or just after
the homeserver acted); a fresh engine on the same database then finishes the
case, after Synapse "restarted" and forgot its transaction ids. For every N:
one DM room, one notice, one kick (after the notice), one alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt

import pytest

from bot.config.settings import MessageTemplates
from bot.core.audit_chain import verify_chain
from bot.core.ports import MESSAGE_MARKER_KEY, Refused
from bot.steps import CASE_STEPS
from bot.store import audit, cases, outbox
from tests.support.fake_homeserver import Crash
from tests.support.policy import (
    GROUP,
    MEMBER,
    MOD,
    NOW,
    PROVENANCE,
    REFERRAL_STEPS,
    STAFF,
    deployment,
    homeserver,
    new_case,
    notices,
    open_and_begin,
    run_until_waiting,
    step_engine,
    steps,
)

# The alert goes as soon as the notice and the removal are settled: a promise, it runs
# before the steps that come after them in the policy's order.
AT_ONCE = [
    "notify",
    "remove",
    "alert",
    "room_notice",
    "schedule",
    "redact_flag",
    "redact_message",
    "debrief",
    # Last: bookkeeping never competes with what the member and staff wait for.
    "mark_dm",
]


def _marker(room) -> str:
    from bot.core.ports import ROOM_MARKER_KEY

    return room.state.get(("m.room.create", ""), {}).get(ROOM_MARKER_KEY) or ""


async def kinds(engine, case_id: int | None = None) -> list[str]:
    async with engine.connect() as conn:
        return [e.kind for e in await audit.entries(conn, case_id=case_id)]


async def test_clean_run_order_and_record(engine):
    hs = homeserver()
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    assert done["checkin"].status == "pending"  # waits for its due time
    assert done["escalate"].status == "pending"  # waits for ack_within
    (notice,) = notices(hs, "notify")
    assert hs.kicks == [(GROUP, MEMBER)]
    kick_event = next(e for e in hs.rooms[GROUP].events if e["type"] == "m.room.member")
    assert notice["order"] < kick_event["order"], "the member is told before removal"
    (alert,) = notices(hs, "alert")
    assert alert["content"]["body"].startswith(f"Case #{case_id}")
    assert len(notices(hs, "room_notice")) == 1
    assert await kinds(engine, case_id) == ["flagged"] + [f"step.{s}" for s in AT_ONCE]
    assert hs.redactions == [(GROUP, "$flag", "Removed by a moderator")], "the flag is gone"
    # The member's DM marked in m.direct, but only once the member is out and staff know:
    # that write must not compete with theirs on the homeserver.
    (dm,) = [room.room_id for room in hs.rooms.values() if notice in room.events]
    assert hs.direct[MEMBER] == [dm]
    marked = hs.calls.index("remember_direct_room")
    assert marked > hs.calls.index("kick")
    assert marked > max(i for i, call in enumerate(hs.calls) if call == "send")
    (debrief,) = notices(hs, "debrief")
    assert "Case #1" in debrief["content"]["body"]
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
        assert case is not None and case.next_attempt_at is not None
        # The next look is the earliest due step: the escalation, ack_within after the alert.
        assert case.next_attempt_at < NOW + dt.timedelta(hours=1)


def _crash_points() -> list[int]:
    # Enough to cover every call of a clean run, before (N) and just after (-N) it acts.
    return [*range(1, 20), *range(-1, -20, -1)]


@pytest.mark.parametrize("crash_at", _crash_points())
async def test_crash_anywhere_then_resume_does_everything_once(engine, crash_at):
    hs = homeserver()
    case_id = await new_case(engine)
    hs.crash_at = crash_at
    with contextlib.suppress(Crash):
        await step_engine(engine, hs).run_case(case_id)
    hs.crash_at = None
    hs.txn_ids.clear()  # Synapse restarted too: its txn-id dedupe cannot save us
    await step_engine(engine, hs).run_case(case_id)

    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS), done
    dm_rooms = [r for r in hs.rooms.values() if r.members.get(MEMBER) == "invite"]
    assert len(dm_rooms) == 1, "exactly one DM room"
    assert len(notices(hs, "notify")) == 1
    assert hs.kicks == [(GROUP, MEMBER)]
    assert len(notices(hs, "alert")) == 1
    assert len(notices(hs, "room_notice")) == 1
    async with engine.connect() as conn:
        rows = [row async for row in audit.chain_rows(conn)]
    assert verify_chain(rows).ok


async def test_dm_room_created_but_invite_lost_is_mended_before_removal(engine):
    """Synapse created the DM room and died before inviting the member (seen in real life)."""
    hs = homeserver()
    hs.create_dies_before_invites = True
    case_id = await new_case(engine)
    with contextlib.suppress(Crash):
        await step_engine(engine, hs).run_case(case_id)
    (dm,) = [r for r in hs.rooms.values() if _marker(r).endswith(":dm")]
    assert MEMBER not in dm.members, "the earlier attempt took effect: room, no invite"
    hs.create_dies_before_invites = False
    await step_engine(engine, hs).run_case(case_id)
    assert dm.members[MEMBER] == "invite", "the resumed step invited the member"
    (notice,) = notices(hs, "notify")
    assert notice in dm.events
    assert [r for r in hs.rooms.values() if _marker(r).endswith(":dm")] == [dm]
    done = await steps(engine, case_id)
    assert done["notify"].status == "done" and done["notify"].result["invited_again"] is True
    invite_order = hs.calls.index("invite")
    assert invite_order < hs.calls.index("kick"), "invited and told before removal"


async def test_dm_room_found_by_its_alias_alone_still_gets_its_invite(engine):
    """The earlier attempt's room is not among the bot's rooms yet (the search by marker
    misses it), so the creation is refused as taken and resolves to that room: the
    member is invited to it, as they would be to a room found by its marker."""
    hs = homeserver()
    hs.create_dies_before_invites = True
    case_id = await new_case(engine)
    with contextlib.suppress(Crash):
        await step_engine(engine, hs).run_case(case_id)
    hs.create_dies_before_invites = False

    async def not_found(marker: str) -> None:
        return None

    hs.find_marked_room = not_found  # type: ignore[method-assign]
    await step_engine(engine, hs).run_case(case_id)
    (dm,) = [r for r in hs.rooms.values() if _marker(r).endswith(":dm")]
    assert dm.members[MEMBER] == "invite"
    (notice,) = notices(hs, "notify")
    assert notice in dm.events


async def test_undeliverable_notice_holds_the_removal_for_staff_to_decide(engine):
    """Never removed untold by our fault: staff hear at once, with the truth, and decide."""
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "user is deactivated", 403)
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "failed" and done["remove"].status == "pending"
    assert done["remove"].attempts == 0, "the intent written ahead was undone"
    assert hs.kicks == [], "not removed without being told"
    # The room does not go on seeing who was flagged while staff decide.
    assert hs.redactions == [(GROUP, "$flag", "Removed by a moderator")]
    assert done["schedule"].status == "pending", "the check-in waits for the removal"
    (alert,) = notices(hs, "alert")
    body = alert["content"]["body"]
    assert "NOT" in body.splitlines()[0], "staff must reach them"
    assert f"!case {case_id} remove" in body and f"!case {case_id} notify" in body
    assert "at the earliest: it waits for your decision on the removal" in body
    assert done["alert"].result["stated"] == {"notify": "failed", "remove": "pending"}

    # A staff member decides: removed without the notice, recorded as their decision.
    async with engine.begin() as conn:
        await cases.save_progress(conn, case_id, "remove", {"decided_by": "@staff:localhost"})
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert hs.kicks == [(GROUP, MEMBER)]
    assert done["remove"].status == "done" and done["remove"].result["staff_decision"] is True
    kick = next(e for e in hs.rooms[GROUP].events if e["type"] == "m.room.member")
    assert kick["reason"] == "Removed by a moderator", "the room learns nothing"
    async with engine.connect() as conn:
        queued = [m.content["body"] for m in await outbox.pending(conn)]
    (update,) = [body for body in queued if "removed from the room" in body]
    assert update == (
        f"Case #{case_id}: they have now been removed from the room, without the notice, "
        "as staff decided."
    )


async def test_notify_again_after_a_failure_tells_then_removes_and_staff_hear_both(engine):
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "no room for now", 403)
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)
    del hs.refuse["create_room"]
    async with engine.begin() as conn:
        await cases.rearm_step(conn, case_id, "notify", 0, lambda progress: progress)
        await cases.set_next_attempt(conn, case_id, NOW)
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "done"
    (notice,) = notices(hs, "notify")
    kick = next(e for e in hs.rooms[GROUP].events if e["type"] == "m.room.member")
    assert notice["order"] < kick["order"]
    async with engine.connect() as conn:
        updates = [m.content["body"] for m in await outbox.pending(conn)]
    assert [u.split(": ", 1)[1][:22] for u in updates] == [
        "the member has now bee",
        "they have now been rem",
    ]


async def test_member_already_gone_is_recorded_not_retried(engine):
    hs = homeserver()
    hs.rooms[GROUP].members[MEMBER] = "leave"
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "done" and done["remove"].result["already_gone"] is True
    assert hs.kicks == [] and done["room_notice"].status == "skipped"


async def test_a_first_removal_kicks_at_once_and_a_ban_is_never_lifted(engine):
    """No read before the first kick: the kick's own answer tells (Synapse refuses to kick
    anyone not in the room, and a banned member stays banned)."""
    hs = homeserver()
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    assert "member_event" not in hs.calls[: hs.calls.index("kick")]
    hs = homeserver()
    case_id = await new_case(engine, member="@banned:localhost")
    hs.rooms[GROUP].members["@banned:localhost"] = "ban"
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "done" and done["remove"].result["already_gone"] is True
    assert done["remove"].result["membership"] == "ban" and hs.kicks == []


async def test_unreadable_membership_is_not_taken_for_gone(engine):
    """A 403 reading the member's state says nothing: the kick's own answer decides."""
    hs = homeserver()
    hs.refuse["member_event"] = Refused("M_FORBIDDEN", "you are not allowed to see that", 403)
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert hs.kicks == [(GROUP, MEMBER)]
    assert done["remove"].status == "done" and done["remove"].result["already_gone"] is False
    (alert,) = notices(hs, "alert")
    assert "already left" not in alert["content"]["body"]


async def test_refused_kick_is_a_recorded_failure_and_the_case_goes_on(engine):
    hs = homeserver()
    hs.refuse["kick"] = Refused("M_FORBIDDEN", "not enough power", 403)
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "failed" and "not enough power" in done["remove"].error
    assert done["alert"].status == "done"
    (alert,) = notices(hs, "alert")
    assert "not enough power" in alert["content"]["body"]


async def test_outage_defers_and_never_records_failure(engine):
    hs = homeserver()
    hs.unavailable_for = {"kick"}
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "done"
    assert done["remove"].status == "started" and done["remove"].failures == 0
    assert "kick" in done["remove"].error, "the record says why it waits"
    assert done["alert"].status == "pending", "it waits for the removal, until its deadline"
    assert "step.remove" not in await kinds(engine, case_id)
    hs.unavailable_for = set()
    await step_engine(engine, hs).run_case(case_id)
    assert (await steps(engine, case_id))["alert"].status == "done"
    assert hs.kicks == [(GROUP, MEMBER)]


async def test_staff_hear_by_the_deadline_whatever_the_removal_waits_for(engine):
    hs = homeserver()
    hs.unavailable_for = {"kick"}
    case_id = await new_case(engine)
    runner = step_engine(engine, hs, deployment(alert_deadline=dt.timedelta(seconds=0.5)))
    await runner.run_case(case_id)  # told; the removal waits for the homeserver
    await asyncio.sleep(0.6)
    await runner.run_case(case_id)  # the deadline came: the alert goes first
    done = await steps(engine, case_id)
    assert done["alert"].status == "done" and done["remove"].status == "started"
    (alert,) = notices(hs, "alert")
    lines = alert["content"]["body"].splitlines()
    assert "✔ Member notified by DM" in lines
    (waiting,) = [line for line in lines if line.startswith("… Not removed yet")]
    assert "kick" in waiting, "not yet, and why"
    hs.unavailable_for = set()
    await run_until_waiting(runner, engine, case_id)
    assert hs.kicks == [(GROUP, MEMBER)]
    async with engine.connect() as conn:
        (update,) = await outbox.pending(conn)
    assert update.content["body"] == f"Case #{case_id}: they have now been removed from the room."
    assert update.content["m.relates_to"]["m.in_reply_to"]["event_id"] == alert["event_id"]


async def test_alert_refused_for_good_is_failed_paged_and_listed(engine):
    hs = homeserver()
    hs.refuse["send"] = Refused("M_TOO_LARGE", "event too large", 413)
    case_id = await new_case(engine)
    policy = {"alert_webhook": "https://pager.example/hook"}
    runner = step_engine(engine, hs, deployment(**policy))
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["alert"].status == "failed" and done["alert"].attempts == 3, "retried twice"
    webhook = runner._kits["default"][1].webhook
    ((url, payload),) = [p for p in webhook.posted if p[1]["event"] == "safeguard.alert_failed"]
    assert url == "https://pager.example/hook" and payload["case"] == case_id
    async with engine.connect() as conn:
        assert await cases.failed_alerts(conn) == [case_id]
    assert "alert_paged" in await kinds(engine, case_id)


async def test_a_moderator_whose_flag_staff_never_heard_of_is_asked_to_tell_them(engine):
    """The alert failed for good: the debrief must not tell the moderator to stand down."""
    hs = homeserver()
    hs.refuse_sends_in[STAFF] = Refused("M_TOO_LARGE", "event too large", 413)
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["alert"].status == "failed" and done["debrief"].status == "done"
    (debrief,) = notices(hs, "debrief")
    body = debrief["content"]["body"]
    assert "I could not pass it to our staff team" in body and "directly, now" in body
    assert "You don't need to do anything more" not in body


async def _withdraw(engine, case_id: int) -> None:
    """What `!case N withdraw wrong` records (bot/staff/tools.py), for the engine to act on."""
    from bot.steps import POSITIONS, WITHDRAW_STEPS

    async with engine.begin() as conn:
        await cases.set_fields(
            conn, case_id, state="closed", closed_at=NOW, outcome="withdrawn: wrong"
        )
        for name in WITHDRAW_STEPS:
            await cases.rearm_step(conn, case_id, name, POSITIONS[name], {})
        await cases.set_next_attempt(conn, case_id, NOW)


async def test_a_case_withdrawn_while_its_notice_waits_never_tells_nor_removes(engine):
    """The notice waits (an outage) and staff withdraw the flag: the member is never sent
    the crisis notice nor removed once it is over, and gets no apology for a flag they
    never heard of."""
    hs = homeserver()
    hs.unavailable_for = {"create_room"}
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)
    assert notices(hs, "notify") == [] and hs.kicks == []
    await _withdraw(engine, case_id)
    hs.unavailable_for = set()
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "skipped" and done["remove"].status == "skipped"
    assert notices(hs, "notify") == [] and hs.kicks == [], "nothing of a withdrawn flag"
    assert done["withdraw_apology"].status == "skipped" and notices(hs, "withdraw_apology") == []
    assert done["withdraw_reinvite"].result == {"already_back": True}
    (report,) = [e["content"]["body"] for e in notices(hs, "withdraw_report")]
    assert "No apology sent: the member was neither told nor removed" in report
    assert "Still in the room" in report
    # The alert, gone after the withdrawal, asks staff to do nothing to the member.
    (alert,) = notices(hs, "alert")
    body = alert["content"]["body"]
    assert "– Member not notified: the case was closed before the member was told" in body
    assert "– Not removed: the case was closed" in body
    assert f"!case {case_id} remove" not in body and "reach them another way" not in body


async def test_a_withdrawal_overrides_a_removal_staff_decided_earlier(engine):
    """Staff decided to remove an untold member, the kick waits out an outage, then staff
    withdraw the flag: the withdrawal is the later word, and nobody is kicked."""
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "user is deactivated", 403)
    hs.unavailable_for = {"kick"}
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)
    async with engine.begin() as conn:
        await cases.save_progress(conn, case_id, "remove", {"decided_by": "@staff:localhost"})
        await cases.set_next_attempt(conn, case_id, NOW)
    await runner.run_case(case_id)
    assert (await steps(engine, case_id))["remove"].status == "started", "the kick waits"
    await _withdraw(engine, case_id)
    hs.unavailable_for = set()
    await run_until_waiting(runner, engine, case_id)
    assert (await steps(engine, case_id))["remove"].status == "skipped" and hs.kicks == []


async def test_a_case_withdrawn_while_its_removal_is_held_apologises_for_the_notice(engine):
    """Told, the removal held for staff (here: the kick waits out an outage), then
    withdrawn: no kick ever; the apology is for the notice, naming the room by its name."""
    hs = homeserver()
    hs.rooms[GROUP].state[("m.room.name", "")] = {"name": "Peer support"}
    hs.unavailable_for = {"kick"}
    case_id = await new_case(engine)
    runner = step_engine(engine, hs, deployment(alert_deadline=dt.timedelta(seconds=0.3)))
    await runner.run_case(case_id)
    assert len(notices(hs, "notify")) == 1 and hs.kicks == []
    await asyncio.sleep(0.4)
    await runner.run_case(case_id)  # the alert goes at its deadline: "not removed yet"
    assert len(notices(hs, "alert")) == 1
    await _withdraw(engine, case_id)
    hs.unavailable_for = set()
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["remove"].status == "skipped" and hs.kicks == []
    (apology,) = notices(hs, "withdraw_apology")
    body = apology["content"]["body"]
    assert body.startswith("We're sorry: the message we sent you about Peer support")
    assert GROUP not in body, "no room id for the member to read"
    async with engine.connect() as conn:
        queued = [m.content["body"] for m in await outbox.pending(conn)]
    assert not [b for b in queued if "could NOT be removed" in b], "nothing to do by hand"


async def test_a_step_that_crashes_is_retried_never_failed_and_staff_told_once(engine):
    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)  # the alert is out: later failures are told to staff

    async def broken(run):
        raise KeyError("a bug")

    runner._kits["default"][0]["escalate"].run = broken
    runner._kits["default"][0]["escalate"].due = lambda case, steps: NOW
    async with engine.begin() as conn:
        await cases.set_fields(conn, case_id, next_attempt_at=NOW)
    for _ in range(3):
        await runner.run_case(case_id)
    done = await steps(engine, case_id)
    assert done["escalate"].status == "started", "a bug is never read as 'could not be done'"
    assert "internal error (KeyError)" in done["escalate"].error
    assert done["escalate"].attempts == 3
    async with engine.connect() as conn:
        queued = await outbox.pending(conn)
        assert await cases.crashing(conn) == [case_id]
    (told,) = [m for m in queued if "raising the alert again" in m.content["body"]]
    assert told.content["body"].startswith(f"Case #{case_id}")
    assert told.content["m.relates_to"]["m.in_reply_to"]["event_id"]  # a reply to the alert


async def test_a_crashing_notice_never_lets_the_removal_go_ahead(engine):
    """Seen with a crypto store restored with the wrong key: the notice raised, the step
    was read as failed, and the member was removed without any DM."""
    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs, deployment(alert_deadline=dt.timedelta(seconds=0.5)))

    async def broken(run):
        raise AttributeError("'NoneType' object has no attribute 'encrypt'")

    runner._kits["default"][0]["notify"].run = broken
    await runner.run_case(case_id)
    await asyncio.sleep(0.6)
    await runner.run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "started" and done["remove"].status == "pending"
    assert done["remove"].attempts == 0, "the intent written ahead was undone"
    assert hs.kicks == []
    (alert,) = notices(hs, "alert")
    first = alert["content"]["body"].splitlines()[0]
    assert "NOT notified yet" in first and "internal error (AttributeError)" in first


async def test_a_notice_sent_but_not_recorded_is_found_not_failed(engine):
    """The disk filled between the notice and its record: recording is retried, and the
    resumed step finds its message. Never 'failed' for a notice the member has."""
    from sqlalchemy.exc import OperationalError

    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    store = runner._saver

    def failing_saver(case, step):
        save = store(case, step)

        async def full_disk(**changes):
            if step.step == "notify":
                raise OperationalError("UPDATE", {}, Exception("database or disk is full"))
            await save(**changes)

        return full_disk

    runner._saver = failing_saver
    with pytest.raises(OperationalError):
        await runner.run_case(case_id)
    assert (await steps(engine, case_id))["notify"].status == "started"
    assert len(notices(hs, "notify")) == 1, "the notice went out before the disk filled"
    runner._saver = store
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == "done" and done["remove"].status == "done"
    assert len(notices(hs, "notify")) == 1, "found, not sent again"


async def test_checkin_does_not_wait_for_a_broken_staff_room(engine):
    hs = homeserver()
    hs.unavailable_for = {"find_marked_message"}  # irrelevant: first attempts never look
    case_id = await new_case(engine, due_in=dt.timedelta(seconds=-1))
    runner = step_engine(engine, hs)
    runner._kits["default"][1].staff_room.room_id = None  # the staff room cannot be resolved
    await runner.run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "done"
    assert done["alert"].status == "started", "waiting for the staff room, not failed"
    assert done["checkin"].status == "done", "the member's check-in opened on time"
    assert done["checkin_notice"].status == "started", "its staff notice waits too"


async def test_template_failing_at_run_time_falls_back_and_is_reported(engine):
    hs = homeserver()
    case_id = await new_case(engine)
    # A format spec validation did not catch (validation would refuse it at start).
    broken = MessageTemplates.model_construct(notice="Hi {resources:d}")
    settings = deployment(messages=broken)
    runner = step_engine(engine, hs, settings)
    reported: list[str] = []
    runner._kits["default"][1].texts.on_fallback = lambda name, problem: reported.append(name)
    await runner.run_case(case_id)
    (notice,) = notices(hs, "notify")
    assert "worried about you" in notice["content"]["body"], "the built-in text was sent"
    assert reported == ["notice"]
    assert (await steps(engine, case_id))["remove"].status == "done"


async def test_dry_run_alerts_but_touches_no_one(engine):
    hs = homeserver()
    case_id = await new_case(engine, dry_run=True)
    await step_engine(engine, hs, deployment(dry_run=True)).run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "skipped"
    assert hs.kicks == [] and notices(hs, "notify") == []
    assert len(notices(hs, "alert")) == 1


async def test_existing_dm_is_reused(engine):
    hs = homeserver()
    hs.add_room("!olddm:localhost", {MEMBER: "join", hs.bot_user_id: "join"}, {})
    hs.direct[MEMBER] = ["!olddm:localhost"]
    case_id = await new_case(engine)
    await step_engine(engine, hs).run_case(case_id)
    (notice,) = notices(hs, "notify")
    assert notice in hs.rooms["!olddm:localhost"].events


async def test_one_timer_for_many_cases(engine):
    """The engine's next look is the earliest due step of any case, read in one query."""
    hs = homeserver()
    first = await new_case(engine, due_in=dt.timedelta(hours=5))
    runner = step_engine(engine, hs, deployment(), poll_interval=3600)
    await runner.run_case(first)
    second = await new_case_for(engine, "@other:localhost")
    await runner.run_case(second)
    async with engine.connect() as conn:
        looks = [(await cases.get(conn, n)).next_attempt_at for n in (first, second)]
        assert await cases.next_due_at(conn) == min(looks)
        assert await cases.due(conn, NOW) == []
        assert await cases.due(conn, min(looks)) != []


async def new_case_for(engine, member: str) -> int:
    flag = cases.NewFlag(GROUP, member, MOD, "reaction", "$f2", "$m2", None, NOW, NOW)
    async with engine.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn, PROVENANCE, flag, steps=CASE_STEPS, dry_run=False, due_at=NOW + HOUR
        )
    return opened.case_id


async def test_an_alert_not_posted_by_its_deadline_pages_once_and_shows_on_health(engine):
    hs = homeserver()
    case_id = await new_case(engine)
    policy = {"alert_webhook": "https://pager.example/hook", "alert_deadline": dt.timedelta(0)}
    runner = step_engine(engine, hs, deployment(**policy))
    runner._kits["default"][1].staff_room.room_id = None  # the staff room cannot take anything
    await runner.run_case(case_id)
    await runner.run_case(case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "done", "the member goes first"
    assert done["alert"].status == "started"
    webhook = runner._kits["default"][1].webhook
    pages = [p for _url, p in webhook.posted if p["event"] == "safeguard.alert_undelivered"]
    assert len(pages) == 1 and pages[0]["case"] == case_id, "paged once, not every retry"
    async with engine.connect() as conn:
        assert await cases.late_alerts(conn, dt.datetime.now(dt.UTC)) == [case_id]


async def test_a_step_that_hangs_is_cut_at_the_alert_deadline_and_the_alert_goes(engine):
    """Nothing of the case can hold its alert back: a notice whose call never returns (a
    homeserver that accepts and never answers) is cut short at the deadline."""
    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs, deployment(alert_deadline=dt.timedelta(seconds=0.5)))
    sending = runner._kits["default"][0]["notify"].run

    async def hangs(run):
        if run.step.attempts == 1:
            await asyncio.Event().wait()
        return await sending(run)

    runner._kits["default"][0]["notify"].run = hangs
    await asyncio.wait_for(runner.run_case(case_id), 5)
    done = await steps(engine, case_id)
    assert done["alert"].status == "done" and done["notify"].status == "started"
    (alert,) = notices(hs, "alert")
    assert (
        "NOT notified yet (still under way at the staff alert's deadline)"
        in (alert["content"]["body"])
    )
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["notify"].status == done["remove"].status == "done", "the notice went on"
    assert len(notices(hs, "notify")) == 1


async def test_a_checkin_whose_message_is_refused_is_not_done_and_staff_are_told(engine):
    """Done means the member finds the message there: a refused one is retried, then the
    step fails and the staff notice says the check-in could not be opened."""
    hs = homeserver()
    case_id = await new_case(engine, due_in=dt.timedelta(seconds=-1))
    runner = step_engine(engine, hs)
    sending = hs.send

    async def refuse_the_checkin_message(room_id, content, **options):
        marker = content.get(MESSAGE_MARKER_KEY, {})
        if marker.get("step") == "checkin":
            return Refused("M_FORBIDDEN", "the room refuses messages", 403)
        return await sending(room_id, content, **options)

    hs.send = refuse_the_checkin_message  # type: ignore[method-assign]
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["checkin"].status == "failed" and done["checkin"].attempts == 3
    (told,) = notices(hs, "checkin_notice")
    assert "could NOT be opened" in told["content"]["body"]


HOUR = dt.timedelta(hours=1)


async def test_a_case_begun_where_it_opened_needs_no_transaction_before_its_notice(
    engine, monkeypatch
):
    hs = homeserver()
    runner = step_engine(engine, hs)
    case_id, begun = await open_and_begin(engine, runner)
    assert begun.step is not None and begun.step.step == "notify"
    async with engine.connect() as conn:
        (notify,) = [s for s in await cases.steps_of(conn, case_id) if s.step == "notify"]
    assert (notify.status, notify.attempts) == ("started", 1), "the intent is written"
    import bot.cases.engine as engine_module

    calls_before: list[int] = []  # homeserver calls made before each transaction
    whole = engine_module.transact

    async def counted(db, work, *args):
        calls_before.append(len(hs.calls))
        return await whole(db, work, *args)

    monkeypatch.setattr(engine_module, "transact", counted)
    await runner.run_case(case_id, begun)
    assert calls_before and calls_before[0] > 0, "the notice's calls came first"
    done = await steps(engine, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    assert done["notify"].attempts == 1, "not taken for a resumed attempt"
    assert len(notices(hs, "notify")) == 1 and hs.kicks == [(GROUP, MEMBER)]


@pytest.mark.parametrize("crash_at", [None, 1, -1, 2, -2, 3, -3])
async def test_killed_after_the_case_began_resumes_it_once(engine, crash_at):
    """The intent written with the case, then the process killed: before the notice's first
    call (None), or at any of its calls, before or just after it acted."""
    hs = homeserver()
    case_id, begun = await open_and_begin(engine, step_engine(engine, hs))
    if crash_at is not None:
        hs.crash_at = crash_at
        with contextlib.suppress(Crash):
            await step_engine(engine, hs).run_case(case_id, begun)
        hs.crash_at = None
    hs.txn_ids.clear()
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS), done
    assert len([r for r in hs.rooms.values() if r.members.get(MEMBER) == "invite"]) == 1
    assert len(notices(hs, "notify")) == 1
    assert hs.kicks == [(GROUP, MEMBER)]


def _noting_records(runner, monkeypatch) -> list[str]:
    """The steps whose outcomes have been written, in order (as the writes finish)."""
    recorded: list[str] = []
    write = runner._write_outcome

    async def noted(conn, finished):
        told = await write(conn, finished)
        recorded.append(finished.step.step)
        return told

    monkeypatch.setattr(runner, "_write_outcome", noted)
    return recorded


def _records_at_kick(hs, recorded: list[str], monkeypatch) -> list[list[str]]:
    """What had been recorded each time the member was kicked."""
    seen: list[list[str]] = []
    kick = hs.kick

    async def watched(room_id, user_id, reason):
        seen.append(list(recorded))
        return await kick(room_id, user_id, reason)

    monkeypatch.setattr(hs, "kick", watched)
    return seen


async def test_the_removal_begins_as_the_member_is_told_not_after_the_record(engine, monkeypatch):
    """The kick waits for the notice alone: its intent was written with the notice's, and
    the notice's outcome is recorded alongside it, both before the next transaction."""
    hs = homeserver()
    runner = step_engine(engine, hs)
    case_id, begun = await open_and_begin(engine, runner)
    assert begun.ahead is not None and begun.ahead.started.step == "remove"
    rows = await steps(engine, case_id)
    assert (rows["remove"].status, rows["remove"].attempts) == ("started", 1), "intent first"
    recorded = _noting_records(runner, monkeypatch)
    at_kick = _records_at_kick(hs, recorded, monkeypatch)
    await runner.run_case(case_id, begun)
    assert at_kick == [[]], "the kick waited for no record"
    done = await steps(engine, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    assert done["notify"].attempts == done["remove"].attempts == 1, "neither taken for a resume"
    assert recorded[:2] == ["notify", "remove"], "recorded in order"
    assert done["remove"].result["notified_first"] is True
    assert (await kinds(engine, case_id))[:3] == ["flagged", "step.notify", "step.remove"]
    async with engine.connect() as conn:
        rows = [row async for row in audit.chain_rows(conn)]
    assert verify_chain(rows).ok


@pytest.mark.parametrize("kicker", [None, "@safeguard-mod:localhost"])
async def test_killed_after_the_kick_before_the_notice_was_recorded_resumes_once(
    engine, monkeypatch, kicker
):
    """The kick took effect; the notice's record, made alongside it, never committed. The
    next run resumes both in order: the notice found, the kick found to be the bot's own
    (or its moderation user's, where that one kicks: not "they had left")."""
    hs = homeserver()
    hs.moderator = kicker
    runner = step_engine(engine, hs)
    case_id, begun = await open_and_begin(engine, runner)
    write = runner._write_outcome

    async def dies(conn, finished):
        if finished.step.step == "notify":
            raise Crash()  # the process died before this transaction committed
        return await write(conn, finished)

    monkeypatch.setattr(runner, "_write_outcome", dies)
    with contextlib.suppress(Crash):
        await runner.run_case(case_id, begun)
    assert hs.kicks == [(GROUP, MEMBER)], "the kick went through"
    rows = await steps(engine, case_id)
    assert rows["notify"].status == rows["remove"].status == "started", "nothing recorded"
    hs.txn_ids.clear()  # Synapse restarted too
    await step_engine(engine, hs).run_case(case_id)
    done = await steps(engine, case_id)
    assert all(done[s].status == "done" for s in REFERRAL_STEPS), done
    assert len(notices(hs, "notify")) == 1, "the notice found, not sent again"
    assert hs.kicks == [(GROUP, MEMBER)], "kicked once"
    assert done["remove"].result == {
        "already_gone": False,
        "notified_first": True,  # the record says they were told first, resumed or not
        "resumed": True,
    }, "its own kick"
    assert done["remove"].attempts == 2


async def test_a_case_changed_during_the_notice_is_read_again_before_the_removal(
    engine, monkeypatch
):
    """A staff command (or another flag) while the notice is under way: the removal waits
    for the case to be read again, and the intent written ahead is undone and written anew
    (one attempt, as recorded)."""
    hs = homeserver()
    runner = step_engine(engine, hs)
    case_id, begun = await open_and_begin(engine, runner)
    send = hs.send

    async def changed_meanwhile(room_id, content, **kwargs):
        runner.start_case(case_id)  # as a staff command does after changing the case
        return await send(room_id, content, **kwargs)

    monkeypatch.setattr(hs, "send", changed_meanwhile)
    recorded = _noting_records(runner, monkeypatch)
    at_kick = _records_at_kick(hs, recorded, monkeypatch)
    runner.start_case(case_id, begun)
    while runner._tasks:
        await asyncio.gather(*runner._tasks)
    assert at_kick == [["notify"]], "kicked after a transaction that read the case again"
    done = await steps(engine, case_id)
    assert [done[s].status for s in REFERRAL_STEPS] == ["done"] * 5
    assert done["remove"].attempts == 1 and "resumed" not in done["remove"].result


async def test_only_a_change_keeps_a_running_case_from_its_removal_at_once(engine):
    """The timer finding a running case due (it is, from the moment it opens) changes
    nothing in it; a staff command or another flag does (`start_case`)."""
    runner = step_engine(engine, homeserver())
    case_id = await new_case(engine)
    runner._running.add(case_id)  # as while its notice is under way
    await runner._start_due_cases()
    assert case_id not in runner._changed, "falling due is no change"
    runner.start_case(case_id)
    assert case_id in runner._changed
    assert not runner._tasks, "not run twice"


async def test_a_case_falling_due_while_the_timer_reads_is_looked_at_again_at_once(
    engine, monkeypatch
):
    """Seen on a busy CI machine: a retry fell due between the timer's read of the due
    cases and its check of the clock, so it was taken for one in flight, and the timer
    slept its whole poll (30 s) while staff waited for a plain word due in 3 s."""
    from bot.cases import engine as engine_module

    runner = step_engine(engine, homeserver(), deployment())
    case_id = await new_case(engine)
    due_at = dt.datetime.now(dt.UTC) + dt.timedelta(milliseconds=50)
    async with engine.begin() as conn:
        await cases.set_next_attempt(conn, case_id, due_at)
    # The clock as a timer that fired just before the case's time sees it, then moves on
    # past it while the reads run.
    ticks = iter([due_at - dt.timedelta(milliseconds=1)])
    monkeypatch.setattr(
        engine_module, "_now", lambda: next(ticks, due_at + dt.timedelta(seconds=1))
    )
    started: list[int] = []
    monkeypatch.setattr(runner, "start_case", lambda case, begun=None: started.append(case))
    look_again = await runner._start_due_cases()
    assert not started, "not due yet when it read"
    assert look_again == due_at, "looked at again when it falls due, not at the next poll"


async def test_a_case_changed_as_its_run_ends_is_run_again_at_once(engine, monkeypatch):
    """A staff command (`!case N remove`) commits as a run writes the case's next look,
    which may put back a later time over the command's "now" (PostgreSQL reads what was
    committed at each statement): the run that ends after the change runs it again."""
    runner = step_engine(engine, homeserver())
    runs: list[int] = []

    async def run_case(case_id, begun=None):
        runs.append(case_id)
        if len(runs) == 1:
            runner.start_case(case_id)  # the command's wake-up, while this run ends

    monkeypatch.setattr(runner, "run_case", run_case)
    runner.start_case(7)
    for _ in range(100):
        if len(runs) >= 2:
            break
        await asyncio.sleep(0.01)
    assert runs == [7, 7]


async def _corroborate(engine, flagger: str, flag_event: str) -> None:
    """Another moderator's flag of the member, recorded as the flag's decision records it."""
    from bot.steps import POSITIONS
    from bot.steps.corroboration import corroboration_due

    flag = cases.NewFlag(GROUP, MEMBER, flagger, "reaction", flag_event, "$msg", None, NOW, NOW)
    async with engine.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn, PROVENANCE, flag, steps=CASE_STEPS, dry_run=False, due_at=NOW + HOUR
        )
        assert not opened.created
        await corroboration_due(conn, opened.case_id, position=POSITIONS["corroboration"])
        await cases.set_next_attempt(conn, opened.case_id, dt.datetime.now(dt.UTC))


async def test_a_flag_corroborating_while_staff_are_told_of_another_is_told_too(
    engine, monkeypatch
):
    """A third moderator flags as the second one's flag is being told to staff: the step,
    armed again while it ran, is not finished over that; staff hear of both."""
    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await run_until_waiting(runner, engine, case_id)
    await _corroborate(engine, "@mod2:localhost", "$f2")
    send = hs.send
    flagged_meanwhile: list[bool] = []

    async def send_and_flag(room_id, content, **kwargs):
        sent = await send(room_id, content, **kwargs)
        if "also flagged" in content.get("body", "") and not flagged_meanwhile:
            flagged_meanwhile.append(True)
            await _corroborate(engine, "@mod3:localhost", "$f3")
        return sent

    monkeypatch.setattr(hs, "send", send_and_flag)
    await run_until_waiting(runner, engine, case_id)
    told = [e["content"]["body"] for e in hs.rooms[STAFF].events if "also flagged" in str(e)]
    assert len(told) == 2, told
    assert "@mod2:localhost" in told[0] and "@mod3:localhost" in told[1]


async def test_a_failed_alert_left_unpaged_by_a_crash_is_paged_at_the_next_start(
    engine, monkeypatch
):
    """The alert's failure committed, the process died before the page: the next start
    pages it, once."""
    hs = homeserver()
    hs.refuse_sends_in[STAFF] = Refused("M_TOO_LARGE", "event too large", 413)
    case_id = await new_case(engine)
    policy = deployment(alert_webhook="https://pager.example/hook")
    dying = step_engine(engine, hs, policy)

    async def died(case, outcome):
        raise Crash("before the page")

    monkeypatch.setattr(dying, "_page_failed_alert", died)
    with contextlib.suppress(Crash):
        await run_until_waiting(dying, engine, case_id)
    assert (await steps(engine, case_id))["alert"].status == "failed"
    assert "alert_paged" not in await kinds(engine, case_id)

    for _start in range(2):  # a second start: paged already
        restarted = step_engine(engine, hs, policy)
        restarted.start()
        for _ in range(100):
            if "alert_paged" in await kinds(engine, case_id):
                break
            await asyncio.sleep(0.02)
        await restarted.stop()
        webhook = restarted._kits["default"][1].webhook
        pages = [p for _url, p in webhook.posted if p["event"] == "safeguard.alert_failed"]
        assert len(pages) == (1 if _start == 0 else 0)
        assert not pages or pages[0]["case"] == case_id
    assert (await kinds(engine, case_id)).count("alert_paged") == 1


async def test_an_alert_found_posted_by_a_resumed_attempt_is_followed_by_what_changed(engine):
    """The alert went at its deadline ("not notified yet"), its answer lost; the notice and
    the removal finished before its resumed attempt found the post. That post still says
    "not yet": what became of each follows as a reply, as promised there."""
    from bot.core.ports import HomeserverUnavailable

    hs = homeserver()
    hs.unavailable_for = {"create_room"}
    case_id = await new_case(engine)
    runner = step_engine(engine, hs, deployment(alert_deadline=dt.timedelta(seconds=0.3)))
    await runner.run_case(case_id)  # the notice waits for the homeserver
    await asyncio.sleep(0.4)
    hs.unavailable_for = set()
    send, lost = hs.send, []

    async def answer_lost(room_id, content, **kwargs):
        sent = await send(room_id, content, **kwargs)
        if room_id == STAFF and not lost:
            lost.append(sent)
            raise HomeserverUnavailable("the answer was lost")
        return sent

    hs.send = answer_lost
    for _ in range(10):
        await run_until_waiting(runner, engine, case_id)
        if (await steps(engine, case_id))["alert"].status == "done":
            break
        await asyncio.sleep(0.3)
    done = await steps(engine, case_id)
    assert lost and done["alert"].status == "done"
    (alert,) = notices(hs, "alert")
    assert "NOT notified yet" in alert["content"]["body"], "posted before the notice went"
    assert done["alert"].result["stated"] == {"notify": "pending", "remove": "pending"}
    async with engine.connect() as conn:
        queued = [m.content["body"] for m in await outbox.pending(conn)]
    assert any("the member has now been notified by DM" in body for body in queued)
    assert any("they have now been removed from the room" in body for body in queued)


async def test_a_staff_message_queued_after_a_restore_is_not_taken_for_one_sent_before(
    tmp_path,
):
    """Restored from a backup, the database numbers its outbox from where the backup left
    it: message 1 again. A retry of the new message 1 must not find the old one (sent
    before the restore) and count itself sent."""
    from appservice.database import create_engine, upgrade
    from bot.rooms.staff_room import StaffRoom
    from bot.staff.delivery import OutboxDelivery
    from bot.texts.messages import Texts

    hs = homeserver()
    texts = Texts(deployment())
    bodies = []
    for n, then in enumerate((NOW, NOW + HOUR)):
        db = create_engine(f"sqlite+aiosqlite:///{tmp_path / f'db{n}.db'}")
        await upgrade(db)
        async with db.begin() as conn:
            await outbox.queue(conn, STAFF, {"msgtype": "m.notice", "body": f"m{n}"}, then)
            if n:  # the new message 1 was tried once already (its answer lost)
                (message,) = await outbox.pending(conn)
                await outbox.mark(conn, message.id, status="pending", now=then)
        await OutboxDelivery(db, hs, texts, StaffRoom(STAFF)).work_once()
        bodies = [e["content"]["body"] for e in hs.rooms[STAFF].events]
        await db.dispose()
    assert bodies == ["m0", "m1"], "the message after the restore was sent"


async def test_a_checkin_late_because_the_removal_waited_for_staff_says_so(engine):
    """The notice failed, the removal (and so the check-in) waited for staff's decision
    past the check-in's time: staff are told why it is late, not "the service was away"."""
    hs = homeserver()
    hs.refuse["create_room"] = Refused("M_FORBIDDEN", "user is deactivated", 403)
    case_id = await new_case(engine, due_in=dt.timedelta(minutes=-1))
    runner = step_engine(engine, hs)
    await runner.run_case(case_id)
    assert (await steps(engine, case_id))["checkin"].status == "pending"
    hs.refuse.pop("create_room")
    async with engine.begin() as conn:
        await cases.save_progress(conn, case_id, "remove", {"decided_by": "@staff:localhost"})
        await cases.set_next_attempt(conn, case_id, NOW)
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert done["checkin"].status == "done" and done["checkin"].result["waited_for_removal"]
    (told,) = [e["content"]["body"] for e in notices(hs, "checkin_notice")]
    assert "late: it waited for the removal to be decided" in told
    assert "the service was unavailable" not in told


async def test_a_member_back_is_removed_again_even_when_why_cannot_be_encrypted(engine):
    """They were told the first time: a DM that cannot be encrypted now (which would wait
    for its fall-back time, or for ever) does not hold their removal again back."""
    from bot.steps import POSITIONS

    hs = homeserver()
    case_id = await new_case(engine)
    runner = step_engine(engine, hs)
    await run_until_waiting(runner, engine, case_id)
    async with engine.connect() as conn:
        case = await cases.get(conn, case_id)
    assert case is not None and case.dm_room_id is not None
    hs.encrypted_rooms.add(case.dm_room_id)
    hs.encryption_broken = "no keys for their devices"
    hs.rooms[GROUP].members[MEMBER] = "join"  # they came back
    async with engine.begin() as conn:
        again = {"room": GROUP, "return": "$back"}
        await cases.rearm_step(conn, case_id, "remove_again", POSITIONS["remove_again"], again)
        await cases.set_next_attempt(conn, case_id, dt.datetime.now(dt.UTC))
    await run_until_waiting(runner, engine, case_id)
    done = await steps(engine, case_id)
    assert hs.kicks == [(GROUP, MEMBER), (GROUP, MEMBER)], "removed again at once"
    assert done["remove_again"].status == "done"
    assert done["remove_again"].result["told"] is False
