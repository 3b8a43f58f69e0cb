"""Each community's own parts, built from its resolved settings (README: Communities).

The service is one: one homeserver connection, one database, one intake, one step
engine, one outbox. What a community decides with its own settings, texts and staff is
built once per community here: the deployment its steps read, its staff room and staff,
the handlers of its events (bot/community/routing.py hands each event to its room's
community), and the steps its cases run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from appservice.config import DEFAULT_COMMUNITY_ID, Community
from bot.config.deployment import Deployment
from bot.intake.dispatch import EventKind, Handler
from bot.rooms.staff_room import PIN, StaffRoom
from bot.staff.members import StaffDirectory
from bot.steps import Toolbox
from bot.texts.messages import Texts


def deployment_of(base: Deployment, community: Community) -> Deployment:
    """The install's deployment with the community's own settings in it."""
    return replace(
        base,
        community=community.id,
        policy=community.policy,
        checkin=community.checkin,
        messages=community.messages,
        resources=community.resources,
        language=community.language,
    )


def staff_room_of(community: Community, db: Any) -> StaffRoom:
    assert community.policy.staff_room is not None  # check_runnable
    # The one community of an install without communities keeps the pin it always had.
    pin = PIN if community.id == DEFAULT_COMMUNITY_ID else f"{PIN}:{community.id}"
    return StaffRoom(community.policy.staff_room, db, staff=community.policy.staff, pin=pin)


@dataclass
class CommunityParts:
    """One community as the service runs it."""

    settings: Community
    deployment: Deployment
    texts: Texts
    staff_room: StaffRoom
    staff: StaffDirectory
    # Built once the service's shared parts are (appservice/service.py).
    tools: Toolbox | None = None
    handlers: dict[EventKind, Handler] | None = None
    refusal_reports: Any = None
    membership: Any = None
    upgrades: Any = None
    spaces: Any = None  # its Space's rooms (bot/community/spaces.py), if it has one
    staff_tools: Any = None
    # Set when the bot is invited into (joins) its staff room, or its Space: the retries
    # of either (appservice/service.py, bot/community/spaces.py) go at once.
    staff_room_news: asyncio.Event = field(default_factory=asyncio.Event)
    space_news: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def id(self) -> str:
        return self.settings.id


def new_parts(
    community: Community,
    base: Deployment,
    *,
    db: Any,
    homeserver: Any,
    on_fallback: Callable[[str, str], None],
) -> CommunityParts:
    deployment = deployment_of(base, community)
    staff_room = staff_room_of(community, db)
    return CommunityParts(
        settings=community,
        deployment=deployment,
        texts=Texts(deployment, on_fallback=on_fallback),
        staff_room=staff_room,
        staff=StaffDirectory(homeserver, community.policy, staff_room),
    )
