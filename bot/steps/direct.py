"""Opening a direct conversation with someone, exactly once, verified, and telling them.

Used by the member's notice, the moderator's debrief and a withdrawal's apology. A room the step
already recorded, or one an earlier attempt created (found by its marker), or
a DM the bot already shares with them, is used; otherwise, for the notice, a room
made ahead (bot/rooms/ready_rooms.py) with them invited into it; otherwise one is
created with the invite. A found room is only used once the person is verifiably
in it (or invited): an earlier attempt may have died after creating the room and
before inviting them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bot.core.ports import Homeserver, HomeserverUnavailable, Refused
from bot.rooms.ready_rooms import ReadyRooms, taken
from bot.steps.base import Outcome, StepRun, Told, Toolbox
from bot.store import cases

log = logging.getLogger(__name__)

PRESENT_IN_DM = frozenset({"join", "invite"})


@dataclass(frozen=True)
class OpenedDm:
    room_id: str
    # Made their DM by this attempt: created, or made ahead and taken (the createRoom's
    # or the invite's answer is the proof of the invite).
    created: bool
    invited_again: bool  # found without them in it: invited now
    direct: Mapping[str, Sequence[str]] | None  # the bot's m.direct as read, to update it
    made_ahead: bool = False  # a room made before the flag (bot/rooms/ready_rooms.py)
    # Made ahead and taken, the invite not sent yet: tell_by_dm sends it alongside the
    # message (a room in the clear: nothing in the message waits for the member).
    invite_pending: bool = False

    @property
    def recorded(self) -> bool:
        """Already recorded on the step and the case: a room made ahead is, as it is taken."""
        return self.made_ahead and self.created


@dataclass(frozen=True)
class ToldByDm:
    """A message that reached someone in their DM with the bot."""

    opened: OpenedDm
    told: Told
    # Why it went in the clear (encryption failing): None when it went as configured.
    plain_because: str | None


@dataclass(frozen=True)
class NotToldByDm:
    """Refused by the homeserver: `room` is None if no DM room could be opened."""

    refused: Refused
    room: str | None

    def outcome(self, whom: str, what: str) -> Outcome:
        """The step's failure, worth another try: no DM with `whom`, or `what` not sent."""
        why = (
            f"no DM could be opened with {whom}"
            if self.room is None
            else f"{what} could not be sent"
        )
        return Outcome.refused(why, self.refused, retry=True)


async def tell_by_dm(
    tools: Toolbox,
    run: StepRun,
    user: str,
    what: str,
    content: dict[str, Any],
    case_field: str,
    *,
    made_ahead: bool = False,
    mark_direct: bool = True,
) -> ToldByDm | NotToldByDm:
    """Open (or find) the DM, keep it, and send `content` there once (`made_ahead`: into a
    room made ahead of any flag, if one is ready: the member's notice).

    `mark_direct=False`: the room is not added to the bot's m.direct here; the case's
    `mark_dm` step does it (the member's notice: see bot/steps/mark_dm.py).

    With encryption known to be broken (and `encryption.fallback: plain`), a room made
    now is made without encryption, and none made ahead (they are encrypted) is taken;
    a message that cannot be encrypted in time goes in the clear (Toolbox.tell). The
    message and the DM's bookkeeping go together: neither waits for the other (a
    resumed attempt finds the room and the message by their markers either way).
    """
    hs = tools.homeserver
    room_plain = tools.plain_room_because()
    encrypted = tools.deployment.encrypt_private_rooms and room_plain is None
    opened = await open_dm(
        hs,
        run,
        user,
        what,
        encrypted=encrypted,
        case_field=case_field,
        ready=tools.ready_rooms if made_ahead and room_plain is None else None,
        # With one community there are no others' cases to keep apart from: no read.
        not_shared=(
            (lambda rooms: _of_other_communities(tools, run, rooms))
            if len(tools.rooms.staff_rooms) > 1
            else None
        ),
        # A room made ahead: the invite goes alongside the message (kept() below).
        invite_later=True,
    )
    if isinstance(opened, Refused):
        return NotToldByDm(opened, None)
    made_plain = room_plain if opened.created else run.progress.get(f"{what}_plain_because")

    async def kept() -> bool:
        """The DM kept; False if the room made ahead refused the invite (not kept)."""
        if opened.invite_pending:
            if mark_direct:
                # m.direct alongside the invite, not after it (undone if it is refused).
                invited, _ = await _all_to_their_end(
                    _invite_into_ready(hs, run, user, opened.room_id, what, case_field),
                    remember_dm(hs, user, opened),
                )
            else:
                invited = await _invite_into_ready(hs, run, user, opened.room_id, what, case_field)
            if not invited:
                if mark_direct:
                    await _forget_dm(hs, opened.room_id)
                return False
        await keep_dm(
            hs,
            tools,
            run,
            user,
            opened,
            what,
            case_field,
            plain_because=made_plain,
            mark_direct=mark_direct,
        )
        return True

    if opened.invite_pending:
        # Encrypted, the message's key goes to their devices while the invite is on its
        # way (keys queried and claimed alongside it), not after its answer.
        hs.expect_member(opened.room_id, user)
    # A resumed attempt finds the room made ahead in the step's record, and the message
    # by its marker.
    told, dm_kept = await _all_to_their_end(tools.tell(run, opened.room_id, content), kept())
    if dm_kept is False:
        # As if none had been ready: a room is created, and the message sent there. The
        # one sent into the room made ahead reaches no one (no one else is in it, and the
        # room is never used again): redacted all the same, as far as it can be.
        if isinstance(told, Told):
            await withdraw_unread(hs, run, what, opened.room_id, told.event_id)
        return await tell_by_dm(
            tools, run, user, what, content, case_field, mark_direct=mark_direct
        )
    if isinstance(told, Refused):
        return NotToldByDm(told, opened.room_id)
    return ToldByDm(opened, told, told.plain_because or made_plain)


async def open_dm(
    hs: Homeserver,
    run: StepRun,
    user: str,
    what: str,
    *,
    encrypted: bool,
    case_field: str,
    ready: ReadyRooms | None = None,
    invite_later: bool = False,
    not_shared: Callable[[list[str]], Awaitable[set[str]]] | None = None,
) -> OpenedDm | Refused:
    """The DM room with `user`, with them in it — except a room made ahead taken with
    `invite_later`: its invite is the caller's to send (`_invite_into_ready`).
    `case_field`: the case's column a room made ahead is recorded in as it is taken.
    `not_shared`: which of their DMs with the bot another community's cases use (never
    shared: each community's words and replies stay in its own rooms)."""
    known = run.progress.get(f"{what}_room")
    tag = run.marker(what)
    direct: Mapping[str, Sequence[str]] | None = None
    if (
        known is not None
        and invite_later
        and not run.resumed
        and run.progress.get(f"{what}_made_ahead")
    ):
        # Taken as the case was opened (Notify.begin), recorded there: nothing sent yet.
        if ready is not None:
            ready.handed_over()
        return OpenedDm(known, True, False, None, made_ahead=True, invite_pending=True)
    room_id: str | None = known
    if room_id is None and run.resumed:
        # The earlier attempt may have created the room and died before recording it.
        room_id = await hs.find_marked_room(tag)
    if room_id is None:
        direct = await hs.direct_rooms()
        # The case's own DM with them too: the notice's is marked in m.direct only by a
        # later step (bot/steps/mark_dm.py).
        own = run.case.dm_room_id if user == run.case.member_id else None
        candidates = [*direct.get(user, ()), *([own] if own else [])]
        if not_shared is not None and candidates:
            others = await not_shared(candidates)
            candidates = [room for room in candidates if room not in others]
        room_id = await _shared_dm(hs, user, candidates)
    if room_id is None and ready is not None:
        room_id = await ready.take(run.case.id, run.step.step, what, run.progress, case_field)
        if room_id is not None:
            # Recorded on the step and the case as it was taken.
            run.progress = run.progress | taken(what, room_id)
            if invite_later or await _invite_into_ready(hs, run, user, room_id, what, case_field):
                return OpenedDm(
                    room_id, True, False, direct, made_ahead=True, invite_pending=invite_later
                )
            room_id = None
    if room_id is None:
        created = await hs.create_room(
            marker=tag, invite=[user], is_direct=True, encrypted=encrypted
        )
        if isinstance(created, Refused):
            return created
        if not created.existing:
            return OpenedDm(created.room_id, True, False, direct)
        # An earlier attempt's room: they may never have been invited to it.
        room_id = created.room_id
    invited = await _make_sure_they_are_in(hs, room_id, user)
    if isinstance(invited, Refused):
        return invited
    made_ahead = room_id == known and bool(run.progress.get(f"{what}_made_ahead"))
    return OpenedDm(room_id, False, invited, direct, made_ahead=made_ahead)


async def keep_dm(
    hs: Homeserver,
    tools: Toolbox,
    run: StepRun,
    user: str,
    opened: OpenedDm,
    what: str,
    case_field: str,
    *,
    plain_because: str | None = None,
    mark_direct: bool = True,
) -> None:
    """What makes an opened DM one whose replies reach staff, now and after a restart:
    the room directory told, the room recorded on the step and the case, and (with
    `mark_direct`) the room marked as a DM with them in the bot's m.direct (what a later
    DM looks for first): also one an earlier attempt opened and died before marking (a
    room already there costs no call).

    m.direct is bookkeeping only: a homeserver away now must not hold up or repeat
    the message the DM was opened for.
    """
    tools.rooms.add_dm(opened.room_id)

    async def record() -> None:
        # Written once: a room made ahead was recorded as it was taken; a resumed attempt
        # finds the step's record, and writes the case's if that attempt died before it.
        if opened.recorded:
            return
        if (
            run.progress.get(f"{what}_room") != opened.room_id
            or getattr(run.case, case_field) != opened.room_id
        ):
            room: dict[str, Any] = {f"{what}_room": opened.room_id}
            if opened.made_ahead:
                room[f"{what}_made_ahead"] = True
            if plain_because:
                room[f"{what}_plain_because"] = plain_because
            await run.save(progress=run.progress | room, case_fields={case_field: opened.room_id})

    if mark_direct:
        await asyncio.gather(record(), remember_dm(hs, user, opened))
    else:
        await record()


async def remember_dm(hs: Homeserver, user: str, opened: OpenedDm) -> None:
    """The room marked as a DM with them in the bot's m.direct (no call if it is)."""
    try:
        remembered = await hs.remember_direct_room(user, opened.room_id, known=opened.direct)
    except HomeserverUnavailable as exc:
        remembered = Refused("M_UNKNOWN", str(exc))
    if isinstance(remembered, Refused):
        log.warning("could not record the DM in m.direct: %s", remembered)


async def _forget_dm(hs: Homeserver, room_id: str) -> None:
    """A room marked in m.direct that did not become their DM, unmarked: best effort."""
    try:
        forgotten = await hs.forget_direct_rooms([room_id])
    except HomeserverUnavailable as exc:
        forgotten = Refused("M_UNKNOWN", str(exc))
    if isinstance(forgotten, Refused):
        log.warning("could not take the unused room %s out of m.direct: %s", room_id, forgotten)


async def _all_to_their_end(*calls: Awaitable[Any]) -> list[Any]:
    """Their results, once all have ended; then the first exception, if any raised: a
    message still on its way when the step gives up could be sent again by the resumed
    attempt."""
    results = await asyncio.gather(*calls, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


async def withdraw_unread(
    hs: Homeserver, run: StepRun, what: str, room_id: str, event_id: str
) -> None:
    """Redact a message sent into a room made ahead that refused the invite: best effort
    (it reaches no one either way)."""
    try:
        redacted = await hs.redact(
            room_id, event_id, reason="not delivered", txn_id=f"safeguard.{run.marker(what)}.unused"
        )
    except HomeserverUnavailable as exc:
        redacted = Refused("M_UNKNOWN", str(exc))
    if isinstance(redacted, Refused):
        log.warning("could not redact the message in the unused room %s: %s", room_id, redacted)


async def _invite_into_ready(
    hs: Homeserver, run: StepRun, user: str, room_id: str, what: str, case_field: str
) -> bool:
    """Them invited as a DM into a room made ahead (taken: the step's and the case's record
    hold it); False if it refused (then the step creates one, as with none ready)."""
    invited = await hs.invite(room_id, user, is_direct=True)
    if isinstance(invited, Refused):
        log.warning(
            "the room made ahead %s refused the invite (%s): creating one", room_id, invited
        )
        # The step's and the case's record, without the room.
        run.progress = {k: v for k, v in run.progress.items() if k not in taken(what, room_id)}
        await run.save(progress=run.progress, case_fields={case_field: None})
        return False
    return True


async def _of_other_communities(tools: Toolbox, run: StepRun, rooms: list[str]) -> set[str]:
    """Which of `rooms` another community's cases use as a DM or a debrief."""
    async with tools.db.connect() as conn:
        return await cases.private_rooms_of_others(conn, rooms, run.case.community)


async def _shared_dm(hs: Homeserver, user: str, rooms: Sequence[str]) -> str | None:
    """The latest of `rooms` (DMs the bot has had with them) that both are still in."""
    for room_id in reversed(dict.fromkeys(rooms)):
        bot, theirs = await asyncio.gather(
            hs.membership(room_id, hs.bot_user_id), hs.membership(room_id, user)
        )
        if bot == "join" and theirs in PRESENT_IN_DM:
            return room_id
    return None


async def _make_sure_they_are_in(hs: Homeserver, room_id: str, user: str) -> bool | Refused:
    """True if they had to be invited (again), False if they were there."""
    if await hs.membership(room_id, user) in PRESENT_IN_DM:
        return False
    invited = await hs.invite(room_id, user, is_direct=True)
    if isinstance(invited, Refused):
        # A retried invite can be refused because the first one went through.
        if await hs.membership(room_id, user) in PRESENT_IN_DM:
            return True
        return invited
    return True
