"""Noticing a transaction Synapse stored and never sent (issue 22), and nudging it out.

What Synapse does (matrix-synapse 1.163, synapse/appservice/scheduler.py and
synapse/storage/databases/main/appservice.py):
- every transaction is first stored (`create_appservice_txn`), its id the next of one
  integer sequence (`application_services_txn_id_seq`; on SQLite a counter in memory
  that starts at the table's max, so a restart with nothing queued starts again low);
  the sequence is shared by every appservice on the homeserver, so ids are consecutive
  for us only when we are its only appservice;
- while the service is UP a transaction is sent at once and deleted when answered 200;
  any other answer marks the service DOWN and starts a `_Recoverer`, which, after a
  backoff of 2 s and more, sends `get_oldest_unsent_txn` (the lowest stored id) again and
  again until none is left, then marks the service UP;
- a push created while the service is DOWN is stored, not sent. One created after the
  recoverer found nothing left but before it marked the service UP is stranded: the
  pushes after it go out at once (UP), and it waits until the next failure;
- POST /_matrix/client/v1/appservice/{id}/ping: Synapse pings us, and on a 200 calls
  `force_retry`, which runs the recoverer now if there is one (else does nothing).

So a stranded push shows here as an id missing below ids that arrived. Answering the
next push with a 503 (not recorded: Synapse keeps it and sends it again) starts the
recoverer, which sends from the oldest — the stranded one first — and the ping makes it
do so at once rather than after its backoff.

But a 503 marks the service down: the pushes behind it wait for the recoverer (seconds,
and a flag among them with it). A homeserver with bridges makes gaps all the time (the
ids are theirs), so a gap alone is no reason to nudge. The sign that a gap is ours is
the safety net (bot/intake/safety_net.py, bot/intake/reconcile.py) finding events the push never
brought: a stranded gap is nudged only when that happened since shortly before it
opened (`EVIDENCE_BEFORE`). Every gap is still counted, and logged: as a warning only
with that sign, else at INFO; one the sign never comes for is forgotten after
`FORGET_AFTER`, so the gaps a homeserver with bridges makes never pile up. A nudged gap that is
not resent (a number Synapse skipped, one the network swallowed after Synapse had its
200) is given up, and each nudge that recovers nothing doubles the wait before the next.
The safety net has caught up the events of any gap that is never filled.

Nothing is kept across a restart: the first transaction after start sets the baseline,
so a restart never produces a false gap (and a strand from before it is left to
reconciliation).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from bot.core.metrics import Metrics

log = logging.getLogger(__name__)

STRANDED_AFTER = 5.0  # seconds a gap may last before it counts as stranded
NUDGE_EVERY = 30.0  # at least this long between two nudges ...
NUDGE_EVERY_MAX = 3600.0  # ... doubling, up to this, after each that recovered nothing
NUDGE_WAIT = 30.0  # a nudged gap still open this long after the nudge is given up
PING_AFTER = 1.0  # the ping follows the 503 once Synapse has had time to mark us down
MAX_JUMP = 1000  # a jump of more ids than this is a renumbering, not as many gaps
MAX_GAPS = 1000  # more open gaps than this: the oldest are given up unnudged
KNOWN = 1024  # ids remembered (recorded or given up), to tell a retry from a renumbering
MAX_ID_DIGITS = 18
# A gap is nudged only if the safety net found events the push never brought since this
# long before the gap opened (the sync finds them a settle time after they were sent).
EVIDENCE_BEFORE = 60.0
# A stranded gap no such evidence has come for this long after it opened is forgotten:
# another appservice's id (with bridges, most gaps are), not one to nudge or to keep.
FORGET_AFTER = 120.0

Outcome = Literal[
    "ignored",
    "baseline",
    "new",
    "filled",
    "recovered",
    "arrived_late",
    "retry",
    "late",
    "renumbered",
]


def sequential_id(txn_id: str) -> int | None:
    """The id as an integer when it is one as Synapse writes them ("42"), else None."""
    if not (0 < len(txn_id) <= MAX_ID_DIGITS and txn_id.isascii() and txn_id.isdigit()):
        return None
    number = int(txn_id)
    return number if str(number) == txn_id else None


@dataclass
class Gap:
    opened: float
    stranded: bool = False
    nudged_at: float | None = None


@dataclass
class Swept:
    stranded: list[int] = field(default_factory=list)  # gaps that just passed STRANDED_AFTER
    abandoned: list[int] = field(default_factory=list)  # nudged and still open: given up
    forgotten: list[int] = field(default_factory=list)  # never evidenced: not ours, dropped
    evidenced: bool = False  # some of `stranded` are likely ours (events were missed)


class GapTracker:
    """The ids seen and the gaps below the highest; pure (the caller gives the time)."""

    def __init__(
        self,
        *,
        stranded_after: float = STRANDED_AFTER,
        nudge_every: float = NUDGE_EVERY,
        nudge_every_max: float = NUDGE_EVERY_MAX,
        nudge_wait: float = NUDGE_WAIT,
        max_jump: int = MAX_JUMP,
        max_gaps: int = MAX_GAPS,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        self.max_gaps = max_gaps
        self.forget_after = forget_after
        self.stranded_after = stranded_after
        self.nudge_every = nudge_every
        self.nudge_every_max = nudge_every_max
        self.nudge_wait = nudge_wait
        self.max_jump = max_jump
        self.highest: int | None = None
        self.gaps: dict[int, Gap] = {}
        self._known: set[int] = set()
        self._known_order: deque[int] = deque()
        self._given_up: set[int] = set()
        self._last_nudge = -math.inf
        self._interval = nudge_every
        self._recovered_since_nudge = False
        self._missed_at = -math.inf  # when the safety net last found an event not pushed

    def missed(self, now: float) -> None:
        """The safety net found events the push never brought: a gap is likely ours."""
        self._missed_at = now

    def evidenced(self, gap: Gap) -> bool:
        """Whether the safety net has found events the push never brought since shortly
        before this gap opened: then the gap is likely ours."""
        return self._missed_at >= gap.opened - EVIDENCE_BEFORE

    @property
    def backing_off(self) -> bool:
        """The last nudge recovered nothing: gaps here are likely not strands."""
        return self._interval > self.nudge_every

    @property
    def stranded(self) -> int:
        """Gaps open past STRANDED_AFTER now."""
        return sum(1 for gap in self.gaps.values() if gap.stranded)

    def _know(self, number: int) -> None:
        if number in self._known:
            return
        self._known.add(number)
        self._known_order.append(number)
        while len(self._known_order) > KNOWN:
            old = self._known_order.popleft()
            self._known.discard(old)
            self._given_up.discard(old)

    def _rebase(self, number: int) -> None:
        self.highest = number
        self.gaps.clear()
        self._known.clear()
        self._known_order.clear()
        self._given_up.clear()
        self._know(number)

    def recorded(self, txn_id: str, now: float) -> Outcome:
        """A transaction was recorded (answered 200): what it was to the sequence."""
        number = sequential_id(txn_id)
        if number is None:
            return "ignored"
        if self.highest is None:
            self._rebase(number)
            return "baseline"
        if number > self.highest:
            if number - self.highest > self.max_jump:
                self._rebase(number)
                return "renumbered"
            for missing in range(self.highest + 1, number):
                if missing not in self._known:
                    self.gaps[missing] = Gap(opened=now)
            self.highest = number
            self._know(number)
            return "new"
        gap = self.gaps.pop(number, None)
        if gap is not None:
            self._know(number)
            if gap.stranded:
                self._recovered_since_nudge = True
                return "recovered"
            return "filled"
        if number in self._given_up:
            # Arrived after all, after it was given up (and counted so): only told.
            self._given_up.discard(number)
            return "arrived_late"
        if number in self._known:
            return "retry"
        if self.highest - number > self.max_jump:
            # Far below anything seen: Synapse numbers from the start again (on SQLite,
            # after a restart with nothing queued).
            self._rebase(number)
            return "renumbered"
        # Below the baseline (sent before it, resent after a nudge): no gap, nothing to do.
        self._know(number)
        return "late"

    def nudge(self, txn_id: str, now: float) -> bool:
        """Whether to answer this push with a 503, to make Synapse resend from its oldest.

        Only a fresh push (above the highest id), only for a stranded gap never nudged
        that events missed by the push show to be ours, and only once per nudge interval.
        """
        number = sequential_id(txn_id)
        if number is None or self.highest is None or number <= self.highest:
            return False
        waiting = [
            gap
            for gap in self.gaps.values()
            if gap.stranded and gap.nudged_at is None and self.evidenced(gap)
        ]
        if not waiting or now - self._last_nudge < self._interval:
            return False
        for gap in waiting:
            gap.nudged_at = now
        self._last_nudge = now
        self._recovered_since_nudge = False
        return True

    def sweep(self, now: float) -> Swept:
        """Gaps that just became stranded, nudged ones given up and ones never evidenced
        forgotten (both dropped)."""
        swept = Swept()
        for number, gap in sorted(self.gaps.items()):
            if not gap.stranded and now - gap.opened >= self.stranded_after:
                gap.stranded = True
                swept.stranded.append(number)
                swept.evidenced = swept.evidenced or self.evidenced(gap)
            elif gap.nudged_at is not None and now - gap.nudged_at >= self.nudge_wait:
                swept.abandoned.append(number)
            elif (
                gap.stranded
                and gap.nudged_at is None
                and now - gap.opened >= self.forget_after
                and not self.evidenced(gap)
            ):
                swept.forgotten.append(number)
        for number in swept.forgotten:
            del self.gaps[number]
            self._know(number)
        excess = len(self.gaps) - len(swept.abandoned) - self.max_gaps
        if excess > 0:
            kept = [number for number in sorted(self.gaps) if number not in swept.abandoned]
            swept.abandoned.extend(kept[:excess])
        for number in swept.abandoned:
            del self.gaps[number]
            self._given_up.add(number)
            self._know(number)
        if swept.abandoned:
            if self._recovered_since_nudge:
                self._interval = self.nudge_every
            else:
                self._interval = min(self._interval * 2, self.nudge_every_max)
        elif self._recovered_since_nudge:
            self._interval = self.nudge_every
        return swept


def _ids(numbers: list[int]) -> str:
    if len(numbers) <= 3:
        return ", ".join(map(str, numbers))
    return f"{numbers[0]} … {numbers[-1]} ({len(numbers)} ids)"


class StrandedWatch:
    """The tracker with its log, metrics and ping: what the AS endpoint and a loop call."""

    def __init__(
        self,
        metrics: Metrics,
        ping: Callable[[], Awaitable[Any]],
        *,
        tracker: GapTracker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tracker = tracker or GapTracker()
        self._metrics = metrics
        self._ping = ping
        self._clock = clock
        self._ping_due: float | None = None
        self.nudges = 0

    def missed(self, count: int, *, first_round: bool = False) -> None:
        """The safety net caught up `count` events the push never brought. What its first
        round after a start finds happened while the service was away, before the push
        this watch numbers from: no sign that a gap since is ours."""
        if not first_round:
            self.tracker.missed(self._clock())

    def refuse(self, txn_id: str) -> bool:
        """Before recording a push: True to answer it 503 (a nudge), once per gap."""
        now = self._clock()
        if not self.tracker.nudge(txn_id, now):
            return False
        self.nudges += 1
        self._metrics.stranded_nudges.inc()
        self._ping_due = now + PING_AFTER
        log.warning(
            "transaction %s answered 503 once to make the homeserver resend from its oldest",
            txn_id,
        )
        return True

    def recorded(self, txn_id: str) -> None:
        outcome = self.tracker.recorded(txn_id, self._clock())
        if outcome == "recovered":
            self._metrics.stranded_resolved.labels("recovered").inc()
            log.warning("stranded transaction %s arrived: recovered", txn_id)
        elif outcome == "arrived_late":
            log.warning("transaction %s arrived after it was given up", txn_id)
        elif outcome == "renumbered":
            log.info("transaction ids start again at %s: gaps before it forgotten", txn_id)

    async def tick(self) -> None:
        now = self._clock()
        # A gap is a warning only with a sign that it is ours (the safety net found events
        # the push never brought) and while nudges still recover what they ask for. Else
        # it is likely another appservice's id (they share the numbering): told at INFO,
        # many in one line, as a homeserver with bridges makes them all the time.
        quiet = self.tracker.backing_off  # as it was before this sweep's give-ups
        swept = self.tracker.sweep(now)
        level = logging.WARNING if swept.evidenced and not quiet else logging.INFO
        if swept.stranded:
            self._metrics.stranded.inc(len(swept.stranded))
            log.log(
                level,
                "transaction %s missing %.0fs after later ones arrived: stranded by the "
                "homeserver, or another appservice's? nudged (the next push answered 503 "
                "once) if the safety net finds events the push never brought",
                _ids(swept.stranded),
                self.tracker.stranded_after,
            )
        if swept.forgotten:
            self._metrics.stranded_resolved.labels("forgotten").inc(len(swept.forgotten))
            log.debug(
                "transaction %s forgotten: no event went missing around it (not ours)",
                _ids(swept.forgotten),
            )
        if swept.abandoned:
            self._metrics.stranded_resolved.labels("abandoned").inc(len(swept.abandoned))
            log.log(
                logging.INFO if quiet else logging.WARNING,
                "transaction %s not resent after a nudge: given up (not ours, or lost after "
                "the homeserver had its answer); catch-up reads its rooms",
                _ids(swept.abandoned),
            )
        if self._ping_due is not None and now >= self._ping_due:
            self._ping_due = None
            try:
                await self._ping()
            except Exception as exc:  # the recoverer retries on its own backoff anyway
                log.warning("ping after a nudge failed: %s", type(exc).__name__)

    async def run(self, every: float = 0.5) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.tick()
            except Exception:
                log.exception("stranded transaction watch failed a round")

    def status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "stranded": self.tracker.stranded,
            "gaps": len(self.tracker.gaps),
            "nudges": self.nudges,
        }
