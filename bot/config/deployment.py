"""What the policy core knows of its deployment: settled once at start, never changed."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from bot.config.settings import (
    CheckinSettings,
    MessageTemplates,
    PolicySettings,
    ReconcileSettings,
    Resource,
)
from bot.store.audit import Provenance
from bot.store.cases import DEFAULT_COMMUNITY


@dataclass(frozen=True)
class Deployment:
    policy: PolicySettings
    checkin: CheckinSettings
    messages: MessageTemplates
    resources: tuple[Resource, ...]
    bot_user_id: str
    provenance: Provenance
    # Who besides staff may put the bot in a room (user ids or * globs; empty: staff only).
    extra_inviters: tuple[str, ...] = ()
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    # The bot's own rooms (DM, check-in, debrief) are created end-to-end encrypted.
    encrypt_private_rooms: bool = False
    # A message to a person that cannot be encrypted this long after its step began is
    # sent in the clear instead (None: never; it waits for encryption).
    plain_fallback_after: dt.timedelta | None = dt.timedelta(seconds=20)
    # Days after a case closes that its personal data is kept (0: for ever); the
    # settings' policy.retention_days, or its older name, or the default.
    retention_days: int = 0
    # The language of every text people read (bot/texts/catalogues.py).
    language: str = "en"
    # The community these settings are of: its cases, its staff (bot/store/cases.py).
    community: str = DEFAULT_COMMUNITY
