"""What every step of a case is: one contract, kept by the step engine (bot/cases/engine.py).

A step states its own preconditions (`requires`: steps that must have finished
first) and its due time (`due`), and does one thing in `run`. The engine writes
the intent before `run` and the outcome after, in the same transaction as the
step's audit entry; a step found started after a restart is run again with
`resumed` set, and must first look for what its earlier attempt may already
have done (a room by the marker in its create event, a message by the marker
in its content, a member's membership). A homeserver outage raised from `run`
defers the step (never a failure); a failure another attempt might mend is
retried a bounded number of times; a failure for good is recorded and a person
is told.
"""

from __future__ import annotations

import datetime as dt
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.config.deployment import Deployment
from bot.core.metrics import Metrics
from bot.core.ports import (
    MESSAGE_MARKER_KEY,
    EncryptionUnavailable,
    Homeserver,
    Refused,
    Webhook,
    message_txn_id,
)
from bot.rooms.directory import RoomDirectory
from bot.rooms.ready_rooms import ReadyRooms
from bot.rooms.staff_room import StaffRoom, StaffRoomUnavailable
from bot.store.cases import Case, Step
from bot.store.retention import record_staff_post

if TYPE_CHECKING:
    from bot.steps.notify_ahead import NoticesAhead
from bot.texts.messages import Texts
from bot.texts.wording import person, place

log = logging.getLogger(__name__)
# In a step's progress: when encryption first failed for it (the plain fall-back's clock).
PLAIN_CLOCK = "encryption_failing_since"
# In the notice step's progress: its calls were made before the case was opened
# (bot/steps/notify_ahead.py), so an attempt that cannot join them looks for them first.
SENT_AHEAD = "sent_ahead"


@dataclass(frozen=True)
class Outcome:
    status: str  # done | failed | skipped
    facts: dict[str, Any] = field(default_factory=dict)
    personal: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    # A failure another attempt might mend (bounded by the step's `retries`).
    retry: bool = False
    # Case columns to write with the outcome (e.g. the alert's event id).
    case_fields: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def skipped(cls, why: str, **facts: Any) -> Outcome:
        return cls("skipped", {"why": why, **facts})

    @classmethod
    def refused(cls, why: str, refusal: Refused | str, *, retry: bool = False) -> Outcome:
        return cls("failed", {"why": why}, error=str(refusal), retry=retry)


@dataclass
class StepRun:
    """One attempt at one step, as the step sees it."""

    case: Case
    step: Step  # this step's row, with this attempt counted
    steps: Mapping[str, Step]  # every step of the case, as recorded now
    store: Callable[..., Awaitable[None]]  # store(progress={...}, case_fields={...})
    # The step's progress as last saved (this attempt's saves included).
    progress: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.progress = dict(self.step.progress)

    async def save(
        self, *, progress: dict[str, Any] | None = None, case_fields: dict[str, Any] | None = None
    ) -> None:
        """Record what the step learnt (a room made, a message sent) before going on."""
        await self.store(progress=progress, case_fields=case_fields)
        if progress is not None:
            self.progress = dict(progress)

    @property
    def resumed(self) -> bool:
        """An earlier attempt started, or the work was begun ahead of the case: part of it
        may be done already."""
        return self.step.attempts > 1 or bool(self.progress.get(SENT_AHEAD))

    @property
    def began_at(self) -> dt.datetime | None:
        """When the step's first attempt began (its record's `started_at`)."""
        return self.step.started_at

    def marker(self, what: str | None = None) -> str:
        return marker(self.case, what or self.step.step)


def marker(case: Case, what: str) -> str:
    """What marks the bot's rooms and messages for this case: unique to the case row, so
    a database started afresh (case numbers from 1 again) never finds an old case's room."""
    return f"{case.tag}:{what}"


def marked(content: dict[str, Any], case: Case, what: str) -> dict[str, Any]:
    """Tag a message so a resumed step can recognise it among the room's messages."""
    return content | {
        MESSAGE_MARKER_KEY: {"case": case.id, "step": what, "marker": marker(case, what)}
    }


@dataclass(frozen=True)
class Told:
    """A message that reached a person's room: its event, and why it went in the clear
    (None: encrypted wherever the room is)."""

    event_id: str
    plain_because: str | None = None


@dataclass(frozen=True)
class Toolbox:
    """The collaborators steps act through, handed to each step at construction."""

    db: AsyncEngine
    homeserver: Homeserver
    deployment: Deployment
    texts: Texts
    staff_room: StaffRoom
    rooms: RoomDirectory
    metrics: Metrics
    webhook: Webhook
    # DM rooms made ahead of any flag, for the member's notice (None: none are kept).
    ready_rooms: ReadyRooms | None = None
    # Members' notices sent ahead of their cases (bot/steps/notify_ahead.py; None: never).
    ahead: NoticesAhead | None = None

    async def send_once(
        self,
        run: StepRun,
        room_id: str,
        content: dict[str, Any],
        what: str | None = None,
        *,
        plain: bool = False,
        encrypt_by: dt.datetime | None = None,
        unmarked: bool = False,
    ) -> str | Refused:
        """Send a marked message, unless an interrupted earlier attempt already did.

        Synapse forgets transaction ids on restart, so a resumed step looks for its
        own marked message before sending again. `unmarked`: its content carries
        nothing of the case (a group room's members can read it whole); it is found
        again by its transaction id, which only the bot reads back.
        """
        what = what or run.step.step
        tag = marker(run.case, what)
        if run.resumed:
            found = await self.homeserver.find_marked_message(room_id, tag)
            if found is not None:
                return found
        sent = await self.homeserver.send(
            room_id,
            content if unmarked else marked(content, run.case, what),
            txn_id=message_txn_id(tag),
            plain=plain,
            encrypt_by=encrypt_by,
        )
        return sent if isinstance(sent, Refused) else sent.event_id

    def plain_deadline(self, run: StepRun) -> dt.datetime | None:
        """When a message of this step that cannot be encrypted goes in the clear instead:
        `encryption.fallback_after` from the attempt that first found it could not be (a
        whole fallback time from now while none has). None: never (`fallback: none`).

        The clock starts at that first failure, not when the step began: a step retried
        after an outage, or a notice tried again by staff hours later, gets its full wait
        for encryption before anything goes unencrypted."""
        after = self.deployment.plain_fallback_after
        if after is None:
            return None
        since = run.progress.get(PLAIN_CLOCK)
        if not isinstance(since, str):
            return dt.datetime.now(dt.UTC) + after
        return dt.datetime.fromisoformat(since) + after

    async def start_plain_clock(self, run: StepRun, at: dt.datetime) -> dt.datetime | None:
        """Encryption just failed for this step: start its clock (once), recorded so that
        a restart keeps it; returns the plain deadline."""
        if self.deployment.plain_fallback_after is not None and PLAIN_CLOCK not in run.progress:
            await run.save(progress=run.progress | {PLAIN_CLOCK: at.isoformat()})
        return self.plain_deadline(run)

    async def may_send_plain(self, run: StepRun, failed_at: dt.datetime) -> bool:
        deadline = await self.start_plain_clock(run, failed_at)
        return deadline is not None and dt.datetime.now(dt.UTC) >= deadline

    def plain_room_because(self) -> str | None:
        """Why a room the bot makes for a person now is made without encryption although
        configured with it: encryption is known to be broken, and messages may fall back
        to plain (a room that cannot be encrypted for would only hold them up). None:
        made as configured."""
        if (
            not self.deployment.encrypt_private_rooms
            or self.deployment.plain_fallback_after is None
        ):
            return None
        return self.homeserver.encryption_problem()

    async def tell(
        self, run: StepRun, room_id: str, content: dict[str, Any], what: str | None = None
    ) -> Told | Refused:
        """send_once to a person: encrypted where the room is, unless that cannot be done
        by the step's plain deadline, when it goes in the clear (the record says so)."""
        began = dt.datetime.now(dt.UTC)
        try:
            sent = await self.send_once(
                run, room_id, content, what, encrypt_by=self.plain_deadline(run)
            )
        except EncryptionUnavailable as exc:
            deadline = await self.start_plain_clock(run, began)
            if deadline is None:
                raise  # waited out like an outage (encryption.fallback: none)
            now = dt.datetime.now(dt.UTC)
            if now < deadline:
                # Waited out like an outage, and tried again by the deadline at the latest.
                left = (deadline - now).total_seconds()
                retry_after = left if exc.retry_after is None else min(exc.retry_after, left)
                raise EncryptionUnavailable(str(exc), retry_after=retry_after) from exc
            log.warning(
                "case #%d: %s sent unencrypted: %s", run.case.id, what or run.step.step, exc
            )
            sent = await self.send_once(run, room_id, content, what, plain=True)
            return sent if isinstance(sent, Refused) else Told(sent, str(exc))
        return sent if isinstance(sent, Refused) else Told(sent)

    async def person(self, user_id: str | None) -> str:
        """`Sam (@sam:example.org)` as staff texts name people."""
        if not user_id:
            return self.texts.language._("(unknown)")
        return person(user_id, await self.homeserver.display_name(user_id))

    async def room_as_members_know_it(self, room_id: str | None) -> str:
        """`Peer support`, or `the group chat`: how a member's message names a room (by
        its name alone: a member is no reader of room ids)."""
        name = await self.homeserver.room_name(room_id) if room_id else None
        return name or self.texts.language._("the group chat")

    async def place(self, room_id: str | None) -> str:
        """`Group chat (!abc:example.org)` as staff texts name rooms."""
        if not room_id:
            return self.texts.language._("(unknown)")
        return place(room_id, await self.homeserver.room_name(room_id))

    async def send_to_staff(
        self, run: StepRun, content: dict[str, Any], what: str | None = None, *, plain: bool = False
    ) -> str | Refused:
        """send_once into the staff room; a room that cannot take it defers the step.

        Not resolved yet, or the bot not allowed to post: an operator can fix both
        (/health says so), and until then the message waits rather than being dropped.
        """
        room_id = self.staff_room.require()
        sent = await self.send_once(run, room_id, content, what, plain=plain)
        if isinstance(sent, Refused) and sent.errcode == "M_FORBIDDEN":
            raise StaffRoomUnavailable(f"cannot post in the staff room {room_id}: {sent}")
        if isinstance(sent, str):
            await self.staff_post_recorded(run, sent)
        return sent

    async def staff_post_recorded(self, run: StepRun, event_id: str) -> None:
        """Recorded before the step goes on, so retention can redact it (a resumed attempt
        finds the message by its marker, and records it again: once)."""
        async with self.db.begin() as conn:
            await record_staff_post(conn, run.case.id, event_id, dt.datetime.now(dt.UTC))


class CaseStep(ABC):
    name: ClassVar[str]
    # Steps that must have finished (done, failed or skipped) before this one runs.
    requires: ClassVar[tuple[str, ...]] = ()
    # Failures that are not outages, retried this many times before the step fails.
    retries: ClassVar[int] = 2
    # The audit entry's kind; documented kinds of older releases are kept.
    audit_kind: ClassVar[str | None] = None
    # A promise with a deadline (the staff alert): once due it runs before any other step
    # of the case, and no other step's attempt may run past its due time.
    promise: ClassVar[bool] = False
    # Begins the moment the step before it is done, while that outcome is recorded (the
    # removal, after the notice): its intent is written with that step's, and the step
    # then waits for no transaction (bot/cases/engine.py). Only for a step whose resumed
    # attempt looks before it acts, as every step's must.
    follows_at_once: ClassVar[bool] = False

    def __init__(self, tools: Toolbox) -> None:
        self.tools = tools
        self.hs = tools.homeserver
        self.deployment = tools.deployment

    @property
    def kind(self) -> str:
        return self.audit_kind or f"step.{self.name}"

    def ready(self, case: Case, steps: Mapping[str, Step]) -> bool:
        """Whether its preconditions hold: by default, every step it requires finished."""
        return all(steps[name].finished for name in self.requires if name in steps)

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        """When the step may run, once its preconditions hold (None: at once)."""
        return None

    async def begin(self, conn: AsyncConnection, case: Case, step: Step) -> dict[str, Any] | None:
        """As a new case opens with this step first, in that transaction (run whole: only
        the database may be awaited): work that saves the step a transaction of its own,
        saved as the step's progress; returns that progress (None: nothing done)."""
        return None

    @abstractmethod
    async def run(self, run: StepRun) -> Outcome: ...

    def try_again_by(self, run: StepRun) -> dt.datetime | None:
        """When a deferred attempt must be tried again at the latest, whatever the backoff
        (a promise that falls due: the alert's deadline). None: the backoff decides."""
        return None

    async def deferred(self, run: StepRun, why: str) -> None:  # noqa: B027 - optional hook
        """Called when an outage defers the step (e.g. the alert pages someone if it waits)."""
