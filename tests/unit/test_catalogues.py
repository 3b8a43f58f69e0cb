"""Message catalogues: every shipped language complete, in step with the code, compiled as
written; the member, moderator and staff read their community's language; a language no
native speaker has reviewed is said so, at check-config and in /health's detail."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gettext
import string
from pathlib import Path

import pytest
import yaml
from babel.messages.pofile import read_po
from hypothesis import given
from hypothesis import strategies as st

from appservice.cli import main
from appservice.config import ConfigError, load_config
from appservice.registration import write_registration
from bot.config.resource_packs import pack_for
from bot.config.settings import MessageTemplates
from bot.staff.commands import CommandError
from bot.texts.catalogue_tool import TEMPLATE_FILE, catalogue_files, compile_catalogue
from bot.texts.catalogue_tool import template_catalogue as source_catalogue
from bot.texts.catalogues import CatalogueMissing, language, shipped_languages
from bot.texts.messages import StepState, Texts
from bot.texts.templates import CATALOGUE
from bot.texts.wording import checkin_when, duration_words, since_words, when
from tests.support.policy import alert_body, deployment

NOW = dt.datetime(2026, 11, 25, 9, 0, tzinfo=dt.UTC)  # a Wednesday
ZONE = dt.UTC
SHIPPED = [path.parts[-3] for path in catalogue_files()]


def fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name}


def read(path: Path):
    with path.open("rb") as file:
        return read_po(file)


def keys(catalogue) -> set[tuple[str | None, str]]:
    return {(message.context, message.id) for message in catalogue if message.id}


def test_welsh_is_shipped():
    assert SHIPPED == ["cy"]
    assert shipped_languages() == ("en", "cy")


def test_the_template_file_is_in_step_with_the_code():
    """A text changed in the code and not taken into the catalogues (`make messages`)
    would be sent in English to a Welsh community: the build refuses it."""
    assert keys(read(TEMPLATE_FILE)) == keys(source_catalogue())


@pytest.mark.parametrize("code", SHIPPED)
def test_every_shipped_catalogue_is_complete_and_keeps_every_placeholder(code):
    catalogue = read(Path(f"bot/texts/locale/{code}/LC_MESSAGES/safeguard.po"))
    assert keys(catalogue) == keys(source_catalogue()), "run `make messages`, then translate"
    # pybabel (the image build) skips a catalogue whose header is fuzzy, and says nothing.
    assert not catalogue.fuzzy, "the header is marked fuzzy: remove the mark"
    for message in catalogue:
        if not message.id:
            continue
        where = f"{code}: {message.context or ''} {message.id[:60]!r}"
        assert message.string, f"untranslated: {where}"
        assert not message.fuzzy, f"fuzzy (changed since it was translated): {where}"
        assert fields(message.string) == fields(message.id), f"placeholders differ: {where}"


@pytest.mark.parametrize("code", SHIPPED)
def test_the_compiled_catalogue_is_the_one_written(code, tmp_path):
    source = Path(f"bot/texts/locale/{code}/LC_MESSAGES/safeguard.po")
    compile_catalogue(source, tmp_path / "fresh.mo")
    with (tmp_path / "fresh.mo").open("rb") as file:
        fresh = gettext.GNUTranslations(file)
    shipped = language(code).translations
    for message in read(source):
        if message.id:
            for compiled, problem in ((fresh, "compiled wrong"), (shipped, "stale: run `make`")):
                looked_up = (
                    compiled.pgettext(message.context, message.id)
                    if message.context
                    else compiled.gettext(message.id)
                )
                assert looked_up == message.string, f"the .mo is {problem}"


def test_an_unknown_language_is_refused_with_the_choices():
    with pytest.raises(CatalogueMissing, match="there are: en, cy"):
        language("xx")


def welsh(**options) -> Texts:
    return Texts(dataclasses.replace(deployment(**options), language="cy"))


def test_the_member_is_told_in_welsh_with_the_welsh_resources():
    pack = pack_for("GB-WLS")
    assert pack is not None
    texts = Texts(dataclasses.replace(deployment(), language="cy", resources=pack.resources))
    body = texts.notice(NOW + dt.timedelta(hours=25), NOW)["body"]
    assert body.startswith("Rydyn ni'n poeni amdanat ti.")
    assert "We're" not in body and "call " not in body
    assert "ffonia 999" in body  # the emergency line, in Welsh, from the pack
    assert "0808 164 0123 i siarad yn Gymraeg" in body
    assert "yfory" in body  # when the check-in is, in Welsh


def test_every_welsh_template_renders_with_its_placeholders():
    cy = language("cy")
    for name, (english, allowed) in CATALOGUE.items():
        translated = cy.template(name, english)
        assert translated != english, f"{name} untranslated"
        translated.format_map(dict.fromkeys(allowed, "x"))


def test_staff_read_the_alert_in_welsh_with_welsh_dates():
    body = alert_body(
        welsh(),
        member="Sam (@sam:localhost)",
        room="Group (!g:localhost)",
        flagger="Mo (@mo:localhost)",
        flagged_at=NOW,
        method="🚨",
        removal=StepState("waiting", why="the homeserver is away"),
        late_by=dt.timedelta(minutes=3),
        due_at=NOW + dt.timedelta(days=1),
    )
    assert body.startswith("Achos #7\nAelod: Sam (@sam:localhost)")
    assert "Mer 25 Tach 2026" in body
    assert "cyrhaeddodd 3 munud yn hwyr" in body
    assert "(dim un wedi'i roi)" in body
    assert "✔ Cafodd yr aelod wybod trwy neges uniongyrchol" in body
    assert "!case 7 ack" in body


def test_an_operators_own_text_still_wins_in_welsh():
    own = MessageTemplates(kick_reason="Symudwyd")
    assert welsh(messages=own).kick_reason(notified=True) == "Symudwyd"
    assert welsh().kick_reason(notified=True) == "Tynnwyd gan gymedrolwr"


def test_english_reads_exactly_as_before():
    assert when(NOW, ZONE) == "Wed 25 Nov 2026, 09:00"
    assert duration_words(dt.timedelta(hours=1, minutes=30)) == "1 h 30 min"
    assert duration_words(dt.timedelta(days=2)) == "2 days"
    assert checkin_when(NOW, NOW + dt.timedelta(days=1), ZONE) == "tomorrow morning"
    assert checkin_when(NOW, NOW + dt.timedelta(days=3), ZONE) == "on Saturday"
    assert since_words(NOW - dt.timedelta(days=9), NOW, ZONE) == "on 16 November"


@given(
    seconds=st.integers(min_value=-10, max_value=400 * 86400),
    code=st.sampled_from(shipped_languages()),
)
def test_times_and_delays_read_in_every_language(seconds, code):
    lang = language(code)
    delta = dt.timedelta(seconds=seconds)
    for text in (
        duration_words(delta, lang),
        checkin_when(NOW, NOW + delta, ZONE, lang),
        since_words(NOW - delta, NOW, ZONE, lang),
        when(NOW + delta, ZONE, lang),
    ):
        assert text and "{" not in text


# ---- config -------------------------------------------------------------------------------


def config_with(tmp_path: Path, **top) -> Path:
    data = {
        "homeserver": {"url": "http://127.0.0.1:8008", "domain": "localhost"},
        "appservice": {"url": "http://127.0.0.1:29333"},
        "policy": {"staff_room": "!staff:localhost"},
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    write_registration(load_config(path), tmp_path / "registration.yaml")
    return path


def test_an_unknown_language_stops_the_config(tmp_path):
    with pytest.raises(ConfigError, match=r"language: no message catalogue for language 'fr'"):
        config_with(tmp_path, language="fr")


def test_an_unreviewed_language_is_warned_of_until_the_charity_lists_it(tmp_path, capsys):
    unreviewed = load_config(config_with(tmp_path, language="cy"))
    assert unreviewed.language_warnings
    assert main(["check-config", "-c", str(tmp_path / "config.yaml")]) == 0
    out = capsys.readouterr().out
    assert "warning: language 'cy': its built-in texts are not marked reviewed" in out
    reviewed = config_with(tmp_path, language="cy", messages={"reviewed_locales": ["en", "cy"]})
    assert not load_config(reviewed).language_warnings
    assert main(["check-config", "-c", str(reviewed)]) == 0
    assert "not marked reviewed" not in capsys.readouterr().out
    # English is the texts' source: never warned of, whatever the list says.
    assert not load_config(config_with(tmp_path)).language_warnings
    only_cy = config_with(tmp_path, messages={"reviewed_locales": ["cy"]})
    assert not load_config(only_cy).language_warnings


def test_a_catalogue_never_compiled_stops_check_config_not_the_start(tmp_path, monkeypatch):
    from bot.texts import catalogues

    uncompiled = tmp_path / "locale" / "xx" / "LC_MESSAGES"
    uncompiled.mkdir(parents=True)
    (uncompiled / "safeguard.po").write_text('msgid ""\nmsgstr ""\n', encoding="utf-8")
    monkeypatch.setattr(catalogues, "LOCALE_DIR", tmp_path / "locale")
    with pytest.raises(CatalogueMissing, match="never compiled: run `make`"):
        language("xx")
    with pytest.raises(ConfigError, match="language: the 'xx' message catalogue was never"):
        config_with(tmp_path, language="xx")


def test_an_empty_setting_stays_empty_in_every_language():
    """gettext answers an empty text with the catalogue's header: never sent to anyone."""
    assert language("cy")._("") == "" and language("cy").resource("") == ""
    debrief = welsh(moderator_support="").moderator_debrief(case_number=1, due_at=None, now=NOW)[
        "body"
    ]
    assert "Project-Id-Version" not in debrief and "Content-Type" not in debrief


def test_the_language_is_part_of_the_recorded_config_hash(tmp_path):
    english = load_config(config_with(tmp_path)).config_hash
    assert load_config(config_with(tmp_path, language="cy")).config_hash != english


# ---- what staff read in reply to their commands ----------------------------------------------


def test_a_case_timeline_and_listing_read_in_welsh():
    from zoneinfo import ZoneInfo

    from bot.staff.replies import case_listing, case_timeline
    from bot.steps import STEP_TYPES
    from bot.store.audit import AuditEntry
    from bot.store.cases import Case

    at = dt.datetime(2026, 7, 1, 9, 30, tzinfo=dt.UTC)
    fields = dict.fromkeys(Case.__dataclass_fields__)
    fields |= {"id": 3, "member_id": "@m:l", "room_id": "!r:l", "state": "open"}
    fields |= {"received_at": at, "due_at": at + dt.timedelta(days=1)}
    case = Case(**fields)

    def entry(kind: str, **facts: object) -> AuditEntry:
        return AuditEntry(1, 3, at, kind, dict(facts), None, "v", "h", "x")

    steps = [entry(f"step.{step.name}", status="done") for step in STEP_TYPES]
    failed = entry("step.redact_flag", status="failed", why="the homeserver refused")
    cy = language("cy")
    names = {"!r:l": "Grŵp", "@m:l": "Sam"}
    shown = case_timeline(
        case, [*steps, failed], zone=ZoneInfo("Europe/London"), names=names, language=cy
    )
    assert shown.startswith("Achos #3: Sam (@m:l) yn Grŵp (!r:l) — agored (amseroedd: Europe")
    assert (
        "Mer 01 Gorff 2026, 10:30  y fflag wedi'i thynnu o'r ystafell — wedi methu; pam:" in shown
    )
    english = case_timeline(case, [*steps, failed], names=names)
    assert len(shown.splitlines()) == len(english.splitlines())
    for line in shown.splitlines()[1:]:
        assert line not in english, f"an English line among the Welsh: {line}"
    listing = case_listing([case], "open", at + dt.timedelta(hours=2), language=cy)
    assert listing.startswith("Achosion (agored), 1–1 o 1 (amseroedd: UTC):")
    assert (
        "#3 @m:l yn !r:l — agored, ers 2 awr, ystafell gysylltu'n agor Iau 02 Gorff 2026, 09:30"
        in listing
    )
    assert case_listing([], "open", at, language=cy) == "Dim achosion (agored)."


def test_a_command_that_cannot_be_read_is_explained_in_welsh():
    from bot.staff.commands import USAGE, parse_case_command

    error = parse_case_command("!case 5 note")
    assert isinstance(error, CommandError)
    assert error.in_(language("cy")) == "ysgrifennwch `!case 5 note <text>`"
    assert error.message == "write `!case 5 note <text>`"
    assert language("cy")._(USAGE).startswith("!case list [open|closed|all] [tudalen] — yr")


def test_the_check_in_and_the_notice_carry_no_english_in_welsh():
    """The words code puts into a template (who is checking in, the weekday, the UK list
    used when no region is chosen) are in the catalogue too."""
    texts = welsh()  # the default resources: no region chosen
    checkin = texts.checkin(
        flagged_at=NOW - dt.timedelta(days=3),
        now=NOW,
        staff_roles=[texts.language._("a member of our staff team")],
    )["body"]
    assert checkin.startswith("Helo, dyma ystafell breifat i ti ac aelod o'n tîm staff.")
    assert "ddydd Sul" in checkin  # three days before a Wednesday, as an adverb
    notice = texts.notice(NOW + dt.timedelta(days=3), NOW)["body"]
    assert "ddydd Sadwrn" in notice and "tecstia THEMIX i 85258" in notice
    for english in ("call ", "text ", "free", "if you", "any time"):
        assert english not in notice, english


def test_the_alerts_own_words_and_the_flags_method_are_translated():
    body = alert_body(
        welsh(),
        case_number=2,
        flagger="Mo",
        reason="poeni",
        notice=StepState("waiting", why="not tried yet"),
        removal=StepState("waiting", why="waiting until they have been told"),
        due_at=None,
    )
    assert "Wedi'i fflagio gan Mo (ymateb)" in body
    assert "heb ei drio eto" in body and "yn aros nes eu bod wedi cael gwybod" in body
    # A reason recorded from elsewhere (the homeserver's) is quoted as it was recorded.
    refused = welsh().step_failed(
        case_number=2, step="checkin_reminder", error="M_FORBIDDEN", reply_to=None
    )["body"]
    assert "atgoffa'r staff am y sgwrs gysylltu" in refused, "what it set out to do"
    assert "(M_FORBIDDEN)" in refused
