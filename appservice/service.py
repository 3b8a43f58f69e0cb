"""The running service: the one place that builds every part and hands each its collaborators.

Start order matters: the instance lock and migrations first (nothing may run on
an old schema or beside a twin), then the HTTP server (Synapse may already be
waiting to deliver), then — once the homeserver answers — the workers, which
resume whatever a previous run left unfinished, and a catch-up of every watched
room. The homeserver may be down: the service still serves and keeps trying in
the background, and /health says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from aiohttp import web

from appservice.communities import CommunityParts, new_parts
from appservice.config import Config, check_runnable
from appservice.crypto import BotCrypto
from appservice.database import (
    HEALTH_BUSY_TIMEOUT_MS,
    InstanceLock,
    checkpoint,
    create_engine,
    protect_files,
    sqlite_journal,
    upgrade,
    write_heartbeat,
)
from appservice.digest_key import load_digest_key
from appservice.errors import ConfigError
from appservice.health import HealthChecks
from appservice.homeserver import NioHomeserver
from appservice.moderation_user import ModerationUser
from appservice.registration import load_registration
from appservice.server import AppServiceServer
from appservice.sync import BotSync
from appservice.webhook import HttpWebhook
from bot.cases.engine import StepEngine
from bot.cases.retention import purge
from bot.checkin.events import CheckinEvents
from bot.community.routing import CommunityRouter
from bot.community.spaces import SpaceRooms
from bot.config.deployment import Deployment
from bot.core.metrics import Metrics
from bot.core.ports import HomeserverUnavailable, Refused
from bot.core.retry import until_done
from bot.core.timers import Timers
from bot.core.worker import STOP_GRACE_SECONDS, Worker
from bot.intake.accept import (
    DECRYPT_LANE,
    FLAG_LANE,
    OTHER_LANE,
    REFUSAL_LANE,
    ActionFilter,
    Intake,
)
from bot.intake.dispatch import Classifier, Dispatcher, EventKind, Handling, StaffOfRoom
from bot.intake.notice_reads import NoticeReads
from bot.intake.recent_senders import RecentSenders
from bot.intake.reconcile import Reconciler
from bot.intake.safety_net import SafetyNet
from bot.intake.stranded import StrandedWatch
from bot.members.policy import PolicyExplainer
from bot.moderation.authorization import power_level
from bot.moderation.membership import Membership, declined_invite
from bot.moderation.room_state import RoomStateCache
from bot.moderation.upgrades import RoomUpgrades
from bot.referral.decision import Referral
from bot.rooms.directory import RoomDirectory
from bot.rooms.names import names_of
from bot.rooms.ready_rooms import REFILL_AFTER_SECONDS, ReadyRooms
from bot.rooms.refusal_reports import RefusalReports
from bot.rooms.staff_room import StaffRoom, StaffRooms
from bot.staff.delivery import OutboxDelivery
from bot.staff.relay import Relay
from bot.staff.room_admin import RoomAdmin
from bot.staff.tools import StaffTools
from bot.steps import Toolbox, build_steps
from bot.steps.notify_ahead import NoticesAhead
from bot.store import (
    audit,
    cases,
    ingest,
    outbox,
    policy_rooms,
    positions,
    retention,
    rooms,
)
from bot.store.audit import Provenance
from bot.texts.messages import Texts
from bot.texts.wording import place

log = logging.getLogger(__name__)
# Retrying a staff room, a Space or a listed alias backs off to this (seconds); /health
# shows the problem meanwhile.
RETRY_MAX = 60.0
HOUSEKEEPING_EVERY = dt.timedelta(hours=1)
CHAIN_HEAD_EVERY = dt.timedelta(days=1)
# How often the homeserver is probed, so catch-up starts as soon as it answers again.
PROBE_SECONDS = 5.0
# How often a database that could not record a push is tried again.
DATABASE_PROBE_SECONDS = 1.0
# How often refusal windows that have ended are reported (each window is
# policy.refusal_report_every long).
REFUSAL_FLUSH_EVERY = dt.timedelta(seconds=30)
# How often rooms made ahead are tried again after the homeserver would not make one.
READY_ROOMS_POLL_SECONDS = 60.0


class Service:
    def __init__(self, config: Config, *, connect_retry_seconds: float = 5.0) -> None:
        check_runnable(config)
        self.config = config
        self.registration = load_registration(config.registration_path)
        self.metrics = Metrics()
        self.deployment = Deployment(
            policy=config.policy,
            checkin=config.checkin,
            messages=config.messages,
            resources=tuple(config.resources),
            language=config.language,
            bot_user_id=config.bot_user_id,
            provenance=Provenance(
                config.policy.policy_version,
                config.config_hash,
                digest_key=load_digest_key(config, create=True) or b"",
            ),
            extra_inviters=config.allowed_inviters,
            reconcile=config.file.reconcile,
            encrypt_private_rooms=config.file.encryption.enabled
            and config.file.encryption.private_rooms
            and self.registration.lets_the_bot_sync(config),
            plain_fallback_after=config.file.encryption.fallback_after
            if config.file.encryption.fallback == "plain"
            else None,
            retention_days=config.retention_days,
        )
        self._connect_retry = connect_retry_seconds
        self._lock = InstanceLock(config.database_url)
        busy_timeout = config.file.database.busy_timeout.total_seconds()
        self.engine = create_engine(config.database_url, busy_timeout_ms=int(busy_timeout * 1000))
        # /health writes through its own connection, which gives up in seconds when locked.
        self._health_engine = create_engine(
            config.database_url, busy_timeout_ms=HEALTH_BUSY_TIMEOUT_MS
        )
        for warning in self.registration.warnings(config):
            log.warning("%s: %s", config.registration_path, warning)
        self.homeserver = NioHomeserver(
            config.homeserver.url,
            self.registration.as_token,
            config.bot_user_id,
            on_rate_limited=self.metrics.rate_limited.inc,
            domain=config.homeserver.domain,
            room_aliases=self.registration.reserves_aliases(config),
        )
        # End-to-end encryption needs the bot to be a namespace user, not the sender.
        self.crypto: BotCrypto | None = None
        if config.file.encryption.enabled and self.registration.lets_the_bot_sync(config):
            self.crypto = BotCrypto(
                config.homeserver.url,
                self.registration.as_token,
                config.bot_user_id,
                config.crypto_store,
                display_name=config.appservice.bot_displayname,
                on_room_key=self._room_key_arrived,
                on_broken=self._encryption_broken,
                retry_seconds=connect_retry_seconds,
                verified_only=config.file.encryption.verified_only,
            )
            self.homeserver.crypto = self.crypto
        self.moderation: ModerationUser | None = None
        if config.moderation_user_id is not None:
            self.moderation = ModerationUser(
                self.homeserver,
                config.moderation_user_id,
                config.appservice.moderation_displayname,
                rooms=lambda: self.rooms.moderated,
                tell_staff=self._moderation_news,
            )
            self.homeserver.moderation = self.moderation
        self.connected = asyncio.Event()
        # Set while the instance lock is held: nothing acts without it (see _lock_lost).
        self._lock_held = asyncio.Event()
        self._acting = False  # the workers, the step engine and the timers run
        self._started = False  # they were started once (by _connect)
        self._pause_resume = asyncio.Lock()  # one pause or resume at a time, in order
        self._encryption_reports = asyncio.Lock()  # "failed" and "works again", in order
        self._staff_room_warned: str | None = None  # logged once, until it changes
        # The rooms communities list by alias not resolved yet, with why (retried in the
        # background, shown on /health); once resolved, known by id in RoomDirectory.listed.
        self._listed_unresolved: dict[str, str] = {}
        self.stopped = asyncio.Event()  # set when the service stops itself (a fatal fault)
        self.fatal: str | None = None
        self._runner: web.AppRunner | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._fallbacks: set[asyncio.Task[None]] = set()

        # ---- who and where: each community's staff, texts and settings ----
        self.parts = {
            community.id: new_parts(
                community,
                self.deployment,
                db=self.engine,
                homeserver=self.homeserver,
                on_fallback=self._template_fell_back,
            )
            for community in config.communities
        }
        first = next(iter(self.parts.values()))
        # The first community's, where one is wanted (an install without communities:
        # its only one): the log's and /health's own words, what belongs to no community.
        self.deployment = first.deployment
        self.staff_room = first.staff_room
        self.staff = first.staff
        self.texts = first.texts
        self.staff_rooms = StaffRooms({key: part.staff_room for key, part in self.parts.items()})
        self.rooms = RoomDirectory(self.staff_rooms)
        for community in config.communities:
            for room in community.rooms:
                self.rooms.listed[room] = community.id
                if not room.startswith("!"):  # /health: not known by its id until resolved
                    self._listed_unresolved[room] = "not resolved yet"
        # Filled by the intake, read by the referral: who sent each recent event.
        self.recent_senders = RecentSenders()
        self.room_state = RoomStateCache(self.homeserver)

        # ---- the workers ----
        self.outbox = OutboxDelivery(
            self.engine,
            self.homeserver,
            self._texts_of_room,
            self.staff_rooms,
            plain_after=self.deployment.plain_fallback_after,
        )
        self.outbox_worker = Worker("outbox", self.outbox.work_once)
        self.ready_rooms = ReadyRooms(
            self.engine,
            self.homeserver,
            self.rooms,
            wanted=config.policy.ready_dm_rooms,
            encrypted=self.deployment.encrypt_private_rooms,
        )
        self.ready_rooms_worker = Worker(
            "ready-rooms",
            self.ready_rooms.work_once,
            poll_interval=READY_ROOMS_POLL_SECONDS,
            gather_for=REFILL_AFTER_SECONDS,
        )
        self.ready_rooms.on_taken = self.ready_rooms_worker.wake
        # Members' notices sent as their flag's push is recorded, ahead of their case
        # (bot/steps/notify_ahead.py): into rooms made ahead, so only with some kept.
        # Always there: reservations a run with rooms made ahead left are found at start
        # whatever `ready_dm_rooms` says now (none are made without rooms made ahead).
        self.notices_ahead = NoticesAhead(self.engine, self.ready_rooms, self.rooms)
        for part in self.parts.values():
            part.tools = Toolbox(
                db=self.engine,
                homeserver=self.homeserver,
                deployment=part.deployment,
                texts=part.texts,
                staff_room=part.staff_room,
                rooms=self.rooms,
                metrics=self.metrics,
                # Each community pages its own webhook, signed with its own secret.
                webhook=HttpWebhook(secret=part.deployment.policy.alert_webhook_secret),
                ready_rooms=self.ready_rooms,
                ahead=self.notices_ahead,
            )
        kits = {key: (build_steps(part.tools), part.tools) for key, part in self.parts.items()}
        first_steps, first_tools = kits.pop(first.id)
        self.steps = StepEngine(self.engine, first_steps, first_tools, others=kits)
        self.steps.on_outbox = self.outbox_worker.wake

        # ---- the inbox: each community's handlers, each event to its room's ----
        on_outbox = self.outbox_worker.wake
        referrals = {key: self._community_handlers(part) for key, part in self.parts.items()}
        self.refusal_reports = first.refusal_reports
        self.membership = first.membership
        self.staff_tools = first.staff_tools
        action_filter = ActionFilter(
            [community.policy for community in config.communities],
            self.rooms,
            bot_user_id=config.bot_user_id,
            can_decrypt=self.crypto is not None,
            power_of=self._known_power,
        )
        router = CommunityRouter(
            self.rooms,
            {key: part.handlers or {} for key, part in self.parts.items()},
            invite_community=self._invite_community,
            decline=self._no_ones_invite,
        )
        self.dispatcher = Dispatcher(
            self.engine,
            self.homeserver,
            Classifier(self.rooms, config.bot_user_id),
            router.handlers(),
            deployment=self.deployment,
            staff_room=self.staff_room,
            metrics=self.metrics,
            texts=self.texts,
            on_outbox=on_outbox,
            reports=self.refusal_reports,
            decrypter=self.crypto,
            lane_of=action_filter.lane,
            on_moved=self._wake_lane,
            hand_over_lanes=frozenset({FLAG_LANE}),
            staff_of=self._staff_of_room,
            told_ahead=self._told_ahead,
        )
        referral = referrals[first.id]

        def referral_of(event: dict[str, Any]) -> Referral:
            room_id = event.get("room_id", "")
            return referrals.get(self.rooms.community_of(room_id) or first.id, referral)

        # One worker a lane (bot/intake/accept.py): flags are worked the moment they arrive;
        # everything else in small batches.
        self.lane_workers = {
            FLAG_LANE: Worker("flags", lambda: self.dispatcher.work_lane(FLAG_LANE)),
            OTHER_LANE: Worker(
                "inbox", lambda: self.dispatcher.work_lane(OTHER_LANE), gather_for=0.1
            ),
            REFUSAL_LANE: Worker(
                "refusals", lambda: self.dispatcher.work_lane(REFUSAL_LANE), gather_for=0.1
            ),
            DECRYPT_LANE: Worker("decrypt", lambda: self.dispatcher.work_lane(DECRYPT_LANE)),
        }
        self.flag_worker = self.lane_workers[FLAG_LANE]
        self.inbox_worker = self.lane_workers[OTHER_LANE]
        self._workers = (
            *self.lane_workers.values(),
            self.outbox_worker,
            self.ready_rooms_worker,
        )
        self.intake = Intake(
            self.engine,
            action_filter,
            self.metrics,
            on_queued=self._wake_lane,
            on_state=self.room_state.state_changed,
            senders=self.recent_senders,
            busy_timeout=busy_timeout,
            # A flag goes to its lane in memory as it is recorded: no read of it back.
            hand_over=self.dispatcher.hand_over,
            writer_met=self._before_notice if self._devices_looked_up else None,
            foresee=lambda event: referral_of(event).foresee(event),
            plan_ahead=lambda event, now: referral_of(event).plan_ahead(event, now),
            ahead_recorded=self.notices_ahead.recorded,
        )
        self.reconciler = Reconciler(
            self.engine,
            self.homeserver,
            self.intake,
            self._watched_rooms,
            self.deployment.reconcile,
            is_flag=lambda event: action_filter.lane(event) in (FLAG_LANE, REFUSAL_LANE),
            is_staff_room=self.staff_rooms.is_staff_room,
            on_caught_up=lambda count: self.stranded.missed(
                count, first_round=self.catch_up.rounds == 0
            ),
        )
        # The catch-up that runs: the bot's own sync when Synapse lets the bot sync (a
        # namespace user, not the sender); else every watched room read in turn.
        self.catch_up: SafetyNet | Reconciler = self.reconciler
        if self.registration.lets_the_bot_sync(config):
            self.catch_up = SafetyNet(
                self.engine,
                BotSync(self.homeserver, self.crypto),
                self.reconciler,
                self.deployment.reconcile,
                bot_user_id=config.bot_user_id,
                joined_at=self._moderated_since,
                notice_reads=NoticeReads(self.engine, self.homeserver, self.deployment.provenance),
                on_interrupted=(
                    self.crypto.sync_failed if self.crypto is not None else lambda why: None
                ),
            )
        # A push Synapse stored and never sent: noticed by the gap it leaves, nudged out.
        self.stranded = StrandedWatch(
            self.metrics, lambda: self.homeserver.ping(self.config.appservice.id)
        )
        self.timers = Timers()
        self.health = HealthChecks(
            self.engine,
            self._health_engine,
            self.homeserver,
            self.staff_rooms,
            self.intake,
            self.metrics,
            connected=self.connected.is_set,
            crypto=self.crypto,
            encryption_problem=self.registration.encryption_problem(config),
            alert_deadline=config.policy.alert_deadline,
            staff_room_warning=self._staff_room_warning,
            extra={
                "ready_dm_rooms": self._ready_rooms_status,
                "transactions": self._transactions_status,
                "messages": self._messages_status,
                **({"moderation_user": self._moderation_status} if self.moderation else {}),
                **({"community_rooms": self._community_rooms_status} if self._finds_rooms else {}),
            },
        )
        self.port: int | None = None

    def _community_handlers(self, part: CommunityParts) -> Referral:
        """A community's handlers of its events (its settings, texts, staff room and
        staff); returns its referral (the intake asks it ahead about a flag's member)."""
        on_outbox = self.outbox_worker.wake
        deployment, texts, staff_room, staff = (
            part.deployment,
            part.texts,
            part.staff_room,
            part.staff,
        )
        part.refusal_reports = RefusalReports(
            self.engine,
            staff_room,
            deployment.policy.refusal_report_every,
            texts=texts,
            on_outbox=on_outbox,
            community=part.id,
        )
        referral = Referral(
            self.homeserver,
            deployment,
            staff,
            staff_room,
            self.metrics,
            room_state=self.room_state,
            reports=part.refusal_reports,
            texts=texts,
            on_case=self.steps.start_case,
            on_outbox=on_outbox,
            senders=self.recent_senders,
            watch_member=self.rooms.watch_member,
            is_moderated=self._moderated_by(part.id),
            before_notice=self._before_notice,
            begin=self.steps.begin,
            is_watched=self.rooms.is_watched,
            ahead=(self.notices_ahead, part.tools),
        )

        async def may_invite(user_id: str) -> bool:
            return await staff.may_invite_bot(user_id, deployment.extra_inviters)

        upgrades = part.upgrades = RoomUpgrades(
            self.engine,
            self.homeserver,
            deployment,
            staff_room,
            self.rooms,
            room_state=self.room_state,
            reports=part.refusal_reports,
            texts=texts,
            on_outbox=on_outbox,
        )
        part.membership = Membership(
            self.engine,
            self.homeserver,
            deployment,
            staff_room,
            self.rooms,
            may_invite=may_invite,
            room_state=self.room_state,
            reports=part.refusal_reports,
            texts=texts,
            on_outbox=on_outbox,
            on_staff_room_joined=part.staff_room_news.set,
            on_case=self.steps.start_case,
            upgrades=upgrades,
            on_space_joined=part.space_news.set,
            on_space_left=functools.partial(self._space_left, part.id),
            is_space=functools.partial(self._is_community_space, part.id),
        )
        if part.settings.space is not None:
            part.spaces = SpaceRooms(
                self.homeserver,
                self.rooms,
                community=part.id,
                space=part.settings.space,
                enrol=part.membership.enrol,
                claimed_twice=self._claimed_twice,
                joined=part.space_news,
            )
        checkins = CheckinEvents(
            self.engine,
            self.homeserver,
            deployment,
            staff_room,
            is_staff=staff.is_staff,
            on_outbox=on_outbox,
        )
        part.staff_tools = StaffTools(
            self.engine,
            deployment,
            staff_room,
            is_staff=staff.is_staff,
            checkins=checkins,
            room_admin=RoomAdmin(
                self.engine, self.homeserver, deployment, self.room_state, self.rooms
            ),
            enrol=part.membership.enrol,
            on_outbox=on_outbox,
            on_case_changed=self.steps.start_case,
        )
        relay = Relay(
            self.engine,
            self.homeserver,
            deployment,
            staff_room,
            self.rooms,
            texts=texts,
            on_outbox=on_outbox,
            awaits_case=self.notices_ahead.awaits_case,
        )
        policy_explainer = PolicyExplainer(
            self.engine, self.homeserver, deployment, self.rooms, texts=texts
        )
        part.handlers = {
            EventKind.FLAG: referral,
            EventKind.BOT_MEMBERSHIP: part.membership.bot_membership,
            EventKind.MEMBERSHIP: part.membership.member_event,
            EventKind.CHECKIN_MEMBERSHIP: checkins.membership,
            EventKind.POWER_LEVELS: part.membership.power_levels_changed,
            EventKind.TOMBSTONE: upgrades.tombstone,
            EventKind.STAFF_MESSAGE: part.staff_tools.message,
            EventKind.STAFF_REACTION: part.staff_tools.reaction,
            EventKind.MEMBER_MESSAGE: relay,
            EventKind.POLICY_REQUEST: policy_explainer.request,
            EventKind.POLICY_ROOM_MESSAGE: policy_explainer.written_to,
            **({EventKind.SPACE_CHILD: part.spaces.child_changed} if part.spaces else {}),
        }
        return referral

    def _moderated_by(self, community: str) -> Any:
        """Whether a room is one this community moderates: a flag in another community's
        room is never this one's to act on."""
        moderated, communities = self.rooms.moderated, self.rooms
        if len(self.parts) == 1:
            return moderated.__contains__  # one community: every room the bot moderates

        def moderates(room_id: str) -> bool:
            # A room of a community the config no longer has is no one's: refused.
            return room_id in moderated and communities.community_of(room_id) == community

        return moderates

    async def _invite_community(self, user_id: str, room_id: str) -> str | None:
        """Whose a room the bot is invited into is, when the room is of no known community:
        a staff room whose alias only now resolves; the replacement of an upgraded room
        (its old room's community); else the one community whose staff (or allowed
        inviters) the inviter is. None if none's, or more than one's (declined, until a
        community lists the room)."""
        for part in self.parts.values():
            if part.staff_room.room_id is None:
                with contextlib.suppress(HomeserverUnavailable):
                    await part.staff_room.resolve(self.homeserver)
            if part.staff_room.room_id == room_id:
                return part.id
        upgrades = next(iter(self.parts.values())).upgrades
        if (upgrade := await upgrades.awaited(room_id)) is not None:
            return self.rooms.community_of(upgrade.old_room_id)
        found = await self._inviters_communities(user_id)
        return found[0] if len(found) == 1 else None

    async def _inviters_communities(self, user_id: str) -> list[str]:
        """The communities whose staff (or allowed inviters) the user is."""
        return [
            key
            for key, part in self.parts.items()
            if await part.staff.may_invite_bot(user_id, part.deployment.extra_inviters)
        ]

    async def _staff_of_room(self, room_id: str) -> StaffOfRoom:
        """Who hears of trouble with an event in a room: its community's staff (a case's
        DM or check-in room: its case's), else the first community's."""
        community = await self.rooms.community_of_any(room_id, self.engine.connect)
        part = self.parts.get(community or "") or next(iter(self.parts.values()))
        return StaffOfRoom(part.staff_room, part.texts, part.refusal_reports)

    async def _is_community_space(self, community: str, room_id: str) -> bool:
        spaces = self.parts[community].spaces
        return spaces is not None and await spaces.is_space(room_id)

    def _space_left(self, community: str, by: str) -> None:
        spaces = self.parts[community].spaces
        if spaces is not None:
            spaces.left(by)

    @property
    def _finds_rooms(self) -> bool:
        """Some community has a Space, or lists a room by alias: found at start, and
        shown on /health until found."""
        return any(part.spaces is not None for part in self.parts.values()) or any(
            not address.startswith("!") for address in self.rooms.listed
        )

    async def _community_rooms_status(self) -> dict[str, Any]:
        """Whether each community's Space is read (its rooms claimed, and followed) and
        each room listed by alias resolved: until they are, their rooms' flags and
        invites are no one's (refused, declined)."""
        spaces = {
            part.id: {"space": part.spaces.configured, "ok": part.spaces.problem is None}
            | ({"error": part.spaces.problem} if part.spaces.problem else {})
            for part in self.parts.values()
            if part.spaces is not None
        }
        result: dict[str, Any] = {
            "ok": not self._listed_unresolved and all(s["ok"] for s in spaces.values())
        }
        if spaces:
            result["spaces"] = spaces
        if self._listed_unresolved:
            result["unresolved"] = dict(self._listed_unresolved)
        return result

    async def _claimed_twice(self, room_id: str, owner: str, claimant: str) -> None:
        """A room in one community's Space that is another's: recorded, and both staff
        rooms told (the room stays its owner's)."""
        names = await names_of(self.homeserver, [room_id])
        room = place(room_id, names.get(room_id))
        owner_name = self.parts[owner].settings.name
        claimant_name = self.parts[claimant].settings.name
        await self._record_and_tell(
            "room_claimed_twice",
            facts={"owner": owner, "claimed_by": claimant},
            personal={"room": room_id},
            content=lambda texts: texts.room_claimed_twice(
                room=room, owner=owner_name, claimant=claimant_name
            ),
            communities={owner, claimant},
        )

    async def _no_ones_invite(self, handling: Handling) -> None:
        """An invite into a room of no community. From someone who is staff of several:
        held, and each of those communities' staff asked whose it is (`!rooms claim`).
        From anyone else: declined, recorded, and logged for the operator; no staff room
        is told (whose would it be?)."""
        item = handling.item
        inviter = item.payload.get("sender", "")
        now = dt.datetime.now(dt.UTC)
        candidates = await self._inviters_communities(inviter)
        if len(candidates) > 1:
            self.rooms.held_invites[item.room_id] = set(candidates)
            names = await names_of(self.homeserver, [item.room_id])
            room = place(item.room_id, names.get(item.room_id))
            async with handling.transaction() as conn:
                await rooms.hold_invite(conn, item.room_id, set(candidates), now)
                await audit.append(
                    conn,
                    self.deployment.provenance,
                    "invite_held",
                    facts={"communities": sorted(candidates)},
                    personal={"room": item.room_id, "inviter": inviter},
                    at=now,
                )
                for community in candidates:
                    part = self.parts[community]
                    await outbox.queue(
                        conn,
                        part.staff_room.address,
                        part.texts.room_whose(inviter=inviter, room=room, room_id=item.room_id),
                        now,
                    )
            self.outbox_worker.wake()
            return
        async with declined_invite(
            self.homeserver, handling, self.deployment.provenance, "no community's", now
        ):
            pass
        log.warning(
            "declined %s's invite into %s: the room belongs to no community (list it under "
            "a community's rooms: to have the bot moderate it)",
            inviter,
            item.room_id,
        )

    def _texts_of_room(self, room_id: str) -> Texts:
        community = self.staff_rooms.community_of(room_id)
        return self.parts[community].texts if community in self.parts else self.texts

    # ---- start ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self._lock.acquire()
        try:
            await upgrade(self.engine)
            database = self.config.sqlite_path
            files = [] if database is None else [database, *sqlite_journal(database)]
            protect_files(*files, self.config.crypto_store if self.crypto is not None else None)
            self._lock_held.set()
            self._lock.watch(self._lock_lost, self._lock_regained, self._lock_taken)
            for part in self.parts.values():
                await part.staff_room.load_pin()
            await self._load_rooms()
            for warning in [
                *self.config.resources_unchosen,
                *self.config.language_warnings,
                *self.config.alias_warnings,
            ]:
                log.warning(warning)
            for resource in self.config.stale_resources():
                log.warning(
                    "crisis resource %r was last verified on %s: check it is still right",
                    resource.name,
                    resource.verified_on,
                )
            server = AppServiceServer(
                self.intake,
                self.registration.hs_token,
                self.metrics,
                self.health.report,
                refresh_metrics=self._refresh_metrics,
                admin_token=self.config.appservice.admin_token,
                stranded=self.stranded,
            )
            self._runner = web.AppRunner(server.app(), access_log=None)
            await self._runner.setup()
            listen = self.config.appservice.listen
            site = web.TCPSite(self._runner, listen.host, listen.port)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self.port = sockets[0].getsockname()[1] if sockets else listen.port
            log.info("listening on %s:%s", listen.host, self.port)
            self._background.append(asyncio.create_task(self._connect(), name="connect"))
            self._background.append(asyncio.create_task(self.stranded.run(), name="stranded"))
        except BaseException:
            await self.stop()
            raise

    async def _load_rooms(self) -> None:
        """What the hot path must know of rooms before the first transaction."""
        async with self.engine.connect() as conn:
            known = await cases.rooms_of_cases(conn)
            former = await retention.former_room_ids(conn)
            moderated_rooms = await rooms.moderated(conn)
            moderated = [room.room_id for room in moderated_rooms]
            policy_dms = await policy_rooms.room_ids(conn)
            held_invites = await rooms.held(conn)
            self.reconciler.first_started = await positions.database_first_started(conn)
            with_cases = await cases.communities_with_cases(conn)
        if stranded := sorted(with_cases - set(self.parts)):
            # Their steps and their staff are gone from the config: nobody would hear.
            raise ConfigError(
                f"cases belong to the community {', '.join(map(repr, stranded))}, which the "
                "config no longer has: keep it under communities: (an install that had none: "
                "a community with id default) until retention has purged its cases"
            )
        for room in moderated_rooms:
            if room.community in self.parts:
                self.rooms.community[room.room_id] = room.community
            else:
                log.error(
                    "the room %s belongs to the community %r, which the config does not "
                    "have: flags there are refused until a community lists it under rooms:",
                    room.room_id,
                    room.community,
                )
        self.rooms.know(
            watched=known.watched,
            # Rooms of purged cases the bot could not leave: a former member may write there.
            dms=known.dms | set(former),
            checkins=known.checkins,
            moderated=moderated,
            policy=policy_dms,
        )
        moderated_now = set(moderated)
        for room_id, communities in held_invites.items():
            # Claimed just before a restart (joined, the hold not yet released): moderated.
            if room_id not in moderated_now and (configured := communities & set(self.parts)):
                self.rooms.held_invites[room_id] = configured
        await self.ready_rooms.load()
        await self.notices_ahead.load()

    async def _connect(self) -> None:
        """Register the bot and ping, retrying until the homeserver answers; then the rest."""
        while True:
            try:
                await self.homeserver.ensure_registered(self.config.appservice.bot_displayname)
                pong = await self.homeserver.ping(self.config.appservice.id)
                if isinstance(pong, Refused):
                    log.warning("homeserver ping refused: %s", pong)
                break
            except HomeserverUnavailable as exc:
                log.warning("homeserver not reachable yet (%s); retrying", exc)
                await asyncio.sleep(self._connect_retry)
        # A twin whose lock connection just dropped must have stopped before we act.
        await asyncio.sleep(self._lock.settle_seconds)
        if self.crypto is not None:
            self._background.append(asyncio.create_task(self.crypto.run(), name="crypto"))
        if self.moderation is not None:
            self._background.append(asyncio.create_task(self.moderation.run(), name="moderation"))
        await self._join_staff_room()
        if problem := await self._resolve_listed_rooms():
            self._background.append(
                asyncio.create_task(self._keep_resolving_listed_rooms(problem), name="listed-rooms")
            )
        for part in self.parts.values():
            if part.spaces is not None:
                self._background.append(
                    asyncio.create_task(
                        part.spaces.keep_loaded(
                            first_pause=self._connect_retry, longest_pause=RETRY_MAX
                        ),
                        name=f"space:{part.id}",
                    )
                )
        async with self._pause_resume:
            # Nothing acts without the instance lock (a PostgreSQL blip may have taken it).
            await self._lock_held.wait()
            for worker in self._workers:
                worker.start()
            self.steps.start()
            self.timers.start()
            now = dt.datetime.now(dt.UTC)
            self.timers.every("housekeeping", HOUSEKEEPING_EVERY, self.housekeeping, first=now)
            for part in self.parts.values():
                # Each community's own jobs (named as they always were with one): the one
                # chain's head to every community's staff, so any of them can check it.
                suffix = f":{part.id}" if len(self.parts) > 1 else ""
                self.timers.every(
                    f"post-chain-head{suffix}", CHAIN_HEAD_EVERY, part.staff_tools.post_chain_head
                )
                self.timers.every(
                    f"refusal-reports{suffix}", REFUSAL_FLUSH_EVERY, part.refusal_reports.flush
                )
            self.catch_up.start()
            self._acting = self._started = True
        await self._warm_room_state()
        self._background.append(asyncio.create_task(self._probe(), name="probe"))
        self._background.append(asyncio.create_task(self._watch_database(), name="database"))
        self.connected.set()
        log.info("connected to the homeserver as %s", self.config.bot_user_id)

    def _encryption_broken(self, why: str | None) -> None:
        """The crypto store stopped working (why), or works again (None): recorded, and
        staff told, in the clear (the message says nothing of any case)."""
        self._in_background(self._report_encryption(why))

    async def _report_encryption(self, why: str | None) -> None:
        async with self._encryption_reports:  # "failed" and "works again", in order
            await self._record_and_tell(
                "encryption_failed" if why else "encryption_restored",
                facts={},
                personal={"why": why} if why else {},
                content=lambda texts: texts.encryption_broken(why=why),
                plain=why is not None,
            )

    async def _moderation_news(self, room_id: str, why: str | None) -> None:
        """The moderation user cannot act in a room (the bot acts there, under its own
        name), or can again: recorded, and staff told."""
        assert self.moderation is not None
        moderator = self.moderation.user_id
        kind = "moderation_user_unseated" if why else "moderation_user_seated"

        def content(texts: Texts) -> dict[str, Any]:
            if why is None:
                return texts.moderation_seated(moderator=moderator, room=room_id)
            return texts.moderation_unseated(moderator=moderator, room=room_id, why=why)

        await self._record_and_tell(
            kind,
            facts={},
            personal={"room": room_id, **({"why": why} if why else {})},
            content=content,
            # The room's community's staff alone: the room is theirs (no community's:
            # the first's, never every community's).
            communities={self.rooms.community_of(room_id) or next(iter(self.parts))},
        )

    async def _record_and_tell(
        self,
        kind: str,
        *,
        facts: dict[str, Any],
        personal: dict[str, Any],
        content: Callable[[Texts], dict[str, Any]],
        plain: bool = False,
        communities: Collection[str] | None = None,
    ) -> None:
        """Something about the service itself (not a case): an audit entry, and a staff
        message queued with it for every community's staff (each in its language),
        however long the database takes to record again (the store and the database
        often share a disk that filled up). `content`: how to word the message in a
        community's texts."""
        delay = 1.0
        while True:
            now = dt.datetime.now(dt.UTC)
            try:
                async with self.engine.begin() as conn:
                    await audit.append(
                        conn,
                        self.deployment.provenance,
                        kind,
                        facts=facts,
                        personal=personal,
                        at=now,
                    )
                    for part in self.parts.values():
                        if communities is not None and part.id not in communities:
                            continue
                        await outbox.queue(
                            conn, part.staff_room.address, content(part.texts), now, plain=plain
                        )
                break
            except Exception as exc:
                log.warning("could not record %s yet (%s)", kind, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        self.outbox_worker.wake()

    def _room_key_arrived(self) -> None:
        """A room key came: encrypted events waiting for one are worth trying again now."""
        self._in_background(self._bring_forward("encrypted events", self.dispatcher.keys_arrived()))

    async def _bring_forward(self, what: str, waiting: Awaitable[None]) -> None:
        """Events waiting to be retried made due now (`waiting`), and every lane woken to take
        them. If that write fails, their backoff still ends: late, never lost."""
        try:
            await waiting
        except Exception:
            log.warning("could not bring %s forward", what, exc_info=True)
        for worker in self.lane_workers.values():
            worker.wake()

    async def _probe(self) -> None:
        """Watch the homeserver: when it answers again after an outage, catch up at once."""
        was_down = False
        while True:
            await asyncio.sleep(PROBE_SECONDS)
            down = await self.homeserver.check() is not None
            if down and not was_down:
                # What we knew of rooms may have changed meanwhile, unseen.
                self.room_state.forget_everything()
            if was_down and not down:
                log.info("the homeserver answers again: catching up")
                self.catch_up.trigger()
                # What waited out the outage goes now, not at the end of its backoff.
                await self._bring_forward("the waiting events", self.dispatcher.homeserver_back())
                await self._warm_room_state()
                await self.steps.retry_waiting()
                self.outbox_worker.wake()
            was_down = down

    async def _watch_database(self) -> None:
        """When a push could not be recorded (a full disk, a lock held too long): notice the
        moment the database records again, and make everything that waited go at once.

        Synapse retries a refused push with a growing backoff (minutes, after a long
        outage): a ping makes it send what it holds now, and catch-up finds anything it
        dropped meanwhile."""
        answered: dt.datetime | None = None  # the refused push already followed up
        while True:
            await asyncio.sleep(DATABASE_PROBE_SECONDS)
            failed_at = self.intake.last_write_failed_at
            if (
                self.intake.last_write_error is None
                or failed_at == answered
                or self.intake.paused is not None
            ):
                continue
            try:
                # The refusal stays on /health until a push is recorded again (a heartbeat
                # can succeed where a bigger write fails): this only makes that come soon.
                await write_heartbeat(self.engine)
                log.warning("the database records again: asking the homeserver to resend now")
                answered = failed_at
                with contextlib.suppress(HomeserverUnavailable):
                    await self.homeserver.ping(self.config.appservice.id)
                self.catch_up.trigger()
                await self.steps.retry_waiting()
                self.outbox_worker.wake()
            except Exception as exc:
                log.debug("the database does not record yet: %s", exc)

    async def _warm_room_state(self) -> None:
        """Know what a flag's decision needs ahead of the first flag (read off any flag's
        path): each moderated room's state, the staff room's, the bot's m.direct."""
        async with self.engine.connect() as conn:
            for room in await rooms.moderated(conn):
                self.room_state.warm(room.room_id)
        for part in self.parts.values():
            if part.staff_room.room_id is not None:
                self.room_state.warm(part.staff_room.room_id)
        with contextlib.suppress(HomeserverUnavailable):
            await self.homeserver.direct_rooms()

    async def _transactions_status(self) -> dict[str, Any]:
        return self.stranded.status()

    async def _messages_status(self) -> dict[str, Any]:
        """The texts' language, and whether a native speaker has reviewed it: a warning,
        not a fault (the service works, and a 503 for ever would hide real faults)."""
        status: dict[str, Any] = {"ok": True, "language": self.config.language}
        if self.config.file.communities is not None:
            status["languages"] = {c.id: c.language for c in self.config.communities}
        if warnings := self.config.language_warnings:
            status["warning"] = "; ".join(warnings)
        return status

    def _told_ahead(self, event_id: str) -> bool:
        """Whether the flag's member was told as its push was recorded."""
        return self.notices_ahead.of_flag(event_id) is not None

    async def _ready_rooms_status(self) -> dict[str, Any]:
        return self.ready_rooms.status()

    async def _moderation_status(self) -> dict[str, Any]:
        """Where the moderation user cannot act (the bot acts there: nobody is left in
        the room at risk, but the room sees "Safeguarding" do it)."""
        assert self.moderation is not None
        status: dict[str, Any] = {"ok": True, **self.moderation.status()}
        if status["not_seated"]:
            status["warning"] = (
                f"the bot acts in {len(status['not_seated'])} room(s) where "
                f"{self.moderation.user_id} cannot (see not_seated)"
            )
        return status

    @property
    def _devices_looked_up(self) -> bool:
        """Members' notices are encrypted: their devices are read ahead of any flag."""
        return self.crypto is not None and self.deployment.encrypt_private_rooms

    def _before_notice(self, member: str) -> bool:
        """Someone writing in a moderated room (the message a flag would name arrives
        before the flag), a possible flag arriving (Referral.foresee), or one accepted on
        a member it had to read the message to know: their devices read meanwhile, so an
        encrypted notice's key goes out without waiting for that read. (Asked again, they
        are not read again: the device follows them from the first answer, the sync
        saying when their devices change.) False: not asked now (the device not ready)."""
        if self.crypto is not None and self.deployment.encrypt_private_rooms:
            return self.crypto.look_up_devices(member)
        return False

    def _wake_lane(self, lane: int) -> None:
        self.lane_workers[lane].wake()
        if lane == FLAG_LANE and isinstance(self.catch_up, SafetyNet):
            self.catch_up.hold()  # the flag's calls first, its burst in one answer after

    def _staff_room_warning(self) -> str | None:
        """What an operator should know of the staff rooms that stops nothing, from what
        is known ahead (no read): does joining one make anyone staff; are members'
        encrypted replies copied into it in the clear (safety first: they are relayed
        all the same)."""
        warnings = [
            self.config.about(part.settings, warning)
            for part in self.parts.values()
            if (warning := self._one_staff_room_warning(part)) is not None
        ]
        warning = "; ".join(warnings) or None
        if warning and warning != self._staff_room_warned:
            log.warning("%s", warning)
        self._staff_room_warned = warning
        return warning

    def _one_staff_room_warning(self, part: CommunityParts) -> str | None:
        room_id = part.staff_room.room_id
        if room_id is None:
            return None
        warnings = []
        if part.staff.everyone_is_staff(self.room_state.current(room_id)):
            warnings.append(
                "anyone who joins the staff room is staff: its power levels' users_default "
                "reaches policy.staff_power_level (lower the default, or raise the level)"
            )
        if (
            self.crypto is not None
            and self.deployment.encrypt_private_rooms
            and self.crypto.known_encrypted(room_id) is False
        ):
            warnings.append(
                "the staff room is not encrypted: members' replies from their encrypted DMs "
                "are copied into it in the clear (turn encryption on in the staff room)"
            )
        return "; ".join(warnings) or None

    def _known_power(self, room_id: str, user_id: str) -> float | None:
        """A sender's power in a room, as known from pushed state (None: not known now)."""
        state = self.room_state.current(room_id)
        return None if state is None else power_level(user_id, state)

    async def _watched_rooms(self) -> list[tuple[str, dt.datetime | None]]:
        """Rooms whose events we must not miss: moderated, staff, open cases' private rooms."""
        async with self.engine.connect() as conn:
            moderated = await rooms.moderated(conn)
            private = await cases.open_private_rooms(conn)
        watched: list[tuple[str, dt.datetime | None]] = [
            (room.room_id, room.joined_at) for room in moderated
        ]
        watched.extend((room.room_id, None) for room in self.staff_rooms if room.room_id)
        watched.extend((room_id, None) for room_id in sorted(private))
        return watched

    async def _moderated_since(self) -> dict[str, dt.datetime | None]:
        """When the bot was put in each room it moderates."""
        async with self.engine.connect() as conn:
            return {room.room_id: room.joined_at for room in await rooms.moderated(conn)}

    async def _join_staff_room(self) -> None:
        """Every community's staff room: tried once now; one that is not ready is kept
        trying in the background (each on its own: one not ready holds no other back).

        Whatever is for staff waits for the room (see bot.rooms.staff_room) rather than being
        dropped, so an alias created or an invite sent after the service started is enough.
        """
        for part in self.parts.values():
            staff_room = part.staff_room
            try:
                problem = await staff_room.connect(self.homeserver)
            except HomeserverUnavailable as exc:
                problem = f"the homeserver is not reachable ({exc})"
            if problem is not None:
                log.error("%s; staff messages wait until it is fixed", problem)
                self._background.append(
                    asyncio.create_task(
                        self._keep_joining_staff_room(part, problem),
                        name=f"staff-room:{part.id}",
                    )
                )
            else:
                await self._learn_staff_room_encryption(staff_room)

    async def _resolve_listed_rooms(self) -> str | None:
        """The rooms communities list by alias, known by their ids: an invite there is
        that community's, whoever sends it (a room id listed needs nothing). Returns what
        is left unresolved (None: nothing), kept for /health and tried again meanwhile."""
        for address in list(self._listed_unresolved):
            community = self.rooms.listed[address]
            try:
                resolved = await self.homeserver.resolve_room(address)
            except HomeserverUnavailable as exc:
                problem = f"the homeserver is not reachable ({exc})"
            else:
                if not isinstance(resolved, Refused):
                    del self._listed_unresolved[address]
                    owner = self.rooms.community_of(resolved)
                    if owner is not None and owner != community:
                        log.warning(
                            "%s (listed by %s) is %s, which is %s's already: it stays %s's",
                            address,
                            community,
                            resolved,
                            owner,
                            owner,
                        )
                    self.rooms.listed.setdefault(resolved, community)
                    continue
                problem = f"does not resolve ({resolved})"
            if self._listed_unresolved.get(address) != problem:  # logged as it changes
                log.warning("%s (listed by %s): %s", address, community, problem)
            self._listed_unresolved[address] = problem
        if not self._listed_unresolved:
            return None
        return f"{len(self._listed_unresolved)} listed room(s) not resolved yet"

    async def _keep_resolving_listed_rooms(self, problem: str) -> None:
        await until_done(
            self._resolve_listed_rooms,
            problem=problem,
            what="the rooms communities list by alias",
            first_pause=self._connect_retry,
            longest_pause=RETRY_MAX,
        )
        log.info("every room the communities list is known by its id")

    async def _learn_staff_room_encryption(self, staff_room: StaffRoom) -> None:
        """Whether the staff room is encrypted, known from the start (no full-state sync
        tells the device): /health warns of one in the clear (`_staff_room_warning`)."""
        room_id = staff_room.room_id
        if room_id is None:
            return
        try:
            await self.homeserver.room_is_encrypted(room_id)
        except HomeserverUnavailable as exc:  # known at the first message to staff instead
            log.warning("could not read whether the staff room is encrypted: %s", exc)

    async def _keep_joining_staff_room(self, part: CommunityParts, problem: str) -> None:
        staff_room = part.staff_room
        await until_done(
            lambda: staff_room.connect(self.homeserver),
            problem=problem,
            what=f"staff room ({part.id}); staff messages wait until it is fixed",
            first_pause=self._connect_retry,
            longest_pause=RETRY_MAX,
            # An invite to the staff room cuts the wait short.
            news=part.staff_room_news,
        )
        log.info("joined the staff room %s", staff_room.room_id)
        if staff_room.room_id is not None:
            self.room_state.warm(staff_room.room_id)
        await self._learn_staff_room_encryption(staff_room)
        await self.steps.retry_waiting()
        self.outbox_worker.wake()

    # ---- timed jobs --------------------------------------------------------------------

    async def housekeeping(self) -> None:
        """Hourly: forget old delivery bookkeeping, apply audit retention, refresh gauges."""
        retention = dt.timedelta(days=self.config.file.database.dedupe_retention_days)
        async with self.engine.begin() as conn:
            await ingest.prune(conn, dt.datetime.now(dt.UTC) - retention)
        purged = await purge(
            self.engine, self.deployment.provenance, self.deployment.retention_days
        )
        await checkpoint(self.engine)
        if purged.cases:
            log.info("retention purged %d case(s)", purged.cases)
        if purged.scheduled:
            log.info("retention: purging %d case(s) on the homeserver too", len(purged.scheduled))
            self.steps.wake()
        await self._refresh_metrics()

    async def _refresh_metrics(self) -> None:
        """Gauges that live in the database are read when Prometheus scrapes."""
        await self.health.checkins()
        async with self.engine.connect() as conn:
            self.metrics.inbox_backlog.set(await ingest.backlog(conn))
            self.metrics.audit_entries.set((await audit.head(conn))[0])

    # ---- faults ----------------------------------------------------------------------------

    def _template_fell_back(self, name: str, problem: str) -> None:
        """A template failed at run time: record it and tell staff (once per template)."""
        self._in_background(self._report_fallback(name, problem))

    async def _report_fallback(self, name: str, problem: str) -> None:
        await self._record_and_tell(
            "template_fallback",
            facts={"template": name, "problem": problem},
            personal={},
            content=lambda texts: texts.template_fallback(name=name, problem=problem),
        )

    def _lock_lost(self, why: str) -> None:
        """The instance lock is gone (its PostgreSQL connection broke): an outage, not the
        end. Nothing acts until it is held again: no step runs, pushes are answered 503
        (Synapse retries them), and the lock is taken again as soon as the database
        answers (appservice/database.py)."""
        log.error("%s: every case waits until the lock is held again", why)
        self._lock_held.clear()
        self.intake.pause(f"{why}: waiting to hold it again")
        self._in_background(self._pause())

    def _lock_regained(self) -> None:
        log.warning("the instance lock is held again: every case goes on")
        self._lock_held.set()
        self.intake.resume()
        self._in_background(self._resume())

    def _lock_taken(self, why: str) -> None:
        """Another instance acts now: stop before acting beside it (exit non-zero)."""
        log.critical("%s: stopping so that no second instance acts beside this one", why)
        self.fatal = why
        self.stopped.set()

    def _in_background(self, work: Any) -> None:
        """Run `work` off the caller's path (a callback cannot await), kept until done."""
        task = asyncio.get_running_loop().create_task(work)
        self._fallbacks.add(task)
        task.add_done_callback(self._fallbacks.discard)

    async def _pause(self) -> None:
        async with self._pause_resume:
            if not self._acting or self._lock_held.is_set():
                return
            await self.catch_up.stop()
            await asyncio.gather(*(worker.stop() for worker in self._workers))
            await self.steps.stop()
            self.timers.pause()
            self._acting = False

    async def _resume(self) -> None:
        async with self._pause_resume:
            if self._acting or not self._started or not self._lock_held.is_set():
                return
            for worker in self._workers:
                worker.start()
            self.steps.start()
            self.timers.resume()
            self.catch_up.start()
            self._acting = True
        # Whatever started before the blip, and whatever Synapse retried meanwhile.
        await self.steps.retry_waiting()
        self.catch_up.trigger()

    # ---- stop --------------------------------------------------------------------------------

    async def stop(self) -> None:
        if self._fallbacks:
            # Work done off a callback's path (a record, a pause) gets the same grace as
            # the workers; one still waiting for the database after it is cut short.
            await asyncio.wait(set(self._fallbacks), timeout=STOP_GRACE_SECONDS)
            for task in list(self._fallbacks):
                task.cancel()
            await asyncio.gather(*self._fallbacks, return_exceptions=True)
        await self.catch_up.stop()
        await asyncio.gather(*(worker.stop() for worker in self._workers))
        await self.steps.stop()
        await self.timers.stop()
        for task in self._background:
            task.cancel()
        for task in self._background:
            # One that died of an error was logged where it died (or is logged here): the
            # rest of stopping (the server, the database, the lock) goes on regardless.
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("background task %s had failed", task.get_name())
        self._background.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.room_state.close()
        if self.crypto is not None:
            await self.crypto.close()
        await self.homeserver.close()
        await self.intake.close()
        await self.engine.dispose()
        await self._health_engine.dispose()
        await self._lock.release()

    async def __aenter__(self) -> Service:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
