"""Messages: the notice says what the policy requires, in order; overrides and escaping work."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

from bot.settings import MessageTemplates, Resource, default_resources
from bot.templates import (
    KICK_REASON_LIMIT,
    render_alert,
    render_checkin,
    render_kick_reason,
    render_notice,
    render_relay,
    render_room_notice,
    validate_templates,
)

DEFAULT = MessageTemplates()


def test_notice_parts_in_the_policy_order():
    body = render_notice(DEFAULT, default_resources())["body"].lower()
    parts = [
        "worried about you",
        "immediate risk",
        "moving you out of the group",
        "not a punishment",
        "call 999",
        "samaritans",
        "we may contact emergency services",
        "staff team will message you tomorrow",
    ]
    positions = [body.index(part) for part in parts]
    assert positions == sorted(positions)


def test_every_configured_resource_appears():
    resources = [
        Resource(
            name="Local Line", contact="call 0123", when="nights", verified_on=dt.date(2026, 1, 1)
        )
    ]
    body = render_notice(DEFAULT, resources)["body"]
    assert "Local Line: call 0123 (nights)" in body
    assert "Local Line" in render_checkin(DEFAULT, resources, staff_roles=["a nurse"])["body"]
    assert "Local Line" in render_room_notice(DEFAULT, resources)["body"]


def test_our_own_lines_are_short_enough_for_a_phone():
    body = render_notice(DEFAULT, default_resources())["body"]
    ours = [line for line in body.splitlines() if not line.startswith("•")]  # not resources
    assert max(len(line) for line in ours) <= 70


def test_overrides_and_unknown_placeholders():
    custom = MessageTemplates(notice="Hello. Help: {resources}", checkin="{staf} here")
    assert render_notice(custom, default_resources())["body"].startswith("Hello. Help: •")
    problems = validate_templates(custom)
    assert problems == [
        "messages.checkin: unknown placeholder(s) staf; available: resources, staff"
    ]
    assert validate_templates(MessageTemplates(notice="{broken"))[0].startswith("messages.notice")
    assert validate_templates(DEFAULT) == []


def test_kick_reasons():
    assert "message" in render_kick_reason(DEFAULT, notified=True)
    unnotified = render_kick_reason(DEFAULT, notified=False)
    assert "999" in unnotified and "check your messages" in unnotified.lower()
    long = MessageTemplates(kick_reason="x" * 1000)
    assert len(render_kick_reason(long, notified=True)) == KICK_REASON_LIMIT


def alert(**overrides):
    values = dict(
        case_number=7,
        member="@m:l",
        room="!r:l",
        flagger="@mod:l",
        flagged_at=dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC),
        method="reaction",
        reason=None,
        notified=True,
        not_notified_why=None,
        removed=True,
        removal_note=None,
        late_by=None,
        due_at=dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC),
        dry_run=False,
        checkin_zone=ZoneInfo("Europe/London"),
    )
    return render_alert(DEFAULT, **(values | overrides))["body"]


def test_alert_starts_with_the_case_and_has_the_checklist():
    body = alert()
    assert body.startswith("Case #7")
    assert "!case 7 es <reference>" in body and "999" in body


def test_alert_first_line_says_not_notified_and_why():
    first = alert(notified=False, not_notified_why="M_FORBIDDEN: deactivated").splitlines()[0]
    assert "NOT notified" in first and "deactivated" in first


def test_alert_says_how_late():
    assert "arrived 2h 5m late" in alert(late_by=dt.timedelta(hours=2, minutes=5))


def test_user_controlled_values_are_escaped_in_html():
    relayed = render_relay(case_number=1, member="@m:l", text="<script>alert(1)</script>")
    assert "<script>" not in relayed["formatted_body"]
    assert "&lt;script&gt;" in relayed["formatted_body"]
