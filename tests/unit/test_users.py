"""API keys files: `<key> [<user>] [admin]` per line, and who a key is without one."""

from __future__ import annotations

import pytest

from cluster.users import KeyOwner, key_fingerprint_user, parse_api_keys, owner_of_key


def test_keys_name_users_share_them_and_may_be_admins():
    owners = parse_api_keys("""
        # lab keys
        tml-a1 alice
        tml-a2 alice      # alice's second key
        tml-b  bob admin
        tml-solo
        tml-solo-admin admin
    """)
    assert owners == {"tml-a1": KeyOwner("alice"), "tml-a2": KeyOwner("alice"), "tml-b": KeyOwner("bob", True),
                      "tml-solo": KeyOwner(key_fingerprint_user("tml-solo")),
                      "tml-solo-admin": KeyOwner(key_fingerprint_user("tml-solo-admin"), True)}
    assert owner_of_key("tml-a2", owners) == KeyOwner("alice")
    assert owner_of_key("tml-unlisted", owners) is None


def test_without_a_file_every_tml_key_is_its_own_user():
    assert owner_of_key("tml-x", None) == KeyOwner(key_fingerprint_user("tml-x"))
    assert owner_of_key("tml-x", None) != owner_of_key("tml-y", None)
    assert owner_of_key("sk-x", None) is None
    assert "tml-x" not in key_fingerprint_user("tml-x")  # the secret never becomes a name


@pytest.mark.parametrize("text, message", [
    ("", "lists no keys"),
    ("sk-abc alice", "must start with 'tml-'"),
    ("tml-a alice\ntml-a bob", "line 2: the key is listed twice"),
    ("tml-a alice bob", "expected `<key> \\[<user>\\] \\[admin\\]`"),
    ("tml-a legacy", "reserved"),
    ("tml-a al/ice", "must match"),
])
def test_malformed_files_are_refused_naming_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        parse_api_keys(text, "keys.txt")
