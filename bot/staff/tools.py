"""Staff act on cases from the staff room: `!case` commands and ✅ acknowledgements.

Only staff (policy.staff, or staff_power_level in the staff room) have any
effect; anyone else's command is recorded and otherwise ignored. Commands edit
nothing: each is a new audit entry. Replies go through the outbox, as replies
to the command, so they are delivered exactly once even across a crash.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.checkin.events import CheckinEvents
from bot.config.deployment import Deployment
from bot.core.reactions import ACK_KEY, CLAIM_KEY, annotation
from bot.intake.dispatch import Handling
from bot.rooms.staff_room import StaffRoom
from bot.staff.commands import (
    USAGE,
    CaseCommand,
    CommandError,
    RoomsCommand,
    parse_case_command,
    parse_rooms_command,
)
from bot.staff.replies import LIST_PAGE_SIZE, case_listing, case_timeline, people_in, word
from bot.staff.room_admin import RoomAdmin
from bot.steps import POSITIONS, WITHDRAW_STEPS
from bot.steps.base import PLAIN_CLOCK
from bot.store import audit, cases, outbox
from bot.texts.catalogues import language
from bot.texts.templates import notice

log = logging.getLogger(__name__)
# What counts as staff dealing with a case: the alert is not raised again after it.
DEALING_WITH = frozenset({"es", "ack", "note", "close", "withdraw", "remove", "notify"})
CHECKIN_STEPS = ["checkin", "checkin_notice", "checkin_reminder"]


class StaffTools:
    def __init__(
        self,
        db: AsyncEngine,
        deployment: Deployment,
        staff_room: StaffRoom,
        *,
        is_staff: Callable[[str], Awaitable[bool]],
        checkins: CheckinEvents,
        room_admin: RoomAdmin,
        enrol: Callable[[str, str, Any], Awaitable[None]],
        on_outbox: Callable[[], None],
        on_case_changed: Callable[[int], None],
    ) -> None:
        self._db = db
        self._room_admin = room_admin
        # Join a room and moderate it as this community's (Membership.enrol).
        self._enrol = enrol
        self._deployment = deployment
        # Its staff see its cases alone: another community's case number is answered as
        # one that does not exist, and its alerts and notices are not theirs to act on.
        self._community = deployment.community
        # Every time staff read, in the zone the alert and the check-in use.
        self._zone = deployment.checkin.zone
        self._language = language(deployment.language)
        self._ = self._language._
        self._staff_room = staff_room
        self._is_staff = is_staff
        self._checkins = checkins
        self._on_outbox = on_outbox
        self._on_case_changed = on_case_changed

    # ---- dispatcher entries --------------------------------------------------------------

    async def message(self, handling: Handling) -> None:
        """A message in the staff room: a `!case` or `!rooms` command, or nothing for us."""
        content = handling.item.payload.get("content") or {}
        body = content.get("body", "")
        rooms_command = parse_rooms_command(body)
        if rooms_command is not None:
            await self._rooms(handling, rooms_command)
            return
        parsed = parse_case_command(body)
        if parsed is None:
            return
        # Staff first: anyone else gets no effect at all, not even a usage hint.
        if isinstance(parsed, CommandError):
            if await self._refused_unless_staff(handling, None, "unparsed", "command"):
                return
            await self._reply(handling, self._not_understood(parsed.in_(self._language)))
            return
        await self._run(handling, parsed, via="command")

    async def reaction(self, handling: Handling) -> None:
        """✅ on an alert acknowledges it; ✋ on a check-in notice claims the check-in."""
        reacted = annotation(handling.item.payload.get("content"))
        if reacted is None:
            return
        key, target = reacted
        if key == CLAIM_KEY:
            if not await self._checkins.claim_by_reaction(handling, target):
                await self._misplaced(handling, key, target)
            return
        if key != ACK_KEY:
            return
        async with self._db.connect() as conn:
            case = await cases.by_alert(conn, target, community=self._community)
        if case is not None:
            # Answered as a reply to the alert itself, naming who acknowledged it.
            await self._run(handling, CaseCommand("ack", case.id), via="reaction", reply_to=target)
            return
        await self._misplaced(handling, key, target)

    async def _misplaced(self, handling: Handling, key: str, target: str) -> None:
        """A ✋ or ✅ on a message it does nothing on: staff are told where it works (a
        reaction that does nothing and says nothing reads as done)."""
        if not await self._is_staff(handling.item.payload.get("sender", "")):
            return
        async with self._db.connect() as conn:
            alerted = await cases.by_alert(conn, target, community=self._community)
            opened = await cases.by_checkin_notice(conn, target, community=self._community)
        case = alerted or opened
        _ = self._
        if key == CLAIM_KEY and case is not None and case.checkin_opened_at is None:
            text = _(
                "Case #{case}'s check-in is not open yet. Once it is, react ✋ on the "
                "message saying so, or send `!case {case} claim`."
            )
        elif key == CLAIM_KEY:
            text = (
                _(
                    "✋ claims a check-in: react on the message saying case #{case}'s check-in "
                    "is open, or send `!case {case} claim`."
                )
                if case is not None
                else _(
                    "✋ claims a check-in: react on a message saying a check-in is open, or "
                    "send `!case N claim`."
                )
            )
        else:
            text = (
                _(
                    "✅ acknowledges an alert: react on case #{case}'s alert itself, or send "
                    "`!case {case} ack`."
                )
                if case is not None
                else _(
                    "✅ acknowledges an alert: react on the alert itself (the message starting "
                    '"Case #"), or send `!case N ack`.'
                )
            )
        text = text.format(case=case.id if case is not None else "N")
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            await self._queue_reply(
                conn,
                handling,
                text,
                now,
                reply_to=target,
                case_id=case.id if case is not None else None,
            )
        self._on_outbox()

    # ---- commands ------------------------------------------------------------------------

    async def _rooms(self, handling: Handling, command: RoomsCommand | CommandError) -> None:
        action = command.action if isinstance(command, RoomsCommand) else "unparsed"
        if await self._refused_unless_staff(handling, None, f"rooms {action}", "command"):
            return
        if isinstance(command, CommandError):
            await self._reply(handling, self._not_understood(command.in_(self._language)))
            return
        if command.action == "list":
            await self._reply(handling, await self._room_admin.listing())
            return
        assert command.room is not None
        sender = handling.item.payload.get("sender", "")
        if command.action == "claim":
            reply = await self._room_admin.claim(
                command.room, sender, lambda room, by: self._enrol(room, by, None)
            )
            await self._reply(handling, reply)
            return
        reply, left = await self._room_admin.leave(command.room, sender)
        now = dt.datetime.now(dt.UTC)
        async with handling.transaction() as conn:
            if left is not None:
                await self._room_admin.record_left(conn, left, sender, now)
            await self._queue_reply(conn, handling, reply, now)
        self._on_outbox()

    async def _refused_unless_staff(
        self, handling: Handling, case_id: int | None, action: str, via: str
    ) -> bool:
        """True (and recorded) when the sender is not staff."""
        sender = handling.item.payload.get("sender", "")
        if await self._is_staff(sender):
            return False
        async with handling.transaction() as conn:
            await audit.append(
                conn,
                self._deployment.provenance,
                "command_refused",
                case_id=await self._ours(conn, case_id),
                facts={"action": action, "via": via, "why": "not staff"},
                personal={"by": sender},
                at=dt.datetime.now(dt.UTC),
            )
        return True

    async def _run(
        self, handling: Handling, command: CaseCommand, *, via: str, reply_to: str | None = None
    ) -> None:
        if await self._refused_unless_staff(handling, command.case, command.action, via):
            return
        sender = handling.item.payload.get("sender", "")
        now = dt.datetime.now(dt.UTC)
        if command.action == "claim":
            await self._claim(handling, command, sender)
            return
        # A listing or a timeline is read once, its names with it, before the transaction
        # (which holds the database's write lock): the transaction only queues the reply.
        shown = await self._shown(command, now) if command.action in ("list", "show") else None
        async with handling.transaction() as conn:
            reply = (
                shown if shown is not None else await self._apply(conn, command, sender, now, via)
            )
            await self._queue_reply(
                conn,
                handling,
                reply,
                now,
                reply_to=reply_to,
                case_id=await self._ours(conn, command.case),
            )
        self._on_outbox()
        if command.case is not None and command.action in (
            "close",
            "reopen",
            "withdraw",
            "remove",
            "notify",
        ):
            self._on_case_changed(command.case)

    async def _claim(self, handling: Handling, command: CaseCommand, sender: str) -> None:
        assert command.case is not None
        async with self._db.connect() as conn:
            case = await cases.get(conn, command.case, community=self._community)
        if case is None or case.checkin_room_id is None:
            text = (
                self._("Case #{case} has no open check-in to claim yet.")
                if case
                else self._("There is no case #{case}.")
            ).format(case=command.case)
            await self._reply(handling, text, case_id=case.id if case else None)
            return
        await self._checkins.claim(handling, case, sender, via="command")
        await self._reply(
            handling,
            self._("Case #{case}: check-in claimed by {by}.").format(case=case.id, by=sender),
            case_id=case.id,
        )

    async def _shown(self, command: CaseCommand, now: dt.datetime) -> str:
        """`!case list` or `!case N`: what it shows, read in one read, with the names of
        the rooms and people it names (the id after, once)."""
        async with self._db.connect() as conn:
            if command.action == "list":
                total = await cases.count(conn, command.text, community=self._community)
                shown = await _listed(conn, command, self._community)
                entries: list[audit.AuditEntry] = []
            else:
                assert command.case is not None
                case = await cases.get(conn, command.case, community=self._community)
                if case is None:
                    return self._no_such_case(command.case)
                shown = [case]
                entries = await audit.entries(conn, case_id=case.id)
        ids = [some_id for one in shown for some_id in (one.room_id, one.member_id) if some_id]
        names = await self._room_admin.names([*ids, *people_in(entries)])
        if command.action == "list":
            return case_listing(
                shown,
                command.text,
                now,
                zone=self._zone,
                names=names,
                page=command.page,
                total=total,
                language=self._language,
            )
        return case_timeline(
            shown[0], entries, zone=self._zone, names=names, language=self._language
        )

    async def _apply(
        self,
        conn: AsyncConnection,
        command: CaseCommand,
        sender: str,
        now: dt.datetime,
        via: str,
    ) -> str:
        """Record the command; returns the reply text."""
        if command.action == "help":
            return self._(USAGE)
        if command.action == "stats":
            return await self._stats(conn, command.page, now)
        assert command.case is not None
        case = await cases.get(conn, command.case, community=self._community)
        if case is None:
            return self._no_such_case(command.case)
        _ = self._
        if case.purged_at is not None:
            # Its personal data is gone by retention: nothing new is recorded of it (a
            # note, a reference, a reason would be personal data no purge comes back for).
            return _(
                "Case #{case} was purged (its time to be kept is over): nothing more is "
                "recorded for it."
            ).format(case=case.id)

        def entry(kind: str, facts: dict[str, Any], personal: dict[str, Any]) -> Any:
            return audit.append(
                conn,
                self._deployment.provenance,
                kind,
                case_id=case.id,
                facts=facts,
                personal={"by": sender} | personal,
                at=now,
            )

        policy = self._deployment.policy
        if command.action in DEALING_WITH and case.dealt_with_at is None:
            # Staff are on it: the alert is not raised again.
            await cases.set_fields(conn, case.id, dealt_with_at=now)
        if command.action == "es":
            await entry(
                "emergency_services_informed",
                {
                    "lawful_basis": policy.lawful_basis,
                    "data_shared": policy.emergency_data_shared,
                    "informed_at": now.isoformat(),
                },
                {"reference": command.reference, "service": command.service},
            )
            return _(
                "Case #{case}: recorded that {service} were informed by {by} "
                "(reference {reference}; lawful basis: {basis})."
            ).format(
                case=case.id,
                # The default ("emergency services") in this language; a service staff
                # named, as they wrote it.
                service=command.service if len(command.words) > 1 else _(command.service),
                by=sender,
                reference=command.reference,
                basis=_(policy.lawful_basis),
            )
        if command.action == "note":
            await entry("note", {"kind": "opinion"}, {"text": command.text})
            return _("Case #{case}: note added.").format(case=case.id)
        if command.action == "ack":
            if case.alert_acked_by is None:
                await cases.set_fields(conn, case.id, alert_acked_by=sender)
            await entry(
                "alert_acknowledged", {"via": via, "first": case.alert_acked_by is None}, {}
            )
            return _("Case #{case}: alert acknowledged by {by}.").format(case=case.id, by=sender)
        if command.action == "withdraw":
            return await self._withdraw(conn, case, command, sender, now, entry)
        if command.action in ("remove", "notify") and case.state == "closed":
            # A closed case's notice and removal are not made (bot/steps/notify.py).
            return _(
                "Case #{case} is closed: nothing is sent to the member or done to them. "
                "`!case {case} reopen <why>` reopens it first."
            ).format(case=case.id)
        if command.action == "remove":
            return await self._remove(conn, case, sender, now, entry)
        if command.action == "notify":
            return await self._notify_again(conn, case, now, entry)
        if command.action == "close":
            if case.state == "closed":
                return _(
                    "Case #{case} is already closed. `!case {case} reopen <why>` reopens it."
                ).format(case=case.id)
            # Closed, the case no longer gathers flags: a new flag opens a new case.
            await cases.set_fields(
                conn, case.id, state="closed", closed_at=now, outcome=command.text, active_key=None
            )
            await entry("closed", {}, {"outcome": command.text})
            await self._cancel_checkin(conn, case.id, "the case was closed before it", now)
            head = await audit.head(conn)
            return _(
                "Case #{case} closed. Audit chain head: {head} "
                "(check with `safeguard audit verify --head {head}`)."
            ).format(case=case.id, head=f"{head[0]}:{head[1]}")
        if command.action == "reopen":
            if case.state != "closed":
                return _("Case #{case} is open already.").format(case=case.id)
            await cases.set_fields(conn, case.id, state="open", closed_at=None)
            await cases.reactivate(conn, case)
            await entry("reopened", {}, {"why": command.text})
            return _("Case #{case} reopened.").format(case=case.id)
        if command.action == "hold":
            await cases.set_fields(conn, case.id, hold_reason=command.text)
            await entry("held", {}, {"why": command.text})
            return _("Case #{case} is on hold: retention will not purge it.").format(case=case.id)
        raise AssertionError(command.action)

    async def _withdraw(
        self,
        conn: AsyncConnection,
        case: cases.Case,
        command: CaseCommand,
        sender: str,
        now: dt.datetime,
        entry: Any,
    ) -> str:
        """A wrong flag: recorded, the case closed as withdrawn, the check-in cancelled
        (unless kept); the apology and the way back are steps (bot/steps/withdraw.py)."""
        if case.outcome and case.outcome.startswith("withdrawn"):
            return self._("Case #{case} was withdrawn already.").format(case=case.id)
        await entry("withdrawn", {"keep_checkin": command.keep_checkin}, {"why": command.text})
        await cases.set_fields(
            conn,
            case.id,
            state="closed",
            closed_at=now,
            outcome=f"withdrawn: {command.text}",
            active_key=None,
        )
        if not command.keep_checkin:
            await self._cancel_checkin(conn, case.id, "withdrawn", now)
        for name in WITHDRAW_STEPS:
            progress = {"by": sender, "why": command.text} if name == "withdraw_report" else {}
            await cases.rearm_step(conn, case.id, name, POSITIONS[name], progress)
        await cases.set_next_attempt(conn, case.id, now)
        kept = self._(" The check-in stays as planned.") if command.keep_checkin else ""
        return self._(
            "Case #{case}: withdrawing. I'm apologising to the member and inviting them "
            "back into the room; I'll say here how it went.{kept}"
        ).format(case=case.id, kept=kept)

    async def _remove(
        self,
        conn: AsyncConnection,
        case: cases.Case,
        sender: str,
        now: dt.datetime,
        entry: Any,
    ) -> str:
        """Staff decide to remove the member without waiting for the notice."""
        steps = {step.step: step for step in await cases.steps_of(conn, case.id)}
        remove, notify = steps.get("remove"), steps.get("notify")
        _ = self._
        if case.dry_run or remove is None:
            return _("Case #{case} has no removal to make (dry run).").format(case=case.id)
        # Skipped: the case was closed before it was made, and has been reopened since.
        if remove.finished and remove.status != "skipped":
            return _("Case #{case}: the removal is over already ({status}).").format(
                case=case.id, status=word(remove.status, self._language)
            )
        if remove.progress.get("decided_by") and not remove.finished:
            return _("Case #{case}: the removal is under way already.").format(case=case.id)
        notified = notify is not None and notify.status == "done"
        await entry("removal_decided", {"notified_first": notified}, {})
        decided = remove.progress | {"decided_by": sender}
        if remove.finished:
            await cases.rearm_step(conn, case.id, "remove", POSITIONS["remove"], decided)
        else:
            await cases.save_progress(conn, case.id, "remove", decided)
        await cases.set_next_attempt(conn, case.id, now)
        if notified:
            return _("Case #{case}: they have been told; removing them now.").format(case=case.id)
        return _(
            "Case #{case}: removing them now, without the notice, as you decided "
            "(recorded). `!case {case} notify` still tries to tell them."
        ).format(case=case.id)

    async def _notify_again(
        self, conn: AsyncConnection, case: cases.Case, now: dt.datetime, entry: Any
    ) -> str:
        """Staff ask for another try at telling the member (the notice failed, or waits)."""
        notify = next((s for s in await cases.steps_of(conn, case.id) if s.step == "notify"), None)
        _ = self._
        if case.dry_run or notify is None:
            return _("Case #{case} sends no notice (dry run).").format(case=case.id)
        if notify.status == "done":
            return _("Case #{case}: the member has been told already.").format(case=case.id)
        await entry("notice_retried", {"was": notify.status}, {})
        if notify.finished:
            # What the earlier attempts did (the DM room) is kept: the next looks there
            # first. Its outcome is told, whatever it is; encryption gets its full wait.
            await cases.rearm_step(
                conn,
                case.id,
                "notify",
                POSITIONS["notify"],
                lambda progress: (
                    {k: v for k, v in progress.items() if k != PLAIN_CLOCK} | {"staff_asked": True}
                ),
            )
        else:
            await cases.save_progress(
                conn, case.id, "notify", notify.progress | {"staff_asked": True}
            )
            await cases.retry_started_now(conn, now, case_id=case.id)
        # The notice still to come is the one staff hear about if it goes unread (the
        # earlier one was never sent, so nothing was said of it).
        await cases.rearm_step(conn, case.id, "unread_notice", POSITIONS["unread_notice"], {})
        await cases.set_next_attempt(conn, case.id, now)
        return _(
            "Case #{case}: trying to tell the member again now; I'll say here how it goes."
        ).format(case=case.id)

    async def _cancel_checkin(
        self, conn: AsyncConnection, case_id: int, why: str, now: dt.datetime
    ) -> None:
        for name in await cases.skip_pending(conn, case_id, CHECKIN_STEPS, why, now):
            await audit.append(
                conn,
                self._deployment.provenance,
                f"step.{name}" if name != "checkin_reminder" else "checkin_reminded",
                case_id=case_id,
                facts={"status": "skipped", "why": why},
                at=now,
            )

    async def _stats(self, conn: AsyncConnection, days: int, now: dt.datetime) -> str:
        """Who carries this most often: flags per moderator and per room, over `days`."""
        since = now - dt.timedelta(days=days)
        flags = [
            e
            for e in await audit.entries(conn, since=since, community=self._community)
            if e.kind in ("flagged", "corroborated")
        ]
        _ = self._
        if not flags:
            return _("No flags in the last {days} days.").format(days=days)
        purged = _("(purged)")
        moderators = Counter((e.personal or {}).get("flagger") or purged for e in flags)
        rooms = Counter((e.personal or {}).get("room") or purged for e in flags)
        lines = [
            _("Flags in the last {days} days: {count} (cases and corroborations).").format(
                days=days, count=len(flags)
            )
        ]
        lines.append(_("By moderator (who may need a debrief):"))
        lines += [f"  {who}: {count}" for who, count in moderators.most_common(20)]
        lines.append(_("By room:"))
        lines += [f"  {room}: {count}" for room, count in rooms.most_common(20)]
        return "\n".join(lines)

    async def _queue_reply(
        self,
        conn: AsyncConnection,
        handling: Handling,
        text: str,
        now: dt.datetime,
        *,
        reply_to: str | None = None,
        case_id: int | None = None,
    ) -> None:
        """`case_id`: the case the reply tells of (retention redacts it with the case)."""
        await outbox.queue(
            conn,
            self._staff_room.address,
            notice(text, reply_to=reply_to or handling.item.event_id),
            now,
            case_id=case_id,
        )

    async def _reply(self, handling: Handling, text: str, *, case_id: int | None = None) -> None:
        async with handling.transaction() as conn:
            await self._queue_reply(conn, handling, text, dt.datetime.now(dt.UTC), case_id=case_id)
        self._on_outbox()

    async def _ours(self, conn: AsyncConnection, case_id: int | None) -> int | None:
        """The case number if it is this community's case (what is recorded against it,
        and redacted with it), else None: another community's case gets nothing of ours,
        and a purged one nothing that its purge, done already, would not come back for
        (recorded outside cases, it is purged with those)."""
        if case_id is None:
            return None
        case = await cases.get(conn, case_id, community=self._community)
        if case is None or case.purged_at is not None:
            return None
        return case_id

    def _not_understood(self, why: str) -> str:
        return self._("Sorry, I did not understand that: {why}.").format(why=why)

    def _no_such_case(self, number: int) -> str:
        return self._("There is no case #{case}. `!case list all` shows every case.").format(
            case=number
        )

    # ---- the chain head, anchored outside the database -----------------------------------

    async def post_chain_head(self) -> None:
        """Daily: anyone can later check the log against the head posted here."""
        now = dt.datetime.now(dt.UTC)
        async with self._db.begin() as conn:
            seq, digest = await audit.head(conn)
            if seq:
                await outbox.queue(
                    conn,
                    self._staff_room.address,
                    notice(
                        self._(
                            "Audit chain head: {head} — keep this; "
                            "`safeguard audit verify --head {head}` proves the log since."
                        ).format(head=f"{seq}:{digest}")
                    ),
                    now,
                )
        self._on_outbox()


async def _listed(conn: AsyncConnection, command: CaseCommand, community: str) -> list[cases.Case]:
    """The community's cases on the page `!case list [which] [page]` asks for."""
    return await cases.page(
        conn,
        command.text,
        offset=(command.page - 1) * LIST_PAGE_SIZE,
        limit=LIST_PAGE_SIZE,
        community=community,
    )
