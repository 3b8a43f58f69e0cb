"""Parsing `!case` commands: every form, and errors that say how to write it right."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.staff_commands import CaseCommand, CommandError, parse_case_command


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
