"""The message catalogues: every text a person reads, in the language their community speaks.

The English texts in the code are the catalogue's source (gettext's message ids); each
other language is a `.po` file under `bot/texts/locale/<code>/LC_MESSAGES/`, compiled to
`.mo` at build (`make`, the image build: `python -m bot.texts.catalogue_tool compile`).
A template's default is looked up with its name as the context, so translators see what
each text is for; the short phrases around it (a step's state, a time of day) by their
English alone.

A language is chosen per community (`language:`, default `en`). A translation is used only
once the charity has had a native speaker read it (`messages.reviewed_locales`): until
then `check-config` warns and `/health` says so, because a crisis message that reads
wrongly can do harm.
"""

from __future__ import annotations

import datetime as dt
import gettext
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from babel.dates import format_datetime

DOMAIN = "safeguard"
LOCALE_DIR = Path(__file__).with_name("locale")
SOURCE_LANGUAGE = "en"
# The context of the built-in crisis resources' phrases (how to reach a service, its hours).
RESOURCE_CONTEXT = "resource"


def N_(message: str) -> str:
    """Marks an English text for the catalogue where it is written (a table of words); it
    is translated where it is used, by `Language._`."""
    return message


class CatalogueMissing(Exception):
    """A language whose catalogue is not there, or was never compiled."""


def _catalogue_path(code: str, suffix: str) -> Path:
    return LOCALE_DIR / code / "LC_MESSAGES" / f"{DOMAIN}{suffix}"


def shipped_languages() -> tuple[str, ...]:
    """English, and every language with a catalogue in the package (compiled or not)."""
    found = {
        path.name
        for path in (LOCALE_DIR.iterdir() if LOCALE_DIR.is_dir() else ())
        if _catalogue_path(path.name, ".po").exists() or _catalogue_path(path.name, ".mo").exists()
    }
    return (SOURCE_LANGUAGE, *sorted(found - {SOURCE_LANGUAGE}))


@dataclass(frozen=True)
class Language:
    """One language's texts: a lookup of the English, and dates as its speakers write them."""

    code: str
    translations: gettext.NullTranslations

    def _(self, message: str) -> str:
        """A phrase in this language (the English if the catalogue lacks it). An empty
        text stays empty: gettext would answer it with the catalogue's header."""
        return self.translations.gettext(message) if message else message

    def template(self, name: str, english: str) -> str:
        """The built-in template `name` in this language."""
        return self.translations.pgettext(name, english)

    def resource(self, phrase: str) -> str:
        """A built-in crisis resource's phrase; an install's own are left as written."""
        return self.translations.pgettext(RESOURCE_CONTEXT, phrase) if phrase else phrase

    def date(self, at: dt.datetime | dt.date, pattern: str) -> str:
        """`at` by a CLDR pattern (`EEE dd MMM y, HH:mm`), with this language's names."""
        return format_datetime(at, pattern, locale=self.code)


@cache
def language(code: str = SOURCE_LANGUAGE) -> Language:
    """The language `code`, its compiled catalogue loaded once; CatalogueMissing says why not."""
    if code == SOURCE_LANGUAGE:
        return Language(code, gettext.NullTranslations())
    compiled = _catalogue_path(code, ".mo")
    if not compiled.exists():
        if _catalogue_path(code, ".po").exists():
            raise CatalogueMissing(
                f"the {code!r} message catalogue was never compiled: run `make` (or "
                "`python -m bot.texts.catalogue_tool compile`) in the source tree"
            )
        raise CatalogueMissing(
            f"no message catalogue for language {code!r} "
            f"(there are: {', '.join(shipped_languages())})"
        )
    with compiled.open("rb") as file:
        return Language(code, gettext.GNUTranslations(file))
