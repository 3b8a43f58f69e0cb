"""The stranded-transaction watch: gaps in Synapse's transaction ids, noticed and nudged."""

from __future__ import annotations

import itertools
import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.metrics import Metrics
from bot.intake.stranded import (
    FORGET_AFTER,
    PING_AFTER,
    STRANDED_AFTER,
    GapTracker,
    StrandedWatch,
    sequential_id,
)


def tracker(*, evidence: bool = True, **options: float) -> GapTracker:
    """A tracker; with `evidence`, the safety net found a missed event at t=0 (the gaps
    these tests open are then ours, and nudged)."""
    gaps = GapTracker(
        **{"stranded_after": 5.0, "nudge_every": 30.0, "nudge_wait": 30.0, **options}  # type: ignore[arg-type]
    )
    if evidence:
        gaps.missed(0.0)
    return gaps


@pytest.mark.parametrize(
    ("txn_id", "number"),
    [("1", 1), ("42", 42), ("042", None), ("", None), ("t1", None), ("²", None), ("-3", None)],
)
def test_only_ids_written_as_synapse_writes_them_are_sequential(txn_id, number):
    assert sequential_id(txn_id) == number


def test_consecutive_ids_leave_no_gap():
    gaps = tracker()
    assert gaps.recorded("7", 0.0) == "baseline"
    for n in range(8, 20):
        assert gaps.recorded(str(n), float(n)) == "new"
    assert gaps.gaps == {}
    assert gaps.sweep(100.0).stranded == []
    assert not gaps.nudge("20", 100.0)


def test_the_first_id_seen_is_the_baseline_whatever_it_is():
    gaps = tracker()
    gaps.recorded("500", 0.0)  # ids below it (before a restart) are no gaps
    assert gaps.gaps == {}
    gaps.recorded("501", 0.0)
    assert gaps.gaps == {}


def test_a_gap_filled_within_a_few_seconds_is_not_stranded():
    gaps = tracker()
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.1)
    assert set(gaps.gaps) == {2}
    assert gaps.sweep(2.0).stranded == []
    assert gaps.recorded("2", 3.0) == "filled"
    assert gaps.sweep(10.0).stranded == [] and gaps.gaps == {}
    assert not gaps.nudge("4", 10.0)


def test_a_stranded_gap_is_reported_once_nudged_once_and_recovered():
    gaps = tracker()
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    assert not gaps.nudge("4", 4.0), "not yet stranded"
    assert gaps.sweep(5.0).stranded == [2]
    assert gaps.sweep(6.0).stranded == [], "reported once"
    assert gaps.stranded == 1
    assert gaps.nudge("4", 6.0), "the next push is answered 503"
    assert not gaps.nudge("4", 6.5), "once: the resent push goes through"
    # Synapse's recoverer sends the oldest first: the stranded one, then the refused one.
    assert gaps.recorded("2", 8.0) == "recovered"
    assert gaps.recorded("4", 8.1) == "new"
    assert gaps.gaps == {} and gaps.stranded == 0


def test_a_gap_is_nudged_only_once_the_safety_net_shows_it_is_ours():
    """Another appservice's ids leave gaps too (Synapse numbers them all from one
    sequence): a 503 for each would hold back our pushes, a flag among them."""
    gaps = tracker(evidence=False)
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    gaps.sweep(5.0)
    assert gaps.stranded == 1, "still noticed and counted"
    assert not gaps.nudge("4", 6.0), "no event was missed: likely not ours"
    gaps.missed(20.0)  # the sync found an event the push never brought
    assert gaps.nudge("5", 20.0)


def test_a_missed_event_long_before_a_gap_is_no_sign_about_it():
    gaps = tracker(evidence=False)
    gaps.missed(0.0)
    gaps.recorded("1", 100.0)
    gaps.recorded("3", 100.0)
    gaps.sweep(105.0)
    assert not gaps.nudge("4", 106.0)


def test_only_a_fresh_push_is_refused():
    gaps = tracker()
    gaps.recorded("10", 0.0)
    gaps.recorded("13", 0.0)  # 11 and 12 missing
    gaps.sweep(5.0)
    assert not gaps.nudge("11", 6.0), "the missing one itself is recorded"
    assert not gaps.nudge("13", 6.0), "a retry of one seen is recorded"
    assert not gaps.nudge("catch-up-1", 6.0), "ids that are not numbers are not in the sequence"
    assert gaps.nudge("14", 6.0)


def test_never_more_than_one_nudge_per_interval():
    gaps = tracker()
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    gaps.sweep(5.0)
    assert gaps.nudge("4", 5.0)
    gaps.recorded("4", 7.0)
    gaps.recorded("6", 7.0)  # a new gap, stranded soon after the first nudge
    gaps.sweep(12.0)
    assert gaps.stranded == 2
    assert not gaps.nudge("7", 12.0), "within 30 s of the last nudge"
    assert not gaps.nudge("7", 34.9)
    assert gaps.nudge("7", 35.0)


def test_a_gap_never_filled_is_given_up_after_one_nudge_and_backs_off():
    gaps = tracker()
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    gaps.sweep(5.0)
    assert gaps.nudge("4", 5.0)
    gaps.recorded("4", 7.0)  # resent, but 2 never came: not Synapse's to resend
    assert gaps.sweep(34.0).abandoned == []
    assert gaps.sweep(35.0).abandoned == [2]
    assert gaps.gaps == {}
    assert not gaps.nudge("5", 36.0), "nothing left to nudge for"
    # The next phantom gap waits twice as long (from the last nudge) for its nudge.
    gaps.recorded("6", 36.0)
    gaps.sweep(41.0)
    assert gaps.stranded == 1
    assert not gaps.nudge("7", 41.0)
    assert not gaps.nudge("7", 5.0 + 60.0 - 0.1)
    assert gaps.nudge("7", 5.0 + 60.0)
    # A given-up gap that arrives after all is told apart (counted once: given up).
    assert gaps.recorded("2", 200.0) == "arrived_late"
    assert gaps.highest == 6


def test_a_retry_of_a_recorded_id_changes_nothing():
    gaps = tracker()
    for n in ("1", "2", "4"):
        gaps.recorded(n, 0.0)
    assert gaps.recorded("2", 1.0) == "retry"
    assert set(gaps.gaps) == {3} and gaps.highest == 4


def test_synapse_numbering_again_from_low_is_a_new_baseline_not_a_gap():
    gaps = tracker()
    for n in ("5000", "5001", "5003"):
        gaps.recorded(n, 0.0)
    # SQLite Synapse restarted with nothing queued: its counter starts at the table's max.
    assert gaps.recorded("1", 1.0) == "renumbered"
    assert gaps.gaps == {} and gaps.highest == 1
    assert gaps.recorded("2", 1.0) == "new" and gaps.gaps == {}


def test_an_id_a_little_below_the_baseline_is_late_not_a_gap_nor_a_renumbering():
    gaps = tracker()
    gaps.recorded("11", 0.0)  # the first after a restart; 10 was stranded before it
    gaps.recorded("12", 0.0)
    assert gaps.recorded("10", 1.0) == "late"
    assert gaps.highest == 12 and gaps.gaps == {}
    assert gaps.recorded("13", 1.0) == "new" and gaps.gaps == {}


def test_a_huge_jump_is_a_renumbering_not_a_thousand_gaps():
    gaps = tracker()
    gaps.recorded("1", 0.0)
    assert gaps.recorded("100000", 0.0) == "renumbered"
    assert gaps.gaps == {}


def test_open_gaps_are_bounded():
    gaps = tracker(max_gaps=10)
    gaps.recorded("1", 0.0)
    gaps.recorded("30", 0.0)  # 28 gaps
    swept = gaps.sweep(1.0)
    assert swept.abandoned == list(range(2, 20))
    assert sorted(gaps.gaps) == list(range(20, 30))


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=2, max_value=40),
    dropped=st.sets(st.integers(min_value=1, max_value=39)),
    order=st.randoms(use_true_random=False),
    steps=st.lists(st.floats(min_value=0.0, max_value=20.0), min_size=40, max_size=40),
)
def test_gaps_are_exactly_the_ids_not_seen_and_nudges_are_bounded(count, dropped, order, steps):
    gaps = tracker()
    ids = list(range(1, count + 1))
    # Synapse sends in order, but a resend can come late: a little shuffling.
    for i in range(len(ids) - 1):
        if order.random() < 0.2:
            ids[i], ids[i + 1] = ids[i + 1], ids[i]
    baseline = ids[0]
    delivered = [n for n in ids[1:] if n not in dropped]
    gaps.recorded(str(baseline), 0.0)
    now, seen, nudges, abandoned, stranded = 0.0, {baseline}, [], set(), set()
    for n, step in zip(delivered, steps, strict=False):
        now += step
        swept = gaps.sweep(now)
        abandoned.update(swept.abandoned, swept.forgotten)
        stranded.update(swept.stranded)
        if gaps.nudge(str(n), now):
            nudges.append(now)
            now += 2.0  # answered 503: Synapse's recoverer resends it (nothing else held)
            assert not gaps.nudge(str(n), now), "a push is refused once"
        gaps.recorded(str(n), now)
        seen.add(n)
        above = set(range(baseline + 1, max(seen) + 1))
        assert set(gaps.gaps) == above - seen - abandoned
    assert all(b - a >= 30.0 for a, b in itertools.pairwise(nudges))
    # One nudge per gap at most: each needs a stranded gap no nudge has covered.
    assert len(nudges) <= len(stranded) <= len(dropped) + count


# ---- the watch: log, metrics, ping ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_the_watch_logs_counts_nudges_and_pings(caplog):
    metrics, clock, pings = Metrics(), Clock(), []

    async def ping() -> None:
        pings.append(clock.now)

    watch = StrandedWatch(metrics, ping, clock=clock)
    watch.missed(1)  # the safety net found an event the push never brought
    watch.recorded("1")
    watch.recorded("3")
    clock.now = 5.0
    with caplog.at_level(logging.WARNING, logger="bot.intake.stranded"):
        await watch.tick()
    assert sample(metrics, "safeguard_stranded_transactions_total") == 1
    assert "transaction 2 missing" in caplog.text
    assert watch.status() == {"ok": True, "stranded": 1, "gaps": 1, "nudges": 0}
    assert watch.refuse("4")
    assert not watch.refuse("4")
    assert sample(metrics, "safeguard_stranded_nudges_total") == 1
    await watch.tick()
    assert pings == [], "the ping waits for Synapse to mark us down"
    clock.now += PING_AFTER
    await watch.tick()
    assert pings == [5.0 + PING_AFTER]
    watch.recorded("2")
    watch.recorded("4")
    labels = {"outcome": "recovered"}
    assert sample(metrics, "safeguard_stranded_transactions_resolved_total", **labels) == 1
    assert watch.status()["stranded"] == 0


async def test_a_failed_ping_is_only_logged():
    metrics, clock = Metrics(), Clock()

    async def ping() -> None:
        raise OSError("down")

    watch = StrandedWatch(metrics, ping, clock=clock)
    watch.missed(1)  # the safety net found an event the push never brought
    watch.recorded("1")
    watch.recorded("3")
    clock.now = 5.0
    await watch.tick()
    assert watch.refuse("4")
    clock.now += PING_AFTER
    await watch.tick()  # does not raise


async def test_after_a_nudge_that_recovered_nothing_new_gaps_are_told_at_info(caplog):
    metrics, clock = Metrics(), Clock()

    async def ping() -> None:
        pass

    watch = StrandedWatch(metrics, ping, clock=clock, tracker=tracker(nudge_wait=5.0))
    with caplog.at_level(logging.INFO, logger="bot.intake.stranded"):
        for n in ("1", "3"):
            watch.recorded(n)
        clock.now = 5.0
        await watch.tick()
        assert watch.refuse("4")
        watch.recorded("4")
        clock.now = 10.0
        await watch.tick()  # 2 given up: a phantom gap
        given_up = [r for r in caplog.records if "not resent" in r.getMessage()]
        assert [r.levelno for r in given_up] == [logging.WARNING]
        for n in ("6", "8", "10", "12", "14"):
            watch.recorded(n)
        clock.now = 15.0
        await watch.tick()
    (line,) = [r for r in caplog.records if "5 … 13 (5 ids) missing" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert sample(metrics, "safeguard_stranded_transactions_total") == 6


def test_a_gap_no_missed_event_points_to_is_forgotten_never_nudged():
    """With bridges on the homeserver most gaps are their ids: without a sign that a gap is
    ours it is told quietly, never nudged, and forgotten, so open gaps do not pile up."""
    gaps = tracker(evidence=False)
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    swept = gaps.sweep(STRANDED_AFTER)
    assert swept.stranded == [2] and not swept.evidenced
    assert not gaps.nudge("4", STRANDED_AFTER)
    assert gaps.sweep(FORGET_AFTER - 1).forgotten == []
    assert gaps.sweep(FORGET_AFTER).forgotten == [2]
    assert gaps.gaps == {}
    assert gaps.recorded("2", FORGET_AFTER + 1) == "retry", "known, so never a gap again"


def test_evidence_keeps_a_gap_to_nudge_and_makes_its_line_a_warning():
    gaps = tracker(evidence=False)
    gaps.recorded("1", 0.0)
    gaps.recorded("3", 0.0)
    gaps.missed(1.0)
    swept = gaps.sweep(STRANDED_AFTER)
    assert swept.evidenced
    assert gaps.sweep(FORGET_AFTER).forgotten == []
    assert gaps.nudge("4", FORGET_AFTER)


async def test_gaps_without_evidence_are_told_at_info(caplog):
    metrics, clock = Metrics(), Clock()

    async def ping() -> None:
        pass

    watch = StrandedWatch(metrics, ping, clock=clock)
    with caplog.at_level(logging.DEBUG, logger="bot.intake.stranded"):
        watch.recorded("1")
        watch.recorded("3")
        clock.now = STRANDED_AFTER
        await watch.tick()
        clock.now = FORGET_AFTER
        await watch.tick()
    (line,) = [r for r in caplog.records if "transaction 2 missing" in r.getMessage()]
    assert line.levelno == logging.INFO
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    labels = {"outcome": "forgotten"}
    assert sample(metrics, "safeguard_stranded_transactions_resolved_total", **labels) == 1


async def test_what_the_first_catch_up_after_a_start_finds_is_no_evidence():
    """Events missed while the service was away are found by the first round after its
    start: they say nothing of the gaps the push leaves after it."""
    metrics, clock = Metrics(), Clock()

    async def ping() -> None:
        pass

    watch = StrandedWatch(metrics, ping, clock=clock, tracker=tracker(evidence=False))
    watch.missed(3, first_round=True)
    watch.recorded("1")
    watch.recorded("3")
    clock.now = STRANDED_AFTER
    await watch.tick()
    assert not watch.refuse("4"), "no nudge on the start's catch-up alone"
    watch.missed(1)  # a later round finds one the push never brought
    assert watch.refuse("5")
