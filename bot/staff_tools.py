"""Staff act on cases from the staff room: `!case` commands, ✅ acknowledgements, escalation.

Only staff (policy.staff, or staff_power_level in the staff room) have any
effect; anyone else's command is recorded and otherwise ignored. Commands edit
nothing: each is a new audit entry. Replies go through the outbox, as replies
to the command, so they are delivered exactly once even across a crash.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.checkin import CheckinScheduler
from bot.context import PolicyContext
from bot.ports import Webhook
from bot.staff_commands import USAGE, CaseCommand, CommandError, parse_case_command
from bot.staff_replies import case_listing, case_timeline, notice
from bot.store import audit, cases, outbox
from bot.store.ingest import InboxItem, finish
from bot.timers import Timers
from bot.triggers import normalise_key

log = logging.getLogger(__name__)
ACK_KEY = normalise_key("✅")


class StaffTools:
    def __init__(
        self,
        engine: AsyncEngine,
        context: PolicyContext,
        *,
        is_staff: Callable[[str], Awaitable[bool]],
        checkins: CheckinScheduler,
        timers: Timers,
        webhook: Webhook,
        on_outbox: Callable[[], None],
    ) -> None:
        self._engine = engine
        self._ctx = context
        self._is_staff = is_staff
        self._checkins = checkins
        self._timers = timers
        self._webhook = webhook
        self._on_outbox = on_outbox

    # ---- dispatcher hook ---------------------------------------------------------------

    async def handle_event(self, item: InboxItem) -> bool:
        if item.room_id != self._ctx.staff_room_id:
            return False
        event = item.payload
        content = event.get("content")
        if not isinstance(content, Mapping) or event.get("sender") == self._ctx.bot_user_id:
            return False
        if item.event_type == "m.room.message":
            parsed = parse_case_command(content.get("body", ""))
            if parsed is None:
                return False
            await self._command(item, parsed)
            return True
        if item.event_type == "m.reaction":
            relation = content.get("m.relates_to")
            if not isinstance(relation, Mapping):
                return False
            key, target = relation.get("key"), relation.get("event_id")
            if isinstance(key, str) and normalise_key(key) == ACK_KEY and isinstance(target, str):
                async with self._engine.connect() as conn:
                    case = await cases.by_column(conn, "alert_event_id", target)
                if case is not None:
                    await self._run(item, CaseCommand("ack", case.id), via="reaction")
                    return True
        return False

    async def _command(self, item: InboxItem, parsed: CaseCommand | CommandError) -> None:
        # Staff first: anyone else gets no effect at all, not even a usage hint.
        if isinstance(parsed, CommandError):
            if await self._refused_unless_staff(item, None, "unparsed", "command"):
                return
            await self._reply(item, f"Sorry, I did not understand that: {parsed.message}.")
            return
        await self._run(item, parsed, via="command")

    async def _refused_unless_staff(
        self, item: InboxItem, case_id: int | None, action: str, via: str
    ) -> bool:
        """True (and recorded) when the sender is not staff."""
        sender = item.payload.get("sender", "")
        if await self._is_staff(sender):
            return False
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await audit.append(
                conn,
                self._ctx.provenance,
                "command_refused",
                case_id=case_id,
                facts={"action": action, "via": via, "why": "not staff"},
                personal={"by": sender},
                at=now,
            )
            await finish(conn, item.seq, now)
        return True

    async def _run(self, item: InboxItem, command: CaseCommand, *, via: str) -> None:
        if await self._refused_unless_staff(item, command.case, command.action, via):
            return
        sender = item.payload.get("sender", "")
        now = dt.datetime.now(dt.UTC)
        if command.action == "claim":
            await self._claim(item, command, sender)
            return
        async with self._engine.begin() as conn:
            reply = await self._apply(conn, command, sender, now, via)
            await self._queue_reply(conn, item, reply, now)
            await finish(conn, item.seq, now)
        self._on_outbox()

    async def _claim(self, item: InboxItem, command: CaseCommand, sender: str) -> None:
        assert command.case is not None
        async with self._engine.connect() as conn:
            case = await cases.get(conn, command.case)
        if case is None or case.checkin_room_id is None:
            text = (
                f"Case #{command.case} has no open check-in to claim yet."
                if case
                else f"There is no case #{command.case}."
            )
            await self._reply(item, text)
            return
        await self._checkins.claim(case, sender, via="command")
        await self._reply(item, f"Case #{case.id}: check-in claimed by {sender}.")

    async def _apply(
        self, conn: AsyncConnection, command: CaseCommand, sender: str, now: dt.datetime, via: str
    ) -> str:
        """Record the command; returns the reply text."""
        if command.action == "help":
            return USAGE
        if command.action == "list":
            found = await cases.listing(conn, command.text)
            return case_listing(found, command.text, now)
        assert command.case is not None
        case = await cases.get(conn, command.case)
        if case is None:
            return f"There is no case #{command.case}. `!case list all` shows every case."
        if command.action == "show":
            return case_timeline(case, await audit.entries(conn, case_id=case.id))

        def entry(kind: str, facts: dict[str, Any], personal: dict[str, Any]) -> Any:
            return audit.append(
                conn,
                self._ctx.provenance,
                kind,
                case_id=case.id,
                facts=facts,
                personal={"by": sender} | personal,
                at=now,
            )

        policy = self._ctx.policy
        if command.action == "es":
            await entry(
                "emergency_services_informed",
                {
                    "service": command.service,
                    "lawful_basis": policy.lawful_basis,
                    "data_shared": policy.emergency_data_shared,
                    "informed_at": now.isoformat(),
                },
                {"reference": command.reference},
            )
            return (
                f"Case #{case.id}: recorded that {command.service} were informed by {sender} "
                f"(reference {command.reference}; lawful basis: {policy.lawful_basis})."
            )
        if command.action == "note":
            await entry("note", {"kind": "opinion"}, {"text": command.text})
            return f"Case #{case.id}: note added."
        if command.action == "ack":
            if case.alert_acked_by is None:
                await cases.set_fields(conn, case.id, alert_acked_by=sender)
            await entry(
                "alert_acknowledged", {"via": via, "first": case.alert_acked_by is None}, {}
            )
            return f"Case #{case.id}: alert acknowledged by {sender}."
        if command.action == "close":
            if case.state == "closed":
                return (
                    f"Case #{case.id} is already closed. `!case {case.id} reopen <why>` reopens it."
                )
            await cases.set_fields(
                conn, case.id, state="closed", closed_at=now, outcome=command.text
            )
            await entry("closed", {"outcome": command.text}, {})
            head = await audit.head(conn)
            return (
                f"Case #{case.id} closed. Audit chain head: {head[0]}:{head[1]} "
                f"(check with `safeguard audit verify --head {head[0]}:{head[1]}`)."
            )
        if command.action == "reopen":
            if case.state != "closed":
                return f"Case #{case.id} is open already."
            await cases.set_fields(conn, case.id, state="open", closed_at=None)
            await entry("reopened", {"why": command.text}, {})
            return f"Case #{case.id} reopened."
        if command.action == "hold":
            await cases.set_fields(conn, case.id, hold_reason=command.text)
            await entry("held", {"why": command.text}, {})
            return f"Case #{case.id} is on hold: retention will not purge it."
        raise AssertionError(command.action)

    async def _queue_reply(
        self, conn: AsyncConnection, item: InboxItem, text: str, now: dt.datetime
    ) -> None:
        await outbox.queue(conn, self._ctx.staff_room, notice(text, reply_to=item.event_id), now)

    async def _reply(self, item: InboxItem, text: str) -> None:
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await self._queue_reply(conn, item, text, now)
            await finish(conn, item.seq, now)
        self._on_outbox()

    # ---- unacknowledged alerts -----------------------------------------------------------

    async def start(self) -> None:
        """Re-create an escalation timer for every alert not yet acknowledged."""
        async with self._engine.connect() as conn:
            waiting = await cases.unacknowledged_alerts(conn)
        for case, sent_at in waiting:
            self.watch_alert(case.id, sent_at)
        self._timers.every("post-chain-head", dt.timedelta(days=1), self.post_chain_head)

    def watch_alert(self, case_id: int, sent_at: dt.datetime | None = None) -> None:
        sent_at = sent_at or dt.datetime.now(dt.UTC)
        self._timers.at(
            f"escalate:{case_id}", sent_at + self._ctx.policy.ack_within, self.escalate, case_id
        )

    async def escalate(self, case_id: int) -> None:
        async with self._engine.connect() as conn:
            case = await cases.get(conn, case_id)
        if case is None or case.alert_acked_by or case.alert_raised_again_at:
            return
        staff = list(self._ctx.policy.staff)
        minutes = int(self._ctx.policy.ack_within.total_seconds() // 60)
        text = (
            f"Case #{case.id}: the alert has not been acknowledged for {minutes} minutes. "
            f"{' '.join(staff)} please look now, then react ✅ to the alert or write "
            f"`!case {case.id} ack`."
        )
        webhook_problem: str | None = None
        webhook_url = self._ctx.policy.alert_webhook
        if webhook_url:
            webhook_problem = await self._webhook.post_json(
                webhook_url,
                {
                    "event": "safeguard.alert_unacknowledged",
                    "case": case.id,
                    "unacknowledged_for_seconds": int(self._ctx.policy.ack_within.total_seconds()),
                    "text": f"Safeguarding case #{case.id} has not been acknowledged.",
                },
            )
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            await cases.set_fields(conn, case.id, alert_raised_again_at=now)
            content = notice(text)
            content["m.mentions"] = {"user_ids": staff}
            await outbox.queue(conn, self._ctx.staff_room, content, now)
            await audit.append(
                conn,
                self._ctx.provenance,
                "alert_raised_again",
                case_id=case.id,
                facts={"webhook": bool(webhook_url), "webhook_error": webhook_problem},
                at=now,
            )
        self._on_outbox()

    async def post_chain_head(self) -> None:
        """Anchor the chain outside the database: anyone can later check the log against it."""
        now = dt.datetime.now(dt.UTC)
        async with self._engine.begin() as conn:
            seq, digest = await audit.head(conn)
            if seq:
                await outbox.queue(
                    conn,
                    self._ctx.staff_room,
                    notice(
                        f"Audit chain head: {seq}:{digest} — keep this; "
                        f"`safeguard audit verify --head {seq}:{digest}` proves the log since."
                    ),
                    now,
                )
        self._on_outbox()
