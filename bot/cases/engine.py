"""The step engine: every step of every case, run exactly once, in one place, by one contract.

For each step (bot/steps/): the intent is written before it touches the
homeserver (status `started`, the attempt counted), the outcome after, in the
same database transaction as its audit entry and whatever a person must be
told. A step runs when the steps it requires have finished and its due time
has come; the case row's `next_attempt_at` is when the engine must look at a
case again, so one timer — the earliest of them — serves every case, however
many check-ins are pending.

What can go wrong, and what then:
- the homeserver is unreachable, rate-limits past its budget, or rejects our
  token (an outage), or the room cannot be encrypted for yet: the step waits
  with backoff; nothing is recorded as failed (its record says why it waits);
- the database cannot record (disk full, locked, restarting): nothing is
  decided; the case is looked at again, and a resumed step finds what it did;
- the homeserver refuses: retried up to the step's `retries`, then recorded
  `failed` with its reason, and a person is told — in the staff alert if it is
  still to come, else by a staff-room reply to it; an alert that itself fails
  pages `policy.alert_webhook` and shows on /health;
- a step hits a bug of ours: never read as "could not be done, move on". It is
  retried with backoff for as long as it raises, the steps that need it wait,
  /health names the case, and staff are told (in the alert, or a reply to it).

Staff hear of every case within `policy.alert_deadline` whatever the other steps
are doing (bot/steps/alert.py); a notice or a removal that finishes after the
alert was posted is told to staff in a reply to it, in the transaction that
records it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, NamedTuple

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.core.ports import EncryptionUnavailable, HomeserverUnavailable
from bot.core.worker import STOP_GRACE_SECONDS
from bot.rooms.staff_room import StaffRoomUnavailable
from bot.steps import CaseStep, Outcome, StepRun, Toolbox
from bot.steps.alert import REPORTED_BY_ALERT
from bot.store import audit, cases, outbox
from bot.store.cases import INTERNAL_ERROR, Case, Step
from bot.store.outages import DatabaseUnavailable, is_database_outage
from bot.store.transact import transact

log = logging.getLogger(__name__)

# Outage backoff (seconds), by the step's attempt number.
OUTAGE_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Backoff before retrying a step that failed but might succeed, or that raised (by its
# failure count; the last is repeated for a step that keeps raising).
FAILURE_DELAYS = (2.0, 10.0, 30.0, 60.0)


class Ahead(NamedTuple):
    """The intent of the step that follows another at once (`CaseStep.follows_at_once`),
    written in the same transaction as that one's: the step as it was, and as started."""

    was: Step
    started: Step


class Begun(NamedTuple):
    """A case as the transaction that opened it left it: its first step's intent written
    (`step` None: none to run now), and that of the step to follow it at once, if any."""

    case: Case | None
    steps: dict[str, Step]
    step: Step | None
    ahead: Ahead | None = None


class _Finished(NamedTuple):
    """A step's outcome, to be recorded in the transaction that starts the next."""

    case: Case
    unit: CaseStep
    step: Step
    steps: Mapping[str, Step]
    outcome: Outcome


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _database_outage(exc: BaseException) -> bool:
    """A database call that failed because the database cannot answer now. Only errors a
    database call raised count (a step's own OSError, say, is a failure of the step)."""
    return isinstance(exc, DatabaseUnavailable | SQLAlchemyError) and is_database_outage(exc)


def _delay(delays: tuple[float, ...], count: int) -> dt.timedelta:
    return dt.timedelta(seconds=delays[min(max(count, 1), len(delays)) - 1])


def _started(step: Step, now: dt.datetime) -> Step:
    """The step as `cases.start_steps` leaves its row: started, this attempt counted."""
    return replace(
        step, status="started", attempts=step.attempts + 1, started_at=step.started_at or now
    )


class StepEngine:
    def __init__(
        self,
        db: AsyncEngine,
        steps: Mapping[str, CaseStep],
        tools: Toolbox,
        *,
        others: Mapping[str, tuple[Mapping[str, CaseStep], Toolbox]] | None = None,
        max_parallel_cases: int = 8,
        poll_interval: float = 30.0,
        outage_delays: tuple[float, ...] = OUTAGE_DELAYS,
        failure_delays: tuple[float, ...] = FAILURE_DELAYS,
    ) -> None:
        self._db = db
        # Each community's steps, with its settings, texts and staff room: a case is run
        # by its own community's (`steps` and `tools`: the first community's; `others`:
        # the rest, by id).
        self._kits = {tools.deployment.community: (dict(steps), tools)}
        self._kits.update({key: (dict(units), kit) for key, (units, kit) in (others or {}).items()})
        self._homeserver = tools.homeserver
        self._metrics = tools.metrics
        self._slots = asyncio.Semaphore(max_parallel_cases)
        self._poll = poll_interval
        self._outage_delays = outage_delays
        self._failure_delays = failure_delays
        self._running: set[int] = set()
        self._changed: set[int] = set()  # running cases changed since their run read them
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        # Set once the timer has read the due cases and armed itself (cleared on stop).
        self.ready = asyncio.Event()
        self.on_outbox = lambda: None  # told when a staff message was queued

    # ---- the timer -------------------------------------------------------------------

    def start(self) -> None:
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="step-engine")

    def wake(self) -> None:
        self._wakeup.set()

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    async def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """Stop the timer; steps in flight get `grace` seconds, then are cancelled.

        Every step is resumable, so whatever is cut short finishes on the next start;
        cancelling in the middle of a database transaction is what the grace avoids.
        """
        self._stopping = True
        self.ready.clear()
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _loop(self) -> None:
        repaging: asyncio.Task[None] | None = None
        while not self._stopping:
            self._wakeup.clear()
            timeout = self._poll
            try:
                next_at = await self._start_due_cases()
                if next_at is not None:
                    timeout = min(self._poll, max((next_at - _now()).total_seconds(), 0.0))
                self.ready.set()
                if repaging is None:
                    # After the first look, beside the cases: a webhook slow to answer
                    # holds none of them back.
                    repaging = asyncio.create_task(
                        self._page_failed_alerts_never_paged(), name="repage-failed-alerts"
                    )
                    self._tasks.add(repaging)
                    repaging.add_done_callback(self._tasks.discard)
            except Exception:
                # A database hiccup must not stop the timer: the rows are still the truth.
                log.exception("the step engine could not read its due cases; retrying")
                timeout = min(self._poll, 2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _start_due_cases(self) -> dt.datetime | None:
        """Start every due case not already running; returns when to look next.

        One `now` for both: a case falling due between the two reads (a timer fires a
        little early, the reads take a while on a busy machine) is looked at again at
        once, never left to the next poll, half a minute later (a plain word to staff, or
        the alert itself, is due seconds after a failure)."""
        now = _now()
        async with self._db.connect() as conn:
            due = await cases.due(conn, now)
            next_at = await cases.next_due_at(conn)
        for case_id in due:
            self._start(case_id)  # one running already is not changed by falling due
        if next_at is not None and next_at <= now and len(due) < cases.DUE_BATCH:
            # Every case due by `now` was just read: started, or in flight (a case in
            # flight wakes the timer when it finishes).
            return None
        return next_at

    async def begin(self, conn: AsyncConnection, opened: cases.Opened) -> Begun:
        """In the transaction that opens the case: its first step's intent written there,
        so the step (the member's notice) waits for no transaction of its own. Hand the
        result to `start_case`."""
        known = None
        if opened.case is not None:  # as just written: no need to read it back
            known = opened.case, {step.step: step for step in opened.steps}
        _, case, steps, step, ahead = await self._between_steps(
            conn, opened.case_id, None, True, set(), known
        )
        if case is not None and step is not None:
            progress = await self._units(case)[step.step].begin(conn, case, step)
            if progress is not None:
                step = steps[step.step] = replace(step, progress=progress)
        return Begun(case, steps, step, ahead)

    def start_case(self, case_id: int, begun: Begun | None = None) -> None:
        """Run a case now (just opened, `begun` there; or changed by a staff command or
        another flag), unless it is already running: that run then reads the case again
        before its next step, and runs none ahead of that read (`_follows`)."""
        if case_id in self._running:
            self._changed.add(case_id)
        self._start(case_id, begun)

    def _start(self, case_id: int, begun: Begun | None = None) -> None:
        """Run the case now unless it is running already (that run finds the intent
        written, and resumes the step as it would after a crash)."""
        if case_id in self._running or self._stopping:
            return
        self._running.add(case_id)
        task = asyncio.create_task(self._run_guarded(case_id, begun), name=f"case:{case_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_guarded(self, case_id: int, begun: Begun | None = None) -> None:
        try:
            async with self._slots:
                await self.run_case(case_id, begun)
        except Exception as exc:
            # Recording failed (the database): the case stays due and is retried; a
            # resumed step finds what this attempt already did.
            if _database_outage(exc):
                log.warning("case #%d: the database cannot record (%s); retrying", case_id, exc)
                self._metrics.errors.labels("database").inc()
            else:
                log.exception("case #%d: could not be advanced; retrying", case_id)
                self._metrics.errors.labels("workflow").inc()
            await asyncio.sleep(1)
        finally:
            self._running.discard(case_id)
            # Changed after this run's last read of it (a staff command committed as the
            # run wrote its next look, which may have put back a later time): run again
            # now, not at that time.
            changed = case_id in self._changed
            self._changed.discard(case_id)
            if changed:
                self._start(case_id)
            self.wake()

    async def retry_waiting(self) -> None:
        """What held steps back is fixed (e.g. the staff room works now): retry them now."""
        async with self._db.begin() as conn:
            await cases.retry_started_now(conn, _now())
        self.wake()

    # ---- one case --------------------------------------------------------------------

    async def run_case(self, case_id: int, begun: Begun | None = None) -> None:
        """Run every step of the case that can run now, in order; then set its next look.

        One database transaction between two steps: the outcome of the one that ran,
        the case as it is now (a staff command may have changed it meanwhile), and the
        intent of the next (or, with none to run now, when to look again). So a step
        waits for one commit after the one before it, not three.

        A step that follows another at once (the removal, after the notice) waits for
        none: its intent was written with that one's, and it begins the moment that one
        is done, while that outcome is recorded (`_follow`).
        """
        deferred: set[str] = set()  # each step is tried at most once per round when waiting
        finished: _Finished | None = None  # the last step's outcome, not yet recorded
        go_on = True
        ahead: Ahead | None = None  # an intent written ahead, not acted on
        while True:
            if begun is not None:
                # The transaction that opened the case wrote the first intent (`begin`).
                (case, steps, step, ahead), told, begun = begun, False, None
            else:
                self._changed.discard(case_id)  # this transaction reads the case as it is
                told, case, steps, step, ahead = await transact(
                    self._db, self._between_steps, case_id, finished, go_on, deferred, None, ahead
                )
            if finished is not None:
                await self._outcome_recorded(finished, told)
            if case is None or step is None:
                return
            deferred.add(step.step)
            # False: the homeserver is away, and the other steps would wait for it too.
            go_on, finished = await self._run_step(case, step, steps)
            if ahead is not None and go_on and finished is not None:
                following = self._follows(case_id, finished, ahead, deferred)
                if following is not None:
                    case, steps = following
                    deferred.add(ahead.started.step)
                    go_on, finished = await self._follow(case, steps, finished, ahead.started)
                    ahead = None

    def _follows(
        self, case_id: int, before: _Finished, ahead: Ahead, deferred: set[str]
    ) -> tuple[Case, dict[str, Step]] | None:
        """The case and its steps as `ahead` would see them, if it is the step to run now
        that `before` has its outcome; None if not (or if the case changed meanwhile: then
        the next transaction reads it again, and undoes the intent written ahead)."""
        if case_id in self._changed:
            return None
        outcome, now = before.outcome, _now()
        done = replace(
            before.step,
            status=outcome.status,
            result=outcome.facts | outcome.personal,
            error=outcome.error,
            finished_at=now,
            not_before=None,
        )
        steps = {**before.steps, done.step: done, ahead.started.step: ahead.started}
        fields = {k: v for k, v in outcome.case_fields.items() if k in Case.__dataclass_fields__}
        case = replace(before.case, **fields)
        upcoming = self._next_runnable(case, steps, now, skip=deferred)
        if upcoming is None or upcoming.step != ahead.started.step:
            return None
        return case, steps

    async def _follow(
        self, case: Case, steps: dict[str, Step], before: _Finished, step: Step
    ) -> tuple[bool, _Finished | None]:
        """Run `step`, whose intent was written ahead, while `before`'s outcome is recorded.

        Both are on record before the next transaction: if the process dies between,
        the next run finds both steps started and resumes them in order, each looking
        for what it did first (a kick that went through is the bot's own leave event).
        """

        async def record() -> None:
            told = await transact(self._db, self._write_outcome, before)
            await self._outcome_recorded(before, told)

        recording = asyncio.create_task(record(), name=f"case:{case.id}:record")
        try:
            return await self._run_step(case, step, steps)
        finally:
            await recording

    async def _between_steps(
        self,
        conn: AsyncConnection,
        case_id: int,
        finished: _Finished | None,
        go_on: bool,
        deferred: set[str],
        known: tuple[Case, dict[str, Step]] | None = None,
        unused: Ahead | None = None,
    ) -> tuple[bool, Case | None, dict[str, Step], Step | None, Ahead | None]:
        """The transaction between two steps (run whole: bot/store/transact.py): the last
        one's outcome recorded, an intent written ahead and not acted on undone, the case
        read (`known`: as this transaction wrote it), and the next one's intent written
        (with that of the step to follow it at once, if any)."""
        told = await self._write_outcome(conn, finished) if finished else False
        if unused is not None:
            await cases.unstart_step(conn, case_id, unused.was)
        if known is not None:
            case, steps = known
        else:
            case = await cases.get(conn, case_id)
            steps = {step.step: step for step in await cases.steps_of(conn, case_id)}
        step: Step | None = None
        ahead: Ahead | None = None
        if case is not None and go_on:
            now = _now()
            step = self._next_runnable(case, steps, now, skip=deferred)
            if step is not None:
                ahead = self._ahead_of(case, steps, step, now)
                # The intent (and the one written ahead, if any): one statement.
                names = [step.step] if ahead is None else [step.step, ahead.was.step]
                await cases.start_steps(conn, case_id, names, now)
                step = steps[step.step] = _started(step, now)
        if case is not None and step is None:
            await cases.set_next_attempt(conn, case_id, self._next_look(case, steps))
        return told, case, steps, step, ahead

    def _ahead_of(
        self, case: Case, steps: Mapping[str, Step], step: Step, now: dt.datetime
    ) -> Ahead | None:
        """The step whose intent is written with `step`'s: the one that would run next were
        `step` done, if it follows at once (`CaseStep.follows_at_once`) and has not begun.
        So it waits for `step` alone, not for `step`'s record. It is acted on only if it is
        still the one to run when `step` has its outcome (`_follows`); else the next
        transaction undoes it. Left by a crash, it only makes that step look before it
        acts."""
        if_done = {**steps, step.step: replace(step, status="done")}
        upcoming = self._next_runnable(case, if_done, now, skip=set())
        if upcoming is None or upcoming.status != "pending":
            return None
        if not self._units(case)[upcoming.step].follows_at_once:
            return None
        return Ahead(upcoming, _started(upcoming, now))

    def _units(self, case: Case) -> dict[str, CaseStep]:
        return self._kits[case.community][0]

    def _tools(self, case: Case) -> Toolbox:
        return self._kits[case.community][1]

    def _when(self, case: Case, steps: Mapping[str, Step], step: Step) -> dt.datetime | None:
        """When `step` may run (None: its preconditions do not hold yet)."""
        unit = self._units(case).get(step.step)
        if unit is None or step.finished or not unit.ready(case, steps):
            return None
        times = [t for t in (unit.due(case, steps), step.not_before) if t is not None]
        return max(times) if times else case.received_at

    def _next_runnable(
        self, case: Case, steps: Mapping[str, Step], now: dt.datetime, *, skip: set[str]
    ) -> Step | None:
        """The next step to run: a promise that fell due (the alert at its deadline) first,
        then the others in the policy's order."""
        ordered = sorted(steps.values(), key=lambda s: s.position)
        promises = [s for s in ordered if self._is_promise(case, s)]
        for step in [*promises, *ordered]:
            if step.step in skip and step.status == "started":
                continue
            when = self._when(case, steps, step)
            if when is not None and when <= now:
                return step
        return None

    def _is_promise(self, case: Case, step: Step) -> bool:
        unit = self._units(case).get(step.step)
        return unit is not None and unit.promise

    def _cut_at(self, case: Case, steps: Mapping[str, Step], step: Step) -> float | None:
        """When an attempt at `step` is cut short (loop time): at the due time of a promise
        still to keep (the alert's deadline), so no other step can hold it up. None: not."""
        if self._is_promise(case, step):
            return None
        dues = [
            self._when(case, steps, other)
            for other in steps.values()
            if self._is_promise(case, other) and not other.finished
        ]
        now = _now()
        upcoming = [due for due in dues if due is not None and due > now]
        if not upcoming:
            return None
        return asyncio.get_running_loop().time() + (min(upcoming) - now).total_seconds()

    def _next_look(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        times = [self._when(case, steps, step) for step in steps.values()]
        return min((t for t in times if t is not None), default=None)

    async def _run_step(
        self, case: Case, step: Step, steps: dict[str, Step]
    ) -> tuple[bool, _Finished | None]:
        """Run one step (its intent written) under the contract: whether to go on (False
        if a homeserver outage deferred it), and the outcome to record, if it has one.

        A staff room that cannot take messages, or a room that cannot be encrypted for
        yet, defers only the steps that need it: the case's other steps go on.
        """
        unit = self._units(case)[step.step]
        run = StepRun(case, step, steps, self._saver(case, step))
        began = time.perf_counter()
        limit = asyncio.timeout_at(self._cut_at(case, steps, step))
        try:
            async with limit:
                outcome = await unit.run(run)
        except HomeserverUnavailable as exc:
            await self._defer(unit, run, exc)
            return await self._others_may_go_on(exc), None
        except TimeoutError as exc:
            if not limit.expired():
                await self._crashed(unit, run, exc)
                return True, None
            # Cut short at the alert's deadline: resumable like any interrupted attempt (it
            # looks for what it did first), and tried again right after the alert.
            cut = HomeserverUnavailable("still under way at the staff alert's deadline")
            cut.retry_after = 0.0
            await self._defer(unit, run, cut)
            return True, None
        except Exception as exc:
            if _database_outage(exc):
                raise  # nothing is decided: the case is looked at again (_run_guarded)
            await self._crashed(unit, run, exc)
            return True, None
        if outcome.status == "failed" and outcome.retry and step.failures < unit.retries:
            await self._retry_later(case, step, outcome)
            return True, None
        self._metrics.step_seconds.labels(step.step).observe(time.perf_counter() - began)
        return True, _Finished(case, unit, step, steps, outcome)

    async def _others_may_go_on(self, exc: HomeserverUnavailable) -> bool:
        """After a step was deferred: whether the case's other steps are worth trying in
        this round. Not if the homeserver itself is away (they would wait for it too); yes
        if only this step's own need failed (the staff room, encryption, one call)."""
        if isinstance(exc, StaffRoomUnavailable | EncryptionUnavailable):
            return True
        try:
            return await self._homeserver.check() is None
        except Exception:
            return False

    def _saver(self, case: Case, step: Step) -> Any:
        async def save(
            *, progress: dict[str, Any] | None = None, case_fields: dict[str, Any] | None = None
        ) -> None:
            async def record(conn: AsyncConnection) -> None:
                if progress is not None:
                    await cases.save_progress(conn, case.id, step.step, progress)
                if case_fields:
                    await cases.set_fields(conn, case.id, **case_fields)

            try:
                # An attempt cut short at the alert's deadline still records what it
                # learnt: the write runs to its end (never half a transaction).
                await asyncio.shield(transact(self._db, record))
            except Exception as exc:
                if _database_outage(exc):
                    # What the step did is on the homeserver; recording it is retried,
                    # never turned into the step's failure.
                    raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
                raise

        return save

    async def _defer(self, unit: CaseStep, run: StepRun, exc: HomeserverUnavailable) -> None:
        case, step = run.case, run.step
        why = str(exc)
        delay = _delay(self._outage_delays, step.attempts)
        if exc.retry_after is not None:
            delay = min(delay, dt.timedelta(seconds=exc.retry_after))
        until = _now() + delay
        promised = unit.try_again_by(run)
        if promised is not None:
            until = min(until, promised)
        async with self._db.begin() as conn:
            # Why it waits is on the record: the alert tells staff, if it goes first.
            await cases.retry_step_later(
                conn, case.id, step.step, not_before=until, failed=False, error=why[:500]
            )
        log.warning(
            "case #%d: %s waits %.0fs: %s",
            case.id,
            step.step,
            (until - _now()).total_seconds(),
            why,
            extra={"case": case.id},
        )
        self._metrics.errors.labels("homeserver").inc()
        try:
            await unit.deferred(run, why)
        except Exception:
            log.exception("case #%d: %s: deferral hook failed", case.id, step.step)

    async def _crashed(self, unit: CaseStep, run: StepRun, exc: BaseException) -> None:
        """A bug of ours: the step is tried again, with backoff, for as long as it raises.

        It is never recorded as failed, so nothing that needs it (the removal, after the
        notice) goes ahead as if it could not be done, and its failures (bounded for
        refusals) are not used up. /health names the case; staff hear of it in the alert,
        or once in a reply to it if the alert went before; an alert that raises pages
        `policy.alert_webhook` once past its deadline, as one that waits does.
        """
        case, step = run.case, run.step
        log.error(
            "case #%d: step %s crashed", case.id, step.step, exc_info=exc, extra={"case": case.id}
        )
        self._metrics.errors.labels("workflow").inc()
        error = f"{INTERNAL_ERROR} ({type(exc).__name__}), retrying"
        crashes = int(run.progress.get("crashes", 0)) + 1
        until = _now() + _delay(self._failure_delays, crashes)
        alert = run.steps.get("alert")
        tell = not run.progress.get("crash_told") and alert is not None and alert.finished
        # What this attempt saved is kept: the progress as it is now, not as it began.
        progress = run.progress | {"crashes": crashes} | ({"crash_told": True} if tell else {})
        async with self._db.begin() as conn:
            await cases.retry_step_later(
                conn, case.id, step.step, not_before=until, failed=False, error=error
            )
            await cases.save_progress(conn, case.id, step.step, progress)
            if tell:
                content = self._tools(case).texts.step_failed(
                    case_number=case.id, step=step.step, error=error, reply_to=case.alert_event_id
                )
                await outbox.queue(
                    conn, self._tools(case).staff_room.address, content, _now(), case_id=case.id
                )
        run.progress = progress
        if tell:
            self.on_outbox()
        try:
            await unit.deferred(run, error)
        except Exception:
            log.exception("case #%d: %s: deferral hook failed", case.id, step.step)

    async def _retry_later(self, case: Case, step: Step, outcome: Outcome) -> None:
        until = _now() + _delay(self._failure_delays, step.failures + 1)
        async with self._db.begin() as conn:
            await cases.retry_step_later(
                conn, case.id, step.step, not_before=until, failed=True, error=outcome.error
            )
        log.warning(
            "case #%d: %s failed (%s); retrying (%d of %d)",
            case.id,
            step.step,
            outcome.error,
            step.failures + 1,
            self._units(case)[step.step].retries,
            extra={"case": case.id},
        )

    async def _write_outcome(self, conn: AsyncConnection, finished: _Finished) -> bool:
        """A step's outcome, its audit entry and what a person must be told, in the
        caller's transaction; True if a staff message was queued."""
        case, unit, step, steps, outcome = finished
        now = _now()
        facts = outcome.facts | {"status": outcome.status, "attempts": step.attempts}
        personal = outcome.personal
        if outcome.error:
            # The homeserver's words may name people: personal, erasable. The code is not.
            personal = personal | {"error": outcome.error}
            code = outcome.error.split(":", 1)[0]
            if code.startswith("M_") and code.replace("_", "").isalnum():
                facts["errcode"] = code
        if not await cases.finish_step(
            conn,
            case.id,
            step.step,
            status=outcome.status,
            result=outcome.facts | outcome.personal,
            error=outcome.error,
            now=now,
        ):
            log.info("case #%d: %s armed again as it ran: it runs again", case.id, step.step)
        if outcome.case_fields:
            await cases.set_fields(conn, case.id, **outcome.case_fields)
        await audit.append(
            conn,
            self._tools(case).deployment.provenance,
            unit.kind,
            case_id=case.id,
            facts=facts,
            personal=personal,
            at=now,
        )
        return await self._tell_staff(conn, case, step, steps, outcome, now)

    async def _outcome_recorded(self, finished: _Finished, told: bool) -> None:
        """What follows a recorded outcome, once it is committed."""
        case, _, step, _, outcome = finished
        self._metrics.steps.labels(step.step, outcome.status).inc()
        log.info("case #%d: %s %s", case.id, step.step, outcome.status, extra={"case": case.id})
        if told:
            self.on_outbox()
        if outcome.status == "failed" and step.step == "alert":
            await self._page_failed_alert(case, outcome)

    async def _tell_staff(
        self,
        conn: AsyncConnection,
        case: Case,
        step: Step,
        steps: Mapping[str, Step],
        outcome: Outcome,
        now: dt.datetime,
    ) -> bool:
        """Queue what staff must hear of this outcome (True if anything was queued).

        The notice's and the removal's outcomes are in the alert when it goes after them;
        when the alert went first (its deadline came), each outcome follows as a reply
        to it. Any other step's failure is told in a reply of its own.
        """
        alert = steps.get("alert")
        contents: list[dict[str, Any]] = []
        if step.step in REPORTED_BY_ALERT:
            stated = (alert.result.get("stated") or {}) if alert is not None else {}
            # News: not what the alert said, or asked for by staff (`!case N notify`).
            news = stated.get(step.step) != outcome.status or step.progress.get("staff_asked")
            if alert is not None and alert.status == "done" and news:
                update = self._step_update(
                    case, steps, step.step, outcome.status, outcome.facts, outcome.error
                )
                contents += [update] if update is not None else []
        elif step.step == "alert" and outcome.status == "done":
            # Found posted by an earlier attempt, it says what was so then: what finished
            # since (while this step waited to be recorded) follows as replies to it.
            said = outcome.facts.get("stated") or {}
            reply_to = outcome.case_fields.get("alert_event_id")
            for name in ("notify", "remove"):  # in the order they happen
                was = steps.get(name)
                if was is None or not was.finished or said.get(name) == was.status:
                    continue
                update = self._step_update(
                    case, steps, name, was.status, was.result, was.error, reply_to
                )
                contents += [update] if update is not None else []
        elif outcome.status == "failed" and step.step != "alert":
            contents.append(
                self._tools(case).texts.step_failed(
                    case_number=case.id,
                    step=step.step,
                    error=outcome.error,
                    reply_to=case.alert_event_id,
                )
            )
        for content in contents:
            await outbox.queue(
                conn, self._tools(case).staff_room.address, content, now, case_id=case.id
            )
        return bool(contents)

    def _step_update(
        self,
        case: Case,
        steps: Mapping[str, Step],
        name: str,
        status: str,
        facts: Mapping[str, Any],
        error: str | None,
        reply_to: str | None = None,
    ) -> dict[str, Any] | None:
        """A reply to the alert: what became of the notice or the removal since it said."""
        if status == "skipped" and case.state == "closed":
            return None  # staff closed (or withdrew) it themselves: nothing to act on
        remove = steps.get("remove")
        return self._tools(case).texts.step_update(
            case_number=case.id,
            step=name,
            status=status,
            facts=facts,
            error=error,
            removed=remove is not None and remove.status == "done",
            reply_to=reply_to or case.alert_event_id,
        )

    async def _page_failed_alerts_never_paged(self) -> None:
        """At start: a failed alert is paged once its failure is recorded; a process that
        died between the two left it unpaged. Paged now (failed alerts are few: this does
        not grow with the cases)."""
        unpaged: list[tuple[Case, Step]] = []
        try:
            unpaged = await self._failed_alerts_never_paged()
        except Exception:
            log.exception("could not look for failed alerts never paged; /health lists them")
        for case, alert in unpaged:
            try:
                await self._page_failed_alert(case, Outcome("failed", error=alert.error))
            except Exception:
                log.exception("case #%d: its failed alert could not be paged", case.id)

    async def _failed_alerts_never_paged(self) -> list[tuple[Case, Step]]:
        unpaged: list[tuple[Case, Step]] = []
        async with self._db.connect() as conn:
            for case_id in await cases.failed_alerts(conn):
                entries = await audit.entries(conn, case_id=case_id)
                if any(entry.kind == "alert_paged" for entry in entries):
                    continue
                case = await cases.get(conn, case_id)
                alert = next(
                    (s for s in await cases.steps_of(conn, case_id) if s.step == "alert"), None
                )
                if case is not None and alert is not None and case.community in self._kits:
                    unpaged.append((case, alert))
        return unpaged

    async def _page_failed_alert(self, case: Case, outcome: Outcome) -> None:
        """Staff could not be told in their room: page whoever is on call (and /health says)."""
        log.error(
            "case #%d: the staff alert could not be delivered: %s",
            case.id,
            outcome.error,
            extra={"case": case.id},
        )
        url = self._tools(case).deployment.policy.alert_webhook
        problem = "no alert_webhook is configured"
        if url:
            problem = (
                await self._tools(case).webhook.post_json(
                    url,
                    {
                        "event": "safeguard.alert_failed",
                        "case": case.id,
                        "error": outcome.error,
                        "text": f"Safeguarding case #{case.id}: the staff alert could not be "
                        "delivered. Check the service's /health and the staff room now.",
                    },
                )
                or "sent"
            )
        async with self._db.begin() as conn:
            await audit.append(
                conn,
                self._tools(case).deployment.provenance,
                "alert_paged",
                case_id=case.id,
                facts={"webhook": problem},
                at=_now(),
            )
