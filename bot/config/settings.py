"""The policy's settings: what a charity may change without touching code.

These models live in `bot/` because the policy core reads them; the edge
(`appservice/config.py`) loads them from YAML together with its own sections.
Every model forbids unknown keys, so a typo is an error, never a silent default.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_DURATION_PART = re.compile(r"(\d+)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> dt.timedelta:
    """Parse "90s", "6h", "1d", "1h30m" into a timedelta; ValueError says what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected a duration such as '90s', '6h' or '1h30m', got {text!r}")
    compact = text.strip().lower().replace(" ", "")
    if not compact:
        raise ValueError("a duration may not be empty (write e.g. '90s', '6h', '1d', '1h30m')")
    position = 0
    seconds = 0
    for match in _DURATION_PART.finditer(compact):
        if match.start() != position:
            break
        seconds += int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit (s, m, h, d), "
            "compounds allowed, e.g. '90s', '6h', '1d', '1h30m'"
        )
    if seconds <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return dt.timedelta(seconds=seconds)


Duration = Annotated[dt.timedelta, Field(description="a duration such as '90s' or '1h30m'")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def coerce_duration(value: object) -> object:
    if isinstance(value, str):
        return parse_duration(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise ValueError(f"write durations with a unit, e.g. '{int(value)}s'")
    return value


def coerce_duration_or_off(value: object) -> object:
    """A duration, or None for `0` / `off` (YAML reads a bare `off` as false)."""
    if value is None or value is False or value == 0:
        return None
    if isinstance(value, str) and value.strip().lower() in ("0", "off"):
        return None
    return coerce_duration(value)


class Resource(_Strict):
    """A crisis service the member is pointed to, as published on `verified_on`."""

    name: str = Field(min_length=1)
    contact: str = Field(min_length=1)
    when: str = ""
    verified_on: dt.date
    # The "if your life is in danger right now" line, apart from the services to talk to.
    emergency: bool = False


def default_resources() -> list[Resource]:
    verified = dt.date(2026, 11, 1)
    return [
        Resource(
            name="Emergency services",
            contact="call 999 or go to A&E",
            when="if your life is in danger right now",
            verified_on=verified,
            emergency=True,
        ),
        Resource(
            name="Shout (The Mix crisis messenger)",
            contact="text THEMIX to 85258",
            when="free, 24/7, by text",
            verified_on=verified,
        ),
        Resource(
            name="Samaritans",
            contact="call 116 123 (free) or email jo@samaritans.org",
            when="any time, day or night",
            verified_on=verified,
        ),
        Resource(
            name="Papyrus HOPELINE247",
            contact="call 0800 068 4141 or email pat@papyrus-uk.org",
            when="if you are under 35",
            verified_on=verified,
        ),
        Resource(
            name="Childline",
            contact="call 0800 1111",
            when="if you are 18 or under",
            verified_on=verified,
        ),
        Resource(
            name="NHS 111",
            contact="call 111 and choose the mental health option",
            when="urgent, but not an emergency",
            verified_on=verified,
        ),
    ]


# Six years after a case closes (2,192 days: six of 365, and two leap days), the period UK
# charities commonly keep safeguarding records for (README: Retention says why).
DEFAULT_RETENTION_DAYS = 2192


class PolicySettings(_Strict):
    reactions: list[str] = Field(default_factory=lambda: ["🚨"], min_length=1)
    command: str = Field(default="!safeguard", min_length=1, pattern=r"^\S+$")
    moderator_power_level: int = 50
    staff_room: str | None = Field(default=None, pattern=r"^[!#].+")
    staff: list[Annotated[str, Field(pattern=r"^@[^:]+:.+$")]] = Field(default_factory=list)
    staff_power_level: int = 50
    dry_run: bool = False
    room_notice: bool = True
    policy_version: str = "2026-11"
    lawful_basis: str = "vital interests"
    # What is recorded as shared with emergency services by `!case N es`.
    emergency_data_shared: str = (
        "the member's name and Matrix user id, and the concern the moderator raised"
    )
    ack_within: Duration = dt.timedelta(minutes=10)
    # The charity's confidentiality policy (what is shared with emergency services, and
    # why), linked from the member's notice and the check-in message.
    confidentiality_url: str | None = Field(default=None, pattern=r"^https://\S+$")
    # Staff hear of every flag this soon after it, whatever state the member's notice and
    # removal are in (the alert says which are done, not yet, or failed, and why).
    alert_deadline: Duration = dt.timedelta(seconds=30)
    alert_webhook: str | None = Field(default=None, pattern=r"^https?://")
    # Signs each webhook request (X-Safeguard-Signature: sha256=HMAC of the body), so the
    # pager can tell the page came from this service.
    alert_webhook_secret: str | None = None
    # A member who left the room this recently can still be flagged (told, staff alerted);
    # anyone else not in the room cannot (a refusal: nothing is sent to them).
    recent_leave: Duration = dt.timedelta(hours=24)
    # Refusals from one person in one room are reported to staff once per this window.
    refusal_report_every: Duration = dt.timedelta(minutes=5)
    # Once the case is recorded, the flag itself (the reaction, the command) is redacted,
    # so the room keeps no trace of it; optionally the flagged message too.
    redact_flag: bool = True
    redact_flagged_message: bool = False
    # The moderator who flagged gets a short DM: thanks, what happens next, where to get
    # support themselves (moderator_support: a named person, a room, a number...).
    moderator_debrief: bool = True
    moderator_support: str = "reply to this message and a member of our staff team will call you"
    # The member rejoins the group room while their case is open: staff are told (tell),
    # and with `remove` the bot removes them again, as discreetly as the first time.
    on_rejoin: Literal["tell", "remove"] = "tell"
    # Empty DM rooms the bot keeps made ahead of any flag, so a flagged member is told
    # without waiting for a room to be created (bot/rooms/ready_rooms.py). 0: create each one.
    ready_dm_rooms: int = Field(default=2, ge=0, le=20)
    # Days after a case closes that its personal data is kept, here and on the homeserver
    # (bot/cases/retention.py); 0 keeps it for ever. Unset: `audit.retention_days` (its older
    # name) if set, else DEFAULT_RETENTION_DAYS.
    retention_days: int | None = Field(default=None, ge=0)
    # Staff are told, in a reply to the alert, when the member has not read their notice
    # (no read receipt on or after it) this long after it was sent. `0` or `off`: never.
    unread_notice_after: Duration | None = dt.timedelta(minutes=10)

    _duration = field_validator(
        "ack_within", "alert_deadline", "recent_leave", "refusal_report_every", mode="before"
    )(coerce_duration)
    _duration_or_off = field_validator("unread_notice_after", mode="before")(coerce_duration_or_off)

    @field_validator("reactions")
    @classmethod
    def _reactions_not_blank(cls, value: list[str]) -> list[str]:
        if any(not key.strip() for key in value):
            raise ValueError("a reaction key may not be blank")
        return value


class CheckinSettings(_Strict):
    at: dt.time | None = None
    timezone: str | None = None
    after: Duration | None = None
    remind_after: Duration = dt.timedelta(hours=4)
    room_name: str = "Checking in with you"

    _durations = field_validator("after", "remind_after", mode="before")(coerce_duration)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Europe/London)"
            ) from exc
        return value

    @model_validator(mode="after")
    def _one_rule(self) -> CheckinSettings:
        if self.after is not None and (self.at is not None or self.timezone is not None):
            raise ValueError("set either 'after' or 'at'/'timezone', not both")
        return self

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone or "Europe/London")

    @property
    def local_time(self) -> dt.time:
        return self.at or dt.time(10, 0)


class ReconcileSettings(_Strict):
    """Catching up on events the homeserver never delivered (Synapse drops its in-memory
    appservice queue when it restarts)."""

    # How far back a room's timeline is read when the service has no position for it.
    lookback: Duration = dt.timedelta(hours=24)
    # Only where the bot cannot sync (bot/intake/safety_net.py): how often every watched room is
    # read, so a homeserver restart nobody noticed (no call of ours failed) is caught up.
    interval: Duration = dt.timedelta(seconds=30)
    # An event younger than this is left to the homeserver's push, which is on its way
    # (milliseconds, seconds under load), and looked for again once it is this old: the
    # record's "caught up" then means the homeserver truly did not deliver it.
    settle: Duration = dt.timedelta(seconds=10)
    # After a sync answer that brought anything, the bot's next sync waits this long, so a
    # burst of events (a flag's) is one answer, not one each (bot/intake/safety_net.py).
    # 0: sync again at once.
    gather: Duration = dt.timedelta(seconds=1)

    _durations = field_validator("lookback", "interval", "settle", mode="before")(coerce_duration)

    @field_validator("gather", mode="before")
    @classmethod
    def _gather(cls, value: object) -> object:
        off = coerce_duration_or_off(value)
        return dt.timedelta(0) if off is None else off


class AuditSettings(_Strict):
    # The older name of `policy.retention_days`, still read (the two may not disagree).
    retention_days: int | None = Field(default=None, ge=0)
    # The secret that keys the digests of personal fields (HMAC-SHA256). Created on first
    # run; default: beside the SQLite database, or beside the config file on PostgreSQL.
    digest_key_file: str | None = None


class MessageTemplates(_Strict):
    """Every text the bot sends (bot/texts/templates.py has each one's default and placeholders)."""

    # The languages whose built-in texts a native speaker has read for this charity
    # (bot/texts/catalogues.py): any other makes check-config warn and /health say so.
    reviewed_locales: list[str] = Field(default_factory=lambda: ["en"])

    notice: str | None = None
    checkin: str | None = None
    withdrawn: str | None = None
    removed_again: str | None = None
    withdrawn_unremoved: str | None = None
    farewell: str | None = None
    policy_explained: str | None = None
    policy_room_reply: str | None = None
    kick_reason: str | None = None
    kick_reason_unnotified: str | None = None
    redaction_reason: str | None = None
    room_notice: str | None = None
    moderator_debrief: str | None = None
    moderator_debrief_unalerted: str | None = None
    alert: str | None = None
    alert_again: str | None = None
    corroborated: str | None = None
    rejoined: str | None = None
    relay: str | None = None
    checkin_opened: str | None = None
    checkin_failed: str | None = None
    checkin_dry_run: str | None = None
    checkin_reminder: str | None = None
    withdrawal_done: str | None = None
    step_failed: str | None = None
    unread_notice: str | None = None
    step_update: str | None = None
    flag_found_late: str | None = None
    encryption_failing: str | None = None
    encryption_broken: str | None = None
    encryption_repaired: str | None = None
    refusal: str | None = None
    refusals_summary: str | None = None
    invite_refused: str | None = None
    room_joined: str | None = None
    room_claimed_twice: str | None = None
    room_whose: str | None = None
    join_failed: str | None = None
    room_upgraded: str | None = None
    upgrade_join_failed: str | None = None
    tombstone_ignored: str | None = None
    room_removed: str | None = None
    space_removed: str | None = None
    powers_lost: str | None = None
    moderation_unseated: str | None = None
    moderation_seated: str | None = None
    processing_failed: str | None = None
    undecryptable: str | None = None
    undecryptable_summary: str | None = None
    former_member_wrote: str | None = None
    retention_redaction_reason: str | None = None
    template_fallback: str | None = None
