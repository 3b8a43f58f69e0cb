"""`safeguard audit verify|purge` and the export on SQLite and PostgreSQL, as operators run them."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from appservice.database import create_engine, upgrade
from bot.store import audit, cases
from bot.store.schema import audit_entries
from tests.support.databases import BACKENDS, fresh_database, offline_config
from tests.support.scene import export_json, export_via_cli, safeguard_cli

PROVENANCE = audit.Provenance("2026-11", "c" * 64, b"5" * 64)
LONG_AGO = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(params=BACKENDS)
async def database(request, tmp_path):
    async with fresh_database(request.param, tmp_path) as url:
        engine = create_engine(url)
        await upgrade(engine)
        config = offline_config(tmp_path, url, audit={"retention_days": 30})
        # The deployment's digest key, as the service's first run would have written it.
        from appservice.config import load_config
        from appservice.digest_key import digest_key_path

        digest_key_path(load_config(config)).write_text(PROVENANCE.digest_key.decode())
        yield engine, config
        await engine.dispose()


async def closed_case(engine, member: str, *, hold: bool = False) -> int:
    flag = cases.NewFlag(
        "!room:localhost",
        member,
        "@mod:localhost",
        "reaction",
        "$f",
        "$m",
        "worried",
        LONG_AGO,
        LONG_AGO,
    )
    async with engine.begin() as conn:
        opened = await cases.open_or_corroborate(
            conn, PROVENANCE, flag, steps=["notify"], dry_run=False, due_at=LONG_AGO
        )
        await audit.append(
            conn,
            PROVENANCE,
            "emergency_services_informed",
            case_id=opened.case_id,
            facts={"service": "police"},
            personal={"by": "@staff:localhost", "reference": "REF-1"},
        )
        await cases.set_fields(
            conn,
            opened.case_id,
            state="closed",
            closed_at=LONG_AGO,
            active_key=None,
            hold_reason="enquiry" if hold else None,
        )
    return opened.case_id


async def test_verify_passes_then_names_the_altered_entry(database):
    engine, config = database
    await closed_case(engine, "@a:localhost")
    await closed_case(engine, "@b:localhost")
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0 and "audit log OK: 4 entries" in out
    async with engine.begin() as conn:
        await conn.execute(
            audit_entries.update()
            .where(audit_entries.c.seq == 3)
            .values(facts={"service": "someone else"})
        )
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 1 and "FAILED at entry 3" in out


async def test_verify_names_entries_cut_off_the_end(database):
    """The last entries deleted: what is left still chains, but ends short of its head."""
    engine, config = database
    await closed_case(engine, "@a:localhost")
    await closed_case(engine, "@b:localhost")
    async with engine.begin() as conn:
        await conn.execute(audit_entries.delete().where(audit_entries.c.seq >= 3))
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 1 and "FAILED at its end: it ends at entry 2" in out, out


async def test_purge_keeps_the_chain_and_the_counts(database):
    engine, config = database
    purged_case = await closed_case(engine, "@gone:localhost")
    held_case = await closed_case(engine, "@kept:localhost", hold=True)
    before = await export_via_cli(config)
    code, out, err = await safeguard_cli("audit", "purge", "-c", str(config))
    assert code == 0, err
    assert "purged 1 case(s)" in out
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0, out
    after = {c["number"]: c for c in (await export_via_cli(config))["cases"]}
    gone, kept = after[purged_case], after[held_case]
    assert gone["member"] is None and gone["room"] is None and gone["purged_at"]
    assert all(not e["personal"] for e in gone["entries"])  # erased (the tombstone has none)
    assert gone["entries"][-1]["kind"] == "purged"
    assert gone["entries"][-1]["facts"]["entries_purged"] == 2
    before_kinds = [
        e["kind"] for c in before["cases"] if c["number"] == purged_case for e in c["entries"]
    ]
    assert [e["kind"] for e in gone["entries"]][:-1] == before_kinds  # the counts stay
    assert kept["member"] == "@kept:localhost"  # on hold: exempt
    async with engine.connect() as conn:
        total = (await conn.execute(sa.select(sa.func.count()).select_from(audit_entries))).scalar()
    assert total == 5


async def test_purge_erases_entries_outside_cases_too(database):
    """Refused flags, rejected invites, refused commands: no case, still personal data."""
    engine, config = database
    async with engine.begin() as conn:
        await audit.append(
            conn,
            PROVENANCE,
            "refused",
            facts={"code": "not_moderator", "method": "reaction"},
            personal={"flagger": "@troll:localhost", "detail": "@troll is not a moderator"},
            at=LONG_AGO,
        )
        await audit.append(
            conn, PROVENANCE, "invite_refused", personal={"inviter": "@x:localhost"}, at=LONG_AGO
        )
        await audit.append(conn, PROVENANCE, "refused", personal={"flagger": "@recent:localhost"})
    code, out, err = await safeguard_cli("audit", "purge", "-c", str(config))
    assert code == 0 and "2 entries outside cases" in out, (out, err)
    # Purged once: a later purge finds nothing more to count, nor to tombstone.
    code, out, err = await safeguard_cli("audit", "purge", "-c", str(config))
    assert code == 0 and "and 0 entries outside cases" in out, (out, err)
    document = await export_via_cli(config)
    refusals = {e["seq"]: e for e in document["refusals"]}
    assert refusals[1]["personal"] is None and refusals[3]["personal"] == {
        "flagger": "@recent:localhost"
    }
    async with engine.connect() as conn:
        kinds = [e.kind for e in await audit.entries(conn, without_case=True)]
    assert kinds[-1] == "purged" and kinds.count("purged") == 1, "one tombstone"
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0, out


async def test_verify_without_the_digest_key_checks_the_chain_and_says_what_it_could_not(
    database,
):
    engine, config = database
    await closed_case(engine, "@a:localhost")
    from appservice.config import load_config
    from appservice.digest_key import digest_key_path

    digest_key_path(load_config(config)).unlink()
    code, out, _ = await safeguard_cli("audit", "verify", "-c", str(config))
    assert code == 0 and "not checked" in out and "digest key" in out


async def test_export_since_and_case_filters(database):
    engine, config = database
    first = await closed_case(engine, "@a:localhost")
    await closed_case(engine, "@b:localhost")
    only = await export_json(config, "--case", str(first))
    assert [c["number"] for c in only["cases"]] == [first]
    assert (await export_json(config, "--since", "2030-01-01"))["cases"] == []
