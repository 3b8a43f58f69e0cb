"""The policy core wired to an in-memory homeserver, for unit tests of what our code decides."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.cases.engine import Begun, StepEngine
from bot.config.deployment import Deployment
from bot.config.settings import CheckinSettings, MessageTemplates, PolicySettings, default_resources
from bot.core.metrics import Metrics
from bot.core.ports import MESSAGE_MARKER_KEY
from bot.rooms.directory import RoomDirectory
from bot.rooms.ready_rooms import ReadyRooms
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom
from bot.steps import CASE_STEPS, Toolbox, build_steps
from bot.store import audit, cases
from bot.texts.messages import StepState, Texts
from bot.texts.wording import person, place
from tests.support.fake_homeserver import FakeHomeserver

GROUP, STAFF = "!group:localhost", "!staff:localhost"
MEMBER, MOD = "@member:localhost", "@mod:localhost"
BOT = "@safeguard:localhost"
PROVENANCE = audit.Provenance("test", "0" * 64, b"5" * 64)


def deployment(
    *, messages: MessageTemplates | None = None, checkin: CheckinSettings | None = None, **policy
) -> Deployment:
    return Deployment(
        policy=PolicySettings(staff_room=STAFF, **policy),
        checkin=checkin or CheckinSettings(after=dt.timedelta(hours=1)),
        messages=messages or MessageTemplates(),
        resources=tuple(default_resources()),
        bot_user_id=BOT,
        provenance=PROVENANCE,
    )


class RecordingWebhook:
    def __init__(self) -> None:
        self.posted: list[tuple[str, dict[str, Any]]] = []

    async def post_json(self, url: str, payload: dict[str, Any]) -> str | None:
        self.posted.append((url, payload))
        return None


def toolbox(
    db: AsyncEngine,
    homeserver: Any,
    settings: Deployment | None = None,
    *,
    ready_rooms: ReadyRooms | None = None,
    ahead: Any = None,
) -> Toolbox:
    settings = settings or deployment()
    staff_room = StaffRoom(STAFF)
    return Toolbox(
        db=db,
        homeserver=homeserver,
        deployment=settings,
        texts=Texts(settings),
        staff_room=staff_room,
        rooms=RoomDirectory(staff_room),
        metrics=Metrics(),
        webhook=RecordingWebhook(),
        ready_rooms=ready_rooms,
        ahead=ahead,
    )


def step_engine(
    db: AsyncEngine,
    homeserver: Any,
    settings: Deployment | None = None,
    *,
    ready_rooms: ReadyRooms | None = None,
    ahead: Any = None,
    **options: Any,
) -> StepEngine:
    tools = toolbox(db, homeserver, settings, ready_rooms=ready_rooms, ahead=ahead)
    options.setdefault("outage_delays", (0.0,))
    options.setdefault("failure_delays", (0.0,))
    return StepEngine(db, build_steps(tools), tools, **options)


async def run_until_waiting(runner: StepEngine, db: AsyncEngine, case_id: int) -> None:
    """Run the case round after round until nothing of it is due now (retries included)."""
    from bot.store import cases

    for _ in range(20):
        await runner.run_case(case_id)
        async with db.connect() as conn:
            case = await cases.get(conn, case_id)
        if case is None or case.next_attempt_at is None:
            return
        if case.next_attempt_at > dt.datetime.now(dt.UTC):
            return
    raise AssertionError(f"case #{case_id} never settled")


def refusal_reports(
    db: AsyncEngine, staff_room: StaffRoom, settings: Deployment, texts: Texts
) -> RefusalReports:
    """Refusal reports as the service makes them, for one staff room."""
    return RefusalReports(
        db, staff_room, settings.policy.refusal_report_every, texts=texts, on_outbox=lambda: None
    )


def referral(
    db: AsyncEngine, homeserver: Any, settings: Deployment | None = None, **options: Any
) -> Any:
    """The referral decision wired to the fake homeserver (what unit tests need of it)."""
    from bot.intake.recent_senders import RecentSenders
    from bot.moderation.room_state import RoomStateCache
    from bot.referral.decision import Referral
    from bot.staff.members import StaffDirectory

    options.setdefault("senders", RecentSenders())
    options.setdefault("watch_member", lambda room_id, member_id: None)
    options.setdefault("is_moderated", lambda room_id: room_id == GROUP)

    settings = settings or deployment()
    staff_room = StaffRoom(STAFF)
    texts = Texts(settings)
    return Referral(
        homeserver,
        settings,
        StaffDirectory(homeserver, settings.policy, staff_room),
        staff_room,
        Metrics(),
        room_state=RoomStateCache(homeserver),
        reports=refusal_reports(db, staff_room, settings, texts),
        texts=texts,
        on_case=lambda case_id, begun=None: None,
        on_outbox=lambda: None,
        **options,
    )


# ---- cases run by the step engine against the fake homeserver ----

NOW = dt.datetime.now(dt.UTC)
REFERRAL_STEPS = ["notify", "remove", "room_notice", "alert", "schedule"]


def homeserver() -> FakeHomeserver:
    hs = FakeHomeserver()
    hs.add_room(
        GROUP, {MEMBER: "join", MOD: "join", hs.bot_user_id: "join"}, {MOD: 50, hs.bot_user_id: 100}
    )
    hs.add_room(STAFF, {hs.bot_user_id: "join"}, {})
    return hs


async def _open(
    conn: AsyncConnection,
    *,
    dry_run: bool = False,
    due_in: dt.timedelta | None = None,
    member: str = MEMBER,
) -> cases.Opened:
    # Flagged now (not at import): the alert's deadline counts from it.
    at = dt.datetime.now(dt.UTC)
    flag = cases.NewFlag(GROUP, member, MOD, "reaction", "$flag", "$msg", None, at, at)
    return await cases.open_or_corroborate(
        conn,
        PROVENANCE,
        flag,
        steps=CASE_STEPS,
        dry_run=dry_run,
        due_at=NOW + (due_in or dt.timedelta(hours=1)),
    )


async def new_case(
    engine: AsyncEngine,
    *,
    dry_run: bool = False,
    due_in: dt.timedelta | None = None,
    member: str = MEMBER,
) -> int:
    async with engine.begin() as conn:
        opened = await _open(conn, dry_run=dry_run, due_in=due_in, member=member)
    return opened.case_id


async def open_and_begin(engine: AsyncEngine, runner: StepEngine) -> tuple[int, Begun]:
    """A case opened and its first intent written in one transaction, as a flag does."""
    async with engine.begin() as conn:
        opened = await _open(conn)
        begun = await runner.begin(conn, opened)
    return opened.case_id, begun


def notices(hs: FakeHomeserver, step: str) -> list[dict[str, Any]]:
    return [
        event
        for room in hs.rooms.values()
        for event in room.events
        if event.get("content", {}).get(MESSAGE_MARKER_KEY, {}).get("step") == step
        # A message the room must see nothing of: its step is in its transaction id.
        or event.get("unsigned", {}).get("transaction_id", "").endswith(f":{step}")
    ]


async def steps(engine: AsyncEngine, case_id: int) -> dict[str, cases.Step]:
    async with engine.connect() as conn:
        return {s.step: s for s in await cases.steps_of(conn, case_id)}


def alert_body(texts: Texts | None = None, **overrides: Any) -> str:
    """The staff alert's text for a plain case (#7, Sam flagged by Alex in Group chat, told
    and removed), `overrides` replacing any of `Texts.alert`'s arguments; by default in a
    London-time deployment."""
    values: dict[str, Any] = dict(
        case_number=7,
        member=person("@m:l", "Sam"),
        room=place("!r:l", "Group chat"),
        flagger=person("@mod:l", "Alex"),
        flagged_at=dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC),
        method="reaction",
        reason=None,
        notice=StepState("done"),
        removal=StepState("done"),
        late_by=None,
        due_at=dt.datetime(2026, 7, 25, 9, tzinfo=dt.UTC),
        dry_run=False,
    )
    if texts is None:
        london = CheckinSettings(at=dt.time(10), timezone="Europe/London")
        texts = Texts(deployment(checkin=london))
    return texts.alert(**(values | overrides))["body"]
