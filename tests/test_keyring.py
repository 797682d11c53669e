"""The keys file and CHAT_API_KEYS: parsing, the union of both, the settings' start-up check, and how a
worker sees a file change (in place, renamed over, a ConfigMap's symlink swapped, gone)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from api.config import Settings, describe_error, open_api_refusal
from api.http.auth import Authenticator, tenant_of
from api.http.keys_file import KeysFile
from api.keyring import KeyEntry, KeysInvalid, combine, env_keys, key_digest, parse_keys_file
from api.store.admission import Limits
from tests.processes import run_python

KEY_WEB = "web-key-0123456789abcdef"
KEY_BATCH = "batch-key-0123456789abcdef"
KEY_ENV = "env-key-0123456789abcdef"


def sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def table(name: str, key: str, **limits: object) -> str:
    lines = ["[[keys]]", f'name = "{name}"', f'key = "{key}"']
    lines += [f"{field} = {value}" for field, value in limits.items()]
    return "\n".join(lines) + "\n"


def refusal(text: str) -> str:
    with pytest.raises(KeysInvalid) as caught:
        parse_keys_file(text)
    return str(caught.value)


def test_a_file_names_each_key_and_may_override_each_limit() -> None:
    text = table("web", KEY_WEB, streams_at_once=3, requests_per_minute=0) + table("batch", sha(KEY_BATCH))
    web, batch = parse_keys_file(text)
    assert web == KeyEntry("web", key_digest(KEY_WEB), requests_per_minute=0, streams_at_once=3)
    assert batch == KeyEntry("batch", hashlib.sha256(KEY_BATCH.encode()).digest())
    # A key configured by its digest is the same key as in plain text: same tenant, same sessions.
    assert tenant_of(batch.digest) == tenant_of(key_digest(KEY_BATCH))
    assert KEY_WEB not in repr(web)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[keys]\nname = "web"', "not valid TOML"),
        ("", "no [[keys]] table"),
        ('[[key]]\nname = "web"\nkey = "web-key-0123456789abcdef"\n', "key: unknown field"),
        ('[[keys]]\nkey = "web-key-0123456789abcdef"\n', "[[keys]] #1: name: missing"),
        ('[[keys]]\nname = "web"\n', "[[keys]] #1 ('web'): key: missing"),
        (table("web", KEY_WEB, limit=3), "[[keys]] #1 ('web'): limit: unknown field"),
        (table("web", KEY_WEB, streams_at_once=-1), "#1 ('web'): streams_at_once: Input should be greater"),
        (table("web", KEY_WEB, streams_at_once=2.5), "#1 ('web'): streams_at_once: Input should be a valid"),
        (table("web", KEY_WEB, streams_at_once='"3"'), "streams_at_once: Input should be a valid integer"),
        (table("web", KEY_WEB, requests_per_minute="true"), "requests_per_minute: Input should be a valid"),
        (table("web", KEY_WEB, tokens_per_minute=10**10), "tokens_per_minute: Input should be less than"),
        (table("w b", KEY_WEB), "[[keys]] #1: name: String should match"),
        (table("web", "short"), "#1 ('web'): key: every key needs at least 16 characters"),
        (table("web", "sha256:abc"), "key: a sha256: entry needs 64 hex digits"),
        (table("web", KEY_WEB) + table("web", KEY_BATCH), "#2: the name 'web' is already used by #1"),
        (table("web", KEY_WEB) + table("copy", sha(KEY_WEB)), "#2 ('copy') has the same key as 'web'"),
        ('title = "keys"\n' + table("web", KEY_WEB), "title: unknown field"),
    ],
    ids=[
        "not toml",
        "empty",
        "misspelt table",
        "no name",
        "no key",
        "unknown field",
        "negative",
        "fraction",
        "string number",
        "bool",
        "too large",
        "bad name",
        "short key",
        "bad digest",
        "duplicate name",
        "duplicate key",
        "unknown top-level field",
    ],
)
def test_a_file_that_will_not_do_is_refused_in_one_line_that_says_where_and_why(
    text: str, expected: str
) -> None:
    message = refusal(text)
    assert expected in message
    assert "\n" not in message
    assert KEY_WEB not in message and KEY_BATCH not in message


def test_only_the_first_problem_is_spelt_out_and_the_rest_counted() -> None:
    message = refusal(table("web", KEY_WEB, streams_at_once=-1, tokens_per_minute=-1))
    assert message.endswith("(and 1 more)")


def test_env_keys_are_named_by_their_place_and_combine_with_the_files() -> None:
    env = env_keys([KEY_ENV, sha(KEY_BATCH), KEY_ENV])
    assert [entry.name for entry in env] == ["env-1", "env-2"]  # a key listed twice is one key
    file = parse_keys_file(table("web", KEY_WEB, streams_at_once=1))
    assert [entry.name for entry in combine(env, file)] == ["env-1", "env-2", "web"]
    # The same key in both, under the name it has in CHAT_API_KEYS: one key, with the file's limits.
    [*_, merged] = combine(env, parse_keys_file(table("env-2", KEY_BATCH, streams_at_once=4)))
    assert merged.name == "env-2" and merged.streams_at_once == 4
    assert len(combine(env, parse_keys_file(table("env-2", KEY_BATCH)))) == 2


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        (table("batch", KEY_BATCH), "the key named 'batch' in the file is also in CHAT_API_KEYS, as 'env-2'"),
        (table("env-1", KEY_WEB), "the name 'env-1' in the file is already a key of CHAT_API_KEYS"),
    ],
)
def test_a_key_or_name_in_both_places_must_mean_the_same_in_both(file: str, expected: str) -> None:
    with pytest.raises(KeysInvalid, match=expected):
        combine(env_keys([KEY_ENV, KEY_BATCH]), parse_keys_file(file))


def test_each_key_gets_its_own_limits_over_the_defaults_and_a_name_never_the_key() -> None:
    entries = parse_keys_file(
        table("web", KEY_WEB, streams_at_once=3, requests_per_minute=0) + table("batch", KEY_BATCH)
    )
    auth = Authenticator(entries, defaults=Limits(requests=10, tokens=500, streams=2), closed=True)
    web = auth.identify(KEY_WEB, None, None)
    assert (web.key, web.limits) == ("web", Limits(requests=0, tokens=500, streams=3))
    batch = auth.identify(KEY_BATCH, None, None)
    assert (batch.key, batch.limits) == ("batch", None)  # None: admission applies the defaults
    assert web.subject == web.tenant == tenant_of(key_digest(KEY_WEB))


def test_with_a_keys_file_the_api_is_never_open() -> None:
    auth = Authenticator([], closed=True)
    assert not auth.open
    assert Authenticator([]).open


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.toml"
    write(path, table("web", KEY_WEB))
    return path


def test_settings_read_the_file_at_start_and_refuse_a_broken_one_in_one_line(
    keys_file: Path, tmp_path: Path
) -> None:
    assert Settings(anthropic_api_key="k", api_keys_file=str(keys_file)).api_keys_file == keys_file
    assert Settings(anthropic_api_key="k", api_keys_file="").api_keys_file is None  # compose's unset
    write(keys_file, table("web", KEY_WEB, streams_at_once=-1))
    for path, expected in (
        (keys_file, "streams_at_once: Input should be greater than or equal to 0"),
        (tmp_path / "missing.toml", "cannot be read: No such file or directory"),
    ):
        with pytest.raises(ValidationError) as caught:
            Settings(anthropic_api_key="k", api_keys_file=str(path))
        line = describe_error(caught.value)
        assert line.startswith(f"CHAT_API_KEYS_FILE: {path}: ") and expected in line, line
    write(keys_file, table("mine", KEY_ENV))
    with pytest.raises(ValidationError) as caught:
        Settings(anthropic_api_key="k", api_keys=KEY_ENV, api_keys_file=str(keys_file))
    assert "also in CHAT_API_KEYS, as 'env-1'" in describe_error(caught.value)


def test_a_keys_file_counts_as_keys_for_the_safe_default(keys_file: Path) -> None:
    real = "sk-ant-not-a-real-key-0123456789"
    assert open_api_refusal(Settings(anthropic_api_key=real)) is not None
    assert open_api_refusal(Settings(anthropic_api_key=real, api_keys_file=str(keys_file))) is None


def test_a_worker_with_a_broken_keys_file_stops_at_start_with_one_line(keys_file: Path) -> None:
    write(keys_file, table("web", KEY_WEB) + table("web", KEY_BATCH))
    result = run_python(
        ["-m", "api", "serve"], {"ANTHROPIC_API_KEY": "test-key", "CHAT_API_KEYS_FILE": str(keys_file)}
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line == (
        f"chat-api: configuration error: CHAT_API_KEYS_FILE: {keys_file}: "
        "[[keys]] #2: the name 'web' is already used by #1"
    )
    assert KEY_WEB not in result.stderr and KEY_BATCH not in result.stderr


Check = Callable[[], list[KeyEntry] | KeysInvalid | None]


def names(found: list[KeyEntry] | KeysInvalid | None) -> list[str]:
    assert isinstance(found, list), found
    return [entry.name for entry in found]


def test_a_change_in_place_is_seen_once_and_a_broken_write_is_refused(keys_file: Path) -> None:
    watched = KeysFile(keys_file, env_keys([KEY_ENV]))
    assert [entry.name for entry in watched.load()] == ["env-1", "web"]
    assert watched.check() is None  # unchanged: not even read
    write(keys_file, table("web", KEY_WEB) + table("batch", KEY_BATCH))
    assert names(watched.check()) == ["env-1", "web", "batch"]
    assert watched.check() is None
    write(keys_file, '[[keys]]\nname = "web"\nkey = "' + KEY_WEB[:8])  # caught halfway through a write
    refused = watched.check()
    assert isinstance(refused, KeysInvalid) and str(refused).startswith(f"{keys_file}: not valid TOML")
    assert watched.check() is None  # refused once, not again at every look
    write(keys_file, table("batch", KEY_BATCH))
    assert names(watched.check()) == ["env-1", "batch"]


def test_a_file_renamed_over_the_old_one_is_seen_even_with_the_same_size_and_time(keys_file: Path) -> None:
    watched = KeysFile(keys_file, [])
    watched.load()
    before = os.stat(keys_file)
    replacement = keys_file.with_name("keys.toml.new")
    write(replacement, table("bat", KEY_BATCH))  # as long as the old one
    os.utime(replacement, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replacement, keys_file)
    assert names(watched.check()) == ["bat"]


def test_a_configmap_update_that_swaps_a_symlink_is_seen(tmp_path: Path) -> None:
    """Kubernetes mounts keys.toml -> ..data/keys.toml, ..data -> ..<timestamp>/, and updates the
    ConfigMap by renaming a new ..data symlink over the old one."""
    mount = tmp_path / "mount"
    mount.mkdir()
    (mount / "..v1").mkdir()
    write(mount / "..v1" / "keys.toml", table("web", KEY_WEB))
    (mount / "..data").symlink_to("..v1")
    (mount / "keys.toml").symlink_to("..data/keys.toml")
    watched = KeysFile(mount / "keys.toml", [])
    assert [entry.name for entry in watched.load()] == ["web"]

    (mount / "..v2").mkdir()
    write(mount / "..v2" / "keys.toml", table("bat", KEY_BATCH))
    (mount / "..data_tmp").symlink_to("..v2")
    os.replace(mount / "..data_tmp", mount / "..data")
    assert names(watched.check()) == ["bat"]


def test_a_file_that_goes_missing_is_refused_once_and_read_again_when_it_is_back(keys_file: Path) -> None:
    watched = KeysFile(keys_file, [])
    watched.load()
    keys_file.unlink()
    refused = watched.check()
    assert isinstance(refused, KeysInvalid) and "No such file or directory" in str(refused)
    assert watched.check() is None
    write(keys_file, table("web", KEY_WEB))
    assert names(watched.check()) == ["web"]


def test_a_reload_that_clashes_with_chat_api_keys_is_refused(keys_file: Path) -> None:
    watched = KeysFile(keys_file, env_keys([KEY_ENV]))
    watched.load()
    write(keys_file, table("mine", KEY_ENV))
    refused = watched.check()
    assert isinstance(refused, KeysInvalid)
    assert str(refused).startswith(f"{keys_file}: the key named 'mine'")
