"""The audit trail as people read it: case listings and the JSON/CSV export."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from bot.store import audit, cases

EXPORT_VERSION = 1
CSV_COLUMNS = [
    "case",
    "seq",
    "at",
    "kind",
    "facts",
    "personal",
    "policy_version",
    "config_hash",
    "hash",
]


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def case_summary(case: cases.Case, steps: list[cases.Step]) -> dict[str, Any]:
    return {
        "number": case.id,
        "community": case.community,
        "room": case.room_id,
        "member": case.member_id,
        "state": case.state,
        "active": case.active,
        "dry_run": case.dry_run,
        "flagged_at": _iso(case.flagged_at),
        "received_at": _iso(case.received_at),
        "checkin_due_at": _iso(case.due_at),
        "dm_room": case.dm_room_id,
        "checkin_room": case.checkin_room_id,
        "notice_read_at": _iso(case.notice_read_at),
        "rejoined_at": _iso(case.rejoined_at),
        "closed_at": _iso(case.closed_at),
        "outcome": case.outcome,
        "on_hold": case.hold_reason is not None,
        "purged_at": _iso(case.purged_at),
        "steps": {step.step: step.status for step in steps},
    }


async def export(
    conn: AsyncConnection,
    *,
    since: dt.datetime | None = None,
    case_id: int | None = None,
    community: str | None = None,
) -> dict[str, Any]:
    """{"cases": [...], "refusals": [...]}: each case with its entries in order.
    `community`: that community's cases and refusals alone (None: every community's)."""
    chosen = await cases.listing(conn, community=community)
    if case_id is not None:
        chosen = [case for case in chosen if case.id == case_id]
    if since is not None:
        chosen = [case for case in chosen if case.received_at >= since]
    exported = []
    for case in chosen:
        summary = case_summary(case, await cases.steps_of(conn, case.id))
        summary["entries"] = [e.as_dict() for e in await audit.entries(conn, case_id=case.id)]
        exported.append(summary)
    refusals = (
        []
        if case_id is not None
        else [
            entry.as_dict()
            for entry in await audit.entries(conn, without_case=True, since=since)
            if entry.kind == "refused" and _of_community(entry, community)
        ]
    )
    head_seq, head_hash = await audit.head(conn)
    return {
        "format": "matrix-safeguard-export",
        "version": EXPORT_VERSION,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(),
        "audit_head": {"seq": head_seq, "hash": head_hash},
        "cases": exported,
        "refusals": refusals,
    }


def _of_community(entry: audit.AuditEntry, community: str | None) -> bool:
    """Whether an entry of no case (a refusal) is `community`'s: as its facts name it, and
    the one community's if they do not (recorded before there were communities)."""
    if community is None:
        return True
    return (entry.facts or {}).get("community", cases.DEFAULT_COMMUNITY) == community


def export_csv(document: dict[str, Any]) -> str:
    """One row per audit entry (cases' entries, then refusals), with a header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    rows = [entry for case in document["cases"] for entry in case["entries"]]
    rows += document["refusals"]
    for entry in rows:
        writer.writerow(
            {
                column: (
                    json.dumps(entry[column], sort_keys=True, ensure_ascii=False)
                    if column in ("facts", "personal")
                    else entry[column]
                )
                for column in CSV_COLUMNS
            }
        )
    return buffer.getvalue()
