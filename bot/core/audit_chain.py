"""The audit log's hash chain: what an entry's hash covers, and how a log is verified.

Each entry's hash covers the previous entry's hash, its own facts and the digest
of its personal fields (never the fields themselves), so retention can erase
personal data while the chain still proves nothing else was changed.

The digest is keyed (HMAC-SHA256 with a per-deployment secret kept outside the
database): a plain hash of a user id could be recovered after a purge by
hashing guesses. Entries written before keyed digests keep their plain SHA-256
and verify as they were.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

GENESIS_HASH = "0" * 64
KEYED = "hmac-sha256"
PLAIN = "sha256"


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def personal_digest(personal: Any, key: bytes) -> str:
    """The keyed digest of an entry's personal fields (HMAC-SHA256)."""
    return hmac.new(key, canonical_json(personal), hashlib.sha256).hexdigest()


def digest_matches(personal: Any, alg: str, stored: str, key: bytes | None) -> bool | None:
    """Whether `personal` still matches its digest; None if the key needed is not at hand."""
    if alg == PLAIN:
        return digest(personal) == stored
    if key is None:
        return None
    return hmac.compare_digest(personal_digest(personal, key), stored)


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
    personal_alg: str = PLAIN

    def compute_hash(self) -> str:
        covered = {
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
        if self.personal_alg != PLAIN:
            # Covered too, so a keyed entry cannot be passed off as a plain one.
            covered["personal_alg"] = self.personal_alg
        return digest(covered)


@dataclass(frozen=True)
class Verification:
    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


class ChainVerifier:
    """Checks (entry, stored hash, personal fields or None if purged) rows fed in seq order,
    one at a time, so a log of any length is verified in constant memory.

    `anchor` is a (seq, hash) pair posted outside the database earlier: the log
    must still contain that entry with that hash, or it was rewritten.
    """

    def __init__(self, *, anchor: tuple[int, str] | None = None, key: bytes | None = None) -> None:
        self._anchor = anchor
        self._key = key
        self.unchecked_personal = 0  # keyed digests not checked: the key was not given
        self._anchor_seen = False
        self._prev_hash = GENESIS_HASH
        self._expected_seq = 1
        self._count = 0
        self._failure: Verification | None = None

    def feed(self, entry: ChainedEntry, stored_hash: str, personal: dict[str, Any] | None) -> bool:
        """False once a bad entry is found (the rest need not be read)."""
        if self._failure is not None:
            return False
        self._count += 1
        problem = self._problem(entry, stored_hash, personal)
        if problem is not None:
            self._failure = Verification(
                False, self._count, entry.seq, stored_hash, entry.seq, problem
            )
            return False
        if self._anchor is not None and entry.seq == self._anchor[0]:
            self._anchor_seen = True
        self._prev_hash = stored_hash
        self._expected_seq += 1
        return True

    def _problem(
        self, entry: ChainedEntry, stored_hash: str, personal: dict[str, Any] | None
    ) -> str | None:
        if entry.seq != self._expected_seq:
            return f"entry {self._expected_seq} is missing (found {entry.seq} after it)"
        if entry.prev_hash != self._prev_hash:
            return f"entry {entry.seq} does not follow entry {entry.seq - 1}"
        if personal is not None:
            matches = digest_matches(personal, entry.personal_alg, entry.personal_digest, self._key)
            if matches is None:
                self.unchecked_personal += 1
            elif not matches:
                return f"entry {entry.seq}: personal fields do not match their digest"
        if entry.compute_hash() != stored_hash:
            return f"entry {entry.seq}: content does not match its hash"
        if (
            self._anchor is not None
            and entry.seq == self._anchor[0]
            and stored_hash != self._anchor[1]
        ):
            return f"entry {entry.seq} does not match the posted head {self._anchor[1][:16]}…"
        return None

    def result(self) -> Verification:
        if self._failure is not None:
            return self._failure
        head_seq = self._expected_seq - 1
        if self._anchor is not None and not self._anchor_seen:
            return Verification(
                False,
                self._count,
                head_seq,
                self._prev_hash,
                self._anchor[0],
                f"entry {self._anchor[0]} named by the posted head is not in the log",
            )
        return Verification(True, self._count, head_seq, self._prev_hash)


def verify_chain(
    rows: Iterable[tuple[ChainedEntry, str, dict[str, Any] | None]],
    *,
    anchor: tuple[int, str] | None = None,
    key: bytes | None = None,
) -> Verification:
    """Check rows already in memory (see ChainVerifier)."""
    verifier = ChainVerifier(anchor=anchor, key=key)
    for row in rows:
        if not verifier.feed(*row):
            break
    return verifier.result()
