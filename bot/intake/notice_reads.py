"""Whether the member has read their notice: their read receipt in the DM, from the sync.

What a person deciding whether to call emergency services wants to know is
whether the member has seen the message. The bot's sync (bot/intake/safety_net.py)
asks read receipts of the DMs whose notice is sent and still unread, and of no
other room (a group room's receipts are none of its business, and would cost
the homeserver work for every message read). A receipt counts when it is the
case's member's own, public (`m.read`: a private one never reaches the bot),
on the main timeline (unthreaded, or thread "main"), in that case's DM, and for
the notice or an event after it. The first is recorded on the case, with the
receipt's time, once, and audited; `!case N` shows it, and the staff reply
"has not opened the message yet" (bot/steps/unread_notice.py) is not sent.

A DM is asked about from the first sync after its notice is recorded. The sync
before it returned on the notice itself (a timeline event of the DM) and then
waited `reconcile.settle` before the next, so a receipt, which can only follow
the notice, falls in a sync that asks for it, unless recording the notice took
longer than that (the database stalling): such a read goes unseen. A restart
loses none: the sync goes on from its stored token. Only the 50 newest unread
notices are asked about (their room ids go in the sync's URL).

A member whose app sends no read receipts, or only private ones, looks the same
as one who has not read the notice: the staff texts and the README say so.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.core.ports import Homeserver, Receipt, Refused
from bot.store import audit, notices
from bot.store.audit import Provenance
from bot.store.notices import Unread

log = logging.getLogger(__name__)
READ = "m.read"
# A receipt on the main timeline: unthreaded (no thread id), or the main thread named.
MAIN_TIMELINE = (None, "main")


def may_count(receipt: Receipt, notice: Unread) -> bool:
    """The receipt is the member's own public one, on the main timeline of their DM: it
    counts if it is for the notice or an event after it (`after_notice`)."""
    return (
        receipt.room_id == notice.room_id
        and receipt.user_id == notice.member_id
        and receipt.receipt_type == READ
        and receipt.thread_id in MAIN_TIMELINE
    )


def after_notice(event: dict[str, Any], notice: dict[str, Any]) -> bool:
    """Whether `event` was sent no earlier than the notice (both as the homeserver gave
    them: by their server timestamps, what the Client-Server API exposes of their order)."""
    sent, noticed = event.get("origin_server_ts"), notice.get("origin_server_ts")
    return isinstance(sent, int) and isinstance(noticed, int) and sent >= noticed


class NoticeReads:
    """The DMs to ask read receipts of, and the receipts a sync brought, recorded."""

    def __init__(self, db: AsyncEngine, homeserver: Homeserver, provenance: Provenance) -> None:
        self._db = db
        self._homeserver = homeserver
        self._provenance = provenance
        # The unread notices as last read, by DM room (one member's cases may share a DM).
        self._unread: dict[str, list[Unread]] = {}
        self.recorded = 0  # reads recorded (tests)

    async def watched(self) -> list[str]:
        """The DMs whose notice is sent and unread: the next sync asks their receipts."""
        async with self._db.connect() as conn:
            found = await notices.unread(conn)
        self._unread = {}
        for notice in found:
            self._unread.setdefault(notice.room_id, []).append(notice)
        return sorted(self._unread)

    async def take(self, receipts: Sequence[Receipt]) -> int:
        """Record each unread notice the receipts show read; returns how many."""
        recorded = 0
        for receipt in receipts:
            for notice in list(self._unread.get(receipt.room_id, ())):
                if not may_count(receipt, notice) or not await self._on_or_after(receipt, notice):
                    continue
                if await self._record(receipt, notice):
                    recorded += 1
                self._unread[receipt.room_id].remove(notice)
        self.recorded += recorded
        return recorded

    async def _on_or_after(self, receipt: Receipt, notice: Unread) -> bool:
        if receipt.event_id == notice.notice_event_id:
            return True
        # A later message (theirs, or the bot's), read: the notice came before it.
        event = await self._homeserver.get_event(receipt.room_id, receipt.event_id)
        sent = await self._homeserver.get_event(notice.room_id, notice.notice_event_id)
        if isinstance(event, Refused) or isinstance(sent, Refused):
            log.warning(
                "case #%d: a read receipt's event could not be placed (%s)",
                notice.case_id,
                event if isinstance(event, Refused) else sent,
            )
            return False
        return after_notice(event, sent)

    async def _record(self, receipt: Receipt, notice: Unread) -> bool:
        now = dt.datetime.now(dt.UTC)
        read_at = receipt.at or now
        async with self._db.begin() as conn:
            if not await notices.record_read(conn, notice.case_id, notice.notice_event_id, read_at):
                return False
            await audit.append(
                conn,
                self._provenance,
                "notice_read",
                case_id=notice.case_id,
                facts={
                    "read_at": read_at.isoformat(),
                    "receipt_on": "notice"
                    if receipt.event_id == notice.notice_event_id
                    else "a later event",
                },
                at=now,
            )
        log.info(
            "case #%d: the member read the notice", notice.case_id, extra={"case": notice.case_id}
        )
        return True
