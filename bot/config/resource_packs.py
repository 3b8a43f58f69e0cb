"""Built-in crisis resources by region (`region:` in the config): who a member can talk
to now, where they are.

Each pack names the emergency number first, then the services for young people, then
the national crisis lines, each with how to reach it, its hours and cost, and the date
it was last checked against the sources listed with it (also in the README). Numbers
change: a charity reviews its pack before use, and `resources_max_age_days` warns when
a pack was checked too long ago. An install's own `resources:` list always wins.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from bot.config.settings import Resource


@dataclass(frozen=True)
class ResourcePack:
    region: str
    checked: dt.date
    resources: tuple[Resource, ...]
    sources: tuple[str, ...]


CHECKED = dt.date(2026, 12, 6)


def _pack(region: str, entries: list[tuple[str, str, str]], sources: list[str]) -> ResourcePack:
    """(name, contact, when) per entry; the first is the emergency line."""
    resources = tuple(
        Resource(name=name, contact=contact, when=when, verified_on=CHECKED, emergency=index == 0)
        for index, (name, contact, when) in enumerate(entries)
    )
    return ResourcePack(region, CHECKED, resources, tuple(sources))


_EMERGENCY_WHEN = "if your life is in danger right now"
_SAMARITANS = ("Samaritans", "call 116 123", "free, any time, day or night")
_SHOUT = ("Shout", "text SHOUT to 85258", "free, any time, by text")
_CHILDLINE_UK = ("Childline", "call 0800 1111", "free, any time, if you are 18 or under")

PACKS: dict[str, ResourcePack] = {
    pack.region: pack
    for pack in (
        _pack(
            "GB",  # England (and the UK where no nation's pack is chosen)
            [
                ("Emergency services", "call 999 or go to A&E", _EMERGENCY_WHEN),
                _CHILDLINE_UK,
                (
                    "Papyrus HOPELINE247",
                    "call 0800 068 4141",
                    "free, any time, if you are under 35",
                ),
                _SHOUT,
                _SAMARITANS,
                (
                    "NHS 111",
                    "call 111 and choose the mental health option",
                    "free, any time, urgent but not an emergency",
                ),
            ],
            [
                "https://www.childline.org.uk/get-support/contacting-childline/",
                "https://www.papyrus-uk.org/papyrus-hopeline247/",
                "https://giveusashout.org/get-help/",
                "https://www.samaritans.org/how-we-can-help/contact-samaritan/",
                "https://www.nhs.uk/nhs-services/mental-health-services/where-to-get-urgent-help-for-mental-health/",
            ],
        ),
        _pack(
            "GB-SCT",  # Scotland
            [
                ("Emergency services", "call 999 or go to A&E", _EMERGENCY_WHEN),
                _CHILDLINE_UK,
                (
                    "Breathing Space",
                    "call 0800 83 85 87",
                    "free, if you are 16 or over; not always open: Monday to Thursday "
                    "6pm to 2am, and Friday 6pm to Monday 6am",
                ),
                _SHOUT,
                _SAMARITANS,
                (
                    "NHS 24",
                    "call 111",
                    "free, any time, urgent but not an emergency",
                ),
            ],
            [
                "https://www.childline.org.uk/get-support/contacting-childline/",
                "https://breathingspace.scot/",
                "https://giveusashout.org/get-help/",
                "https://www.samaritans.org/scotland/how-we-can-help/contact-samaritan/",
                "https://www.nhs24.scot/111/",
            ],
        ),
        _pack(
            "GB-WLS",  # Wales
            [
                ("Emergency services", "call 999 or go to A&E", _EMERGENCY_WHEN),
                (
                    "Meic",
                    "call 080880 23456 or text 84001",
                    "free, 8am to midnight every day, if you are 25 or under",
                ),
                _CHILDLINE_UK,
                (
                    "C.A.L.L. Mental Health Listening Line",
                    "call 0800 132 737 or text 'help' to 81066",
                    "free, any time",
                ),
                (
                    "Samaritans",
                    "call 116 123, or 0808 164 0123 to talk in Welsh",
                    "free; 116 123 any time, the Welsh line only 7pm to 11pm every day",
                ),
                (
                    "NHS 111 Wales",
                    "call 111 and press 2 for mental health",
                    "free, any time, urgent but not an emergency",
                ),
            ],
            [
                "https://www.meic.cymru/",
                "https://www.childline.org.uk/get-support/contacting-childline/",
                "https://www.callhelpline.org.uk/",
                "https://www.samaritans.org/wales/how-we-can-help/contact-samaritan/",
                "https://111.wales.nhs.uk/",
            ],
        ),
        _pack(
            "GB-NIR",  # Northern Ireland
            [
                ("Emergency services", "call 999 or go to A&E", _EMERGENCY_WHEN),
                _CHILDLINE_UK,
                ("Lifeline", "call 0808 808 8000", "free, any time"),
                _SHOUT,
                _SAMARITANS,
            ],
            [
                "https://www.childline.org.uk/get-support/contacting-childline/",
                "https://www.lifelinehelpline.info/",
                "https://giveusashout.org/get-help/",
                "https://www.samaritans.org/northern-ireland/how-we-can-help/contact-samaritan/",
            ],
        ),
        _pack(
            "IE",  # Ireland
            [
                (
                    "Emergency services",
                    "call 112 or 999, or go to an emergency department",
                    _EMERGENCY_WHEN,
                ),
                (
                    "Childline (ISPCC)",
                    "call 1800 66 66 66",
                    "free, any time, if you are under 18",
                ),
                ("50808", "text HELLO to 50808", "free, any time, by text"),
                ("Pieta", "call 1800 247 247 or text HELP to 51444", "free, any time"),
                _SAMARITANS,
            ],
            [
                "https://www.childline.ie/",
                "https://text50808.ie/",
                "https://www.pieta.ie/",
                "https://www.samaritans.org/ireland/how-we-can-help/contact-samaritan/",
            ],
        ),
        _pack(
            "US",  # the United States
            [
                ("Emergency services", "call 911", _EMERGENCY_WHEN),
                (
                    "988 Suicide & Crisis Lifeline",
                    "call or text 988",
                    "free, any time",
                ),
                ("Crisis Text Line", "text HOME to 741741", "free, any time, by text"),
                (
                    "The Trevor Project",
                    "call 1-866-488-7386 or text START to 678-678",
                    "free, any time, for LGBTQ+ young people under 25",
                ),
            ],
            [
                "https://988lifeline.org/",
                "https://www.crisistextline.org/",
                "https://www.thetrevorproject.org/get-help/",
            ],
        ),
        _pack(
            "CA",  # Canada
            [
                ("Emergency services", "call 911", _EMERGENCY_WHEN),
                (
                    "Kids Help Phone",
                    "call 1-800-668-6868 or text CONNECT to 686868",
                    "free, any time, for young people",
                ),
                ("9-8-8 Suicide Crisis Helpline", "call or text 988", "free, any time"),
            ],
            [
                "https://kidshelpphone.ca/",
                "https://988.ca/",
            ],
        ),
        _pack(
            "AU",  # Australia
            [
                ("Emergency services", "call 000", _EMERGENCY_WHEN),
                (
                    "Kids Helpline",
                    "call 1800 55 1800",
                    "free, any time, if you are 5 to 25",
                ),
                ("Lifeline", "call 13 11 14 or text 0477 13 11 14", "any time, free from mobiles"),
                ("Suicide Call Back Service", "call 1300 659 467", "any time"),
            ],
            [
                "https://kidshelpline.com.au/",
                "https://www.lifeline.org.au/",
                "https://www.suicidecallbackservice.org.au/",
            ],
        ),
    )
}


def pack_for(region: str) -> ResourcePack | None:
    """The built-in pack of a region code (as written in the config, any case)."""
    return PACKS.get(region.strip().upper())
