"""The API keys a deployment accepts, each with a name: `CHAT_API_KEYS` and `CHAT_API_KEYS_FILE`.

A name is what logs, turn reports and usage show; a key is never shown, and no message here repeats
one. A file holds one `[[keys]]` table per key (docs/keys.md):

    [[keys]]
    name = "web"                # 1-64 of A-Z a-z 0-9 _ . -
    key = "sha256:<64 hex>"     # or the key itself
    requests_per_minute = 120   # optional, each: overrides its CHAT_RATE_LIMIT_* for this key; 0 is no limit
    tokens_per_minute = 200000
    streams_at_once = 3

Keys from `CHAT_API_KEYS` are named `env-1`, `env-2`... by their place in the list. Both sources may
be set: the keys accepted are the union. A key in both must carry the same name in both (the file then
gives its limits); a name may not stand for two keys, nor a key appear twice in the file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# The bounds of every limit, CHAT_RATE_LIMIT_* and a key's own: a bucket's arithmetic in Lua stays
# exact below 2**53.
MAX_REQUESTS = 1_000_000
MAX_TOKENS = 1_000_000_000
MAX_STREAMS = 1_000_000


class KeysInvalid(ValueError):
    """One line that says what is wrong with a set of keys, and never holds a key."""


@dataclass(frozen=True, slots=True)
class KeyEntry:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the key: all that is kept of it
    requests_per_minute: int | None = None  # None: the CHAT_RATE_LIMIT_* default
    tokens_per_minute: int | None = None
    streams_at_once: int | None = None


def check_key(key: str) -> None:
    """A `ValueError` when a configured key (plain, or `sha256:<hex>`) could never match a request."""
    if key.startswith("sha256:"):
        digest = key.removeprefix("sha256:")
        if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise ValueError("a sha256: entry needs 64 hex digits")
    elif len(key) < 16:
        raise ValueError("every key needs at least 16 characters")
    elif any(not " " < c < "\x7f" for c in key):
        # A key is sent in a header: anything but printable ASCII would not arrive as configured.
        raise ValueError("a key may hold only printable ASCII characters, without spaces")


def key_digest(entry: str) -> bytes:
    """The SHA-256 digest a configured key stands for: a plain key, or `sha256:<hex>` of one."""
    if entry.startswith("sha256:"):
        return bytes.fromhex(entry.removeprefix("sha256:"))
    return hashlib.sha256(entry.encode()).digest()


def env_keys(keys: Iterable[str]) -> list[KeyEntry]:
    """`CHAT_API_KEYS`'s entries, named by their place in the list. A key listed twice is one key."""
    entries: dict[bytes, KeyEntry] = {}
    for place, key in enumerate(keys, 1):
        digest = key_digest(key)
        entries.setdefault(digest, KeyEntry(f"env-{place}", digest))
    return list(entries.values())


class _FileKey(BaseModel):
    # Strict: `streams_at_once = "3"`, `= 2.5` or `= true` is a mistake to point out, not to guess at.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=f"^{NAME.pattern}$")
    key: str
    requests_per_minute: int | None = Field(None, ge=0, le=MAX_REQUESTS)
    tokens_per_minute: int | None = Field(None, ge=0, le=MAX_TOKENS)
    streams_at_once: int | None = Field(None, ge=0, le=MAX_STREAMS)

    @field_validator("key")
    @classmethod
    def _check(cls, key: str) -> str:
        check_key(key)
        return key


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    # An empty file is refused rather than read as "no keys": it is what a reader sees halfway
    # through an editor's in-place write, and shutting every client out is never what that meant.
    keys: list[_FileKey] = Field(min_length=1)


def parse_keys_file(text: str) -> list[KeyEntry]:
    """A keys file's entries, or `KeysInvalid` with the first thing wrong in it."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KeysInvalid(f"not valid TOML: {exc}") from None
    try:
        parsed = _KeysFile.model_validate(data)
    except ValidationError as exc:
        raise KeysInvalid(_describe(exc, data)) from None
    entries: list[KeyEntry] = []
    names: dict[str, int] = {}
    digests: dict[bytes, str] = {}
    for place, item in enumerate(parsed.keys, 1):
        if item.name in names:
            raise KeysInvalid(
                f"[[keys]] #{place}: the name {item.name!r} is already used by #{names[item.name]}"
            )
        digest = key_digest(item.key)
        if digest in digests:
            raise KeysInvalid(f"[[keys]] #{place} ({item.name!r}) has the same key as {digests[digest]!r}")
        names[item.name], digests[digest] = place, item.name
        entries.append(
            KeyEntry(
                item.name, digest, item.requests_per_minute, item.tokens_per_minute, item.streams_at_once
            )
        )
    return entries


def _describe(exc: ValidationError, data: object) -> str:
    """The first error as `[[keys]] #2 ('web'): streams_at_once: <what is wrong>`. Only locations and
    pydantic's own messages are used: its input values would hold the key."""
    errors = exc.errors(include_input=False, include_url=False)
    # A misspelt name (`[[key]]`, `stream_at_once`) says more than the field it leaves missing.
    errors.sort(key=lambda error: error["type"] != "extra_forbidden")
    first = errors[0]
    loc = list(first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        known = ", ".join(_FileKey.model_fields) if len(loc) > 2 else "keys"
        message = f"unknown field (known: {known})"
    elif loc == ["keys"] and first["type"] in ("missing", "too_short"):
        message = "no [[keys]] table: the file must name at least one key"
        loc = []
    elif first["type"] == "missing":
        message = "missing"
    where = ""
    if len(loc) >= 2 and loc[0] == "keys" and isinstance(loc[1], int):
        where = f"[[keys]] #{loc[1] + 1}"
        name = _name_at(data, loc[1])
        if name is not None:
            where += f" ({name!r})"
        loc = loc[2:]
    parts = [part for part in (where, ".".join(str(p) for p in loc)) if part]
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return ": ".join([*parts, message]) + more


def _name_at(data: object, index: int) -> str | None:
    try:
        name = data["keys"][index]["name"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None
    return name if isinstance(name, str) and NAME.fullmatch(name) else None


def combine(env: Sequence[KeyEntry], file: Sequence[KeyEntry]) -> list[KeyEntry]:
    """The keys of both sources. A key in both keeps one name, and the file's limits."""
    by_digest = {entry.digest: entry for entry in env}
    by_name = {entry.name: entry for entry in env}
    combined = dict(by_digest)
    for entry in file:
        same_key = by_digest.get(entry.digest)
        if same_key is not None and same_key.name != entry.name:
            raise KeysInvalid(
                f"the key named {entry.name!r} in the file is also in CHAT_API_KEYS, as {same_key.name!r}: "
                f"keep it in one place, or name it {same_key.name!r} in the file"
            )
        if same_key is None and entry.name in by_name:
            raise KeysInvalid(f"the name {entry.name!r} in the file is already a key of CHAT_API_KEYS")
        combined[entry.digest] = entry
    return list(combined.values())


@dataclass(frozen=True, slots=True)
class FileState:
    """What a keys file was when it was read: its identity and size and times, as `os.stat` gives them
    through every symlink (a Kubernetes ConfigMap swaps a symlink to a new directory)."""

    device: int
    inode: int
    size: int
    modified_ns: int
    changed_ns: int


def file_state(path: Path) -> FileState | None:
    """The file's state now; None if it cannot be found."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return FileState(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


def read_keys_file(path: Path) -> list[KeyEntry]:
    """The file's entries; `KeysInvalid` when it cannot be read or is not a valid keys file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise KeysInvalid(f"{path}: cannot be read: {reason}") from None
    try:
        return parse_keys_file(text)
    except KeysInvalid as exc:
        raise KeysInvalid(f"{path}: {exc}") from None
