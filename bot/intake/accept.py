"""Accepting events: record them durably, fast, and queue only what may need action.

Every event id is recorded (so nothing is processed twice), but only events that
could matter to the policy — reactions with a flag key, messages carrying the
command, memberships, power levels, anything in the staff room or a member's
DM or check-in room — are queued with their content. Ordinary chat stays out of
the inbox: it costs one id row, and a flag never waits behind it.

The same intake takes Synapse's transactions and the events reconciliation
finds that Synapse never delivered, so both are checked and deduplicated alike.
An event the database cannot store (an id with a lone surrogate, say) is
skipped like any other malformed event; only the database being unable to
record anything makes a transaction fail (and Synapse retry it).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any, TypeGuard

from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config.settings import PolicySettings
from bot.core.metrics import Metrics
from bot.core.reactions import ACK_KEY, CLAIM_KEY, normalise_key
from bot.intake.recent_senders import RecentSenders
from bot.rooms.directory import RoomDirectory
from bot.store import ingest
from bot.store.ready_rooms import Reservation

if TYPE_CHECKING:
    from bot.steps.notify_ahead import NoticeAhead

log = logging.getLogger(__name__)

STATE_TYPES = frozenset(
    {"m.room.member", "m.room.power_levels", "m.room.create", "m.room.tombstone"}
)
# What any member of a moderated room may send to be told, in a DM, how safeguarding
# works there (bot/members/policy.py).
POLICY_COMMAND = "!policy"
# State the room-state cache is told of the moment it arrives (bot/moderation/room_state.py).
_ROOM_STATE = STATE_TYPES | {"m.room.join_rules"}
# Matrix ids are far shorter; the columns hold 255 characters.
MAX_ID_LENGTH = 255
# Members told of as writers (Intake's `writer_met`) are remembered up to this many.
WRITERS_KEPT = 100_000
_REQUIRED = itemgetter("event_id", "room_id", "type", "sender")
# The inbox's lanes, each drained in order by a worker of its own (bot/intake/dispatch.py):
# - FLAG: a possible flag in a room the bot moderates, from someone not known to be
#   below a moderator: ahead of everything else, behind nothing that cannot be a flag;
# - OTHER: memberships, power levels, the staff room, members' DMs and check-in rooms;
# - REFUSAL: what looks like a flag but will be refused (a room the bot does not
#   moderate, a sender known from pushed state to be below a moderator): recorded and
#   reported as any refusal, never ahead of a possible real one, however many;
# - DECRYPT: encrypted messages in group rooms, decrypted apart; only one that decrypts
#   to a flag moves to the flag lane, so a busy encrypted room never delays its flags.
FLAG_LANE, OTHER_LANE, REFUSAL_LANE, DECRYPT_LANE = 0, 1, 2, 3
LANES = {FLAG_LANE: "flags", OTHER_LANE: "other", REFUSAL_LANE: "refusals", DECRYPT_LANE: "decrypt"}


class StorageUnavailable(Exception):
    """The database could not record the events; the homeserver must retry them."""


def _storable(value: str) -> bool:
    if value.isascii():
        return True
    try:
        value.encode("utf-8")  # a lone surrogate cannot be stored (nor hashed)
    except UnicodeEncodeError:
        return False
    return True


def shape(event: object, valid_text: bool = False) -> tuple[str, str, str, str] | None:
    """(event_id, room_id, type, sender) of an event with the shape every recorded event
    must have, else None. On every event's path: exact type checks, no copies.

    `valid_text`: the parser already refused lone surrogates, so ids need no check.
    """
    if event.__class__ is not dict:
        return None
    try:
        fields = _REQUIRED(event)
    except KeyError:
        return None
    event_id, room_id, kind, sender = fields
    if not (
        event_id.__class__ is str
        and room_id.__class__ is str
        and kind.__class__ is str
        and sender.__class__ is str
        and 0 < len(event_id) <= MAX_ID_LENGTH
        and 0 < len(room_id) <= MAX_ID_LENGTH
        and 0 < len(kind) <= MAX_ID_LENGTH
        and 0 < len(sender) <= MAX_ID_LENGTH
    ):
        return None
    if not valid_text and not all(map(_storable, fields)):
        return None
    content = event.get("content")  # type: ignore[attr-defined]
    if content is not None and content.__class__ is not dict:
        return None
    return fields


def well_formed(event: object, *, valid_text: bool = False) -> TypeGuard[dict[str, Any]]:
    """Whether the event has the shape every recorded event must have (see `shape`)."""
    return shape(event, valid_text) is not None


def without_lone_surrogates(value: Any) -> Any:
    """The value with every lone UTF-16 surrogate replaced by U+FFFD (pairs are joined).

    Only a body the strict parser refused can hold one (appservice/server.py).
    """
    if isinstance(value, str):
        if _storable(value):
            return value
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, dict):
        return {without_lone_surrogates(k): without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_lone_surrogates(item) for item in value]
    return value


class ActionFilter:
    """The cheap test, run on every event on the hot path: queue it, and in which lane?"""

    def __init__(
        self,
        policy: PolicySettings | Sequence[PolicySettings],
        rooms: RoomDirectory,
        *,
        bot_user_id: str,
        can_decrypt: bool = False,
        power_of: Callable[[str, str], float | None] = lambda room_id, user_id: None,
    ) -> None:
        self._rooms = rooms
        # The rooms the bot moderates (the intake reads it too).
        self.moderated = rooms.moderated
        # A sender's power in a room as known from pushed state (None: not known now).
        self._power_of = power_of
        # Every community's flags take the flag lane (its own referral then decides): the
        # keys and commands of all, and the lowest moderator level any of them sets.
        policies = [policy] if isinstance(policy, PolicySettings) else list(policy)
        self._moderator_level = min(p.moderator_power_level for p in policies)
        # Read on every event: the private-room test, without two method calls per event.
        self._conversations = rooms.conversations
        self._staff_rooms = rooms.staff_rooms
        self._bot = bot_user_id
        # With the bot's encryption on, an encrypted message in a group room may be a
        # `!safeguard` command: it is queued (in its own lane) to be decrypted and read.
        self._can_decrypt = can_decrypt
        self._flag_keys = frozenset(normalise_key(k) for p in policies for k in p.reactions)
        self._staff_keys = frozenset({normalise_key(CLAIM_KEY), normalise_key(ACK_KEY)})
        commands = sorted({p.command for p in policies})
        self._command = re.compile("|".join(map(re.escape, commands)), re.IGNORECASE)
        # Nearly every message lacks the command's first character (a "!"): a scan for it
        # in C rules them out before the regex. Letters have case variants the regex
        # matches (Unicode folding included), so a command starting with one is not
        # pre-tested. Communities' commands starting differently are not pre-tested either.
        marks = {command[0] for command in commands}
        mark = marks.pop() if len(marks) == 1 else None
        self._command_mark: str | None = mark if mark is not None and not mark.isalpha() else None

    def _flag_lane(self, event: Mapping[str, Any], room_id: str) -> int:
        """A possible flag's lane: the flag lane only where it could be acted on."""
        if room_id not in self.moderated:
            return REFUSAL_LANE
        power = self._power_of(room_id, event["sender"])
        if power is not None and power < self._moderator_level:
            return REFUSAL_LANE
        return FLAG_LANE

    def lane(
        self, event: Mapping[str, Any], event_type: str | None = None, room_id: str | None = None
    ) -> int | None:
        """The lane to queue the event in, or None when the event needs no action.

        Runs on every event Synapse delivers, so it tests exact types (events come
        from a JSON parser: dicts, lists, str) and reads each key once (the intake
        passes the type and room it has already read).
        """
        if event_type is None or room_id is None:
            event_type, room_id = event["type"], event["room_id"]
        if room_id in self._conversations or self._staff_rooms.is_staff_room(room_id):
            return OTHER_LANE  # the staff room, a DM or a check-in room (RoomDirectory)
        # Chat first: nearly every event is a message or a reaction in a group room.
        if event_type == "m.room.message":
            content = event.get("content")
            body = content.get("body") if content.__class__ is dict else None
            if body.__class__ is not str:
                return None
            mark = self._command_mark
            if mark is not None and mark not in body and POLICY_COMMAND[0] not in body:
                return None
            if self._command.search(body) is None:
                if is_policy_request(body) and room_id in self.moderated:
                    return OTHER_LANE  # a member asking how safeguarding works here
                return None
            return self._flag_lane(event, room_id)
        if event_type == "m.reaction" or event_type == "m.room.encrypted":
            content = event.get("content")
            if content.__class__ is not dict:
                return None
            relation = content.get("m.relates_to")
            if relation.__class__ is dict and relation.get("rel_type") == "m.annotation":
                key = relation.get("key")
                if key.__class__ is str:
                    key = normalise_key(key)
                    if key in self._flag_keys:
                        return self._flag_lane(event, room_id)
                    if key in self._staff_keys:
                        return OTHER_LANE
                return None
            return DECRYPT_LANE if event_type == "m.room.encrypted" and self._can_decrypt else None
        if event_type == "m.room.redaction":
            # A flag removed before it was acted on must not be: the flag lane reads its
            # redactions with it (bot/intake/dispatch.py). Only in rooms the bot moderates.
            if room_id in self.moderated and event.get("sender") != self._bot:
                return FLAG_LANE
            return None
        if event_type == "m.room.member":
            # In a group room, only the bot's own membership and that of members with an
            # active case are acted on (bot/moderation/membership.py); everyone else's joins and
            # leaves are chat, as far as the policy goes. The room-state cache hears of
            # every one of them anyway (Intake.accept).
            member = event.get("state_key")
            if member == self._bot:
                # Invited, kicked, banned: by someone else. What the bot did itself
                # (joined, left, made a room) was recorded by what made it do it.
                return OTHER_LANE if event.get("sender") != self._bot else None
            if member.__class__ is str and self._rooms.is_watched(room_id, member):
                return OTHER_LANE
            return None
        if event_type in STATE_TYPES:
            # The bot's own state (a room it made) changes nothing it decides.
            return OTHER_LANE if event.get("sender") != self._bot else None
        if event_type == "m.space.child" and room_id in self._rooms.spaces:
            return OTHER_LANE  # a room added to (or taken out of) a community's Space
        return None


def redacted_by(event: Mapping[str, Any]) -> str | None:
    """The event a redaction removes (`content.redacts` from room v11, `redacts` before);
    None if it is no redaction, or names none."""
    if event.get("type") != "m.room.redaction":
        return None
    content = event.get("content")
    target = content.get("redacts") if isinstance(content, dict) else None
    target = target or event.get("redacts")
    return target if isinstance(target, str) else None


def _redacted_here(event_id: str, events: Sequence[dict[str, Any]]) -> bool:
    """Whether one of `events` is a redaction of that event."""
    return any(redacted_by(event) == event_id for event in events)


def is_policy_request(body: str) -> bool:
    """`!policy` alone (any case, spaces around it): a member asking how it works here."""
    return len(body) < 32 and body.strip().casefold() == POLICY_COMMAND


def _queued_items(
    to_act_on: Sequence[tuple[dict[str, Any], int]],
    seqs: Mapping[str, int],
    received_at: dt.datetime,
    caught_up: bool,
) -> list[ingest.InboxItem]:
    """The events just queued with these queue numbers, as the inbox holds them (each
    once, however many times the transaction carried it)."""
    items: dict[int, ingest.InboxItem] = {}
    for event, lane in to_act_on:
        seq = seqs.get(event["event_id"])
        if seq is not None and seq not in items:
            items[seq] = ingest.InboxItem(
                seq=seq,
                event_id=event["event_id"],
                room_id=event["room_id"],
                event_type=event["type"],
                payload=event,
                received_at=received_at,
                attempts=0,
                lane=lane,
                caught_up=caught_up,
            )
    return list(items.values())


class Intake:
    def __init__(
        self,
        db: AsyncEngine,
        action_filter: ActionFilter,
        metrics: Metrics,
        on_queued: Callable[[int], None],
        on_state: Callable[[str, str, object], None] = lambda room, kind, key: None,
        senders: RecentSenders | None = None,
        recorder: ingest.TransactionRecorder | None = None,
        busy_timeout: float = 5.0,
        hand_over: Callable[[list[ingest.InboxItem]], None] | None = None,
        foresee: Callable[[dict[str, Any]], None] = lambda event: None,
        writer_met: Callable[[str], bool] | None = None,
        plan_ahead: Callable[[dict[str, Any], dt.datetime], NoticeAhead | None] | None = None,
        ahead_recorded: Callable[[NoticeAhead, bool], None] = lambda notice, reserved: None,
    ) -> None:
        # Asked of each possible flag pushed (one a transaction at most): its member's
        # notice to send ahead of its case, reserved in the push's own record; told how that
        # record ended, before the flag is handed to its lane (bot/steps/notify_ahead.py).
        self._plan_ahead = plan_ahead
        self._ahead_recorded = ahead_recorded
        # Told once of each member who writes in a room the bot moderates (None: no one
        # needs to know): their devices are read then, so a notice to them if they are
        # flagged later need not wait for that read (appservice/service.py). It answers
        # False when it could not take it now (told again at their next message).
        self._writer_met = writer_met
        self._writers_known: set[str] = set()
        self._moderated = action_filter.moderated
        # Shown each possible flag as it arrives, before it is recorded (the referral
        # asks now for what the member's notice will need: bot/referral/decision.py).
        self._foresee = foresee
        # Told of the flags just queued, as the inbox holds them: their lane takes them
        # from memory, not from a read of what was just written (bot/intake/dispatch.py).
        self._hand_over = hand_over
        # A transaction not recorded within `busy_timeout` seconds is answered 503.
        self._recorder = recorder or ingest.TransactionRecorder(db, busy_timeout=busy_timeout)
        # Who sent each event, so that a flag on it needs no read (bot/intake/recent_senders.py).
        self._senders = senders
        self._filter = action_filter
        # Told of every state event at once (room, type, state_key): what is known of the
        # room ahead of a flag is stale from this moment (bot/moderation/room_state.py).
        self._on_state = on_state
        self._on_queued = on_queued
        self._metrics = metrics
        # Counted on every transaction: the labelled series looked up once.
        self._delivered = metrics.transactions.labels("new")
        self._retried = metrics.transactions.labels("duplicate")
        self._new_events = metrics.events.labels("new")
        self._duplicate_events = metrics.events.labels("duplicate")
        # The outcome of the last write, for /health: None, or why it failed and when.
        self.last_write_error: str | None = None
        self.last_write_failed_at: dt.datetime | None = None
        # Why nothing may be recorded now (the service does not hold its instance lock):
        # every push is answered 503 until `resume`.
        self.paused: str | None = None

    def pause(self, why: str) -> None:
        self.paused = why

    def resume(self) -> None:
        self.paused = None

    async def accept(
        self,
        txn_id: str,
        events: Sequence[object],
        *,
        valid_text: bool = False,
        caught_up: bool = False,
        body: bytes | None = None,
    ) -> ingest.Recorded:
        """Record the well-formed events in one DB transaction; skip (and count) the rest.

        `body`: the transaction's body the events were parsed from, kept as it is to
        know who sent them (bot/intake/recent_senders.py); without it, the events are kept.

        `valid_text`: the parser already refused lone surrogates (see `well_formed`).
        One pass over the events (the hot path): shape, room state, lane.
        """
        if self.paused is not None:
            raise self._unavailable(Exception(self.paused))
        lane_of = self._filter.lane
        on_state = self._on_state
        writer_met, writers_known = self._writer_met, self._writers_known
        moderated = self._moderated
        kept: list[dict[str, Any]] = []
        event_ids: list[str] = []
        to_act_on: list[tuple[dict[str, Any], int]] = []
        now = dt.datetime.now(dt.UTC)
        flags: list[dict[str, Any]] = []  # possible flags, in order
        for event in events:
            fields = shape(event, valid_text)
            if fields is None:
                continue
            event_id, room_id, kind, sender = fields
            kept.append(event)  # type: ignore[arg-type]
            event_ids.append(event_id)
            if (
                writer_met
                and kind == "m.room.message"
                and sender not in writers_known
                and room_id in moderated  # a DM's writer is known already
            ):
                self._met(writer_met, sender)
            if kind in _ROOM_STATE:
                on_state(room_id, kind, event.get("state_key"))  # type: ignore[attr-defined]
            lane = lane_of(event, kind, room_id)  # type: ignore[arg-type]
            if lane is not None:
                to_act_on.append((event, lane))  # type: ignore[arg-type]
                if lane == FLAG_LANE:
                    self._foreseen(event)  # type: ignore[arg-type]
                    flags.append(event)  # type: ignore[arg-type]
        skipped = len(events) - len(kept)
        if skipped:
            self._metrics.events.labels("malformed").inc(skipped)
            log.warning("transaction %s: skipped %d malformed event(s)", txn_id, skipped)
        if self._senders is not None:
            if body is not None:
                self._senders.note_body(body)
            else:
                self._senders.note(event_ids, kept)
        # Once the whole push has been seen (a state change after the flag in it has made
        # what it changed unknown, and every sender in it is known): one notice ahead.
        ahead = self._plan(flags, kept, now) if flags and not caught_up else None
        reserved = False
        try:
            recorded = await self._record(
                txn_id,
                event_ids,
                to_act_on,
                now,
                caught_up,
                ahead=None if ahead is None else ahead.reservation,
            )
            reserved = recorded.reserved
        except ingest.WriteUnavailable as exc:
            raise self._unavailable(exc) from exc
        except ingest.UnstorableEvents as exc:
            # Something in the events themselves: record them one by one, skip the bad.
            log.warning("%s: recording event by event (%s)", txn_id, exc)
            recorded = await self._record_one_by_one(txn_id, kept, to_act_on, now, caught_up)
        finally:
            # Before the flag is handed to its lane, which looks for its notice ahead.
            if ahead is not None:
                self._ahead_recorded(ahead, reserved)
        self.last_write_error = None
        self._count(recorded, len(kept))
        if recorded.handed and self._hand_over is not None:
            self._hand_over(_queued_items(to_act_on, recorded.handed, now, caught_up))
        if recorded.queued:
            for lane in sorted({lane for _, lane in to_act_on}):
                self._on_queued(lane)
        return recorded

    def _met(self, writer_met: Callable[[str], bool], writer: str) -> None:
        """Someone writing in a room the bot moderates: told once."""
        try:
            taken = writer_met(writer)
        except Exception:  # a look ahead: nothing depends on it
            log.exception("could not look ahead at a writer")
            return
        if taken:
            if len(self._writers_known) >= WRITERS_KEPT:
                self._writers_known.clear()  # bounded; one told twice is read once at most
            self._writers_known.add(writer)

    def _plan(
        self, flags: Sequence[dict[str, Any]], kept: Sequence[dict[str, Any]], now: dt.datetime
    ) -> NoticeAhead | None:
        """The first of the push's possible flags whose member's notice can go ahead of
        their case; None for a flag taken back in the same push (its lane withdraws it)."""
        if self._plan_ahead is None:
            return None
        for flag in flags:
            if _redacted_here(flag["event_id"], kept):
                continue
            try:
                ahead = self._plan_ahead(flag, now)
            except Exception:  # a way to be faster only: the flag is decided in its lane
                log.exception("could not plan a notice ahead of its case")
                continue
            if ahead is not None:
                return ahead
        return None

    def _foreseen(self, event: dict[str, Any]) -> None:
        try:
            self._foresee(event)
        except Exception:  # a look ahead: the flag is recorded and acted on regardless
            log.exception("could not look ahead at a possible flag")

    def _unavailable(self, exc: BaseException) -> StorageUnavailable:
        self.last_write_error = f"{type(exc).__name__}: {exc}"[:300]
        self.last_write_failed_at = dt.datetime.now(dt.UTC)
        return StorageUnavailable(self.last_write_error)

    async def _record(
        self,
        txn_id: str,
        event_ids: Sequence[str],
        to_act_on: Sequence[tuple[dict[str, Any], int]],
        now: dt.datetime,
        caught_up: bool,
        *,
        ahead: Reservation | None = None,
    ) -> ingest.Recorded:
        return await self._recorder.record(
            txn_id,
            event_ids,
            to_act_on,
            now,
            caught_up=caught_up,
            hand_over_lane=FLAG_LANE if self._hand_over is not None else None,
            ahead=ahead,
        )

    async def close(self) -> None:
        """Let go of the recording connection (before the engine is disposed)."""
        await self._recorder.close()

    async def _record_one_by_one(
        self,
        txn_id: str,
        events: Sequence[dict[str, Any]],
        to_act_on: Sequence[tuple[dict[str, Any], int]],
        now: dt.datetime,
        caught_up: bool,
    ) -> ingest.Recorded:
        lanes = {id(event): lane for event, lane in to_act_on}
        new_events = queued = stored = 0
        handed: dict[str, int] = {}
        for position, event in enumerate(events):
            lane = lanes.get(id(event))
            try:
                one = await self._record(
                    txn_id,
                    [event["event_id"]],
                    [(event, lane)] if lane is not None else [],
                    now,
                    caught_up,
                )
            except ingest.WriteUnavailable as exc:
                raise self._unavailable(exc) from exc
            except ingest.UnstorableEvents as exc:
                # Logged by position and error type, never by content.
                log.warning("%s: event %d cannot be stored (%s); skipped", txn_id, position, exc)
                self._metrics.events.labels("malformed").inc()
                continue
            new_events += one.new_events
            queued += one.queued
            handed |= one.handed
            stored += 1
        return ingest.Recorded(new_events, queued, stored, handed)

    def _count(self, recorded: ingest.Recorded, total: int) -> None:
        duplicates = total - recorded.new_events
        (self._retried if recorded.duplicate_transaction else self._delivered).inc()
        if duplicates > 0:
            self._duplicate_events.inc(duplicates)
        if recorded.new_events:
            self._new_events.inc(recorded.new_events)
