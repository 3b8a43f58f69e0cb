"""A moderator's flag becomes a case, or a recorded refusal: the referral decision.

Who may flag: a moderator of that room (on the room's state as it is now — a
moderator demoted a second ago cannot flag). Whom: someone in that room, or who
left it within `policy.recent_leave`; never staff, a moderator, or the bot.

Everything the decision needs is usually known before the flag arrives, so it
makes no homeserver call: the room's and the staff room's create event, power
levels and memberships (bot/moderation/room_state.py: invalidated by every state event
pushed before the flag, read again whenever not known to be current), and who
sent the flagged message (bot/intake/recent_senders.py, else read). A flood of refused
flags costs a database write each and never queues in front of a real one.

When all of it is known, the flag is decided as its push is recorded (`plan_ahead`), and
the member's notice goes the moment that record commits, before the case is written
(bot/steps/notify_ahead.py); the flag's turn in its lane then opens the case, as decided.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bot.cases.engine import Begun
from bot.checkin.due import due_at
from bot.config.deployment import Deployment
from bot.core.metrics import Metrics
from bot.core.ports import Homeserver, Refused, RoomState
from bot.intake.dispatch import Handling
from bot.intake.recent_senders import RecentSenders
from bot.moderation.authorization import Refusal, decide_flag, power_level
from bot.moderation.room_state import RoomStateCache, membership_in
from bot.referral.triggers import Flag, recognise_flag
from bot.rooms.names import names_of
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.staff.members import StaffDirectory
from bot.steps import CASE_STEPS, POSITIONS
from bot.steps.base import Toolbox
from bot.steps.corroboration import corroboration_due
from bot.steps.notify_ahead import NoticeAhead, NoticesAhead
from bot.store import audit, cases, outbox
from bot.texts.messages import Texts
from bot.texts.wording import duration_words as _duration
from bot.texts.wording import person, place

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncConnection

log = logging.getLogger(__name__)
# Refusals recorded and logged but not reported to staff (see Referral._refuse).
UNREPORTED = frozenset({"own_event", "room_not_moderated"})


def event_time(event: Mapping[str, Any], fallback: dt.datetime) -> dt.datetime:
    ts = event.get("origin_server_ts")
    if isinstance(ts, int) and not isinstance(ts, bool) and ts > 0:
        try:
            return dt.datetime.fromtimestamp(ts / 1000, dt.UTC)
        except (OverflowError, OSError, ValueError):
            return fallback
    return fallback


def _was_joined(event: Mapping[str, Any] | None) -> bool:
    """Whether a leave (or ban) ended a membership: what it replaced was a join. Synapse
    gives what a state event replaced (`unsigned.prev_content`). An event that replaced
    nothing (no `replaces_state`) ended no membership: a ban of someone never in the room,
    which a moderator can make of any user, must not let them be flagged (a crisis DM to
    anyone). Only one that replaced an earlier membership not shown is taken as a join."""
    unsigned = (event or {}).get("unsigned")
    if not isinstance(unsigned, dict):
        return False
    previous = unsigned.get("prev_content")
    if not isinstance(previous, dict):
        return "replaces_state" in unsigned
    return previous.get("membership") == "join"


class Referral:
    def __init__(
        self,
        homeserver: Homeserver,
        deployment: Deployment,
        staff: StaffDirectory,
        staff_room: StaffRoom,
        metrics: Metrics,
        *,
        room_state: RoomStateCache,
        reports: RefusalReports,
        texts: Texts,
        on_case: Callable[[int, Begun | None], None],
        on_outbox: Callable[[], None],
        senders: RecentSenders,
        watch_member: Callable[[str, str], None],
        is_moderated: Callable[[str], bool],
        before_notice: Callable[[str], object] = lambda member: None,
        begin: Callable[[AsyncConnection, cases.Opened], Awaitable[Begun]] | None = None,
        is_watched: Callable[[str, str], bool] = lambda room_id, member: True,
        ahead: tuple[NoticesAhead, Toolbox] | None = None,
    ) -> None:
        # Notices sent ahead of their cases, and this community's tools to send them with
        # (None: every flag waits for its case).
        self._ahead = ahead
        self._is_watched = is_watched
        # Writes a new case's first step's intent in the transaction that opens it.
        self._begin = begin
        self._hs = homeserver
        # Told the member as their flag is accepted: what their notice needs from the
        # homeserver (their devices) is read while the case is opened.
        self._before_notice = before_notice
        self._is_moderated = is_moderated
        self._watch_member = watch_member
        self._senders = senders
        self._deployment = deployment
        self._policy = deployment.policy
        self._staff = staff
        self._staff_room = staff_room
        self._metrics = metrics
        self._room_state = room_state
        self._reports = reports
        self._texts = texts
        self._on_case = on_case
        self._on_outbox = on_outbox

    def foresee(self, event: dict[str, Any]) -> None:
        """A possible flag as it arrives, before it is recorded: what its notice will need
        from the homeserver (the member's devices) is asked for now, when no read is
        needed to know whom it names. Asks nothing of anyone else; the flag is decided
        later, as always (a flag refused then cost one read of someone's devices)."""
        if self._policy.dry_run:
            return
        flag = recognise_flag(event, reactions=self._policy.reactions, command=self._policy.command)
        if flag is None or not self._is_moderated(flag.room_id):
            return
        target = self._known_target(flag)
        if target is not None:
            self._before_notice(target)

    def plan_ahead(self, event: dict[str, Any], now: dt.datetime) -> NoticeAhead | None:
        """A possible flag as its push arrives: its notice to send ahead of its case, if
        the flag is certain to open one from what is known now, without a read (else
        None, and it is decided in its lane, as always). The caller records the push with
        it (bot/intake/accept.py).

        Known means known current: the room's and the staff room's state, the flagged
        message's sender and their membership, and that they have no case (no watched
        membership) and no DM with the bot. The decision is the lane's own (`decide_flag`);
        only a member joined now qualifies (a recent leaver needs the lane's reads)."""
        if self._ahead is None or self._policy.dry_run:
            return None
        notices, tools = self._ahead
        flag = recognise_flag(event, reactions=self._policy.reactions, command=self._policy.command)
        if flag is None or not self._is_moderated(flag.room_id):
            return None
        target = self._known_target(flag)
        if target is None or self._is_watched(flag.room_id, target):
            return None
        room = self._room_state.current(flag.room_id)
        staff_room: RoomState | None = None
        if self._staff_room.room_id is not None:
            staff_room = self._room_state.current(self._staff_room.room_id)
            if staff_room is None:
                return None
        if room is None:
            return None
        known, member_event = self._room_state.known_member(flag.room_id, target)
        if not known or membership_in((member_event or {}).get("content")) != "join":
            return None
        if self._decided(flag, target, room, staff_room) is not None:
            return None
        dms = self._hs.direct_rooms_known(target)
        if dms is None or dms or tools.plain_room_because() is not None:
            return None  # as Notify.begin: a DM with them may be the one to use
        flagged_at = event_time(event, now)
        notice = notices.plan(
            tools,
            flag_event_id=flag.flag_event_id,
            group_room_id=flag.room_id,
            member_id=target,
            due_at=due_at(flagged_at, self._deployment.checkin),
        )
        if notice is None:
            return None
        try:
            # Before anything is sent: no membership of theirs goes unqueued.
            self._watch_member(flag.room_id, target)
            self._before_notice(target)
        except BaseException:
            notices.recorded(notice, False)  # never left unsettled: a case would wait on it
            raise
        return notice

    async def __call__(self, handling: Handling) -> None:
        """Dispatcher entry: a possible flag in a group room."""
        flag = recognise_flag(
            handling.item.payload, reactions=self._policy.reactions, command=self._policy.command
        )
        if flag is not None:
            await self.handle(handling, flag)

    async def handle(self, handling: Handling, flag: Flag) -> None:
        item = handling.item
        told = self._ahead[0].of_flag(flag.flag_event_id) if self._ahead else None
        if told is not None:
            # Decided as its push was recorded, and the member told: the case opens now
            # (or, opened by another flag of theirs meanwhile, is corroborated).
            await self._open(handling, flag, told.reservation.member_id)
            return
        flagged_at = event_time(item.payload, item.received_at)
        if item.caught_up and item.received_at - flagged_at > self._deployment.reconcile.lookback:
            await self._found_too_late(handling, flag, flagged_at)
            return
        if not self._is_moderated(flag.room_id):
            # Staff put the bot in a room before it acts there. What arrives from anywhere
            # else (a room it was not enrolled in, or a body forged with the hs_token) is
            # recorded, and told to the operator's log only: nobody in it can be helped.
            why = Refusal("room_not_moderated", "the bot does not moderate that room")
            await self._refuse(handling, flag, None, why)
            return
        known = self._room_state.current(flag.room_id)
        if known is not None and flag.flagger != self._deployment.bot_user_id:
            power = power_level(flag.flagger, known)
            if power < self._policy.moderator_power_level:
                # Plainly not a moderator, on state known to be current: no call needed.
                why = decide_flag(
                    flagger=flag.flagger,
                    target="",
                    room=known,
                    bot_user_id=self._deployment.bot_user_id,
                    moderator_power_level=self._policy.moderator_power_level,
                    target_is_staff=False,
                )
                assert why is not None
                await self._refuse(handling, flag, None, why)
                return
        # A flag that may be accepted: decided on state known to be current, or read
        # now where it is not (the reads are independent, so they are made together).
        flagged, room, staff_room = await asyncio.gather(
            self._flagged_sender(flag),
            self._room_state.state(flag.room_id),
            self._staff_room_state(),
        )
        if isinstance(flagged, Refusal):
            await self._refuse(handling, flag, None, flagged)
            return
        target = flagged
        if isinstance(room, Refused):
            why = f"the bot cannot read the room's power levels ({room.errcode})"
            await self._refuse(handling, flag, target, Refusal("room_unreadable", why))
            return
        refusal = self._decided(flag, target, room, staff_room)
        if refusal is not None:
            await self._refuse(handling, flag, target, refusal)
            return
        absent = await self._absence(handling, flag, target)
        if absent is not None:
            await self._refuse(handling, flag, target, absent)
            return
        await self._open(handling, flag, target)

    def _decided(
        self, flag: Flag, target: str, room: RoomState, staff_room: RoomState | None
    ) -> Refusal | None:
        """The decision on who flagged whom where (None: accepted), the same ahead of the
        push's record (`plan_ahead`) as in the flag's lane."""
        return decide_flag(
            flagger=flag.flagger,
            target=target,
            room=room,
            bot_user_id=self._deployment.bot_user_id,
            moderator_power_level=self._policy.moderator_power_level,
            target_is_staff=self._staff.is_staff_in(target, staff_room),
        )

    async def _absence(self, handling: Handling, flag: Flag, target: str) -> Refusal | None:
        """None if the target may be flagged in that room: joined, or gone from it (after
        being in it) less than `policy.recent_leave` before the flag, or already the
        subject of an open case there (then it is corroboration).

        Someone only invited (or knocking) was never in the room: anyone who can invite
        could otherwise make the bot send any user of the homeserver a crisis DM."""
        event = await self._room_state.member_event(flag.room_id, target)
        if isinstance(event, Refused):
            return None  # unreadable says nothing either way: the removal's answer decides
        content = (event or {}).get("content") or {}
        membership = content.get("membership")
        if membership == "join":
            return None
        flagged_at = event_time(handling.item.payload, handling.item.received_at)
        left_at = event_time(event or {}, flagged_at - 2 * self._policy.recent_leave)
        if (
            membership in ("leave", "ban")
            and _was_joined(event)
            and flagged_at - left_at <= self._policy.recent_leave
        ):
            return None
        async with handling.database() as conn:
            if await cases.has_active(conn, flag.room_id, target):
                return None
        if event is None:
            return Refusal("not_in_room", f"{target} has never been in that room")
        if membership == "invite":
            return Refusal("not_in_room", f"{target} is only invited to that room, not in it")
        if membership == "knock":
            return Refusal("not_in_room", f"{target} is only knocking at that room, not in it")
        if not _was_joined(event):
            how = "banned while not in it" if membership == "ban" else "an invite refused"
            return Refusal("not_in_room", f"{target} was never in that room ({how})")
        return Refusal(
            "not_in_room",
            f"{target} left that room more than {_duration(self._policy.recent_leave)} "
            "before the flag",
        )

    async def _flagged_sender(self, flag: Flag) -> str | Refusal:
        """The member the flag names: given, or the flagged message's sender."""
        known = self._known_target(flag)
        if known is not None:
            return known
        if flag.target_event_id is None:
            return Refusal("target_unknown", "no member was named")
        flagged = await self._hs.get_event(flag.room_id, flag.target_event_id)
        if isinstance(flagged, Refused):
            return Refusal(
                "target_unknown", f"the flagged message could not be read ({flagged.errcode})"
            )
        sender = flagged.get("sender")
        return sender if isinstance(sender, str) else Refusal("target_unknown", "no sender")

    def _known_target(self, flag: Flag) -> str | None:
        """The member the flag names, if known without a read: given, or the sender of a
        message delivered lately (bot/intake/recent_senders.py)."""
        if flag.target_user is not None:
            return flag.target_user
        if flag.target_event_id is None:
            return None
        return self._senders.sender_of(flag.room_id, flag.target_event_id)

    async def _staff_room_state(self) -> RoomState | None:
        """Whose power in the staff room makes them staff (None: no staff room yet, or it
        cannot be read: then only `policy.staff` are staff)."""
        room_id = self._staff_room.room_id
        if room_id is None:
            return None
        state = await self._room_state.state(room_id)
        return None if isinstance(state, Refused) else state

    async def _open(self, handling: Handling, flag: Flag, target: str) -> None:
        item = handling.item
        flagged_at = event_time(item.payload, item.received_at)
        new_flag = cases.NewFlag(
            room_id=flag.room_id,
            member_id=target,
            flagger=flag.flagger,
            method=flag.method,
            flag_event_id=flag.flag_event_id,
            target_event_id=flag.target_event_id,
            reason=flag.reason,
            flagged_at=flagged_at,
            received_at=item.received_at,
            caught_up=item.caught_up,
            community=self._deployment.community,
        )
        # Before the case exists, so no membership of theirs from then on goes unqueued.
        self._watch_member(flag.room_id, target)
        if not self._policy.dry_run:
            self._before_notice(target)
        if self._ahead is not None:
            # Their notice sent ahead (by this flag or another): the case takes it over.
            told = await self._ahead[0].settled_for(flag.room_id, target)
            if told is not None:
                new_flag = replace(new_flag, nonce=told.reservation.nonce)
        opened, begun = await handling.transact(self._record_flag, new_flag, flagged_at)
        if self._ahead is not None:
            if new_flag.nonce is not None:
                self._ahead[0].taken_over(new_flag)
            self._ahead[0].handled(flag.flag_event_id)
        self._metrics.flags.labels("accepted" if opened.created else "corroborated").inc()
        log.info(
            "case #%d %s by %s flag",
            opened.case_id,
            "opened" if opened.created else "corroborated",
            flag.method,
            extra={"case": opened.case_id},
        )
        self._on_case(opened.case_id, begun)

    async def _record_flag(
        self, conn: AsyncConnection, new_flag: cases.NewFlag, flagged_at: dt.datetime
    ) -> tuple[cases.Opened, Begun | None]:
        """The case opened, its first step's intent with it (or the flag recorded on the
        member's open case): one transaction."""
        opened = await cases.open_or_corroborate(
            conn,
            self._deployment.provenance,
            new_flag,
            steps=CASE_STEPS,
            dry_run=self._policy.dry_run,
            due_at=due_at(flagged_at, self._deployment.checkin),
        )
        if new_flag.nonce is not None and self._ahead is not None:
            # Their notice went ahead: the case's, whichever of its steps begins first.
            opened = await self._ahead[0].take_over(conn, opened, new_flag)
        if opened.created:
            begun = await self._begin(conn, opened) if self._begin else None
            return opened, begun
        # Staff are told (as a reply to the alert), and this flag is redacted too.
        await corroboration_due(conn, opened.case_id, position=POSITIONS["corroboration"])
        # What it redacted already stays recorded: only the new flag is new.
        await cases.rearm_step(
            conn, opened.case_id, "redact_flag", POSITIONS["redact_flag"], lambda was: was
        )
        await cases.set_next_attempt(conn, opened.case_id, dt.datetime.now(dt.UTC))
        return opened, None

    async def _found_too_late(
        self, handling: Handling, flag: Flag, flagged_at: dt.datetime
    ) -> None:
        """A flag the homeserver never delivered, found after longer than the look-back (a
        long outage): too old to act on as if it were new, and never dropped in silence:
        recorded, and staff told at once, each one."""
        now = dt.datetime.now(dt.UTC)
        target = await self._flagged_sender(flag)
        member = target if isinstance(target, str) else None
        # Staff must act on this by hand: named as they know them (rare: read each time).
        ids = [flag.room_id, flag.flagger, *([member] if member else [])]
        names = await names_of(self._hs, ids)
        room = place(flag.room_id, names[flag.room_id])
        flagger = person(flag.flagger, names[flag.flagger])
        member_named = person(member, names[member]) if member else None
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "refused",
                facts={
                    "code": "found_too_late",
                    "method": flag.method,
                    "community": self._deployment.community,
                },
                personal={
                    "room": flag.room_id,
                    "flagger": flag.flagger,
                    "member": member,
                    "flag_event": flag.flag_event_id,
                    "flagged_at": flagged_at.isoformat(),
                },
                at=now,
            )
            await outbox.queue(
                conn,
                self._staff_room.address,
                self._texts.flag_found_late(
                    flagged_at=flagged_at, room=room, flagger=flagger, member=member_named
                ),
                now,
            )
        self._metrics.flags.labels("refused_found_too_late").inc()
        log.warning("a flag found %s after it was raised was not acted on", now - flagged_at)
        self._on_outbox()

    async def _refuse(
        self, handling: Handling, flag: Flag, target: str | None, refusal: Refusal
    ) -> None:
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "refused",
                facts={
                    "code": refusal.code,
                    "method": flag.method,
                    # Whose staff were told: a community's export carries its refusals.
                    "community": self._deployment.community,
                },
                personal={
                    "detail": refusal.detail,
                    "room": flag.room_id,
                    "flagger": flag.flagger,
                    "member": target,
                    "flag_event": flag.flag_event_id,
                    "flagged_event": flag.target_event_id,
                },
                at=now,
            )
            # The bot's own events, and flags from rooms it does not moderate, are not worth
            # a staff message; every other refusal is, coalesced per (flagger, room).
            told = refusal.code not in UNREPORTED and await self._reports.refused(
                conn,
                kind="flag",
                actor=flag.flagger,
                room_id=flag.room_id,
                report=self._texts.refusal(
                    code=refusal.code,
                    detail=refusal.detail,
                    flagger=flag.flagger,
                    member=target,
                    room=flag.room_id,
                    method=flag.method,
                ),
                now=now,
            )
        self._metrics.flags.labels(f"refused_{refusal.code}").inc()
        log.info("flag refused: %s", refusal.code)
        if told:
            self._on_outbox()
