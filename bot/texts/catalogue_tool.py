"""Keep the message catalogues in step with the code, and compile them (Babel).

    python -m bot.texts.catalogue_tool update    # the .pot from the code; each .po updated
    python -m bot.texts.catalogue_tool compile   # each .po to the .mo the service reads

`update` collects every English text a person may read: each template's default (its
name as the context), the phrases marked `language._(...)` in `bot/`, and the built-in
crisis resources' phrases. New texts arrive untranslated in each `.po`, changed ones
marked fuzzy; a test refuses a catalogue with either, so a language is complete or the
build says which texts it lacks.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.extract import extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po, write_po

from bot.config.resource_packs import PACKS
from bot.config.settings import CheckinSettings, PolicySettings, default_resources
from bot.texts.catalogues import DOMAIN, LOCALE_DIR, RESOURCE_CONTEXT, SOURCE_LANGUAGE
from bot.texts.templates import CATALOGUE

PACKAGE = Path(__file__).resolve().parents[1]
TEMPLATE_FILE = LOCALE_DIR / f"{DOMAIN}.pot"


def source_messages() -> Iterator[tuple[str | None, str, str]]:
    """(context, English, where) of every text to translate."""
    for name, (text, _) in CATALOGUE.items():
        yield name, text, "bot/texts/templates.py"
    # `_` is a method of a Language (Babel's extractor matches the name at any call); `N_`
    # marks a text in a table, translated where it is used.
    for filename, lineno, message, _comments, context in extract_from_dir(
        PACKAGE, keywords={"_": None, "N_": None}, comment_tags=(), strip_comment_tags=True
    ):
        if isinstance(message, str):
            yield context, message, f"bot/{filename}:{lineno}"
    packs = [pack.resources for pack in PACKS.values()]
    for resources in [*packs, default_resources()]:
        for resource in resources:
            for phrase in (resource.contact, resource.when):
                if phrase:
                    yield RESOURCE_CONTEXT, phrase, "bot/config/resource_packs.py"
    # The settings' defaults that people read (an install's own values are its own).
    policy, checkin = PolicySettings(), CheckinSettings()
    for phrase in (policy.moderator_support, policy.lawful_basis, checkin.room_name):
        yield None, phrase, "bot/config/settings.py"


def template_catalogue() -> Catalog:
    catalogue = Catalog(project="matrix-safeguard", domain=DOMAIN, locale=SOURCE_LANGUAGE)
    for context, message, where in source_messages():
        path, _, line = where.partition(":")
        catalogue.add(message, context=context, locations=[(path, int(line) if line else 0)])
    return catalogue


def catalogue_files(suffix: str = ".po") -> list[Path]:
    return sorted(LOCALE_DIR.glob(f"*/LC_MESSAGES/{DOMAIN}{suffix}"))


def update() -> None:
    template = template_catalogue()
    LOCALE_DIR.mkdir(exist_ok=True)
    with TEMPLATE_FILE.open("wb") as file:
        write_po(file, template, width=100, omit_header=False)
    for path in catalogue_files():
        with path.open("rb") as file:
            catalogue = read_po(file)
        catalogue.update(template, no_fuzzy_matching=False)
        with path.open("wb") as file:
            write_po(file, catalogue, width=100, ignore_obsolete=True)
        print(f"updated {path.relative_to(PACKAGE.parent)}")


def compile_catalogue(source: Path, target: Path) -> None:
    with source.open("rb") as file:
        catalogue = read_po(file)
    with target.open("wb") as file:
        write_mo(file, catalogue, use_fuzzy=False)


def compile_all() -> None:
    for path in catalogue_files():
        compile_catalogue(path, path.with_suffix(".mo"))


def main(argv: list[str]) -> int:
    if argv[:1] == ["compile"] and len(argv) == 3:  # one catalogue: make's rule, per file
        compile_catalogue(Path(argv[1]), Path(argv[2]))
        return 0
    commands = {"update": update, "compile": compile_all}
    if len(argv) != 1 or argv[0] not in commands:
        print(
            "usage: python -m bot.texts.catalogue_tool update|compile [SOURCE.po TARGET.mo]",
            file=sys.stderr,
        )
        return 2
    commands[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
