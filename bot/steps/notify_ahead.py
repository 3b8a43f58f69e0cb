"""The member's notice, sent ahead of their case: the moment their flag's push is recorded.

A flag that is certain to be accepted from what the service already knows (the room,
the flagger's power, the member's membership, the staff room: all known current; see
`Referral.plan_ahead`) need not wait for its case to be written before the member is
told. Opening the case is a transaction of its own, most of the wait between the push
and the first call to the homeserver; a bare appservice makes none.

Exactly once, all the same:
- the notice's room (a room made ahead) and its marker are chosen before the push is
  recorded, and written in the push's own transaction (bot/store/ingest.py): the room
  leaves the pool there and the reservation keeps it, only if the flag is new and the
  member has no active case; the marker comes from the nonce the case will have
  (`Case.tag`), not from its number, which does not exist yet;
- the invite and the notice go out once that transaction commits, while the case is
  opened as for any flag (the flag is not decided again: it was decided, and acted on);
- the transaction that opens the member's case (for this flag or another of them) takes
  the reservation over: the room and `SENT_AHEAD` recorded on the notice step, the
  reservation deleted, the nonce the case's. The notice step, whenever it runs, joins the
  calls already made (`joined`) instead of making its own; after a crash anywhere
  between, or a call that failed, `SENT_AHEAD` makes it look for them first (the
  member's membership, the message by its marker), as any resumed step does.

Nothing ahead happens when anything is unknown (a read would be needed), when the member
already has a case or a DM with the bot, or when no room made ahead is ready: then the
flag takes the usual path, decided in its lane.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.core.ports import MESSAGE_MARKER_KEY, Refused, Sent, message_txn_id
from bot.rooms.directory import RoomDirectory
from bot.rooms.ready_rooms import ReadyRooms, record_taken
from bot.steps.base import SENT_AHEAD, StepRun, Told, Toolbox
from bot.steps.direct import OpenedDm, ToldByDm, withdraw_unread
from bot.store import cases
from bot.store import ready_rooms as store
from bot.store.cases import AHEAD_NONCE_PREFIX, ahead_tag

log = logging.getLogger(__name__)
NOTICE_STEP = "notify"  # the step the notice sent ahead stands for, and its marker's part


def notice_marker(nonce: str) -> str:
    """The marker of the notice of the case whose nonce this is (`marker(case, "notify")`)."""
    return f"{ahead_tag(nonce)}:{NOTICE_STEP}"


@dataclass(eq=False)
class NoticeAhead:
    """One member's notice sent ahead: reserved with the push, then sent."""

    reservation: store.Reservation
    due_at: dt.datetime | None
    tools: Toolbox | None  # None: found at start (a crash between): nothing to send or join
    # Set once the push's transaction has ended: whether it reserved the room.
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    reserved: bool = False
    sending: asyncio.Task[tuple[Any, Any]] | None = None

    @property
    def member(self) -> tuple[str, str]:
        return self.reservation.group_room_id, self.reservation.member_id


class NoticeUnsettled(Exception):
    """A push's record with a notice ahead has not ended in time: the case waits for it."""


# How long a case opening for a member waits for the push that planned their notice ahead
# to be recorded (it is the same service, a few milliseconds as a rule): past it, the flag
# is retried (never opened beside a notice that may still go).
SETTLE_SECONDS = 30.0


class NoticesAhead:
    """Every notice sent (or being reserved) ahead of its case: one for all communities,
    as the rooms made ahead are one pool."""

    def __init__(self, db: AsyncEngine, ready: ReadyRooms, rooms: RoomDirectory) -> None:
        self._db = db
        self._ready = ready
        self._rooms = rooms
        # Planned or reserved, no case has taken it over yet: by (group room, member).
        self._pending: dict[tuple[str, str], NoticeAhead] = {}
        # Reserved, its flag not handled in its lane yet (it opens the case undecided).
        self._by_flag: dict[str, NoticeAhead] = {}
        # Taken over by a case, its notice step not run yet: by the case's nonce.
        self._taken: dict[str, NoticeAhead] = {}

    async def load(self) -> None:
        """At start: reservations whose case was not opened before the service stopped."""
        async with self._db.connect() as conn:
            found = await store.reservations(conn)
        for reservation in found:
            notice = NoticeAhead(reservation, None, None, reserved=True)
            notice.settled.set()
            # Their replies there wait for the case, not dropped as a stranger's room's.
            self._rooms.add_dm(reservation.room_id)
            self._pending[notice.member] = notice
            self._by_flag[reservation.flag_event_id] = notice

    def plan(
        self,
        tools: Toolbox,
        *,
        flag_event_id: str,
        group_room_id: str,
        member_id: str,
        due_at: dt.datetime | None,
    ) -> NoticeAhead | None:
        """A notice to reserve with the flag's push, if a room made ahead is ready and none
        is planned for the member there already; the caller records the push with it and
        then calls `recorded`, whatever happens."""
        if (group_room_id, member_id) in self._pending or flag_event_id in self._by_flag:
            return None
        room_id = self._ready.claim_free()
        if room_id is None:
            return None
        nonce = AHEAD_NONCE_PREFIX + secrets.token_hex(8)
        reservation = store.Reservation(flag_event_id, group_room_id, member_id, room_id, nonce)
        notice = NoticeAhead(reservation, due_at, tools)
        self._pending[notice.member] = notice
        # Made ready while the push is being recorded (the notice's text): it waits only
        # for the record to end, then sends if reserved.
        notice.sending = asyncio.create_task(
            self._send(notice), name=f"notice-ahead:{reservation.flag_event_id}"
        )
        return notice

    def recorded(self, notice: NoticeAhead, reserved: bool) -> None:
        """The push's transaction ended: reserved (send now), or not (forgotten; the room,
        if still in the pool, is known again at its next round)."""
        notice.reserved = reserved
        notice.settled.set()  # its sending goes on, or ends
        if not reserved:
            if self._pending.get(notice.member) is notice:
                del self._pending[notice.member]
            return
        self._by_flag[notice.reservation.flag_event_id] = notice
        # (Its room is a DM in the directory already, as every room made ahead is.)
        self._ready.handed_over()
        log.info(
            "flag %s: its member told ahead of the case, in a room made ahead",
            notice.reservation.flag_event_id,
        )

    def of_flag(self, flag_event_id: str) -> NoticeAhead | None:
        """The notice reserved for this flag, its flag not handled yet (None: none)."""
        return self._by_flag.get(flag_event_id)

    def handled(self, flag_event_id: str) -> None:
        """The flag's turn in its lane ended with its case opened or corroborated."""
        self._by_flag.pop(flag_event_id, None)

    def awaits_case(self, room_id: str) -> bool:
        """Whether the room is a notice's sent ahead of a case not opened yet."""
        return any(n.reservation.room_id == room_id for n in self._pending.values())

    async def settled_for(self, group_room_id: str, member_id: str) -> NoticeAhead | None:
        """The member's notice reserved ahead in that room and not taken over, once its
        push's transaction has ended (a case opening for them meanwhile waits for it: it
        must take that notice over, not send a second)."""
        notice = self._pending.get((group_room_id, member_id))
        if notice is None:
            return None
        try:
            await asyncio.wait_for(notice.settled.wait(), SETTLE_SECONDS)
        except TimeoutError:
            raise NoticeUnsettled(
                f"the push of flag {notice.reservation.flag_event_id} is still being recorded"
            ) from None
        return notice if notice.reserved else None

    async def take_over(
        self, conn: AsyncConnection, opened: cases.Opened, flag: cases.NewFlag
    ) -> cases.Opened:
        """In the transaction that opens the member's case (`flag.nonce`: their notice's):
        the reservation deleted, and, on a case opened, its room and `SENT_AHEAD` recorded
        on the notice step and the case, whichever step begins first. Returns the case as
        written. Call `taken_over` once it has committed."""
        if not await store.take_reserved(conn, flag.room_id, flag.member_id):
            return opened
        notice = self._pending.get((flag.room_id, flag.member_id))
        room_id = notice.reservation.room_id if notice is not None else None
        if not opened.created or opened.case is None or room_id is None:
            return opened
        progress = await record_taken(
            conn, opened.case_id, NOTICE_STEP, "dm", {SENT_AHEAD: True}, "dm_room_id", room_id
        )
        steps = tuple(
            replace(s, progress=progress) if s.step == NOTICE_STEP else s for s in opened.steps
        )
        return replace(opened, case=replace(opened.case, dm_room_id=room_id), steps=steps)

    def taken_over(self, flag: cases.NewFlag) -> None:
        """`take_over` committed: the notice is the case's, joined by its notice step."""
        notice = self._pending.get((flag.room_id, flag.member_id))
        if notice is None or notice.reservation.nonce != flag.nonce:
            return
        del self._pending[notice.member]
        self._taken[notice.reservation.nonce] = notice

    async def joined(self, run: StepRun) -> ToldByDm | None:
        """The notice step's outcome from the calls made ahead, if both went through in
        this run of the service; None if the step must make them itself (after a crash,
        or a call that failed: then `run.resumed`, and it looks for them first)."""
        nonce = run.case.nonce
        notice = self._taken.pop(nonce, None) if nonce is not None else None
        if notice is None or notice.sending is None:
            return None
        invited, sent = await asyncio.shield(notice.sending)
        room_id = notice.reservation.room_id
        if isinstance(invited, Refused) and notice.tools is not None:
            # As with a room made ahead that refuses the invite on the usual path: a room
            # is made instead (the step, as if none had been ready).
            log.warning("the room made ahead %s refused the invite (%s)", room_id, invited)
            if isinstance(sent, Sent):
                await withdraw_unread(notice.tools.homeserver, run, "dm", room_id, sent.event_id)
            run.progress = {
                k: v
                for k, v in run.progress.items()
                if k not in ("dm_room", "dm_made_ahead", SENT_AHEAD)
            }
            await run.save(progress=run.progress, case_fields={"dm_room_id": None})
            return None
        if not isinstance(sent, Sent) or isinstance(invited, BaseException):
            log.warning(
                "case #%d: a call made ahead did not go (%s, %s)", run.case.id, sent, invited
            )
            return None
        return told_in(room_id, sent.event_id)

    async def _send(self, notice: NoticeAhead) -> tuple[Any, Any]:
        """Once the push's record has reserved the room: the invite and the notice,
        together, as the notice step sends them: (the invite's answer, the send's), each an
        exception if it raised. (None, None) if it was not reserved: nothing sent."""
        tools = notice.tools
        assert tools is not None
        hs = tools.homeserver
        reservation = notice.reservation
        room_id, member = reservation.room_id, reservation.member_id
        now = dt.datetime.now(dt.UTC)
        marker = notice_marker(reservation.nonce)
        content = tools.texts.notice(notice.due_at, now) | {
            MESSAGE_MARKER_KEY: {"step": NOTICE_STEP, "marker": marker}
        }
        after = tools.deployment.plain_fallback_after
        await notice.settled.wait()
        if not notice.reserved:
            return None, None
        hs.expect_member(room_id, member)
        # The notice first: what the member reads (the invite shows it to them either way).
        sent, invited = await asyncio.gather(
            hs.send(
                room_id,
                content,
                txn_id=message_txn_id(marker),
                encrypt_by=None if after is None else now + after,
            ),
            hs.invite(room_id, member, is_direct=True),
            return_exceptions=True,
        )
        return invited, sent


def told_in(room_id: str, event_id: str) -> ToldByDm:
    """The member's notice, in the room made ahead it was sent ahead into."""
    return ToldByDm(OpenedDm(room_id, True, False, None, made_ahead=True), Told(event_id), None)
