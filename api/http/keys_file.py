"""Follows `CHAT_API_KEYS_FILE`: each worker looks at the file twice a second and, once it has changed,
reads it and swaps the keys its authenticator accepts. A file that will not do is refused in one log
line, and the keys in force stay.

It polls `os.stat` rather than waiting for inotify events: a Kubernetes ConfigMap update swaps a
symlink two levels above the file, an editor renames a new file over the old one, and a mounted
volume may not deliver events at all. A stat through every symlink sees each of these, for a few
microseconds every half second. A reload never cuts a stream: a turn holds the caller it was
admitted as until it ends, whatever the file says meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path

from api.http.auth import Authenticator
from api.keyring import FileState, KeyEntry, KeysInvalid, combine, file_state, read_keys_file

log = logging.getLogger("api.keys")

POLL_SECONDS = 0.5  # a change is in force on every worker within this and a read: well within 2 s


class KeysFile:
    def __init__(self, path: Path, env: Sequence[KeyEntry]) -> None:
        self.path = path
        self.env = list(env)  # CHAT_API_KEYS, which every version of the file is combined with
        self.state: FileState | None = None  # the file as it was last read, good or not
        self._task: asyncio.Task[None] | None = None

    def load(self) -> list[KeyEntry]:
        """The keys at start: `KeysInvalid` if the file will not do, which must stop the process."""
        # The state is taken before the read: a change during the read then shows at the next look.
        state = file_state(self.path)
        keys = combine(self.env, read_keys_file(self.path))
        self.state = state
        return keys

    def follow(self, auth: Authenticator) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow(auth), name="keys file")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _follow(self, auth: Authenticator) -> None:
        while True:
            await asyncio.sleep(POLL_SECONDS)
            try:
                # The file may sit on a slow or network volume: the loop never waits on it.
                changed = await asyncio.to_thread(self.check)
            except Exception:
                log.exception("could not check the keys file %s; the keys in force stay", self.path)
                continue
            if isinstance(changed, KeysInvalid):
                log.error("keys file refused, the keys in force stay: %s", changed)
            elif changed is not None:
                before = set(auth.names)
                auth.replace(changed)
                after = set(auth.names)
                log.info(
                    "keys file reloaded: %d keys; added: %s; removed: %s",
                    len(after),
                    ", ".join(sorted(after - before)) or "none",
                    ", ".join(sorted(before - after)) or "none",
                )

    def check(self) -> list[KeyEntry] | KeysInvalid | None:
        """The keys of a changed file, why it will not do, or None when it has not changed since it
        was last read. A file that went missing is a change too, refused once, then left unread."""
        state = file_state(self.path)
        if state == self.state:
            return None
        self.state = state
        try:
            entries = read_keys_file(self.path)
        except KeysInvalid as exc:
            return exc
        try:
            return combine(self.env, entries)
        except KeysInvalid as exc:
            return KeysInvalid(f"{self.path}: {exc}")
