"""The texts: the notice says what the policy requires, in order, once; what the room sees
says nothing of anyone; staff texts name people and rooms plainly; every text a template."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from bot.config.settings import MessageTemplates, Resource
from bot.texts.messages import StepState, Texts
from bot.texts.templates import CATALOGUE, KICK_REASON_LIMIT, validate_templates
from bot.texts.wording import checkin_when, clean_name, person, since_words
from tests.support.policy import alert_body, deployment

LONDON = ZoneInfo("Europe/London")
NOW = dt.datetime(2026, 11, 24, 12, tzinfo=dt.UTC)
TOMORROW_10 = dt.datetime(2026, 11, 25, 10, tzinfo=dt.UTC)


def texts(**options) -> Texts:
    return Texts(deployment(**options))


def test_every_text_is_a_template_operators_can_override():
    assert set(MessageTemplates.model_fields) - {"reviewed_locales"} == set(CATALOGUE)
    assert validate_templates(MessageTemplates()) == []


def test_notice_parts_in_the_policy_order_and_999_once():
    body = texts().notice(TOMORROW_10, NOW)["body"].lower()
    parts = [
        "worried about you",
        "immediate risk",
        "moving you out of the group",
        "not a punishment",
        "call 999",
        "samaritans",
        "we may contact emergency services",
        "staff team will message you tomorrow morning",
    ]
    positions = [body.index(part) for part in parts]
    assert positions == sorted(positions)
    assert body.count("999") == 1, "the emergency line is said once"


def test_the_delay_is_told_as_it_is():
    soon = texts().notice(NOW + dt.timedelta(minutes=30), NOW)["body"]
    assert "within the hour" in soon and "tomorrow" not in soon
    checkin = texts().checkin(
        flagged_at=NOW - dt.timedelta(minutes=30), now=NOW, staff_roles=["a nurse"]
    )["body"]
    assert "a little while ago" in checkin and "yesterday" not in checkin


@pytest.mark.parametrize(
    ("due", "said"),
    [
        (NOW + dt.timedelta(minutes=2), "very soon"),
        (NOW + dt.timedelta(minutes=40), "within the hour"),
        (NOW + dt.timedelta(hours=3), "in a few hours"),
        (NOW + dt.timedelta(hours=6), "later today"),
        (TOMORROW_10, "tomorrow morning"),
        (TOMORROW_10 + dt.timedelta(hours=5), "tomorrow afternoon"),
        (NOW + dt.timedelta(days=3), "on Friday"),
    ],
)
def test_checkin_when(due, said):
    assert checkin_when(NOW, due, LONDON) == said


def test_since_words():
    assert since_words(NOW - dt.timedelta(days=1), NOW, LONDON) == "yesterday"
    assert since_words(NOW - dt.timedelta(hours=3), NOW, LONDON) == "earlier today"


def test_every_configured_resource_appears_and_emergency_apart():
    resources = (
        Resource(
            name="Local Line", contact="call 0123", when="nights", verified_on=dt.date(2026, 1, 1)
        ),
        Resource(
            name="Emergency",
            contact="call 112",
            when="if you are in danger now",
            verified_on=dt.date(2026, 1, 1),
            emergency=True,
        ),
    )
    settings = deployment()
    settings = type(settings)(**{**settings.__dict__, "resources": resources})
    body = Texts(settings).notice(TOMORROW_10, NOW)["body"]
    assert "Local Line: call 0123 (nights)" in body
    assert "If you are in danger now, call 112." in body
    assert "• Emergency" not in body


def test_our_own_lines_are_short_enough_for_a_phone():
    body = texts().notice(TOMORROW_10, NOW)["body"]
    ours = [line for line in body.splitlines() if not line.startswith("•")]
    assert max(len(line) for line in ours) <= 75


def test_what_the_room_sees_says_nothing_of_anyone():
    for notified in (True, False):
        reason = texts().kick_reason(notified=notified).lower()
        assert reason == "removed by a moderator"
    notice = texts().room_notice()["body"].lower()
    for hint in ("safety", "worried", "risk", "looked after", "moved out"):
        assert hint not in notice
    assert texts().redaction_reason() == "Removed by a moderator"
    long = MessageTemplates(kick_reason="x" * 1000)
    assert len(Texts(deployment(messages=long)).kick_reason(notified=True)) == KICK_REASON_LIMIT


def test_overrides_and_unknown_placeholders():
    custom = MessageTemplates(notice="Hello. Help: {resources}", checkin="{staf} here")
    assert Texts(deployment(messages=custom)).notice(None, NOW)["body"].startswith("Hello. Help: •")
    assert validate_templates(custom) == [
        "messages.checkin: unknown placeholder(s) staf; available: confidentiality, "
        "emergency, resources, since, staff"
    ]
    assert validate_templates(MessageTemplates(notice="{broken"))[0].startswith("messages.notice")


alert = alert_body


def test_alert_names_people_and_rooms_and_one_zone():
    body = alert()
    assert body.startswith("Case #7")
    assert "Member: Sam (@m:l)" in body and "Room: Group chat (!r:l)" in body
    assert "Alex (@mod:l)" in body
    assert "UTC" not in body and "GMT" not in body and "BST" not in body
    assert body.count("Europe/London") == 1
    assert "10:00" in body, "the check-in time in the charity's zone (BST in July)"
    assert "!case 7 es <reference>" in body and "999" in body


def test_alert_first_line_says_not_notified_and_why():
    first = alert(notice=StepState("failed", "M_FORBIDDEN: deactivated")).splitlines()[0]
    assert "NOT notified" in first and "deactivated" in first


def test_alert_states_each_step_as_verified():
    """Done, not yet (and why), failed (and why), or held for staff: never a guess."""
    waiting = alert(
        notice=StepState("waiting", "the homeserver is away"),
        removal=StepState("waiting", "waiting until they have been told"),
    )
    assert "NOT notified yet: the homeserver is away" in waiting.splitlines()[0]
    assert "… Member NOT notified yet (the homeserver is away)" in waiting
    assert "… Not removed yet (waiting until they have been told)" in waiting
    held = alert(notice=StepState("failed", "M_FORBIDDEN: no"), removal=StepState("held"))
    assert "⏸ Not removed" in held and "!case 7 remove" in held and "!case 7 notify" in held
    plain = alert(notice=StepState("done", note="the crypto store is broken"))
    assert "✔ Member notified by DM, before removal — sent UNENCRYPTED" in plain
    assert "crypto store is broken" in plain


def test_alert_says_how_late():
    assert "arrived 2 h 5 min late" in alert(late_by=dt.timedelta(hours=2, minutes=5))


def test_names_cannot_break_lines_or_pose_as_the_bot():
    assert clean_name("Sam\nCase #9: fake\u202e") == "Sam Case #9: fake"
    assert person("@x:l", "  ") == "@x:l"
    assert len(clean_name("n" * 500) or "") == 64


def test_user_controlled_values_are_escaped_in_html():
    relayed = texts().relay(case_number=1, member="@m:l", text="<script>x</script>", where="DM")
    assert "<script>" not in relayed["formatted_body"]
    assert "&lt;script&gt;" in relayed["formatted_body"]


def test_a_template_that_fails_at_run_time_falls_back_once():
    broken = MessageTemplates.model_construct(notice="Hi {resources:d}")
    reported: list[str] = []
    writer = Texts(deployment(messages=broken), on_fallback=lambda n, p: reported.append(n))
    for _ in range(2):
        assert "worried about you" in writer.notice(TOMORROW_10, NOW)["body"]
    assert reported == ["notice"]


def test_readme_documents_every_template():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name in CATALOGUE:
        assert f"| `{name}` |" in readme, name


def test_the_notice_and_the_checkin_link_the_confidentiality_policy_when_set():
    url = "https://example.org/confidentiality"
    linked = texts(confidentiality_url=url)
    notice = linked.notice(TOMORROW_10, NOW)["body"]
    checkin = linked.checkin(flagged_at=NOW, now=NOW, staff_roles=[])["body"]
    for body in (notice, checkin):
        assert body.endswith(f"\n\nWhat we share and why: {url}")
    plain = texts()
    assert "What we share" not in plain.notice(TOMORROW_10, NOW)["body"]
    assert not plain.checkin(flagged_at=NOW, now=NOW, staff_roles=[])["body"].endswith("\n")


@pytest.mark.parametrize("url", ["http://example.org/policy", "example.org", "https://a b"])
def test_the_confidentiality_link_must_be_https(url):
    from pydantic import ValidationError

    from bot.config.settings import PolicySettings

    with pytest.raises(ValidationError):
        PolicySettings(staff_room="!staff:localhost", confidentiality_url=url)


@pytest.mark.parametrize(
    ("step", "action"),
    [
        ("remove_again", "removing the member again"),
        ("checkin", "opening the check-in room"),
        ("withdraw_apology", "apologising to the member"),
    ],
)
def test_a_step_that_could_not_be_done_is_named_by_what_it_set_out_to_do(step, action):
    """Not by its outcome's words: "could not be done — member removed again" reads as if
    the member had been removed."""
    body = texts().step_failed(case_number=3, step=step, error="M_FORBIDDEN", reply_to=None)["body"]
    assert f"could not be done — {action}" in body
