"""Log lines name no one: every Matrix id, as written or URL-encoded in a request path,
becomes the same keyed pseudonym; words that only look like ids are left alone."""

from __future__ import annotations

import logging
import sys
from urllib.parse import quote

import yaml
from hypothesis import given
from hypothesis import strategies as st

from appservice.cli import main
from appservice.logs import JsonFormatter, Pseudonyms, TextFormatter, log_key

LOCAL = st.text("abcdefghijklmnopqrstuvwxyz0123456789._=-/", min_size=1, max_size=30)
SERVER = st.from_regex(
    r"[a-z]([a-z0-9\-]{0,9}[a-z0-9])?(\.[a-z]{2,6}){0,2}(:[0-9]{2,5})?", fullmatch=True
)
OPAQUE = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-", min_size=43, max_size=43
)
pseudonyms = Pseudonyms(b"k" * 32)


@given(sigil=st.sampled_from("@!#"), local=LOCAL, server=SERVER, encoded=st.booleans())
def test_an_id_with_a_server_becomes_its_pseudonym(sigil, local, server, encoded):
    matrix_id = f"{sigil}{local}:{server}"
    written = quote(matrix_id, safe="") if encoded else matrix_id
    line = pseudonyms.apply(f"PUT /rooms/{written}/kick waits 4s ({written}).")
    assert matrix_id not in line and quote(matrix_id, safe="") not in line
    assert pseudonyms.of(matrix_id) in line
    assert pseudonyms.of(quote(matrix_id, safe="")) == pseudonyms.of(matrix_id)


@given(sigil=st.sampled_from("!$"), opaque=OPAQUE, encoded=st.booleans())
def test_a_serverless_room_or_event_id_becomes_its_pseudonym(sigil, opaque, encoded):
    matrix_id = sigil + opaque
    written = quote(matrix_id, safe="") if encoded else matrix_id
    line = pseudonyms.apply(f"rooms/{written}/send/m.room.message/txn")
    assert opaque not in line and pseudonyms.of(matrix_id) in line


def test_words_that_look_like_ids_are_left_alone():
    for text in ("!safeguard used", "case #3 [case #12]", "$5 and $ev", "mail a@b.org", "100%"):
        assert pseudonyms.apply(text) == text


def test_the_key_makes_the_pseudonym():
    other = Pseudonyms(b"x" * 32)
    assert other.of("@alice:example.org") != pseudonyms.of("@alice:example.org")
    assert Pseudonyms(b"k" * 32).of("@alice:example.org") == pseudonyms.of("@alice:example.org")


def test_both_formatters_pseudonymise_messages_and_tracebacks():
    try:
        raise RuntimeError("kick of @member:example.org failed")
    except RuntimeError:
        record = logging.LogRecord(
            "bot", logging.WARNING, __file__, 1, "in %s", ("!room:example.org",), True
        )
        record.exc_info = sys.exc_info()
    for formatter in (TextFormatter(pseudonyms), JsonFormatter(pseudonyms)):
        line = formatter.format(record)
        assert "example.org" not in line and "<room " in line and "<user " in line


def test_log_id_prints_the_pseudonym_the_logs_use(tmp_path, capsys):
    from tests.unit.test_config import MINIMAL, write

    path = write(tmp_path, MINIMAL)
    assert main(["log-id", "-c", str(path), "@alice:localhost"]) == 2, "no digest key yet"
    key = "ab" * 32
    config = yaml.safe_load(path.read_text())
    config.setdefault("audit", {})["digest_key_file"] = str(tmp_path / "digest.key")
    path.write_text(yaml.safe_dump(config))
    (tmp_path / "digest.key").write_text(key)
    capsys.readouterr()
    assert main(["log-id", "-c", str(path), "@alice:localhost"]) == 0
    expected = Pseudonyms(log_key(key.encode())).of("@alice:localhost")
    assert capsys.readouterr().out.split() == [*expected.split(), "@alice:localhost"]
