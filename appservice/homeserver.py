"""The bot's Client-Server API calls, through matrix-nio with the as_token.

Implements `bot.core.ports.Homeserver`. Every call goes through `_call`, which tells
the three kinds of answer apart: success; a refusal the homeserver means
(returned as `Refused`, for the workflow to record); and "not now" — network
errors, 5xx, rate limits past nio's own retries, a rejected token — retried here
with backoff and raised as `HomeserverUnavailable` when the budget runs out, so
the caller tries the whole step again later instead of recording a failure that
was not one.

A call that creates something (a room, a message) is never retried blindly
after an answer went missing: the homeserver may have acted on it. It raises at
once, and the step's next attempt looks for what the first one did (by its
marker) before acting again. Only a connection that was never made, or a 429,
is retried in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import hashlib
import hmac
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinedRoomsResponse,
    RoomGetEventResponse,
    RoomMessagesResponse,
    RoomResolveAliasResponse,
)
from nio.api import MessageDirection
from nio.client.async_client import client_session

from appservice.registration import ROOM_ALIAS_PREFIX
from bot.core.ports import (
    MESSAGE_MARKER_KEY,
    ROOM_MARKER_KEY,
    Done,
    HomeserverUnavailable,
    Refused,
    RoomCreated,
    RoomState,
    Sent,
    TimelinePage,
    message_txn_id,
)

if TYPE_CHECKING:
    from appservice.crypto import BotCrypto
    from appservice.moderation_user import ModerationUser

log = logging.getLogger(__name__)
ENCRYPTION = {"algorithm": "m.megolm.v1.aes-sha2"}
# Beside the ciphertext of the bot's own encrypted messages: the keyed digest of the
# message's marker, so that finding it again never depends on reading it.
ENCRYPTED_MARKER_KEY = "org.matrix.safeguard.digest"
# Never wait longer than this on one retry_after_ms: the step is retried later anyway.
MAX_RETRY_AFTER = 30.0
# A room alias reserved this long with no room behind it was left by a Synapse that died
# mid-createRoom (no creation takes that long): it is released and the room made anew.
EMPTY_RESERVATION_SECONDS = 20.0
T = TypeVar("T")


def _quote(value: str) -> str:
    return quote(value, safe="")


# Set while a call must be made as the appservice itself (registering the bot).
_AS_APPSERVICE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "as_appservice", default=False
)
# Set while a call is made as another user of the namespace (the moderation user).
_ACTING_AS: contextvars.ContextVar[str | None] = contextvars.ContextVar("acting_as", default=None)


def with_query(path: str, **params: str) -> str:
    parts = urlsplit(path)
    query = dict(parse_qsl(parts.query, keep_blank_values=True)) | params
    return urlunsplit(parts._replace(query=urlencode(query)))


class BotClient(AsyncClient):
    """nio's client acting as the bot through the as_token, without aiohttp's silent
    second try of a request.

    The bot is a user in the appservice's namespace, not its sender: every request
    carries `?user_id=` (and, for the bot's device, `?device_id=`), so no access token
    exists to leak or rotate, and every call stays an appservice call.

    aiohttp resends a PUT or DELETE on a fresh connection when a kept-alive one drops
    before the answer — and PUT is how a message is sent. If the homeserver had
    already stored the message and then restarted (forgetting the transaction id),
    the resend is a duplicate nobody sees coming. Every retry is ours to decide
    (NioHomeserver._call), so that one is turned off. aiohttp has no public switch
    for it: the session's `_retry_connection` flag is what it reads.
    """

    masquerade_user = ""
    masquerade_device = ""

    @client_session
    async def _session_ready(self) -> None:
        assert self.client_session is not None
        self.client_session._retry_connection = False  # type: ignore[attr-defined]

    async def send(self, method: str, path: str, *args: Any, **kwargs: Any) -> Any:
        session = self.client_session
        if session is None or getattr(session, "_retry_connection", False):
            await self._session_ready()
        if (other := _ACTING_AS.get()) is not None:
            path = with_query(path, user_id=other)
        elif self.masquerade_user and not _AS_APPSERVICE.get():
            params = {"user_id": self.masquerade_user}
            if self.masquerade_device:
                params["device_id"] = self.masquerade_device
            path = with_query(path, **params)
        return await super().send(method, path, *args, **kwargs)


class NioHomeserver:
    """The bot user, acting through the application service's as_token."""

    def __init__(
        self,
        url: str,
        as_token: str,
        bot_user_id: str,
        *,
        attempts: int = 5,
        base_delay: float = 0.25,
        max_delay: float = 8.0,
        request_timeout: float = 30.0,
        on_rate_limited: Callable[[], None] = lambda: None,
        domain: str | None = None,
        room_aliases: bool = True,
    ) -> None:
        self._bot_user_id = bot_user_id
        self._domain = domain or bot_user_id.split(":", 1)[1]
        # Room creation with an alias in our namespace (see create_room); off when the
        # registration does not reserve it.
        self._room_aliases = room_aliases
        self._alias_key = as_token.encode()
        # Aliases found reserved with no room yet: alias -> when first seen (monotonic).
        self._empty_reservations: dict[str, float] = {}
        # nio retries 429s honouring retry_after_ms; bound it so a sustained
        # limit surfaces to us instead of hanging a step for ever.
        config = AsyncClientConfig(
            max_limit_exceeded=8, max_timeouts=0, request_timeout=request_timeout
        )
        self.client = BotClient(url, user=bot_user_id, config=config)
        self.client.access_token = as_token
        self.client.user_id = bot_user_id
        self.client.masquerade_user = bot_user_id
        # The bot's end-to-end encryption, when on (appservice/crypto.py).
        self.crypto: BotCrypto | None = None
        # Who acts in group rooms instead of the bot, when configured.
        self.moderation: ModerationUser | None = None
        # Whom the bot created each room with, or invited since: an encrypted message
        # waits for the sync to show them (their devices get the room key).
        self._expected_members: dict[str, list[str]] = {}
        # (room, user) counted in ahead of an invite's answer (`expect_member`).
        self._counted_ahead: set[tuple[str, str]] = set()
        # The bot's m.direct as last read or written (see direct_rooms); None: not known.
        self._direct: dict[str, list[str]] | None = None
        self._direct_lock = asyncio.Lock()
        self._on_rate_limited = on_rate_limited
        # nio runs response callbacks on each 429 before it sleeps and retries.
        self.client.add_response_callback(self._saw_error, ErrorResponse)
        self._attempts = attempts
        self._base_delay = base_delay
        self._max_delay = max_delay
        # Why the last call could not get through (None once one does): /health shows it.
        self.problem: str | None = None

    @property
    def bot_user_id(self) -> str:
        return self._bot_user_id

    def is_ours(self, user_id: object) -> bool:
        return user_id == self._bot_user_id or (
            self.moderation is not None and user_id == self.moderation.user_id
        )

    async def _saw_error(self, response: ErrorResponse) -> None:
        if response.status_code == "M_LIMIT_EXCEEDED" or (
            response.transport_response is not None and response.transport_response.status == 429
        ):
            self._on_rate_limited()

    async def close(self) -> None:
        await self.client.close()

    # ---- the retry/classification core -------------------------------------------------

    async def _call(
        self, what: str, request: Callable[[], Awaitable[T]], *, idempotent: bool = True
    ) -> T | Refused:
        last_problem = "no attempt made"
        retry_after: float | None = None
        for attempt in range(self._attempts):
            if attempt:
                backoff = min(self._max_delay, self._base_delay * 2 ** (attempt - 1))
                # A 429 says how long to wait; otherwise back off with jitter.
                delay = retry_after if retry_after is not None else backoff
                await asyncio.sleep(min(delay, MAX_RETRY_AFTER) * random.uniform(1.0, 1.2))
                retry_after = None
            try:
                response = await request()
            except aiohttp.ClientConnectorError as exc:
                # Never connected: nothing reached the homeserver, so trying again is safe.
                last_problem = f"{type(exc).__name__}: {exc}"
                continue
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
                if not idempotent:
                    break  # the homeserver may have acted: the step looks before retrying
                continue
            failure = _failure(response)
            if failure is None:
                self.problem = None
                return response
            status, errcode, message, retry_after_ms = failure
            limited = status == 429 or errcode == "M_LIMIT_EXCEEDED"
            if limited and retry_after_ms is not None:
                retry_after = retry_after_ms / 1000
            if limited and isinstance(response, _RawError):
                self._on_rate_limited()  # nio counts its own methods' 429s (_saw_error)
            if status == 401 or errcode == "M_UNKNOWN_TOKEN":
                # Our as_token was rejected (rotated, or the registration not loaded):
                # an operator's fix, never a refusal of this one request.
                last_problem = (
                    f"the homeserver rejected the as_token ({errcode or status}): check that "
                    "the registration file Synapse loads matches the service's"
                )
                break
            if limited or status >= 500 or status == 0:
                last_problem = f"HTTP {status} {errcode} {message}".strip()
                if not limited and not idempotent:
                    break
                continue
            self.problem = None
            return Refused(errcode=errcode or f"HTTP_{status}", reason=message, status=status)
        self.problem = last_problem
        log.warning("homeserver unavailable for %s: %s", what, last_problem)
        raise HomeserverUnavailable(f"{what}: {last_problem}")

    async def _raw(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        idempotent: bool = True,
        long_poll: float | None = None,
    ) -> dict[str, Any] | Refused:
        """A request nio has no method for, answered by a JSON object; same
        classification as `_call`. `long_poll`: how long a long poll may take (seconds)."""
        result = await self._raw_json(
            method, path, body, idempotent=idempotent, long_poll=long_poll
        )
        if isinstance(result, Refused):
            return result
        return result if isinstance(result, dict) else {}

    async def _raw_json(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        idempotent: bool = True,
        long_poll: float | None = None,
    ) -> Any:
        """`_raw`, with the answer's JSON as it came (a list, say); Refused on an error."""

        async def request() -> Any:
            headers = {"Content-Type": "application/json"}
            if self.client.access_token:
                headers["Authorization"] = f"Bearer {self.client.access_token}"
            data = json.dumps(body) if body is not None else None
            response = await self.client.send(method, path, data, headers, timeout=long_poll)
            try:
                payload = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                payload = {}
            if response.status >= 400:
                return _RawError(response.status, payload if isinstance(payload, dict) else {})
            return payload

        result = await self._call(f"{method} {path.split('?')[0]}", request, idempotent=idempotent)
        assert not isinstance(result, _RawError)  # _call turns every error into Refused
        return result

    # ---- start-up ----------------------------------------------------------------------

    async def ensure_registered(self, displayname: str) -> None:
        await self.register_user(self._bot_user_id, displayname)

    async def register_user(self, user_id: str, displayname: str) -> None:
        """Make a user of the namespace exist (the bot, the moderation user), named."""
        localpart = user_id[1:].split(":", 1)[0]
        token = _AS_APPSERVICE.set(True)  # it may not exist yet: ask as the appservice
        try:
            result = await self._raw(
                "POST",
                "/_matrix/client/v3/register",
                {
                    "type": "m.login.application_service",
                    "username": localpart,
                    "inhibit_login": True,
                },
            )
        finally:
            _AS_APPSERVICE.reset(token)
        if isinstance(result, Refused) and result.errcode != "M_USER_IN_USE":
            raise HomeserverUnavailable(f"registering {user_id} was refused: {result}")
        with self.acting_as(user_id):
            profile = await self._raw(
                "PUT",
                f"/_matrix/client/v3/profile/{_quote(user_id)}/displayname",
                {"displayname": displayname},
            )
        if isinstance(profile, Refused):
            log.warning("could not set the display name of %s: %s", user_id, profile)

    @contextlib.contextmanager
    def acting_as(self, user_id: str | None) -> Iterator[None]:
        """Calls made meanwhile are made as `user_id` (None: as the bot)."""
        token = _ACTING_AS.set(user_id if user_id != self._bot_user_id else None)
        try:
            yield
        finally:
            _ACTING_AS.reset(token)

    def _moderator_in(self, room_id: str) -> str | None:
        """Who acts in this group room: the moderation user where it is seated."""
        moderation = self.moderation
        return moderation.user_id if moderation and moderation.seated_in(room_id) else None

    async def _as_moderator(self, room_id: str, action: Callable[[], Awaitable[Any]]) -> Any:
        """`action` as the moderation user where it is seated; refused for want of power
        (it was demoted), it is unseated and the bot does it at once."""
        actor = self._moderator_in(room_id)
        if actor is None:
            return await action()
        with self.acting_as(actor):
            result = await action()
        if isinstance(result, Refused) and result.errcode == "M_FORBIDDEN":
            assert self.moderation is not None
            if await self.moderation.still_empowered(room_id):
                return result  # refused for its target, not for want of power: as it is
            self.moderation.unseat(room_id, str(result))
            return await action()
        return result

    async def put_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> Done | Refused:
        result = await self._raw(
            "PUT",
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/{_quote(event_type)}/"
            f"{_quote(state_key)}",
            content,
        )
        return result if isinstance(result, Refused) else Done()

    async def ping(self, appservice_id: str) -> dict[str, Any] | Refused:
        """Ask Synapse to ping us back: it also makes queued transactions flow at once."""
        return await self._raw(
            "POST", f"/_matrix/client/v1/appservice/{_quote(appservice_id)}/ping", {}
        )

    async def versions(self) -> bool:
        try:
            response = await self.client.send("GET", "/_matrix/client/versions", None, {})
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False
        return response.status == 200

    async def check(self) -> str | None:
        """None if the homeserver answers and accepts our token; else what is wrong."""
        headers = {"Authorization": f"Bearer {self.client.access_token}"}
        try:
            response = await self.client.send(
                "GET", "/_matrix/client/v3/account/whoami", None, headers
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"the homeserver is not reachable ({type(exc).__name__}: {exc})"
        if response.status == 200:
            return None
        if response.status == 401:
            return (
                "the homeserver rejected the as_token (M_UNKNOWN_TOKEN): check that the "
                "registration file Synapse loads matches the service's"
            )
        return f"the homeserver answered HTTP {response.status}"

    # ---- bot.core.ports.Homeserver ------------------------------------------------------------

    async def _state_event(
        self, room_id: str, event_type: str, state_key: str = "", *, as_event: bool = False
    ) -> dict[str, Any] | Refused | None:
        path = (
            f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/{_quote(event_type)}/"
            f"{_quote(state_key)}"
        )
        if as_event:
            path += "?format=event"
        result = await self._raw("GET", path)
        if isinstance(result, Refused) and result.errcode == "M_NOT_FOUND":
            return None
        return result

    async def room_state(self, room_id: str) -> RoomState | Refused:
        create = await self._state_event(room_id, "m.room.create", as_event=True)
        if isinstance(create, Refused):
            return create
        if create is None:
            return Refused("M_NOT_FOUND", f"no create event in {room_id}", 404)
        power = await self._state_event(room_id, "m.room.power_levels")
        if isinstance(power, Refused):
            return power
        return RoomState.of(room_id, create, power)

    async def room_state_events(self, room_id: str) -> list[Any] | Refused:
        result = await self._raw_json("GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/state")
        if isinstance(result, (Refused, list)):
            return result
        return Refused("M_UNKNOWN", "the room's state was not a list", 200)

    async def space_children(self, space_id: str, *, max_depth: int) -> list[str] | Refused:
        """The rooms in a Space, walked `max_depth` deep (the Spaces in it are walked,
        not listed), every page of the hierarchy read."""
        found: list[str] = []
        page: str | None = None
        while True:
            query = f"max_depth={max_depth}&limit=50" + (f"&from={_quote(page)}" if page else "")
            answer = await self._raw(
                "GET", f"/_matrix/client/v1/rooms/{_quote(space_id)}/hierarchy?{query}"
            )
            if isinstance(answer, Refused):
                return answer
            for room in answer.get("rooms") or []:
                if not isinstance(room, dict) or room.get("room_id") == space_id:
                    continue
                if room.get("room_type") != "m.space" and isinstance(room.get("room_id"), str):
                    found.append(room["room_id"])
            page = answer.get("next_batch")
            if not isinstance(page, str) or not page:
                return found

    async def get_event(self, room_id: str, event_id: str) -> dict[str, Any] | Refused:
        response = await self._call(
            f"get event {event_id}", lambda: self.client.room_get_event(room_id, event_id)
        )
        if isinstance(response, Refused):
            return response
        assert isinstance(response, RoomGetEventResponse)
        return response.event.source

    async def membership(self, room_id: str, user_id: str) -> str | None:
        content = await self._state_event(room_id, "m.room.member", user_id)
        if isinstance(content, Refused) or content is None:
            return None
        membership = content.get("membership")
        return membership if isinstance(membership, str) else None

    async def member_event(self, room_id: str, user_id: str) -> dict[str, Any] | Refused | None:
        return await self._state_event(room_id, "m.room.member", user_id, as_event=True)

    async def resolve_room(self, room_id_or_alias: str) -> str | Refused:
        if room_id_or_alias.startswith("!"):
            return room_id_or_alias
        response = await self._call(
            f"resolve {room_id_or_alias}",
            lambda: self.client.room_resolve_alias(room_id_or_alias),
        )
        if isinstance(response, Refused):
            return response
        assert isinstance(response, RoomResolveAliasResponse)
        return response.room_id

    async def display_name(self, user_id: str) -> str | None:
        result = await self._raw("GET", f"/_matrix/client/v3/profile/{_quote(user_id)}/displayname")
        if isinstance(result, Refused):
            return None
        name = result.get("displayname")
        return name if isinstance(name, str) else None

    async def room_name(self, room_id: str) -> str | None:
        content = await self._state_event(room_id, "m.room.name")
        name = content.get("name") if isinstance(content, dict) else None
        return name if isinstance(name, str) else None

    async def redact(
        self, room_id: str, event_id: str, *, reason: str, txn_id: str
    ) -> Done | Refused:
        result = await self._as_moderator(
            room_id,
            lambda: self._raw(
                "PUT",
                f"/_matrix/client/v3/rooms/{_quote(room_id)}/redact/{_quote(event_id)}/"
                f"{_quote(txn_id)}",
                {"reason": reason},
            ),
        )
        return result if isinstance(result, Refused) else Done()

    async def is_redacted(self, room_id: str, event_id: str) -> bool | None:
        result = await self._raw(
            "GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/event/{_quote(event_id)}"
        )
        if isinstance(result, Refused):
            return None
        unsigned = result.get("unsigned") or {}
        return "redacted_because" in unsigned or not result.get("content")

    async def join_room(self, room_id: str) -> Done | Refused:
        response = await self._call(f"join {room_id}", lambda: self.client.join(room_id))
        return response if isinstance(response, Refused) else Done()

    async def leave_room(self, room_id: str) -> Done | Refused:
        response = await self._call(f"leave {room_id}", lambda: self.client.room_leave(room_id))
        return response if isinstance(response, Refused) else Done()

    async def joined_rooms(self) -> list[str]:
        response = await self._call("joined rooms", self.client.joined_rooms)
        if isinstance(response, Refused):
            return []
        assert isinstance(response, JoinedRoomsResponse)
        return list(response.rooms)

    async def find_marked_room(self, marker: str) -> str | None:
        """The room made with `marker`, once made whole: found by the alias it was made
        with (three reads, two of them at once, however many rooms the bot is in)."""
        if not self._room_aliases:
            # An older registration reserves no alias namespace, so its rooms carry
            # none: only reading every joined room's create event can find one.
            return await self._scan_for_marked_room(marker)
        room_id = await self.resolve_room(self._room_alias(marker))
        if isinstance(room_id, Refused):
            return None  # no such alias: no attempt made the room
        content = await self._created(room_id)
        if isinstance(content, dict) and content.get(ROOM_MARKER_KEY) == marker:
            return room_id
        return None  # reserved, its room not all written yet (create_room waits for it)

    async def _created(self, room_id: str) -> dict[str, Any] | None:
        """The room's create event, once its creation is complete; None before.

        Synapse writes a new room's create event (with its creator and power levels) on its
        own, then the rest of what was asked (join rules, encryption, name, topic) in one
        batch. An attempt cut short while it waited must not take the room in between: its
        invites would go out before its name and encryption (seen in CI: a check-in
        invite whose room had no name). Every preset writes the join rules in that batch."""
        create, join_rules = await asyncio.gather(
            self._state_event(room_id, "m.room.create"),
            self._state_event(room_id, "m.room.join_rules"),
        )
        if not isinstance(create, dict) or not isinstance(join_rules, dict):
            return None
        return create

    async def _scan_for_marked_room(self, marker: str) -> str | None:
        for room_id in await self.joined_rooms():
            content = await self._state_event(room_id, "m.room.create")
            if isinstance(content, dict) and content.get(ROOM_MARKER_KEY) == marker:
                return room_id
        return None

    def _digest(self, marker: str) -> str:
        """What only this deployment can derive from a marker (keyed with the as_token),
        and nobody can read a case from."""
        return hmac.new(self._alias_key, marker.encode(), hashlib.sha256).hexdigest()[:32]

    def _alias_for(self, marker: str) -> str:
        """An alias only this deployment can derive from the marker (no one can squat it:
        the namespace is the appservice's, exclusively)."""
        return f"{ROOM_ALIAS_PREFIX}{self._digest(marker)}"

    def _room_alias(self, marker: str) -> str:
        return f"#{self._alias_for(marker)}:{self._domain}"

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
        """A private room carrying `marker`, created at most once (encrypted, if asked,
        from its first event).

        The room gets an alias derived from the marker, in the appservice's exclusive
        namespace. Synapse reserves the alias before it sends any event of the room, so
        a second attempt — after a lost answer, or while the first is still being
        processed — is refused with "in use" and resolves to the one room.
        """
        encrypted = encrypted and self.crypto is not None
        options = {"name": name, "topic": topic, "is_direct": is_direct, "encrypted": encrypted}
        if not self._room_aliases:
            created = await self._create_room(marker, invite, alias=None, **options)
        else:
            alias = self._alias_for(marker)
            created = await self._create_room(marker, invite, alias=alias, **options)
            if isinstance(created, Refused) and created.errcode == "M_EXCLUSIVE":
                log.warning(
                    "the registration does not reserve the room alias namespace: rooms are "
                    "created without an alias (re-run `safeguard registration`, restart Synapse)"
                )
                self._room_aliases = False
                created = await self._create_room(marker, invite, alias=None, **options)
            elif isinstance(created, Refused) and (
                created.errcode == "M_ROOM_IN_USE" or created.status == 409
            ):
                created = await self._existing_room(self._room_alias(marker), marker)
        if isinstance(created, RoomCreated):
            self._expected_members[created.room_id] = list(invite)
            if self.crypto is not None:
                # We just made it, so whether it is encrypted needs no read before sending.
                self.crypto.created(
                    created.room_id,
                    encrypted=encrypted,
                    invited=invite,
                    new=not created.existing,
                )
        return created

    async def _existing_room(self, alias: str, marker: str) -> RoomCreated | Refused:
        """The room an earlier attempt created, once its creation is complete (`_created`).

        Synapse reserves the alias before it writes the room's first event: a Synapse
        killed in between leaves a reservation with no room behind it (or half of one).
        One that stays so longer than any room creation takes is released, and the room
        created anew.
        """
        room_id = await self.resolve_room(alias)
        if isinstance(room_id, Refused):
            raise HomeserverUnavailable(f"{alias} is taken but does not resolve yet ({room_id})")
        create = await self._created(room_id)
        if create is None:
            first_seen = self._empty_reservations.setdefault(alias, time.monotonic())
            waited = time.monotonic() - first_seen
            if waited < EMPTY_RESERVATION_SECONDS:
                raise HomeserverUnavailable(
                    f"the room {room_id} is still being created",
                    retry_after=min(2.0, EMPTY_RESERVATION_SECONDS - waited),
                )
            released = await self._raw(
                "DELETE", f"/_matrix/client/v3/directory/room/{_quote(alias)}", idempotent=True
            )
            self._empty_reservations.pop(alias, None)
            log.warning("released %s: its room %s was never created (%s)", alias, room_id, released)
            raise HomeserverUnavailable(
                f"the room for {marker} must be created again", retry_after=0.0
            )
        self._empty_reservations.pop(alias, None)
        if create.get(ROOM_MARKER_KEY) != marker:
            return Refused("M_ROOM_IN_USE", f"{alias} names a room that is not {marker}")
        return RoomCreated(room_id, existing=True)

    async def _create_room(
        self,
        marker: str,
        invite: list[str],
        *,
        name: str | None,
        topic: str | None,
        is_direct: bool,
        encrypted: bool,
        alias: str | None,
    ) -> RoomCreated | Refused:
        body: dict[str, Any] = {
            "visibility": "private",
            # private_chat, not trusted_private_chat: in room v12 the latter would
            # make every invitee a creator with unlimited power.
            "preset": "private_chat",
            "invite": invite,
            "is_direct": is_direct,
            "creation_content": {ROOM_MARKER_KEY: marker},
        }
        if name:
            body["name"] = name
        if topic:
            body["topic"] = topic
        initial_state: list[dict[str, Any]] = []
        if alias is not None:
            body["room_alias_name"] = alias
            # The alias is for our bookkeeping only: members see no room address.
            initial_state.append({"type": "m.room.canonical_alias", "state_key": "", "content": {}})
        if encrypted:
            initial_state.append(
                {"type": "m.room.encryption", "state_key": "", "content": dict(ENCRYPTION)}
            )
        if initial_state:
            body["initial_state"] = initial_state
        # Raw, because nio's room_create cannot set creation_content. Not retried
        # blindly: a lost answer may hide a created room (the step finds it by its marker).
        result = await self._raw("POST", "/_matrix/client/v3/createRoom", body, idempotent=False)
        if isinstance(result, Refused):
            return result
        room_id = result.get("room_id")
        if not isinstance(room_id, str):
            return Refused("M_UNKNOWN", "createRoom answered without a room_id")
        return RoomCreated(room_id)

    async def direct_rooms(self) -> Mapping[str, Sequence[str]]:
        """The bot's m.direct: read once, then kept. Only this process writes it — the bot
        has no access token, whoever holds the as_token is this service, and a second
        instance cannot start — so what was read or last written is what is there.

        A view of what is kept, not a copy: it holds every DM the bot keeps, and the
        member's notice reads it."""
        return MappingProxyType(await self._direct_known())

    def direct_rooms_known(self, user_id: str) -> Sequence[str] | None:
        # Never changed in place (a new dict replaces it), so readable from any thread.
        direct = self._direct
        return None if direct is None else direct.get(user_id, ())

    async def _direct_known(self) -> dict[str, list[str]]:
        if self._direct is None:
            result = await self._raw(
                "GET",
                f"/_matrix/client/v3/user/{_quote(self._bot_user_id)}/account_data/m.direct",
            )
            if isinstance(result, Refused):
                # None written yet: an empty m.direct, kept (anything else: read again).
                if result.errcode == "M_NOT_FOUND":
                    self._direct = {}
                return {}
            self._direct = {
                user: [room for room in rooms if isinstance(room, str)]
                for user, rooms in result.items()
                if isinstance(rooms, list)
            }
        return self._direct

    async def remember_direct_room(
        self, user_id: str, room_id: str, *, known: Mapping[str, Sequence[str]] | None = None
    ) -> Done | Refused:
        # One update at a time: two cases' DMs at once must not overwrite each other.
        async with self._direct_lock:
            # What is kept, else what the caller just read (no second read), else read.
            source = self._direct if self._direct is not None or known is None else known
            if source is None:
                source = await self._direct_known()
            if room_id in source.get(user_id, ()):
                return Done()
            direct = {user: list(rooms) for user, rooms in source.items()}
            direct.setdefault(user_id, []).append(room_id)
            result = await self._raw(
                "PUT",
                f"/_matrix/client/v3/user/{_quote(self._bot_user_id)}/account_data/m.direct",
                direct,
            )
            if isinstance(result, Refused):
                self._direct = None  # what is there now is not known: read it next time
                return result
            self._direct = direct
            return Done()

    async def forget_direct_rooms(self, room_ids: Collection[str]) -> Done | Refused:
        gone = set(room_ids)
        async with self._direct_lock:
            direct = await self._direct_known()
            kept = {
                user: [room for room in rooms if room not in gone] for user, rooms in direct.items()
            }
            kept = {user: rooms for user, rooms in kept.items() if rooms}
            if kept == direct:
                return Done()
            result = await self._raw(
                "PUT",
                f"/_matrix/client/v3/user/{_quote(self._bot_user_id)}/account_data/m.direct",
                kept,
            )
            if isinstance(result, Refused):
                self._direct = None  # what is there now is not known: read it next time
                return result
            self._direct = kept
            return Done()

    async def invite(
        self, room_id: str, user_id: str, *, is_direct: bool = False
    ) -> Done | Refused:
        if is_direct:
            # /invite cannot say "direct": the membership event itself can, as the
            # invite createRoom sends with is_direct does (clients show it as a DM).
            result = await self._raw(
                "PUT",
                f"/_matrix/client/v3/rooms/{_quote(room_id)}/state/m.room.member/{_quote(user_id)}",
                {"membership": "invite", "is_direct": True},
                idempotent=True,
            )
            if isinstance(result, Refused):
                self._unexpect_member(room_id, user_id)
                return result
        else:
            response = await self._call(
                f"invite to {room_id}", lambda: self.client.room_invite(room_id, user_id)
            )
            if isinstance(response, Refused):
                self._unexpect_member(room_id, user_id)
                return response
        # Our own invite's answer says they are invited (no wait for the sync).
        self._counted_ahead.discard((room_id, user_id))
        self._count_in(room_id, user_id)
        return Done()

    def expect_member(self, room_id: str, user_id: str) -> None:
        """They are being invited now: counted in ahead of the invite's answer, and
        counted out again if it is refused (`invite`)."""
        if not self._counts_in(room_id, user_id):
            self._counted_ahead.add((room_id, user_id))
        self._count_in(room_id, user_id)

    def _counts_in(self, room_id: str, user_id: str) -> bool:
        return user_id in self._expected_members.get(room_id, [])

    def _count_in(self, room_id: str, user_id: str) -> None:
        """An encrypted message to the room waits until the device knows its members, and
        their devices get the key: they count from now."""
        expected = self._expected_members.setdefault(room_id, [])
        if user_id not in expected:
            expected.append(user_id)
        if self.crypto is not None:
            self.crypto.invited(room_id, user_id)

    def _unexpect_member(self, room_id: str, user_id: str) -> None:
        """The invite was refused: only what `expect_member` counted in ahead of it is
        taken back (anyone counted in by an earlier answer stays)."""
        if (room_id, user_id) not in self._counted_ahead:
            return
        self._counted_ahead.discard((room_id, user_id))
        self._expected_members[room_id].remove(user_id)
        if self.crypto is not None:
            self.crypto.not_invited(room_id, user_id)

    async def kick(self, room_id: str, user_id: str, reason: str) -> Done | Refused:
        response = await self._as_moderator(
            room_id,
            lambda: self._call(
                f"kick from {room_id}", lambda: self.client.room_kick(room_id, user_id, reason)
            ),
        )
        return response if isinstance(response, Refused) else Done()

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
        if not plain and await self._encrypted(room_id, encrypt_by):
            assert self.crypto is not None
            tag = content.get(MESSAGE_MARKER_KEY)
            content = await self.crypto.encrypt(
                room_id,
                event_type,
                content,
                members=self._expected_members.get(room_id, []),
                by=encrypt_by,
            )
            if isinstance(tag, dict) and isinstance(tag.get("marker"), str):
                # Findable again without decrypting (find_marked_message): a resumed step
                # must see its own message even while its keys cannot be read.
                content = content | {ENCRYPTED_MARKER_KEY: self._digest(tag["marker"])}
            event_type = "m.room.encrypted"

        def put() -> Awaitable[dict[str, Any] | Refused]:
            return self._raw(
                "PUT",
                f"/_matrix/client/v3/rooms/{_quote(room_id)}/send/{_quote(event_type)}/"
                f"{_quote(txn_id)}",
                content,
                # Synapse forgets txn ids when it restarts: after a lost answer the step
                # looks for its marked message instead of sending again.
                idempotent=False,
            )

        # Encrypted, it is the bot's device's message: the bot sends it.
        result = await (
            put() if event_type == "m.room.encrypted" else self._as_moderator(room_id, put)
        )
        if isinstance(result, Refused):
            return result
        event_id = result.get("event_id")
        if not isinstance(event_id, str):
            return Refused("M_UNKNOWN", "the send answered without an event_id")
        return Sent(event_id)

    def encryption_problem(self) -> str | None:
        return None if self.crypto is None else self.crypto.unusable_because

    async def room_is_encrypted(self, room_id: str) -> bool:
        """Whether the room is encrypted: as the device knows it, else read once (and
        known from then on; the sync shows a room becoming encrypted)."""
        if self.crypto is None:
            return False

        async def read() -> bool:
            state = await self._state_event(room_id, "m.room.encryption")
            return isinstance(state, dict) and bool(state.get("algorithm"))

        return await self.crypto.room_encrypted(room_id, read)

    async def _encrypted(self, room_id: str, encrypt_by: dt.datetime | None = None) -> bool:
        """Whether what the bot sends to the room must be encrypted; EncryptionUnavailable
        if it must and cannot be (never in the clear into an encrypted room unasked)."""
        if not await self.room_is_encrypted(room_id):
            return False
        await self.crypto.usable(by=encrypt_by)
        return True

    async def find_marked_message(
        self, room_id: str, marker: str, *, limit: int = 200
    ) -> str | None:
        found = await self._find_marked_message(room_id, marker, limit=limit)
        actor = self._moderator_in(room_id)
        if found is None and actor is not None:
            # Its own transaction ids are shown to it alone.
            with self.acting_as(actor):
                found = await self._find_marked_message(room_id, marker, limit=limit)
        return found

    async def _find_marked_message(self, room_id: str, marker: str, *, limit: int) -> str | None:
        senders = [self._bot_user_id]
        if self.moderation is not None:
            senders.append(self.moderation.user_id)
        response = await self._call(
            f"messages in {room_id}",
            lambda: self.client.room_messages(
                room_id,
                start=None,
                direction=MessageDirection.back,
                limit=limit,
                message_filter={"senders": senders},
            ),
        )
        if isinstance(response, Refused):
            return None
        assert isinstance(response, RoomMessagesResponse)
        digest = self._digest(marker)
        txn_id = message_txn_id(marker)
        for event in response.chunk:
            source = getattr(event, "source", {}) or {}
            if (source.get("unsigned") or {}).get("transaction_id") == txn_id:
                return source.get("event_id")  # shown to its sender alone
            if (source.get("content") or {}).get(ENCRYPTED_MARKER_KEY) == digest:
                return source.get("event_id")
            if source.get("type") == "m.room.encrypted" and self.crypto is not None:
                # Our own message: decrypted with the session the bot shared it with.
                source = self.crypto.decrypt({**source, "room_id": room_id}) or source
            content = source.get("content") or {}
            tag = content.get(MESSAGE_MARKER_KEY)
            if isinstance(tag, dict) and tag.get("marker") == marker:
                return source.get("event_id")
        return None

    # ---- bot.core.ports.Timeline ---------------------------------------------------------------

    async def _messages(
        self, room_id: str, *, direction: str, token: str | None, limit: int
    ) -> TimelinePage | Refused:
        query = f"dir={direction}&limit={limit}"
        if token is not None:
            query += f"&from={quote(token, safe='')}"
        result = await self._raw(
            "GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/messages?{query}"
        )
        if isinstance(result, Refused):
            return result
        chunk = result.get("chunk")
        events = [e for e in chunk if isinstance(e, dict)] if isinstance(chunk, list) else []
        for event in events:
            event.setdefault("room_id", room_id)
        end = result.get("end")
        return TimelinePage(events, end if isinstance(end, str) and events else None)

    async def current_position(self, room_id: str) -> str | Refused:
        result = await self._raw(
            "GET", f"/_matrix/client/v3/rooms/{_quote(room_id)}/messages?dir=b&limit=1"
        )
        if isinstance(result, Refused):
            return result
        start = result.get("start")
        if not isinstance(start, str):
            return Refused("M_UNKNOWN", "no position in the /messages answer")
        return start

    async def read_forward(self, room_id: str, token: str, *, limit: int) -> TimelinePage | Refused:
        return await self._messages(room_id, direction="f", token=token, limit=limit)

    async def read_back(
        self, room_id: str, token: str | None, *, limit: int
    ) -> TimelinePage | Refused:
        return await self._messages(room_id, direction="b", token=token, limit=limit)

    async def sync_json(
        self, since: str | None, filter_json: str, *, wait: float, device_id: str | None = None
    ) -> dict[str, Any] | Refused:
        """The bot's /sync answer as it came (appservice/sync.py reads it); with
        `device_id`, as the bot's encryption device (its to-device messages with it)."""
        params = {"filter": filter_json, "timeout": str(int(wait * 1000))}
        if since is not None:
            params["since"] = since
        if device_id is not None:
            params["device_id"] = device_id
        return await self._raw(
            "GET",
            f"/_matrix/client/v3/sync?{urlencode(params)}",
            long_poll=wait + self.client.config.request_timeout,
        )

    async def state_event(
        self, room_id: str, event_type: str, state_key: str = ""
    ) -> dict[str, Any] | None:
        content = await self._state_event(room_id, event_type, state_key)
        return content if isinstance(content, dict) else None


class _RawError:
    """A raw request's error answer, classified by `_failure` like nio's ErrorResponse."""

    def __init__(self, status: int, payload: dict[str, Any]) -> None:
        self.status = status
        self.payload = payload


def _failure(response: object) -> tuple[int, str, str, int | None] | None:
    """(HTTP status, errcode, message, retry_after_ms) for an error response, else None."""
    if isinstance(response, _RawError):
        retry = response.payload.get("retry_after_ms")
        return (
            response.status,
            str(response.payload.get("errcode") or ""),
            str(response.payload.get("error") or ""),
            retry if isinstance(retry, int) and not isinstance(retry, bool) else None,
        )
    if isinstance(response, ErrorResponse):
        status = response.transport_response.status if response.transport_response else 0
        retry = getattr(response, "retry_after_ms", None)
        return (
            status,
            str(response.status_code or ""),
            str(response.message or ""),
            retry if isinstance(retry, int) else None,
        )
    return None
