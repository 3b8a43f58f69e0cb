"""Crisis resources by region: `region:` picks a built-in pack, an install's own
`resources:` wins, and an install that chose neither is told so."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

import pytest

from appservice.cli import main
from appservice.config import UNCHOSEN_RESOURCES, ConfigError, load_config
from appservice.registration import write_registration
from bot.config.resource_packs import PACKS, pack_for
from bot.config.settings import default_resources
from bot.texts.messages import Texts
from tests.support.policy import alert_body, deployment
from tests.unit.test_config import MINIMAL, write

REGIONS = ("GB", "GB-SCT", "GB-WLS", "GB-NIR", "IE", "US", "CA", "AU")
EMERGENCY = {"GB": "999", "IE": "112", "US": "911", "CA": "911", "AU": "000"}
NOW = dt.datetime(2026, 12, 6, 12, tzinfo=dt.UTC)


def config_with(tmp_path, **top):
    data = {**MINIMAL, "policy": {"staff_room": "!staff:localhost"}, **top}
    path = write(tmp_path, data)
    write_registration(load_config(path), tmp_path / "registration.yaml")
    return path


def test_every_region_the_issue_names_has_a_pack():
    assert set(REGIONS) <= set(PACKS)


@pytest.mark.parametrize("region", REGIONS)
def test_a_pack_says_the_emergency_number_first_then_who_to_talk_to(region):
    pack = PACKS[region]
    first, *rest = pack.resources
    assert first.emergency and EMERGENCY[region.split("-")[0]] in first.contact
    assert rest and not any(r.emergency for r in rest)
    for resource in pack.resources:
        assert resource.verified_on == pack.checked
        assert resource.when, f"{resource.name}: hours and cost are said"
        assert re.search(r"\d", resource.contact), f"{resource.name}: a number to use"
    assert pack.sources and all(s.startswith("https://") for s in pack.sources)


def test_a_line_that_is_not_always_open_never_says_any_time():
    breathing_space = next(r for r in PACKS["GB-SCT"].resources if r.name == "Breathing Space")
    assert "any time" not in breathing_space.when and "6pm" in breathing_space.when


def test_region_picks_its_pack_and_is_read_in_any_case(tmp_path):
    config = load_config(config_with(tmp_path, region="gb-wls"))
    assert config.file.region == "GB-WLS"
    assert config.resources == list(PACKS["GB-WLS"].resources)
    assert not config.resources_unchosen


def test_an_unknown_region_is_refused_naming_the_known_ones(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(config_with_raw(tmp_path, region="FR"))
    message = str(caught.value)
    assert "region:" in message and "'FR'" in message and "GB-WLS" in message


def config_with_raw(tmp_path, **top):
    return write(tmp_path, {**MINIMAL, "policy": {"staff_room": "!staff:localhost"}, **top})


def test_an_installs_own_resources_win_over_its_region(tmp_path):
    own = [{"name": "Our line", "contact": "call 0800 000 000", "verified_on": "2026-12-01"}]
    config = load_config(config_with(tmp_path, region="US", resources=own))
    assert [r.name for r in config.resources] == ["Our line"]


def test_neither_chosen_keeps_the_uk_list_and_says_so(tmp_path, capsys):
    path = config_with(tmp_path)
    config = load_config(path)
    assert config.resources_unchosen
    assert config.resources == default_resources(), "existing installs render as before"
    assert main(["check-config", "-c", str(path)]) == 0
    assert f"warning: {UNCHOSEN_RESOURCES}" in capsys.readouterr().out


def test_check_config_is_quiet_about_resources_once_a_region_is_set(tmp_path, capsys):
    path = config_with(tmp_path, region="IE")
    assert main(["check-config", "-c", str(path)]) == 0
    assert "neither region nor resources" not in capsys.readouterr().out


def test_the_region_is_part_of_the_recorded_config_hash(tmp_path):
    hashes = {load_config(config_with(tmp_path, region=r)).config_hash for r in ("GB", "IE")}
    assert len(hashes) == 2
    unchosen = load_config(config_with(tmp_path)).config_hash
    listed = [r.model_dump(mode="json") for r in default_resources()]
    assert load_config(config_with(tmp_path, resources=listed)).config_hash == unchosen


@pytest.mark.parametrize("region", REGIONS)
def test_the_member_is_told_the_regions_numbers_in_the_notice(region):
    pack = pack_for(region)
    assert pack is not None
    options = dataclasses.replace(deployment(), resources=pack.resources)
    body = Texts(options).notice(NOW + dt.timedelta(hours=20), NOW)["body"]
    for resource in pack.resources:
        assert resource.contact in body or resource.name in body
    assert body.count(pack.resources[0].contact) == 1, "the emergency line is said once"


@pytest.mark.parametrize("region", REGIONS)
def test_staff_are_told_the_regions_emergency_number_never_another(region):
    """The alert's checklist names the emergency line of the community's own region (a
    US team told to "call 999" would lose minutes)."""
    pack = pack_for(region)
    assert pack is not None
    options = dataclasses.replace(deployment(), resources=pack.resources)
    body = alert_body(Texts(options))
    emergency = pack.resources[0]
    assert f"☐ Contact emergency services ({emergency.contact})" in body
    if "999" not in emergency.contact:
        assert "999" not in body
