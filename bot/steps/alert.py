"""alert: tell staff everything they need to act, including informing emergency services.

Staff hear of every case within `policy.alert_deadline` of the flag, whatever the
member's notice and removal are doing: the alert goes as soon as both have
settled, or at the deadline with each stated as it is, verified — done, not yet
(and why), failed (and why), or held for their decision. What finishes after the
alert is told in a reply to it (bot/cases/engine.py, with the outcome's record).

A staff room that cannot take the alert (not resolved, the bot not allowed to
post) defers it — /health says why — and once the deadline has passed the alert
webhook is paged, once. An encrypted staff room the bot cannot encrypt for gets a
short plain "Case #N needs you" first (encryption.fallback), and the alert itself
once encryption works. A refusal that is not about the room is retried, then
recorded as failed: the webhook is paged and /health names the case.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping
from typing import Any

from bot.core.ports import EncryptionUnavailable, Refused
from bot.steps.base import PLAIN_CLOCK, CaseStep, Outcome, StepRun
from bot.store import audit
from bot.store.cases import Case, Step
from bot.texts.catalogues import N_
from bot.texts.messages import StepState

log = logging.getLogger(__name__)
# A flag that reaches us later than this is reported as late in the staff alert.
LATE_AFTER = dt.timedelta(seconds=60)
# The steps whose outcomes the alert states; one that finishes after it is told in a reply.
REPORTED_BY_ALERT = frozenset({"notify", "remove"})


def settled(steps: Mapping[str, Step]) -> bool:
    """Whether the notice and the removal have gone as far as they will on their own:
    both finished, or the notice failed (the removal then waits for staff)."""
    notify, remove = steps.get("notify"), steps.get("remove")
    if notify is None or remove is None:
        return True
    return notify.finished and (remove.finished or notify.status != "done")


def notice_state(notify: Step) -> StepState:
    if notify.status == "done":
        return StepState("done", note=notify.result.get("plain_because"))
    if notify.status == "failed":
        return StepState("failed", notify.error or notify.result.get("why"))
    if notify.status == "skipped":
        return StepState("skipped", notify.result.get("why"))
    return StepState("waiting", notify.error or N_("not tried yet"))


def removal_state(remove: Step, notify: Step) -> StepState:
    if remove.status == "done":
        if remove.result.get("already_gone"):
            return StepState("done", note=N_("they had already left the room"))
        return StepState("done")
    if remove.status == "failed":
        return StepState("failed", remove.error or remove.result.get("why"))
    if remove.status == "skipped":
        return StepState("skipped", remove.result.get("why"))
    if notify.status == "skipped":
        return StepState("skipped", notify.result.get("why"))  # the case closed first
    if notify.status == "failed" and not remove.progress.get("decided_by"):
        return StepState("held")
    if notify.status != "done":
        return StepState("waiting", N_("waiting until they have been told"))
    return StepState("waiting", remove.error or N_("not tried yet"))


def stated(step: Step) -> str:
    """How the alert states a step, as the engine compares a later outcome with it."""
    return step.status if step.finished else "pending"


class Alert(CaseStep):
    name = "alert"
    # No `requires`: it waits for the notice and the removal only until its deadline, and
    # then goes first, whatever they are doing (see bot/cases/engine.py).
    promise = True

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        if settled(steps):
            return None
        return case.received_at + self.deployment.policy.alert_deadline

    async def run(self, run: StepRun) -> Outcome:
        self.tools.staff_room.require()  # before reading anything: the alert waits for it
        posted = await self._posted_before(run)
        if posted is not None:
            # An earlier attempt's post stands, saying what it said then (the engine
            # replies with what changed since): looked for once, and not sent again.
            sent, said = posted
            await self.tools.staff_post_recorded(run, sent)
        else:
            notify, remove = run.steps["notify"], run.steps["remove"]
            content = await self._content(run, notify, remove)
            # What this post says, on record before it goes: a resumed attempt that finds
            # it knows what it told staff.
            said = {"notify": stated(notify), "remove": stated(remove)}
            await run.save(progress=run.progress | {"stating": said})
            began = dt.datetime.now(dt.UTC)
            try:
                sent = await self.tools.send_to_staff(run, content)
            except EncryptionUnavailable:
                await self._plain_word_first(run, began)
                raise
            if isinstance(sent, Refused):
                return Outcome.refused("the staff room refused the alert", sent, retry=True)
        facts = {"event": sent, "stated": said}
        if run.progress.get("plain_event"):
            facts["plain_first"] = run.progress["plain_event"]
        return Outcome("done", facts, case_fields={"alert_event_id": sent})

    async def _content(self, run: StepRun, notify: Step, remove: Step) -> dict[str, Any]:
        """The alert as it goes now: who, where, when, and how the notice and the removal
        stand."""
        case = run.case
        async with self.tools.db.connect() as conn:
            first = await audit.first_of_case(conn, case.id)
        personal = (first.personal if first else None) or {}
        late = case.received_at - case.flagged_at
        member, room, flagger = await asyncio.gather(
            self.tools.person(case.member_id),
            self.tools.place(case.room_id),
            self.tools.person(personal.get("flagger")),
        )
        return self.tools.texts.alert(
            case_number=case.id,
            member=member,
            room=room,
            flagger=flagger,
            flagged_at=case.flagged_at,
            method=first.facts.get("method", "") if first else "",
            reason=personal.get("reason"),
            notice=notice_state(notify),
            removal=removal_state(remove, notify),
            late_by=late if late > LATE_AFTER else None,
            due_at=case.due_at,
            dry_run=case.dry_run,
        )

    async def _posted_before(self, run: StepRun) -> tuple[str, dict[str, str]] | None:
        """An earlier attempt's post (found by its marker), and what it said; None if
        none was made (or none that said what it said was recorded first)."""
        stating = run.progress.get("stating")
        if not run.resumed or not isinstance(stating, dict):
            return None
        room_id = self.tools.staff_room.require()
        found = await self.hs.find_marked_message(room_id, run.marker())
        return None if found is None else (found, stating)

    async def _plain_word_first(self, run: StepRun, failed_at: dt.datetime) -> None:
        """The staff room is encrypted and the bot cannot encrypt: once the fall-back
        time has passed, a short plain "Case #N needs you" goes first, once."""
        if run.progress.get("plain_event") or not await self.tools.may_send_plain(run, failed_at):
            return
        content = self.tools.texts.encryption_failing(case_number=run.case.id)
        sent = await self.tools.send_to_staff(run, content, "alert_plain", plain=True)
        if isinstance(sent, str):
            await run.save(progress=run.progress | {"plain_event": sent})

    def try_again_by(self, run: StepRun) -> dt.datetime | None:
        """Its promises fall due on time, whatever the backoff: the deadline (to page, if it
        cannot be posted) and the plain fall-back time (to say "Case #N needs you")."""
        now = dt.datetime.now(dt.UTC)
        due = [run.case.received_at + self.deployment.policy.alert_deadline]
        if PLAIN_CLOCK in run.progress and not run.progress.get("plain_event"):
            plain = self.tools.plain_deadline(run)
            if plain is not None:
                due.append(plain)
        upcoming = [at for at in due if at > now]
        return min(upcoming) if upcoming else None

    async def deferred(self, run: StepRun, why: str) -> None:
        """Past its deadline and still not posted: page someone, once."""
        waited = dt.datetime.now(dt.UTC) - run.case.received_at
        url = self.deployment.policy.alert_webhook
        if not url or waited < self.deployment.policy.alert_deadline or run.progress.get("paged"):
            return
        problem = await self.tools.webhook.post_json(
            url,
            {
                "event": "safeguard.alert_undelivered",
                "case": run.case.id,
                "waiting_seconds": int(waited.total_seconds()),
                "plain_notice_posted": bool(run.progress.get("plain_event")),
                "text": f"Safeguarding case #{run.case.id}: its staff alert could not be "
                "posted. Check the service's /health and the staff room now.",
            },
        )
        if problem:
            log.error("case #%d: paging about the waiting alert failed: %s", run.case.id, problem)
        await run.save(progress=run.progress | {"paged": True, "page_error": problem})
