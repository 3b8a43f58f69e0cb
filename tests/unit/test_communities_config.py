"""`communities:` in the config: each community's settings resolved from its own keys and
the top level's, and every way two communities could overlap refused with a clear line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml

from appservice.cli import main
from appservice.config import ConfigError, load_config
from appservice.registration import write_registration

WALES = {
    "id": "wales",
    "name": "Young Voices Cymru",
    "staff_room": "!cymru:localhost",
    "staff": ["@dewi:localhost"],
    "rooms": ["#grwp:localhost"],
    "language": "cy",
    "region": "GB-WLS",
    "checkin": {"at": "10:00", "timezone": "Europe/London"},
}
DUBLIN = {
    "id": "dublin",
    "name": "Young Voices Dublin",
    "staff_room": "!dublin:localhost",
    "staff": ["@aoife:localhost"],
    "rooms": ["!dublin-group:localhost"],
    "region": "IE",
    "policy": {"reactions": ["🆘"], "ack_within": "5m"},
}


def config_file(tmp_path: Path, **top) -> Path:
    data = {
        "homeserver": {"url": "http://127.0.0.1:8008", "domain": "localhost"},
        "appservice": {"url": "http://127.0.0.1:29333"},
        **top,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def with_communities(tmp_path: Path, *communities, **top) -> Path:
    path = config_file(tmp_path, communities=list(communities), **top)
    write_registration(load_config(path), tmp_path / "registration.yaml")
    return path


def test_without_communities_the_install_is_the_one_community_default(tmp_path):
    path = config_file(tmp_path, policy={"staff_room": "!staff:localhost"}, language="cy")
    (community,) = load_config(path).communities
    assert community.id == "default" and community.language == "cy"
    assert community.policy.staff_room == "!staff:localhost"


def test_each_community_resolves_its_own_keys_over_the_top_levels(tmp_path):
    path = with_communities(
        tmp_path,
        WALES,
        DUBLIN,
        policy={"ack_within": "20m", "dry_run": True},
        checkin={"remind_after": "2h"},
    )
    wales, dublin = load_config(path).communities
    assert (wales.id, wales.name, wales.language) == ("wales", "Young Voices Cymru", "cy")
    assert wales.policy.staff_room == "!cymru:localhost" and wales.policy.staff == [
        "@dewi:localhost"
    ]
    assert wales.policy.ack_within == dt.timedelta(minutes=20), "the top level's"
    assert wales.policy.dry_run and dublin.policy.dry_run
    assert wales.checkin.at == dt.time(10, 0)
    assert wales.checkin.remind_after == dt.timedelta(hours=2), "the top level's"
    assert dublin.policy.ack_within == dt.timedelta(minutes=5), "its own"
    assert dublin.policy.reactions == ["🆘"] and wales.policy.reactions == ["🚨"]
    assert dublin.language == "en" and dublin.rooms == ("!dublin-group:localhost",)
    assert "999" in " ".join(r.contact for r in wales.resources)
    assert any("112" in r.contact for r in dublin.resources)
    assert not wales.resources_unchosen and not dublin.resources_unchosen


@pytest.mark.parametrize(
    ("top", "communities", "complaint"),
    [
        (
            {"policy": {"staff_room": "!x:localhost"}},
            [WALES],
            "policy.staff_room: with communities",
        ),
        ({"policy": {"staff": ["@a:localhost"]}}, [WALES], "policy.staff: with communities"),
        ({}, [WALES, WALES | {"staff_room": "!y:localhost"}], "the id 'wales' is used twice"),
        (
            {},
            [WALES, DUBLIN | {"rooms": ["#grwp:localhost"]}],
            "#grwp:localhost is claimed by both 'wales' and 'dublin'",
        ),
        (
            {},
            [WALES, DUBLIN | {"staff_room": "!cymru:localhost"}],
            "!cymru:localhost is claimed by both",
        ),
        ({}, [WALES | {"policy": {"staff_room": "!z:localhost"}}], "the community's own key"),
        (
            {},
            [WALES | {"space": "#s:localhost"}, DUBLIN | {"space": "#s:localhost"}],
            "#s:localhost is claimed by both",
        ),
        ({}, [WALES | {"policy": {"ack_within": "soon"}}], "communities[wales].policy: ack_within"),
        ({}, [WALES | {"policy": {"no_such_key": 1}}], "no_such_key"),
        ({}, [WALES | {"policy": {"retention_days": 30}}], "retention_days is the whole install's"),
        ({}, [WALES | {"id": "Wales Cymru"}], "communities.0.id"),
        ({}, [WALES | {"language": "fr"}], "no message catalogue for language 'fr'"),
        ({}, [WALES | {"region": "FR"}], "no built-in crisis resources for region 'FR'"),
        ({}, [], "communities"),
    ],
)
def test_overlapping_or_wrong_communities_are_refused_with_the_key_named(
    tmp_path, top, communities, complaint
):
    path = config_file(tmp_path, communities=communities, **top)
    with pytest.raises(ConfigError) as refused:
        load_config(path)
    assert complaint in str(refused.value)


def test_check_config_names_the_community_a_warning_is_about(tmp_path, capsys):
    unchosen = {k: v for k, v in DUBLIN.items() if k != "region"}
    path = with_communities(tmp_path, WALES, unchosen)
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning: community wales: language 'cy'" in out
    assert "warning: community dublin: neither region nor resources is set" in out
    assert "community wales: neither" not in out, "its own region chose for it"
    # Wales lists a room by alias: anyone could make it first, and have theirs moderated.
    assert "warning: community wales: rooms: #grwp:localhost is an alias" in out
    assert "community dublin: rooms" not in out, "a room id leaves no doubt"


def test_the_config_hash_changes_with_a_communitys_settings(tmp_path):
    first = load_config(with_communities(tmp_path, WALES, DUBLIN)).config_hash
    changed = DUBLIN | {"policy": {"reactions": ["🆘", "🚨"]}}
    assert load_config(with_communities(tmp_path, WALES, changed)).config_hash != first


def test_a_community_without_crisis_resources_of_its_own_is_warned_of(tmp_path, capsys):
    """The top level's region is not a community's: Dublin's members would be shown the
    UK's numbers, so check-config says so."""
    dublin = {k: v for k, v in DUBLIN.items() if k != "region"}
    path = with_communities(tmp_path, WALES, dublin, region="GB")
    wales, dublin_resolved = load_config(path).communities
    assert dublin_resolved.resources_unchosen and not wales.resources_unchosen
    assert main(["check-config", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        "warning: community dublin: no region or resources of its own: its members are "
        "shown the top level's crisis resources (region GB)"
    ) in out
    assert "community wales: no region" not in out
