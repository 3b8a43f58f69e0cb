"""Parsing `!case` commands: every form, and errors that say how to write it right."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.staff.commands import CaseCommand, CommandError, parse_case_command


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!case", CaseCommand("help")),
        ("!case help", CaseCommand("help")),
        ("!case list", CaseCommand("list", text="open")),
        ("!case list all", CaseCommand("list", text="all")),
        ("!case 12", CaseCommand("show", 12)),
        ("!case #12 claim", CaseCommand("claim", 12)),
        ("!case 3 ack", CaseCommand("ack", 3)),
        (
            "!CASE 3 note seemed calmer",
            CaseCommand("note", 3, "seemed calmer", ("seemed", "calmer")),
        ),
        (
            "!case 4 close referred to GP",
            CaseCommand("close", 4, "referred to GP", ("referred", "to", "GP")),
        ),
    ],
)
def test_forms(body, expected):
    assert parse_case_command(body) == expected


def test_es_reference_and_service():
    command = parse_case_command("!case 5 es CAD-1234 Met Police")
    assert isinstance(command, CaseCommand)
    assert (command.reference, command.service) == ("CAD-1234", "Met Police")
    bare = parse_case_command("!case 5 es REF9")
    assert isinstance(bare, CaseCommand) and bare.service == "emergency services"


@pytest.mark.parametrize(
    ("body", "hint"),
    [
        ("!case 5 es", "!case 5 es <reference> [service]"),
        ("!case 5 note", "!case 5 note <text>"),
        ("!case five", "is not a case number"),
        ("!case 5 frobnicate", "!case help"),
        ("!case list everything", "!case list all"),
    ],
)
def test_errors_say_how_to_write_it(body, hint):
    result = parse_case_command(body)
    assert isinstance(result, CommandError) and hint in result.message


@pytest.mark.parametrize("body", ["hello", "!cases 1", "", "!safeguard @x:l"])
def test_not_case_commands(body):
    assert parse_case_command(body) is None


@given(st.text())
def test_never_raises(body):
    parse_case_command(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("!case list 2", CaseCommand("list", text="open", page=2)),
        ("!case list all 3", CaseCommand("list", text="all", page=3)),
        ("!case list closed", CaseCommand("list", text="closed", page=1)),
    ],
)
def test_list_pages(body, expected):
    assert parse_case_command(body) == expected


@given(st.lists(st.text(max_size=30), max_size=6))
def test_never_raises_on_words(words):
    parse_case_command(" ".join(["!case", *words]))


def test_a_long_listing_is_paged_under_the_event_size_limit():
    """10,000 cases with the longest ids: each page fits a Matrix event and says how to go on."""
    import datetime as dt
    import json

    from bot.staff.replies import LIST_PAGE_SIZE, case_listing
    from bot.store.cases import Case
    from bot.texts.templates import notice

    now = dt.datetime(2026, 11, 25, tzinfo=dt.UTC)
    long_id = "@" + "m" * 240 + ":example.org"

    def case(number: int) -> Case:
        fields = dict.fromkeys(Case.__dataclass_fields__)
        fields |= {
            "id": number,
            "room_id": "!" + "r" * 250,
            "member_id": long_id,
            "state": "open",
            "dry_run": False,
            "flagged_at": now,
            "received_at": now,
            "due_at": now,
        }
        return Case(**fields)

    page = [case(n) for n in range(1, LIST_PAGE_SIZE + 1)]
    text = case_listing(page, "all", now, page=1, total=10_000)
    assert len(json.dumps(notice(text)).encode()) < 60_000
    assert "`!case list all 2`" in text and f"1–{LIST_PAGE_SIZE} of 10000" in text
    last = case_listing(page[:5], "all", now, page=500, total=9_985)
    assert "More:" not in last


def test_a_case_timeline_reads_as_sentences_in_the_charitys_zone():
    """No internal names (`step.redact_flag — done`), no UTC under an alert in local time."""
    import datetime as dt
    from zoneinfo import ZoneInfo

    from bot.staff.replies import case_timeline
    from bot.steps import STEP_TYPES
    from bot.store.audit import AuditEntry
    from bot.store.cases import Case

    at = dt.datetime(2026, 7, 1, 9, 30, tzinfo=dt.UTC)  # 10:30 in London (summer time)
    fields = dict.fromkeys(Case.__dataclass_fields__)
    fields |= {"id": 3, "member_id": "@m:l", "room_id": "!r:l", "state": "open"}
    case = Case(**fields)

    def entry(kind: str, **facts: object) -> AuditEntry:
        return AuditEntry(1, 3, at, kind, dict(facts), None, "v", "h", "x")

    steps = [entry(f"step.{step.name}", status="done") for step in STEP_TYPES]
    failed = entry("step.redact_flag", status="failed", why="the homeserver refused")
    names = {"!r:l": "Group chat", "@m:l": "Sam"}
    shown = case_timeline(case, [*steps, failed], zone=ZoneInfo("Europe/London"), names=names)
    head = "Case #3: Sam (@m:l) in Group chat (!r:l) — open (times: Europe/London)"
    assert shown.startswith(head)
    assert "Wed 01 Jul 2026, 10:30  the flag taken out of the room\n" in shown + "\n"
    assert "the flag taken out of the room — failed; why: the homeserver refused" in shown
    assert "step." not in shown and "— done" not in shown and "UTC" not in shown
    assert "_" not in shown.split("\n", 1)[1], "no internal name in any line"


def test_the_people_in_a_timeline_are_named():
    """Who flagged and who acted, by the names staff know, the id after (once)."""
    import datetime as dt

    from bot.staff.replies import case_timeline, people_in
    from bot.store.audit import AuditEntry
    from bot.store.cases import Case

    at = dt.datetime(2026, 7, 1, 9, 30, tzinfo=dt.UTC)
    fields = dict.fromkeys(Case.__dataclass_fields__)
    fields |= {"id": 3, "member_id": "@m:l", "room_id": "!r:l", "state": "open"}
    flagged = AuditEntry(
        1, 3, at, "flagged", {"method": "reaction"}, {"flagger": "@mod:l"}, "v", "h", "x"
    )
    closed = AuditEntry(2, 3, at, "closed", {}, {"by": "@ann:l", "outcome": "safe"}, "v", "h", "x")
    assert people_in([flagged, closed]) == ["@mod:l", "@ann:l"]
    names = {"@mod:l": "Mo", "@ann:l": None}
    shown = case_timeline(Case(**fields), [flagged, closed], names=names)
    assert "flagger: Mo (@mod:l)" in shown
    assert "by: @ann:l" in shown, "no name to show: the id alone"
