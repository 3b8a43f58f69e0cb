"""Config and registration: every bad key gets one clear line and exit 2; tokens are kept."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from appservice.cli import main
from appservice.config import ConfigError, check_runnable, load_config
from appservice.registration import PLACEHOLDER_PREFIX, load_registration, write_registration

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {
    "homeserver": {"url": "http://127.0.0.1:8008", "domain": "localhost"},
    "appservice": {"url": "http://127.0.0.1:29333"},
}


def write(tmp_path: Path, data: dict, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def runnable(tmp_path: Path, **policy) -> Path:
    data = {**MINIMAL, "policy": {"staff_room": "!staff:localhost", **policy}}
    path = write(tmp_path, data)
    write_registration(load_config(path), tmp_path / "registration.yaml")
    return path


def test_example_config_is_valid_and_every_key_is_commented():
    config = load_config(ROOT / "config.example.yaml")
    assert config.policy.reactions == ["🚨"]
    assert config.checkin.local_time.hour == 10
    # Every key with a value carries a comment (resource list entries are self-describing).
    for line in (ROOT / "config.example.yaml").read_text().splitlines():
        key, colon, value = line.strip().partition(":")
        if (
            colon
            and value.strip()
            and not key.startswith(("#", "-", "contact", "when", "verified"))
        ):
            assert "#" in line, f"uncommented key: {line}"


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"policy": {"moderatr_power_level": 50}}, "policy.moderatr_power_level: unknown key"),
        ({"policy": {"moderator_power_level": "lots"}}, "policy.moderator_power_level:"),
        ({"homeserver": {"url": "ftp://x", "domain": "localhost"}}, "homeserver.url:"),
        ({"database": {"url": "mysql://x/y"}}, "database.url: driver 'mysql' is not supported"),
        ({"checkin": {"after": "soon"}}, "checkin.after: 'soon' is not a duration"),
        ({"checkin": {"after": "1h", "at": "10:00"}}, "set either 'after' or 'at'"),
        ({"checkin": {"timezone": "Mars/Olympus"}}, "unknown time zone 'Mars/Olympus'"),
        ({"policy": {"staff": ["not-a-user"]}}, "policy.staff.0:"),
        ({"resources": []}, "resources:"),
    ],
)
def test_bad_values_name_the_key(tmp_path, patch, expected):
    data = {**MINIMAL, **patch}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    "patch",
    [
        {"database": {"url": "mysql://admin:hunter2-secret@db.example.org/safeguard"}},
        {"database": {"url": "postgresql+asyncpg://admin:hunter2-secret@db:notaport/x"}},
        {"database": {"url": 12345}},  # not even text: still not echoed
        {"appservice": {**MINIMAL["appservice"], "admin_token": "hunter2-secret"}},
        {"policy": {"alert_webhook": 7, "alert_webhook_secret": ["hunter2-secret"]}},
    ],
)
def test_config_errors_never_echo_a_secret(tmp_path, patch):
    """The error names the key; a value that is or may hold a secret (a database URL
    with its password, a token) is never printed: error text reaches logs and tickets."""
    data = {**MINIMAL, **patch}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, data))
    text = str(caught.value)
    assert "hunter2" not in text and "12345" not in text, text
    assert "database." in text or "admin_token" in text or "alert_webhook" in text


def test_a_yaml_error_does_not_quote_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text('database: {url: "postgresql+asyncpg://u:hunter2@db/x"\nhomeserver: [unclosed\n')
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert "not valid YAML at line" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_missing_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match="homeserver: required key is missing"):
        load_config(write(tmp_path, {"appservice": MINIMAL["appservice"]}))


def test_not_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("homeserver: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_registration_needs_only_its_keys_and_keeps_tokens(tmp_path, capsys):
    path = write(tmp_path, MINIMAL)
    assert main(["registration", "-c", str(path), "-o", str(tmp_path / "reg.yaml")]) == 0
    first = yaml.safe_load((tmp_path / "reg.yaml").read_text())
    assert first["namespaces"]["users"] == [{"exclusive": True, "regex": "^@safeguard:localhost$"}]
    # The bot is a namespace user (it may /sync for its encryption); the sender is apart.
    assert first["rate_limited"] is False
    assert first["sender_localpart"] == "safeguard-appservice"
    assert len(first["as_token"]) > 40 and first["as_token"] != first["hs_token"]
    assert (tmp_path / "reg.yaml").stat().st_mode & 0o077 == 0
    main(["registration", "-c", str(path), "-o", str(tmp_path / "reg.yaml")])
    second = yaml.safe_load((tmp_path / "reg.yaml").read_text())
    assert (second["as_token"], second["hs_token"]) == (first["as_token"], first["hs_token"])


def test_placeholder_tokens_are_replaced_and_refused(tmp_path):
    shutil.copy(ROOT / "registration.yaml", tmp_path / "registration.yaml")
    path = write(tmp_path, {**MINIMAL, "policy": {"staff_room": "!s:localhost"}})
    config = load_config(path)
    with pytest.raises(ConfigError, match="as_token is a placeholder"):
        check_runnable(config)
    assert main(["check-config", "-c", str(path)]) == 2
    write_registration(config, tmp_path / "registration.yaml")
    fresh = load_registration(tmp_path / "registration.yaml")
    assert not fresh.as_token.startswith(PLACEHOLDER_PREFIX)
    check_runnable(config)


def test_check_config_exit_codes(tmp_path, capsys):
    good = runnable(tmp_path)
    assert main(["check-config", "-c", str(good)]) == 0
    assert "OK" in capsys.readouterr().out
    no_staff_room = write(tmp_path, MINIMAL, "other.yaml")
    assert main(["check-config", "-c", str(no_staff_room)]) == 2
    assert "policy.staff_room: required" in capsys.readouterr().err


def test_registration_mismatch_is_reported(tmp_path):
    path = runnable(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["appservice"]["bot_localpart"] = "otherbot"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="sender_localpart is 'safeguard-appservice'"):
        check_runnable(load_config(path))


def test_a_webhook_that_would_cross_a_network_in_the_clear_is_refused(tmp_path):
    path = runnable(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["policy"]["alert_webhook"] = "http://pager.example.org/hook"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"policy\.alert_webhook: the webhook must be https"):
        check_runnable(load_config(path))


def test_relative_paths_follow_the_config_file(tmp_path, monkeypatch):
    path = runnable(tmp_path)
    monkeypatch.chdir("/")
    config = load_config(path)
    assert config.registration_path == tmp_path / "registration.yaml"
    assert config.database_url.endswith(str(tmp_path / "safeguard.db"))


def test_missing_database_folder_is_reported(tmp_path):
    data = {
        **MINIMAL,
        "policy": {"staff_room": "!s:localhost"},
        "database": {"url": "sqlite+aiosqlite:///no/such/dir/x.db"},
    }
    path = write(tmp_path, data)
    write_registration(load_config(path), tmp_path / "registration.yaml")
    with pytest.raises(ConfigError, match=r"database\.url: folder .* does not exist"):
        check_runnable(load_config(path))


def test_inviters_default_to_staff_only(tmp_path):
    """No one but staff (always allowed) may put the bot in a room, unless operators widen it."""
    assert load_config(write(tmp_path, MINIMAL)).allowed_inviters == ()
    widened = {**MINIMAL, "appservice": {**MINIMAL["appservice"], "allowed_inviters": ["@*-mod:l"]}}
    assert load_config(write(tmp_path, widened, "w.yaml")).allowed_inviters == ("@*-mod:l",)
    listed = {**MINIMAL, "appservice": {**MINIMAL["appservice"], "allowed_inviters": ["@a:l"]}}
    assert load_config(write(tmp_path, listed, "l.yaml")).choosable_inviters() == []
    assert load_config(write(tmp_path, widened, "c.yaml")).choosable_inviters() == ["@*-mod:l"], (
        "a name anyone may register"
    )
    bad = {**MINIMAL, "appservice": {**MINIMAL["appservice"], "allowed_inviters": ["everyone"]}}
    with pytest.raises(ConfigError, match=r"appservice\.allowed_inviters\.0"):
        load_config(write(tmp_path, bad, "b.yaml"))


def test_db_upgrade_applies_the_migrations(tmp_path, capsys):
    path = write(tmp_path, {**MINIMAL, "database": {"url": "sqlite+aiosqlite:///fresh.db"}})
    assert main(["db", "upgrade", "-c", str(path)]) == 0
    assert "latest schema" in capsys.readouterr().out
    assert (tmp_path / "fresh.db").exists()


def test_dev_without_synapse_installed_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    real_find_spec = importlib.util.find_spec

    def no_synapse(name, *args, **kwargs):
        return None if name == "synapse" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_synapse)
    assert main(["dev", "--dir", str(tmp_path / ".dev")]) == 2
    assert "needs matrix-synapse" in capsys.readouterr().err
    assert not (tmp_path / ".dev").exists()


def test_runtime_imports_are_declared_dependencies():
    """A production install has only [project.dependencies]: every third-party
    import in appservice/ and bot/ must be one of them, not a dev extra's passenger."""
    import ast
    import re
    import sys
    import tomllib

    declared = {
        re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower().replace("-", "_")
        for line in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    # Import names that differ from their distribution's name.
    distribution_of = {"yaml": "pyyaml", "nio": "matrix_nio"}
    lazily_optional = {"asyncpg", "synapse"}  # the postgres and dev extras, imported on demand
    missing = set()
    for source in [*(ROOT / "appservice").rglob("*.py"), *(ROOT / "bot").rglob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in {"appservice", "bot"}:
                    continue
                if top in lazily_optional:
                    continue
                if distribution_of.get(top, top).lower() not in declared:
                    missing.add(f"{top} ({source.relative_to(ROOT)})")
    assert not missing, f"imported but not in [project.dependencies]: {sorted(missing)}"


def test_run_refuses_a_template_typo_before_connecting_to_anything(tmp_path, capsys):
    """`run` exits 2 naming the key; no homeserver or database is touched (none exists here)."""
    path = runnable(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["messages"] = {"notice": "Hi {resourcez}"}
    data["database"] = {"url": f"sqlite+aiosqlite:///{tmp_path / 'never.db'}"}
    path.write_text(yaml.safe_dump(data))
    assert main(["run", "-c", str(path)]) == 2
    err = capsys.readouterr().err
    assert "messages.notice" in err and "resourcez" in err
    assert not (tmp_path / "never.db").exists()
    assert main(["check-config", "-c", str(path)]) == 2


def test_a_template_that_cannot_render_is_refused_too(tmp_path, capsys):
    path = runnable(tmp_path)
    data = yaml.safe_load(path.read_text())
    data["messages"] = {"alert": "Case {case:d}"}  # the right name, a format that fails
    path.write_text(yaml.safe_dump(data))
    assert main(["check-config", "-c", str(path)]) == 2
    assert "messages.alert" in capsys.readouterr().err


def test_read_only_commands_never_migrate(tmp_path, capsys):
    """They say to run `safeguard db upgrade` instead of changing the schema under a service."""
    path = write(tmp_path, {**MINIMAL, "database": {"url": "sqlite+aiosqlite:///fresh.db"}})
    for command in (["cases", "list"], ["cases", "export"], ["audit", "verify"]):
        assert main([*command, "-c", str(path)]) == 2, command
        assert "safeguard db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "-c", str(path)]) == 0
    assert main(["cases", "list", "-c", str(path)]) == 0


async def test_sqlite_reads_take_no_write_lock(tmp_path):
    """A read goes ahead while another connection holds the write lock (WAL, deferred BEGIN)."""
    import asyncio

    import sqlalchemy as sa

    from appservice.database import create_engine, upgrade

    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", busy_timeout_ms=10_000)
    await upgrade(engine)
    try:
        async with engine.begin() as writer:
            await writer.execute(sa.text("INSERT INTO heartbeat (id, at) VALUES (1, '2026-01-01')"))
            async with asyncio.timeout(5), engine.connect() as reader:
                count = await reader.execute(sa.text("SELECT count(*) FROM cases"))
                assert count.scalar_one() == 0
    finally:
        await engine.dispose()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:"])
def test_an_in_memory_database_is_refused(tmp_path, url):
    """Every case would be lost at a restart (and the intake writes on a second connection)."""
    data = {**MINIMAL, "policy": {"staff_room": "!s:localhost"}, "database": {"url": url}}
    path = write(tmp_path, data)
    write_registration(load_config(path), tmp_path / "registration.yaml")
    with pytest.raises(ConfigError, match=r"database\.url: an in-memory database forgets"):
        check_runnable(load_config(path))


def test_retention_defaults_to_six_years_and_reads_its_older_name(tmp_path):
    from bot.config.settings import DEFAULT_RETENTION_DAYS

    assert load_config(write(tmp_path, MINIMAL)).retention_days == DEFAULT_RETENTION_DAYS == 2192
    newer = write(tmp_path, {**MINIMAL, "policy": {"retention_days": 0}})
    assert load_config(newer).retention_days == 0, "0 set explicitly keeps for ever"
    older = write(tmp_path, {**MINIMAL, "audit": {"retention_days": 30}})
    assert load_config(older).retention_days == 30
    both = {**MINIMAL, "policy": {"retention_days": 30}, "audit": {"retention_days": 30}}
    assert load_config(write(tmp_path, both)).retention_days == 30
    both["audit"] = {"retention_days": 31}
    with pytest.raises(ConfigError, match="disagree"):
        load_config(write(tmp_path, both))


def test_the_doctor_that_breaks_exits_2_not_1(monkeypatch, capsys):
    """1 means a check failed; 2 that the doctor itself could not run."""
    from appservice import doctor

    async def broken(config_path: str, *, webhook: bool = False) -> doctor.Report:
        raise RuntimeError("no event loop for you")

    monkeypatch.setattr(doctor, "diagnose", broken)
    assert doctor.run("config.yaml", as_json=False, webhook=False) == 2
    assert "the doctor could not run: RuntimeError" in capsys.readouterr().out


def test_every_key_can_be_set_by_the_environment(tmp_path):
    """SAFEGUARD_SECTION__KEY sets section.key; …_FILE reads it from a file; values stay
    strings unless they are a flow list or mapping; other SAFEGUARD_ variables are not config."""
    secret = tmp_path / "db-url"
    secret.write_text("sqlite+aiosqlite:///from-a-secret.db\n")
    environ = {
        "SAFEGUARD_POLICY__STAFF_ROOM": "!staff:example.org",
        "SAFEGUARD_POLICY__STAFF": '["@ann:example.org", "@bo:example.org"]',
        "SAFEGUARD_POLICY__MODERATOR_POWER_LEVEL": "40",
        "SAFEGUARD_CHECKIN__AT": "10:00",
        "SAFEGUARD_CHECKIN__TIMEZONE": "Europe/Dublin",
        "SAFEGUARD_APPSERVICE__LISTEN__HOST": "0.0.0.0",
        "SAFEGUARD_DATABASE__URL_FILE": str(secret),
        "SAFEGUARD_RESOURCES_MAX_AGE_DAYS": "90",
        "SAFEGUARD_TEST_PG": "postgresql://not-config",  # no section: not a config key
    }
    config = load_config(write(tmp_path, MINIMAL), environ)
    assert config.policy.staff_room == "!staff:example.org"
    assert config.policy.staff == ["@ann:example.org", "@bo:example.org"]
    assert config.policy.moderator_power_level == 40
    assert config.checkin.local_time.hour == 10
    assert config.file.appservice.listen.host == "0.0.0.0"
    assert config.sqlite_path == tmp_path / "from-a-secret.db"
    assert config.file.resources_max_age_days == 90
    # An alias is a string, not a YAML comment.
    alias = load_config(write(tmp_path, MINIMAL), {"SAFEGUARD_POLICY__STAFF_ROOM": "#staff:x.org"})
    assert alias.policy.staff_room == "#staff:x.org"


def test_a_bad_environment_value_is_a_clear_config_error(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"policy\.moderator_power_level"):
        load_config(path, {"SAFEGUARD_POLICY__MODERATOR_POWER_LEVEL": "lots"})
    with pytest.raises(ConfigError, match="SAFEGUARD_DATABASE__URL_FILE: cannot read"):
        load_config(path, {"SAFEGUARD_DATABASE__URL_FILE": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match=r"policy\.no_such_key: unknown key"):
        load_config(path, {"SAFEGUARD_POLICY__NO_SUCH_KEY": "1"})


def test_a_first_start_writes_the_config_then_the_registration_then_runs(tmp_path, capsys):
    """As mautrix bridges start in a container: each missing file is written, with what to
    do, and the start stops until it is done."""
    config = tmp_path / "data" / "config.yaml"
    assert main(["start", "-c", str(config)]) == 0
    assert config.read_bytes() == (ROOT / "config.example.yaml").read_bytes()
    assert "edit it" in capsys.readouterr().out
    # Not edited: refused, not run on the example's placeholders.
    assert main(["start", "-c", str(config)]) == 2
    assert "still has the example's policy.staff_room" in capsys.readouterr().err
    data = yaml.safe_load(config.read_text())
    data["policy"]["staff_room"] = "!staff:example.org"
    config.write_text(yaml.safe_dump(data))
    assert main(["start", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "add it to Synapse's app_service_config_files" in out
    registration = load_registration(tmp_path / "data" / "registration.yaml")
    assert not registration.as_token.startswith(PLACEHOLDER_PREFIX)
