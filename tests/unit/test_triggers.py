"""Flag recognition: reactions (incl. encrypted), reply commands, named users; never raises."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.referral.triggers import normalise_key, recognise_flag, strip_reply_fallback

KEYS = {"reactions": ["🚨"], "command": "!safeguard"}
BASE = {"event_id": "$flag", "room_id": "!room:l", "sender": "@mod:l"}


def message(body: str, **content) -> dict:
    return BASE | {
        "type": "m.room.message",
        "content": {"msgtype": "m.text", "body": body} | content,
    }


def reaction(key: str, event_type: str = "m.reaction", **extra) -> dict:
    relates = {"rel_type": "m.annotation", "event_id": "$target", "key": key}
    return BASE | {"type": event_type, "content": {"m.relates_to": relates} | extra}


@pytest.mark.parametrize("key", ["🚨", "🚨\ufe0f", " 🚨 "])
def test_reaction_with_or_without_variation_selector(key):
    flag = recognise_flag(reaction(key), **KEYS)
    assert flag is not None
    assert (flag.method, flag.target_event_id, flag.target_user) == ("reaction", "$target", None)


def test_configured_key_with_selector_matches_plain_reaction():
    assert recognise_flag(reaction("🚨"), reactions=["🚨\ufe0f"], command="!safeguard")


def test_other_reactions_are_not_flags():
    assert recognise_flag(reaction("👍"), **KEYS) is None
    assert recognise_flag(reaction("🚨", rel=1) | {"type": "m.sticker"}, **KEYS) is None


def test_encrypted_reaction_with_cleartext_relation_is_a_flag():
    event = reaction("🚨", "m.room.encrypted", algorithm="m.megolm.v1.aes-sha2", ciphertext="x")
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.method == "reaction"
    opaque = BASE | {"type": "m.room.encrypted", "content": {"ciphertext": "x"}}
    assert recognise_flag(opaque, **KEYS) is None


def test_reply_command_with_fallback_and_reason():
    event = message(
        "> <@member:l> I want to end it\n> second quoted line\n\n!safeguard said they have a plan",
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$said"}}},
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None
    assert (flag.method, flag.target_event_id, flag.reason) == (
        "reply",
        "$said",
        "said they have a plan",
    )


def test_reply_command_with_html_fallback_only_in_formatted_body():
    event = message(
        "!safeguard",
        format="org.matrix.custom.html",
        formatted_body="<mx-reply><blockquote>quoted</blockquote></mx-reply>!safeguard",
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$said"}}},
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.method == "reply"


def test_thread_fallback_is_not_a_reply():
    relation = {
        "rel_type": "m.thread",
        "event_id": "$root",
        "is_falling_back": True,
        "m.in_reply_to": {"event_id": "$latest"},
    }
    assert recognise_flag(message("!safeguard", **{"m.relates_to": relation}), **KEYS) is None
    named = message("!safeguard @member:l", **{"m.relates_to": relation})
    flag = recognise_flag(named, **KEYS)
    assert flag is not None and flag.target_user == "@member:l"
    real_reply = dict(relation, is_falling_back=False)
    flag = recognise_flag(message("!safeguard", **{"m.relates_to": real_reply}), **KEYS)
    assert flag is not None and flag.target_event_id == "$latest"


def test_user_command_with_reason():
    flag = recognise_flag(message("!safeguard @member:l they are not safe"), **KEYS)
    assert flag is not None
    assert (flag.method, flag.target_user, flag.reason) == (
        "command",
        "@member:l",
        "they are not safe",
    )


def test_element_mention_pill():
    event = message(
        "!safeguard Member Name worried",
        format="org.matrix.custom.html",
        formatted_body='!safeguard <a href="https://matrix.to/#/@member:l">Member Name</a> worried',
        **{"m.mentions": {"user_ids": ["@member:l"]}},
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None
    assert (flag.target_user, flag.reason) == ("@member:l", "worried")


def test_explicit_user_wins_over_reply_target():
    event = message(
        "!safeguard @other:l", **{"m.relates_to": {"m.in_reply_to": {"event_id": "$x"}}}
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.target_user == "@other:l" and flag.target_event_id is None


def test_reply_mentions_do_not_turn_a_reply_into_a_user_command():
    event = message(
        "!safeguard",
        **{
            "m.relates_to": {"m.in_reply_to": {"event_id": "$said"}},
            "m.mentions": {"user_ids": ["@member:l"]},
        },
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.method == "reply"


@pytest.mark.parametrize(
    "body", ["!safeguarding @member:l", "please !safeguard @member:l", "!safeguard", "safeguard"]
)
def test_not_a_flag(body):
    assert recognise_flag(message(body), **KEYS) is None


def test_command_is_case_insensitive_and_edits_are_ignored():
    assert recognise_flag(message("!SafeGuard @member:l"), **KEYS) is not None
    edit = message(
        "!safeguard @member:l", **{"m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"}}
    )
    assert recognise_flag(edit, **KEYS) is None


def test_reason_is_trimmed_and_bounded():
    flag = recognise_flag(message("!safeguard @m:l " + "word " * 500), **KEYS)
    assert flag is not None and flag.reason is not None and len(flag.reason) <= 500


def test_strip_reply_fallback():
    assert strip_reply_fallback("> <@a:l> hi\n\nreal") == "real"
    assert strip_reply_fallback("no fallback") == "no fallback"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["m.reaction", "m.room.message", "m.room.encrypted"]) | st.text(),
        "event_id": st.text() | st.integers(),
        "room_id": st.text(),
        "sender": st.text(),
        "content": json_values
        | st.fixed_dictionaries(
            {},
            optional={
                "body": st.text() | json_values,
                "formatted_body": st.text(),
                "m.relates_to": json_values
                | st.fixed_dictionaries(
                    {},
                    optional={
                        "rel_type": st.sampled_from(["m.annotation", "m.thread", "m.replace"]),
                        "key": st.text() | json_values,
                        "event_id": st.text() | json_values,
                        "m.in_reply_to": json_values,
                        "is_falling_back": json_values,
                    },
                ),
                "m.mentions": json_values,
            },
        ),
    },
)


@given(event_like)
def test_never_raises_on_arbitrary_events(event):
    recognise_flag(event, **KEYS)


@given(st.text(min_size=1).filter(lambda t: normalise_key(t) != ""))
def test_any_configured_key_matches_its_variants(key):
    assert recognise_flag(reaction(key + "\ufe0f"), reactions=[key], command="!x") is not None


@given(st.text())
def test_fallback_stripping_never_grows_the_text(body):
    assert len(strip_reply_fallback(body)) <= len(body)


def test_a_crafted_formatted_body_is_read_in_one_pass():
    """64 KB of unclosed pill anchors from anyone: the old pattern backtracked on it on the
    event loop, before any permission check. Too much formatted text is not read at all,
    and what is read is read once (an HTML parser)."""
    import time

    crafted = '<a href="https://matrix.to/#/@x:y">' * 1700  # ~64 KB, no </a>
    event = message("!safeguard", format="org.matrix.custom.html", formatted_body=crafted)
    began = time.perf_counter()
    assert recognise_flag(event, **KEYS) is None, "the body names no one"
    bounded = '<a href="https://matrix.to/#/@x:y">' * 400  # under the cap: parsed
    recognise_flag(message("!safeguard", formatted_body=bounded), **KEYS)
    assert time.perf_counter() - began < 0.5


def test_an_unclosed_pill_reads_as_its_name_and_a_reply_fallback_is_skipped():
    event = message(
        "!safeguard Sam",
        formatted_body=(
            "<mx-reply><a href='https://matrix.to/#/@quoted:l'>Q</a></mx-reply>"
            "!safeguard <a href='https://matrix.to/#/@sam:l'>Sam</a> said so"
        ),
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and (flag.target_user, flag.reason) == ("@sam:l", "said so")


def test_markup_the_html_parser_chokes_on_is_read_as_the_plain_body():
    """html.parser asserts on some markup (`<![ x`), which anyone can send: the command is
    still read (from the body), and nothing raises (a raise is retried, then reported)."""
    event = message(
        "!safeguard @member:l worried",
        format="org.matrix.custom.html",
        formatted_body='!safeguard <a href="https://matrix.to/#/@member:l">M</a> <![ x',
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.target_user == "@member:l"


def test_a_stray_reply_end_in_the_quoted_message_cannot_name_someone_else():
    """The flagged person wrote `</mx-reply>!safeguard <pill victim> <mx-reply>`; the
    moderator's client quoted it in its reply fallback. The flag is on whom they replied
    to, never on the victim the quoted words name."""
    quoted = '</mx-reply>!safeguard <a href="https://matrix.to/#/@victim:l">V</a> <mx-reply>'
    event = message(
        "!safeguard",
        format="org.matrix.custom.html",
        formatted_body=f"<mx-reply><blockquote>{quoted}</blockquote></mx-reply>!safeguard",
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$troll"}}},
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None
    assert (flag.method, flag.target_user, flag.target_event_id) == ("reply", None, "$troll")


def test_the_reply_cut_is_found_in_the_text_itself_whatever_its_letters():
    """ "İ" lower-cases to two characters: a cut found in a lower-cased copy would land
    inside the moderator's own words."""
    quoted = "İ" * 12
    event = message(
        "!safeguard Sam",
        format="org.matrix.custom.html",
        formatted_body=(
            f"<mx-reply><blockquote>{quoted}</blockquote></mx-reply>"
            '!safeguard <a href="https://matrix.to/#/@sam:l">Sam</a>'
        ),
        **{"m.relates_to": {"m.in_reply_to": {"event_id": "$said"}}},
    )
    flag = recognise_flag(event, **KEYS)
    assert flag is not None and flag.target_user == "@sam:l"
