"""Who the bot's room keys go to: the recorded shares, and reading cross-signatures."""

from __future__ import annotations

import copy
from typing import Any

import peewee
import vodozemac
from nio import Api

from appservice.key_sharing import SessionShares, cross_signed_devices

USER = "@staff:example.org"


def sign(key: vodozemac.Account, signed: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in signed.items() if k not in ("signatures", "unsigned")}
    signature = key.sign(Api.to_canonical_json(body).encode()).to_base64()
    name = f"ed25519:{key.ed25519_key.to_base64()}"
    return {**signed, "signatures": {USER: {name: signature}}}


def cross_signing_key(key: vodozemac.Account, usage: str) -> dict[str, Any]:
    public = key.ed25519_key.to_base64()
    return {"user_id": USER, "usage": [usage], "keys": {f"ed25519:{public}": public}}


def device(device_id: str) -> dict[str, Any]:
    ed25519 = vodozemac.Account().ed25519_key.to_base64()
    return {
        "user_id": USER,
        "device_id": device_id,
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "keys": {f"ed25519:{device_id}": ed25519, f"curve25519:{device_id}": "c"},
        "unsigned": {"device_display_name": "phone"},
    }


def answer() -> tuple[dict[str, Any], str]:
    """A /keys/query answer: PHONE cross-signed, LAPTOP not; and PHONE's Ed25519 key."""
    master, self_signing = vodozemac.Account(), vodozemac.Account()
    phone, laptop = device("PHONE"), device("LAPTOP")
    query = {
        "device_keys": {USER: {"PHONE": sign(self_signing, phone), "LAPTOP": laptop}},
        "master_keys": {USER: cross_signing_key(master, "master")},
        "self_signing_keys": {USER: sign(master, cross_signing_key(self_signing, "self_signing"))},
    }
    return query, phone["keys"]["ed25519:PHONE"]


def test_a_device_signed_by_the_owners_self_signing_key_is_cross_signed():
    query, phone_key = answer()
    assert cross_signed_devices(query) == {USER: frozenset({("PHONE", phone_key)})}


def test_a_signature_over_other_keys_or_by_an_unsigned_key_counts_for_nothing():
    query, _ = answer()
    tampered = copy.deepcopy(query)
    tampered["device_keys"][USER]["PHONE"]["keys"]["curve25519:PHONE"] = "another"
    assert cross_signed_devices(tampered) == {USER: frozenset()}
    unsigned = copy.deepcopy(query)
    unsigned["self_signing_keys"][USER].pop("signatures")
    assert cross_signed_devices(unsigned) == {USER: frozenset()}
    no_master = copy.deepcopy(query)
    no_master.pop("master_keys")
    assert cross_signed_devices(no_master) == {USER: frozenset()}
    assert cross_signed_devices({}) == {}


def test_a_session_is_known_as_given_only_to_the_devices_recorded():
    shares = SessionShares(peewee.SqliteDatabase(":memory:"))
    shares.record("S1", "!room", [(USER, "PHONE", "curve-phone")])
    shares.record("S1", "!room", [(USER, "PHONE", "curve-phone")])  # again: no harm
    assert shares.given_to("S1", "!room", USER, "PHONE") == "curve-phone"
    assert shares.given_to("S1", "!room", USER, "LAPTOP") is None
    assert shares.given_to("S1", "!other", USER, "PHONE") is None
    assert shares.given_to("S2", "!room", USER, "PHONE") is None
