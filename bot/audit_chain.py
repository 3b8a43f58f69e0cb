"""The audit log's hash chain: what an entry's hash covers, and how a log is verified.

Each entry's hash covers the previous entry's hash, its own facts and the digest
of its personal fields (never the fields themselves), so retention can erase
personal data while the chain still proves nothing else was changed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


@dataclass(frozen=True)
class ChainedEntry:
    seq: int
    case_id: int | None
    at: dt.datetime
    kind: str
    facts: dict[str, Any]
    personal_digest: str
    policy_version: str
    config_hash: str
    prev_hash: str

    def compute_hash(self) -> str:
        return digest(
            {
                "seq": self.seq,
                "case": self.case_id,
                "at": self.at.astimezone(dt.UTC).isoformat(timespec="microseconds"),
                "kind": self.kind,
                "facts": self.facts,
                "personal": self.personal_digest,
                "policy_version": self.policy_version,
                "config_hash": self.config_hash,
                "prev": self.prev_hash,
            }
        )


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


def verify_chain(
    rows: Iterable[tuple[ChainedEntry, str, dict[str, Any] | None]],
    *,
    anchor: tuple[int, str] | None = None,
) -> Verification:
    """Check (entry, stored hash, personal fields or None if purged) rows in seq order.

    `anchor` is a (seq, hash) pair posted outside the database earlier: the log
    must still contain that entry with that hash, or it was rewritten.
    """
    prev_hash = GENESIS_HASH
    expected_seq = 1
    count = 0
    anchor_seen = False
    for entry, stored_hash, personal in rows:
        count += 1

        def bad(
            problem: str, entry: ChainedEntry = entry, count: int = count, found: str = stored_hash
        ) -> Verification:
            return Verification(False, count, entry.seq, found, entry.seq, problem)

        if entry.seq != expected_seq:
            return bad(f"entry {expected_seq} is missing (found {entry.seq} after it)")
        if entry.prev_hash != prev_hash:
            return bad(f"entry {entry.seq} does not follow entry {entry.seq - 1}")
        if personal is not None and digest(personal) != entry.personal_digest:
            return bad(f"entry {entry.seq}: personal fields do not match their digest")
        if entry.compute_hash() != stored_hash:
            return bad(f"entry {entry.seq}: content does not match its hash")
        if anchor is not None and entry.seq == anchor[0]:
            if stored_hash != anchor[1]:
                return bad(f"entry {entry.seq} does not match the posted head {anchor[1][:16]}…")
            anchor_seen = True
        prev_hash = stored_hash
        expected_seq += 1
    if anchor is not None and not anchor_seen:
        return Verification(
            False,
            count,
            expected_seq - 1,
            prev_hash,
            anchor[0],
            f"entry {anchor[0]} named by the posted head is not in the log",
        )
    return Verification(True, count, expected_seq - 1, prev_hash)
