"""What every step of a case is: one contract, kept by the step engine (bot/engine.py).

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
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.deployment import Deployment
from bot.metrics import Metrics
from bot.ports import MESSAGE_MARKER_KEY, Homeserver, Refused, Webhook
from bot.ready_rooms import ReadyRooms
from bot.rooms import RoomDirectory
from bot.staff_room import StaffRoom, StaffRoomUnavailable
from bot.store.cases import Case, Step
from bot.texts import Texts
from bot.wording import person, place


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


@dataclass(frozen=True)
class StepRun:
    """One attempt at one step, as the step sees it."""

    case: Case
    step: Step  # this step's row, with this attempt counted
    steps: Mapping[str, Step]  # every step of the case, as recorded now
    save: Callable[..., Awaitable[None]]  # save(progress={...}, case_fields={...})

    @property
    def resumed(self) -> bool:
        """An earlier attempt started: it may have done part of the work already."""
        return self.step.attempts > 1

    @property
    def progress(self) -> dict[str, Any]:
        return self.step.progress

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

    async def send_once(
        self, run: StepRun, room_id: str, content: dict[str, Any], what: str | None = None
    ) -> str | Refused:
        """Send a marked message, unless an interrupted earlier attempt already did.

        Synapse forgets transaction ids on restart, so a resumed step looks for its
        own marked message before sending again.
        """
        what = what or run.step.step
        tag = marker(run.case, what)
        if run.resumed:
            found = await self.homeserver.find_marked_message(room_id, tag)
            if found is not None:
                return found
        sent = await self.homeserver.send(
            room_id, marked(content, run.case, what), txn_id=f"safeguard.{tag}"
        )
        return sent if isinstance(sent, Refused) else sent.event_id

    async def person(self, user_id: str | None) -> str:
        """`Sam (@sam:example.org)` as staff texts name people."""
        if not user_id:
            return "(unknown)"
        return person(user_id, await self.homeserver.display_name(user_id))

    async def place(self, room_id: str | None) -> str:
        """`Group chat (!abc:example.org)` as staff texts name rooms."""
        if not room_id:
            return "(unknown)"
        return place(room_id, await self.homeserver.room_name(room_id))

    async def send_to_staff(
        self, run: StepRun, content: dict[str, Any], what: str | None = None
    ) -> str | Refused:
        """send_once into the staff room; a room that cannot take it defers the step.

        Not resolved yet, or the bot not allowed to post: an operator can fix both
        (/health says so), and until then the message waits rather than being dropped.
        """
        room_id = self.staff_room.require()
        sent = await self.send_once(run, room_id, content, what)
        if isinstance(sent, Refused) and sent.errcode == "M_FORBIDDEN":
            raise StaffRoomUnavailable(f"cannot post in the staff room {room_id}: {sent}")
        return sent


class CaseStep(ABC):
    name: ClassVar[str]
    # Steps that must have finished (done, failed or skipped) before this one runs.
    requires: ClassVar[tuple[str, ...]] = ()
    # Failures that are not outages, retried this many times before the step fails.
    retries: ClassVar[int] = 2
    # The audit entry's kind; documented kinds of older releases are kept.
    audit_kind: ClassVar[str | None] = None

    def __init__(self, tools: Toolbox) -> None:
        self.tools = tools
        self.hs = tools.homeserver
        self.deployment = tools.deployment

    @property
    def kind(self) -> str:
        return self.audit_kind or f"step.{self.name}"

    def due(self, case: Case, steps: Mapping[str, Step]) -> dt.datetime | None:
        """When the step may run, once its preconditions hold (None: at once)."""
        return None

    @abstractmethod
    async def run(self, run: StepRun) -> Outcome: ...

    async def deferred(self, run: StepRun, why: str) -> None:  # noqa: B027 - optional hook
        """Called when an outage defers the step (e.g. the alert pages someone if it waits)."""
