"""The homeserver as the policy sees it: a few verbs, each with a typed outcome.

`appservice/homeserver.py` implements this with matrix-nio; unit tests use an
in-memory fake. Verbs retry rate limits and network errors themselves; what
they cannot get past in their budget raises `HomeserverUnavailable`, which the
workflow treats as "try this step again later" (never as a failure), while a
refusal the homeserver means (403, 404, ...) comes back as `Refused`, which the
workflow records as the step's outcome.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# Key in the create event's content of every room the bot creates, so a crash
# mid-createRoom can be detected and the room reused, not duplicated. In the
# create event itself, it costs no extra event (each one slows createRoom).
ROOM_MARKER_KEY = "org.matrix.safeguard.marker"
# Key inside the content of every message the bot sends about a case, so a
# resumed step can find its own message instead of sending it twice.
MESSAGE_MARKER_KEY = "org.matrix.safeguard"


def message_txn_id(marker: str) -> str:
    """The transaction id of the bot's message with this marker. Synapse gives it back
    (`unsigned.transaction_id`) to the sender alone, and keeps it across restarts: a
    message whose content must say nothing — the notice in a group room, which anyone
    there can "view source" of — is found again by it (find_marked_message)."""
    return f"safeguard.{marker}"


class HomeserverUnavailable(Exception):
    """Not now: the homeserver could not be reached, kept rate-limiting, answered 5xx, or
    rejected our token (M_UNKNOWN_TOKEN: fixed by an operator, never a refusal to record).

    Callers try again later; nothing is recorded as failed because of it. `retry_after`
    (seconds), when known, says how soon trying again makes sense.
    """

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EncryptionUnavailable(HomeserverUnavailable):
    """The room is encrypted and the bot cannot encrypt for it now: its device is not
    ready, its store is broken, or the room has not reached its sync yet.

    Not the homeserver's fault, and nothing was sent. Like any outage it can be waited
    out; a caller with a person waiting may choose to send in the clear instead
    (`Homeserver.send(..., plain=True)`).
    """


@dataclass(frozen=True)
class Refused:
    """The homeserver refused the request for good (it would refuse a retry too)."""

    errcode: str
    reason: str
    status: int = 0

    def __str__(self) -> str:
        return f"{self.errcode}: {self.reason}"


@dataclass(frozen=True)
class Sent:
    event_id: str


@dataclass(frozen=True)
class RoomCreated:
    room_id: str
    # Created by an earlier attempt (found by its marker's alias), not by this call: its
    # invites are not proven sent (that attempt may have died in between).
    existing: bool = False


@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class RoomState:
    """What authorisation needs from a room: its create event and power levels."""

    room_id: str
    create_sender: str
    create_content: dict[str, Any]
    power_levels: dict[str, Any] | None
    room_version: str

    @classmethod
    def of(
        cls, room_id: str, create: dict[str, Any], power_levels: dict[str, Any] | None
    ) -> RoomState:
        """From the room's m.room.create event (as an event: its sender matters) and the
        content of its m.room.power_levels (None when the room has none)."""
        content = create.get("content") or {}
        return cls(
            room_id=room_id,
            create_sender=create.get("sender", ""),
            create_content=content,
            power_levels=power_levels,
            room_version=str(content.get("room_version", "1")),
        )


class Homeserver(Protocol):
    @property
    def bot_user_id(self) -> str: ...

    def is_ours(self, user_id: object) -> bool:
        """Whether the service acted as `user_id`: the bot, or its moderation user (which
        kicks and redacts where it is seated)."""
        ...

    async def room_state(self, room_id: str) -> RoomState | Refused:
        """Fresh create + power-levels state of a room (never a cached copy)."""
        ...

    async def room_state_events(self, room_id: str) -> list[Any] | Refused:
        """Every current state event of the room, in one read (GET /rooms/{id}/state): the
        create event, the power levels, each member's m.room.member, ... as answered."""
        ...

    async def get_event(self, room_id: str, event_id: str) -> dict[str, Any] | Refused: ...

    async def membership(self, room_id: str, user_id: str) -> str | None:
        """The user's current membership ("join", "leave", ...), or None if never a member."""
        ...

    async def member_event(self, room_id: str, user_id: str) -> dict[str, Any] | Refused | None:
        """The user's current m.room.member state event (sender, content); None if they were
        never a member; Refused if the bot may not read it (which says nothing either way)."""
        ...

    async def resolve_room(self, room_id_or_alias: str) -> str | Refused: ...

    async def display_name(self, user_id: str) -> str | None:
        """The user's display name (their profile), or None."""
        ...

    async def room_name(self, room_id: str) -> str | None:
        """The room's name (m.room.name), or None."""
        ...

    async def redact(
        self, room_id: str, event_id: str, *, reason: str, txn_id: str
    ) -> Done | Refused:
        """Redact an event (the flag, say), with a reason everyone can read."""
        ...

    async def is_redacted(self, room_id: str, event_id: str) -> bool | None:
        """Whether the event is redacted already (None: it cannot be read)."""
        ...

    async def join_room(self, room_id: str) -> Done | Refused: ...

    async def space_children(self, space_id: str, *, max_depth: int) -> list[str] | Refused:
        """The rooms in a Space (Spaces in it walked, to `max_depth`)."""
        ...

    async def leave_room(self, room_id: str) -> Done | Refused: ...

    async def find_marked_room(self, marker: str) -> str | None:
        """A room the bot is in (joined) whose marker state names `marker`."""
        ...

    async def create_room(
        self,
        *,
        marker: str,
        invite: list[str],
        name: str | None = None,
        topic: str | None = None,
        is_direct: bool = False,
        encrypted: bool = False,
    ) -> RoomCreated | Refused:
        """A private room (preset private_chat) carrying `marker` in its initial state,
        end-to-end encrypted from its first event when `encrypted` (and the bot can)."""
        ...

    async def direct_rooms(self) -> Mapping[str, Sequence[str]]:
        """The bot's m.direct account data: user id -> DM room ids (read only: a view, not a
        copy, as it grows with every DM the bot keeps)."""
        ...

    def direct_rooms_known(self, user_id: str) -> Sequence[str] | None:
        """Their DM rooms in the bot's m.direct as already read (no call; safe from any
        thread); None if m.direct has not been read yet."""
        ...

    async def remember_direct_room(
        self, user_id: str, room_id: str, *, known: Mapping[str, Sequence[str]] | None = None
    ) -> Done | Refused:
        """Add the room to m.direct (no write if it is there); `known` is the m.direct just
        read, if any."""
        ...

    async def forget_direct_rooms(self, room_ids: Collection[str]) -> Done | Refused:
        """Take the rooms out of m.direct, whoever they were a DM with (a user left with
        none is taken out too); rooms not there cost no write."""
        ...

    async def invite(
        self, room_id: str, user_id: str, *, is_direct: bool = False
    ) -> Done | Refused:
        """Invite them; `is_direct` marks the invite as a DM's, as createRoom's does."""
        ...

    def expect_member(self, room_id: str, user_id: str) -> None:
        """They are being invited there now: an encrypted message sent meanwhile is
        encrypted for their devices too, without waiting for the invite's answer."""
        ...

    async def kick(self, room_id: str, user_id: str, reason: str) -> Done | Refused: ...

    async def send(
        self,
        room_id: str,
        content: dict[str, Any],
        *,
        txn_id: str,
        event_type: str = "m.room.message",
        plain: bool = False,
        encrypt_by: dt.datetime | None = None,
    ) -> Sent | Refused:
        """Send, encrypted where the room is. `plain`: in the clear whatever the room.
        `encrypt_by`: give up waiting for encryption then (EncryptionUnavailable), rather
        than after the verb's own wait."""
        ...

    def encryption_problem(self) -> str | None:
        """Why the bot cannot encrypt at all now (None: it can, or encryption is off)."""
        ...

    async def check(self) -> str | None:
        """None if the homeserver answers and accepts our token; else what is wrong."""
        ...

    async def find_marked_message(
        self, room_id: str, marker: str, *, limit: int = 200
    ) -> str | None:
        """The id of a recent event from the bot whose content carries `marker`, or that
        was sent with `message_txn_id(marker)`."""
        ...


@dataclass(frozen=True)
class TimelinePage:
    """Events of a room's timeline in order, and the token to read on from."""

    events: list[dict[str, Any]]
    next_token: str | None


class Timeline(Protocol):
    """Reading rooms' timelines back, to catch up on events never delivered to us."""

    async def current_position(self, room_id: str) -> str | Refused:
        """A token for "now" in the room's timeline (read forwards from it later)."""
        ...

    async def read_forward(self, room_id: str, token: str, *, limit: int) -> TimelinePage | Refused:
        """Events after `token`, oldest first; `next_token` None when nothing more yet."""
        ...

    async def read_back(
        self, room_id: str, token: str | None, *, limit: int
    ) -> TimelinePage | Refused:
        """Events before `token` (None: now), newest first."""
        ...


@dataclass(frozen=True)
class SyncedRoom:
    """One room's part of a sync: its new timeline events (oldest first, each with its
    room_id), and whether events between the last sync and these were left out
    (`limited`: read them back from `prev_batch`)."""

    room_id: str
    events: list[dict[str, Any]]
    limited: bool = False
    prev_batch: str | None = None


@dataclass(frozen=True)
class Receipt:
    """One read receipt a sync brought: `user_id` has read up to `event_id` in `room_id`
    (`receipt_type`: m.read, or the reader's own m.read.private; `thread_id`: None for
    an unthreaded receipt, "main" for the main timeline, else a thread's root)."""

    room_id: str
    event_id: str
    user_id: str
    receipt_type: str
    at: dt.datetime | None  # the receipt's `ts`, as the reader's homeserver gave it
    thread_id: str | None = None


@dataclass(frozen=True)
class SyncBatch:
    """What one sync brought since the last one: the rooms the bot is in, the invites it
    has (each as its m.room.member event, with room_id; stripped: no event id unless the
    homeserver gave one), the read receipts asked for, and the token to sync on from.
    `recorded`, if any, is called once the answer is recorded and its token stored (the
    encryption device then stores its own)."""

    next_batch: str
    rooms: list[SyncedRoom]
    invites: list[dict[str, Any]]
    receipts: list[Receipt] = field(default_factory=list)
    recorded: Callable[[], None] | None = field(default=None, compare=False)
    # More is waiting than one answer holds (a limited timeline, to-device messages at the
    # homeserver's limit per answer): the next sync is asked for at once
    # (bot/intake/safety_net.py).
    backlog: bool = False


class SyncWithdrawn(Exception):
    """The sync in flight was withdrawn before its answer came (`Syncing.withdraw`):
    nothing of it was taken, and the same token is asked from next time."""


class Syncing(Protocol):
    """The bot's own sync: one request for every room, the safety net behind the push."""

    async def sync(
        self, since: str | None, *, wait: float, receipts_in: Collection[str] = ()
    ) -> SyncBatch | Refused:
        """What happened since `since` (None: a start, no timelines wanted), waiting up to
        `wait` seconds for something to happen; read receipts only of `receipts_in`.
        Raises SyncWithdrawn if `withdraw()` came first."""
        ...

    def withdraw(self) -> bool:
        """Drop the request in flight while it waits for its answer (never once the answer
        is being taken); True if there was one."""
        ...


class Decrypter(Protocol):
    """The bot's end-to-end encryption, as the policy needs it: reading what it is sent."""

    def decrypt(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """The event with its plaintext type and content; None while its key is missing."""
        ...

    async def request_key(self, event: dict[str, Any]) -> None:
        """Ask for the key of an event that could not be decrypted."""
        ...


class Webhook(Protocol):
    async def post_json(self, url: str, payload: dict[str, Any]) -> str | None:
        """POST JSON; None when the receiver accepted it (2xx), else what went wrong."""
        ...
