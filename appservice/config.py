"""Load and validate config.yaml; every problem is one clear line naming the key.

Relative paths (the registration file, a SQLite database) are resolved against
the directory of the config file, so `safeguard run -c /etc/safeguard/config.yaml`
works from any working directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from appservice.errors import ConfigError
from appservice.registration import load_registration
from appservice.webhook import webhook_problem
from bot.config.resource_packs import PACKS, pack_for
from bot.config.settings import (
    DEFAULT_RETENTION_DAYS,
    AuditSettings,
    CheckinSettings,
    MessageTemplates,
    PolicySettings,
    ReconcileSettings,
    Resource,
    coerce_duration,
    default_resources,
)
from bot.texts.catalogues import SOURCE_LANGUAGE, CatalogueMissing, language
from bot.texts.templates import validate_templates

DEFAULT_CONFIG_PATH = "config.yaml"
# Said by `check-config` and the doctor when neither `region` nor `resources` is set.
UNCHOSEN_RESOURCES = (
    "neither region nor resources is set: members are shown the UK (England) crisis "
    f"resources; set region: ({', '.join(PACKS)}) or list your own under resources:"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HomeserverSettings(_Strict):
    url: str = Field(pattern=r"^https?://[^/\s]+")
    domain: str = Field(min_length=1, pattern=r"^[A-Za-z0-9.\-:\[\]]+$")


class ListenSettings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=29333, ge=0, le=65535)


class AppserviceSettings(_Strict):
    id: str = Field(default="safeguard", min_length=1)
    bot_localpart: str = Field(default="safeguard", pattern=r"^[a-z0-9._=\-/+]+$")
    bot_displayname: str = "Safeguarding"
    listen: ListenSettings = ListenSettings()
    url: str = Field(pattern=r"^https?://[^/\s]+")
    registration: str = "registration.yaml"
    # Who besides staff may invite the bot into a room (user ids or * globs). Staff
    # always may; by default no one else.
    allowed_inviters: list[Annotated[str, Field(pattern=r"^@.+")]] = Field(default_factory=list)
    # What `GET /health?detail=1` asks for (as a Bearer token): the detail names rooms,
    # cases and errors, so it is for operators only. None: the detail is not served.
    admin_token: str | None = Field(default=None, min_length=16)
    # A second user of the namespace that removes members, redacts flags and posts the
    # room notice in group rooms, so the room sees no user called "Safeguarding" act.
    # It needs the power to kick, redact and post in each group room (the bot gives it
    # that when the bot may change power levels there). None: the bot does it all.
    moderation_localpart: str | None = Field(default=None, pattern=r"^[a-z0-9._=\-/+]+$")
    moderation_displayname: str = "Moderator"


class DatabaseSettings(_Strict):
    url: str = "sqlite+aiosqlite:///safeguard.db"
    # How long a write may wait for the database (SQLite's lock, a PostgreSQL connection)
    # before giving up: a transaction push that cannot be recorded is answered 503 by then.
    busy_timeout: Annotated[dt.timedelta, Field(gt=dt.timedelta(0))] = dt.timedelta(seconds=5)

    _duration = field_validator("busy_timeout", mode="before")(coerce_duration)
    # Processed transaction and event ids are kept this long, then pruned.
    dedupe_retention_days: int = Field(default=7, ge=1)

    @field_validator("url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        try:
            url = make_url(value)
        except ArgumentError as exc:
            raise ValueError("not a database URL") from exc
        if url.drivername not in ("sqlite+aiosqlite", "postgresql+asyncpg"):
            raise ValueError(
                f"driver {url.drivername!r} is not supported: use sqlite+aiosqlite:///FILE "
                "or postgresql+asyncpg://USER@HOST/DB"
            )
        return value


class EncryptionSettings(_Strict):
    """End-to-end encryption (appservice/crypto.py): the bot's device and its store."""

    enabled: bool = True
    # The crypto store (the device's keys): default beside the SQLite database, or
    # beside the config file on PostgreSQL. Back it up with the database.
    store: str | None = None
    # The bot's own rooms (the member's DM, the check-in, the moderator's debrief) are
    # created encrypted.
    private_rooms: bool = True
    # When a message cannot be encrypted within `fallback_after` for a reason of
    # encryption (the device not ready, a room not yet in its sync, a broken store):
    # `plain` sends it in the clear instead (a member's notice, check-in, debrief; a
    # short "Case #N needs you" into the staff room), said so in the record and to staff;
    # `none` keeps everything encrypted and relies on `policy.alert_deadline`.
    fallback: Literal["plain", "none"] = "plain"
    fallback_after: Annotated[dt.timedelta, Field(gt=dt.timedelta(0))] = dt.timedelta(seconds=20)
    # Room keys go only to devices their owner cross-signed ("verified" in Element), when
    # the bot encrypts and when a device asks for a key again. A member who has not
    # verified a device cannot read the bot's messages on it.
    verified_only: bool = False

    _duration = field_validator("fallback_after", mode="before")(coerce_duration)


class LoggingSettings(_Strict):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


def known_region(region: str | None) -> str | None:
    """A region with built-in crisis resources, as the pack spells it (None: none set)."""
    if region is None:
        return None
    pack = pack_for(region)
    if pack is None:
        known = ", ".join(PACKS)
        raise ValueError(
            f"no built-in crisis resources for region {region!r} (there are: {known}); "
            "list your own under resources:"
        )
    return pack.region


def shipped_language(code: str | None) -> str | None:
    """A language with a catalogue in the package. Loaded here, so a catalogue that is
    missing or was never compiled stops check-config, not the service's start."""
    if code is None:
        return None
    try:
        language(code)
    except CatalogueMissing as exc:
        raise ValueError(str(exc)) from None
    return code


UserId = Annotated[str, Field(pattern=r"^@[^:]+:.+$")]
RoomAddress = Annotated[str, Field(pattern=r"^[!#].+")]
# The sections a community may override key by key; what it does not set comes from
# the top level. Who its staff are and where they meet are its own keys, never these.
OVERRIDABLE = {"policy": PolicySettings, "checkin": CheckinSettings, "messages": MessageTemplates}
OWN_KEYS = ("staff_room", "staff")
# Policy keys of the install as a whole (one retention sweep, one pool of rooms made
# ahead, one policy version in the record, one alert deadline /health watches).
INSTALL_WIDE = ("retention_days", "ready_dm_rooms", "policy_version", "alert_deadline")


class CommunitySettings(_Strict):
    """One of the groups an install serves (README: Communities): its own staff, rooms,
    crisis resources, language, and any policy, checkin or messages key it overrides."""

    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    name: str = Field(min_length=1, max_length=100)
    staff_room: RoomAddress
    staff: list[UserId] = Field(default_factory=list)
    # Its group rooms (ids or aliases); rooms its staff add the bot to are its own too.
    rooms: list[RoomAddress] = Field(default_factory=list)
    # A Space whose rooms are its own (walked to depth 3; rooms added later followed).
    space: RoomAddress | None = None
    language: str | None = None
    region: str | None = None
    resources: list[Resource] | None = Field(default=None, min_length=1)
    policy: dict[str, Any] = Field(default_factory=dict)
    checkin: dict[str, Any] = Field(default_factory=dict)
    messages: dict[str, Any] = Field(default_factory=dict)

    _region = field_validator("region")(classmethod(lambda cls, v: known_region(v)))
    _language = field_validator("language")(classmethod(lambda cls, v: shipped_language(v)))

    @field_validator("policy")
    @classmethod
    def _not_own_keys(cls, policy: dict[str, Any]) -> dict[str, Any]:
        for key in OWN_KEYS:
            if key in policy:
                raise ValueError(
                    f"{key} is the community's own key (communities[].{key}), not a policy one"
                )
        for key in INSTALL_WIDE:
            if key in policy:
                raise ValueError(f"{key} is the whole install's: set policy.{key} at the top level")
        return policy


@dataclass(frozen=True)
class Community:
    """A community as the service runs it: every setting resolved, the top level's
    where it sets nothing of its own."""

    id: str
    name: str
    policy: PolicySettings  # with its staff_room and staff
    checkin: CheckinSettings
    messages: MessageTemplates
    resources: tuple[Resource, ...]
    language: str
    rooms: tuple[str, ...]
    space: str | None
    # It chose no crisis resources of its own (a community: no region or resources of
    # its own; the install without communities: neither at the top level).
    resources_unchosen: bool

    @property
    def language_warning(self) -> str | None:
        """While its language is not marked reviewed by a native speaker
        (`messages.reviewed_locales`): a crisis message that reads wrongly can do harm."""
        code = self.language
        if code == SOURCE_LANGUAGE or code in self.messages.reviewed_locales:
            return None  # English is the texts' source, written and reviewed here
        return (
            f"language {code!r}: its built-in texts are not marked reviewed "
            f"(messages.reviewed_locales: {self.messages.reviewed_locales}): have a native "
            "speaker read every message members, moderators and staff will get "
            f"(bot/texts/locale/{code}), then add {code!r} there"
        )


DEFAULT_COMMUNITY_ID = "default"


class ConfigFile(_Strict):
    homeserver: HomeserverSettings
    appservice: AppserviceSettings
    database: DatabaseSettings = DatabaseSettings()
    policy: PolicySettings = PolicySettings()
    checkin: CheckinSettings = CheckinSettings()
    messages: MessageTemplates = MessageTemplates()
    # The built-in crisis resources of a region (bot/config/resource_packs.py), used
    # unless `resources` lists the install's own.
    region: str | None = None
    resources: list[Resource] | None = Field(default=None, min_length=1)
    resources_max_age_days: int = Field(default=365, ge=1)
    # The language of every text people read (bot/texts/catalogues.py): en, or a
    # language with a catalogue in the package (cy).
    language: str = SOURCE_LANGUAGE
    # Several communities on one install (README: Communities); unset, the install is
    # the one community `default`, made of the keys above.
    communities: list[CommunitySettings] | None = Field(default=None, min_length=1)
    audit: AuditSettings = AuditSettings()
    reconcile: ReconcileSettings = ReconcileSettings()
    encryption: EncryptionSettings = EncryptionSettings()
    logging: LoggingSettings = LoggingSettings()

    _region = field_validator("region")(classmethod(lambda cls, v: known_region(v)))
    _language = field_validator("language")(classmethod(lambda cls, v: shipped_language(v)))

    @property
    def crisis_resources(self) -> list[Resource]:
        """What members are pointed to: the install's own list, else its region's pack,
        else (neither set) the UK list this project has always shipped."""
        return _crisis_resources(self.resources, self.region)

    @model_validator(mode="after")
    def _communities_apart(self) -> ConfigFile:
        """Each community's settings resolve, and no two share an id, a staff room or a
        group room; staff and their room belong to the communities, not the top level."""
        if self.communities is None:
            return self
        for key in OWN_KEYS:
            if key in self.policy.model_fields_set:
                raise ValueError(
                    f"policy.{key}: with communities: each community has its own "
                    f"({key} under its entry); remove it here"
                )
        seen: dict[str, str] = {}
        for community in self.communities:
            if f"id:{community.id}" in seen:
                raise ValueError(f"communities: the id {community.id!r} is used twice")
            seen[f"id:{community.id}"] = community.id
            claimed = [community.staff_room, *community.rooms, *filter(None, [community.space])]
            for room in claimed:
                if room in seen:
                    raise ValueError(
                        f"communities: {room} is claimed by both {seen[room]!r} and "
                        f"{community.id!r}: a room belongs to one community"
                    )
                seen[room] = community.id
        self.resolved_communities()  # every override valid, or an error naming it
        return self

    def resolved_communities(self) -> list[Community]:
        """The communities the service runs: each with every setting resolved."""
        if self.communities is None:
            return [
                Community(
                    id=DEFAULT_COMMUNITY_ID,
                    name=DEFAULT_COMMUNITY_ID,
                    policy=self.policy,
                    checkin=self.checkin,
                    messages=self.messages,
                    resources=tuple(self.crisis_resources),
                    language=self.language,
                    rooms=(),
                    space=None,
                    resources_unchosen=self.resources is None and self.region is None,
                )
            ]
        return [self._resolved(community) for community in self.communities]

    def _resolved(self, community: CommunitySettings) -> Community:
        sections: dict[str, Any] = {}
        for name, model in OVERRIDABLE.items():
            base = getattr(self, name).model_dump(exclude_unset=True)
            own = getattr(community, name)
            if name == "policy":
                own = own | {"staff_room": community.staff_room, "staff": community.staff}
            try:
                sections[name] = model.model_validate(base | own)
            except ValidationError as exc:
                problems = "; ".join(_describe(error) for error in exc.errors())
                raise ValueError(f"communities[{community.id}].{name}: {problems}") from None
        own_resources = community.resources is not None or community.region is not None
        return Community(
            id=community.id,
            name=community.name,
            policy=sections["policy"],
            checkin=sections["checkin"],
            messages=sections["messages"],
            resources=tuple(
                _crisis_resources(community.resources, community.region)
                if own_resources
                else self.crisis_resources
            ),
            language=community.language or self.language,
            rooms=tuple(community.rooms),
            space=community.space,
            resources_unchosen=not own_resources,
        )

    @model_validator(mode="after")
    def _one_retention(self) -> ConfigFile:
        new, old = self.policy.retention_days, self.audit.retention_days
        if new is not None and old is not None and new != old:
            raise ValueError(
                f"policy.retention_days ({new}) and audit.retention_days ({old}) disagree: "
                "audit.retention_days is its older name, keep one"
            )
        return self

    @property
    def retention_days(self) -> int:
        """Days a closed case's personal data is kept (0: for ever)."""
        for days in (self.policy.retention_days, self.audit.retention_days):
            if days is not None:
                return days
        return DEFAULT_RETENTION_DAYS


def _crisis_resources(own: list[Resource] | None, region: str | None) -> list[Resource]:
    """A list given, else a region's pack, else the UK list this project always shipped."""
    if own is not None:
        return own
    if region is not None:
        pack = pack_for(region)
        assert pack is not None  # validated
        return list(pack.resources)
    return default_resources()


@dataclass(frozen=True)
class Config:
    """The validated config plus what was derived from where it was read."""

    file: ConfigFile
    path: Path
    registration_path: Path
    database_url: str

    homeserver = property(lambda self: self.file.homeserver)
    appservice = property(lambda self: self.file.appservice)
    policy = property(lambda self: self.file.policy)
    checkin = property(lambda self: self.file.checkin)
    messages = property(lambda self: self.file.messages)
    resources = property(lambda self: self.file.crisis_resources)
    audit = property(lambda self: self.file.audit)
    retention_days = property(lambda self: self.file.retention_days)
    logging = property(lambda self: self.file.logging)

    @property
    def sqlite_path(self) -> Path | None:
        """The SQLite database file, or None (PostgreSQL, or in memory)."""
        return sqlite_file(self.database_url)

    @property
    def crypto_store(self) -> Path:
        configured = self.file.encryption.store
        if configured:
            path = Path(configured)
            return path if path.is_absolute() else self.path.resolve().parent / path
        database = self.sqlite_path
        if database is not None:
            return database.with_name(database.name + ".crypto")
        return self.path.resolve().parent / "safeguard-crypto"

    @property
    def sender_localpart(self) -> str:
        """The appservice's own account: never joins a room (the bot is a namespace user)."""
        return f"{self.appservice.bot_localpart}-appservice"

    @property
    def bot_user_id(self) -> str:
        return f"@{self.appservice.bot_localpart}:{self.homeserver.domain}"

    @property
    def moderation_user_id(self) -> str | None:
        localpart = self.appservice.moderation_localpart
        return None if localpart is None else f"@{localpart}:{self.homeserver.domain}"

    @property
    def allowed_inviters(self) -> tuple[str, ...]:
        """Besides staff (always allowed): who may put the bot in a room."""
        return tuple(self.appservice.allowed_inviters)

    @property
    def config_hash(self) -> str:
        """A digest of the policy-relevant settings, recorded with every audit entry."""
        relevant = self.file.model_dump(
            mode="json", include={"policy", "checkin", "messages", "language"}
        )
        if self.file.communities is not None:  # an install without them: its digest as before
            relevant["communities"] = [c.model_dump(mode="json") for c in self.file.communities]
        # What members are shown, wherever it came from (a list, or a region's pack).
        relevant["resources"] = [r.model_dump(mode="json") for r in self.resources]
        canonical = json.dumps(relevant, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def choosable_inviters(self) -> list[str]:
        """`allowed_inviters` globs whose name part a user can choose at registration: on a
        homeserver that lets people register, anyone may become one of them."""
        return [
            pattern
            for pattern in self.appservice.allowed_inviters
            if any(mark in pattern.split(":", 1)[0] for mark in "*?[")
        ]

    @property
    def resources_unchosen(self) -> list[str]:
        """What is said of each community that shows the UK list because neither it nor
        the top level set `region` or `resources`."""
        if self.file.resources is None and self.file.region is None:
            unchosen = UNCHOSEN_RESOURCES
        else:
            # Another country's numbers may be shown to its members: said all the same.
            region = f" (region {self.file.region})" if self.file.resources is None else ""
            unchosen = (
                "no region or resources of its own: its members are shown the top level's "
                f"crisis resources{region}; set region: or resources: for it"
            )
        return [
            self.about(community, unchosen)
            for community in self.communities
            if community.resources_unchosen
        ]

    @property
    def language(self) -> str:
        return self.file.language

    @property
    def communities(self) -> list[Community]:
        return self.file.resolved_communities()

    @property
    def language_warnings(self) -> list[str]:
        """Said by check-config, the doctor, the log at start and /health while a
        community's language is not marked reviewed by a native speaker
        (`messages.reviewed_locales`): a crisis message that reads wrongly can do harm."""
        return [
            self.about(community, warning)
            for community in self.communities
            if (warning := community.language_warning) is not None
        ]

    @property
    def alias_warnings(self) -> list[str]:
        """A Space or a group room given by an alias: an alias not made yet can be made by
        anyone on the homeserver, on a room of theirs, which the bot would then take as the
        community's (unlike the staff room's, these are not vetted). Said by check-config
        and the log at start."""
        warnings = []
        for community in self.communities:
            addresses = [("space", community.space)] if community.space else []
            addresses += [("rooms", room) for room in community.rooms]
            for key, address in addresses:
                if address.startswith("!"):
                    continue
                warnings.append(
                    self.about(
                        community,
                        f"{key}: {address} is an alias: while it does not exist, anyone on "
                        "the homeserver can create it on a room of theirs, which I would then "
                        "moderate as this community's; give the room id (!…) instead",
                    )
                )
        return warnings

    def about(self, community: Community, text: str) -> str:
        """`text` said of one community: named, where the install has several."""
        return text if self.file.communities is None else f"community {community.id}: {text}"

    def stale_resources(self, today: dt.date | None = None) -> list[Resource]:
        """Every community's crisis resources last checked too long ago (each once)."""
        today = today or dt.date.today()
        limit = dt.timedelta(days=self.file.resources_max_age_days)
        shown = {r: None for community in self.communities for r in community.resources}
        return [r for r in shown if today - r.verified_on > limit]


# Keys whose values are secrets, or may hold one (a URL with a password or a token in
# its query): a config error names the key but never echoes the value — error text
# reaches terminals, logs and support tickets.
SECRET_KEY = re.compile(r"token|secret|password|key|url|webhook", re.IGNORECASE)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (check the spelling against config.example.yaml)"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if given is None or isinstance(given, dict | list):
        return f"{key}: {message}"
    if any(SECRET_KEY.search(str(part)) for part in error["loc"]):
        return f"{key}: {message} (the value is not shown: it may hold a secret)"
    return f"{key}: {message} (got {given!r})"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Where and what, never the line itself (it may hold a password).
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def sqlite_file(url: str | URL) -> Path | None:
    """The SQLite database file a database URL names; None for any other database, and
    for SQLite in memory."""
    parsed = make_url(url)
    if parsed.drivername.startswith("sqlite") and parsed.database not in (None, "", ":memory:"):
        return Path(parsed.database)
    return None


def _resolve_database_url(url: str, base: Path) -> str:
    database = sqlite_file(url)
    if database is not None:
        if not database.is_absolute():
            database = (base / database).resolve()
        return make_url(url).set(database=str(database)).render_as_string(hide_password=False)
    return url


# Environment variables that set config keys: SAFEGUARD_POLICY__STAFF_ROOM=… sets
# policy.staff_room (sections and keys joined by "__"); SAFEGUARD_…_FILE=/run/secrets/x
# sets the key to that file's content (a secret kept out of the environment).
ENV_PREFIX = "SAFEGUARD_"
ENV_FILE_SUFFIX = "_FILE"


def environment_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], Any]:
    """The config keys the environment sets, by their path (("policy", "staff_room")).

    Only names that reach a known section with "__", or name a top-level key, count:
    other SAFEGUARD_ variables (a test's, a wrapper script's) are not config. A value is
    a string, as YAML would read it quoted (so "!room:server", "#alias:server" and
    "10:00" stay what they say), except a flow list or mapping ("[a, b]", "{k: v}")."""
    found: dict[tuple[str, ...], Any] = {}
    top_level = set(ConfigFile.model_fields)
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key, value = name[len(ENV_PREFIX) :], raw
        if key.endswith(ENV_FILE_SUFFIX):
            key = key[: -len(ENV_FILE_SUFFIX)]
            try:
                value = Path(raw).read_text(encoding="utf-8").rstrip("\n")
            except OSError as exc:
                raise ConfigError(f"{name}: cannot read {raw}: {exc.strerror}") from None
        path = tuple(part.lower() for part in key.split("__"))
        if path[0] not in top_level or "" in path:
            continue
        if value.lstrip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{name}: not a valid YAML list or mapping") from None
        found[path] = value
    return found


def _apply(data: dict[str, Any], overrides: dict[tuple[str, ...], Any]) -> None:
    for path, value in overrides.items():
        section = data
        for part in path[:-1]:
            inner = section.get(part)
            if not isinstance(inner, dict):
                inner = section[part] = {}
            section = inner
        section[path[-1]] = value


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, apply the environment's overrides, validate; raises ConfigError naming the
    first bad key(s)."""
    config_path = Path(path)
    data = _read_yaml(config_path)
    _apply(data, environment_overrides(os.environ if environ is None else environ))
    try:
        parsed = ConfigFile.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(error) for error in exc.errors()]
        raise ConfigError(f"{config_path}: " + "; ".join(lines), lines) from None
    base = config_path.resolve().parent
    registration = Path(parsed.appservice.registration)
    if not registration.is_absolute():
        registration = base / registration
    return Config(
        file=parsed,
        path=config_path,
        registration_path=registration,
        database_url=_resolve_database_url(parsed.database.url, base),
    )


def check_runnable(config: Config) -> None:
    """Everything `run` needs beyond the file's shape — paths, registration, staff room,
    templates — checked before connecting to anything. `check-config` runs the same."""
    problems: list[str] = []
    for community in config.communities:
        problems += [config.about(community, p) for p in validate_templates(community.messages)]
    if config.policy.staff_room is None and config.file.communities is None:
        problems.append("policy.staff_room: required to run (a room id or #alias the bot is in)")
    for community in config.communities:
        webhook = community.policy.alert_webhook
        if webhook is not None and (refused := webhook_problem(webhook)) is not None:
            problems.append(config.about(community, f"policy.alert_webhook: {refused}"))
    database = config.sqlite_path
    if database is None and make_url(config.database_url).drivername.startswith("sqlite"):
        problems.append(
            "database.url: an in-memory database forgets every case when the service stops;"
            " give a file (sqlite+aiosqlite:///path/to/safeguard.db)"
        )
    elif database is not None:
        folder = database.parent
        if not folder.is_dir():
            problems.append(f"database.url: folder {folder} does not exist")
        elif not os.access(folder, os.W_OK):
            problems.append(f"database.url: folder {folder} is not writable")
    try:
        registration = load_registration(config.registration_path)
    except ConfigError as exc:
        problems.append(f"appservice.registration: {exc}")
    else:
        problems.extend(
            f"appservice.registration: {problem}" for problem in registration.mismatches(config)
        )
    if problems:
        raise ConfigError(f"{config.path}: " + "; ".join(problems), problems)
