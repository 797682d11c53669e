"""Who is calling: an API key checked in constant time or, when the API is open, the client's address.

A key is never kept, logged or stored. Only its SHA-256 digest is held in memory, and the tenant that
names its sessions and limits in Redis is a further, separately salted digest of that, so nothing in
Redis can be replayed as a key or looked up against a list of configured digests.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

from api.errors import AuthenticationFailed
from api.keyring import KeyEntry
from api.store.admission import Limits

# Sessions of an open API (no keys configured) all belong to one tenant: there is nobody to tell apart.
PUBLIC_TENANT = "public"
_TENANT_SALT = b"redis-chat-api tenant\x00"


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str  # whose sessions these are
    subject: str  # whose limits apply: the key's tenant, or the client's address on an open API
    key: str | None = None  # the key's name, for logs and reports; None on an open API
    limits: Limits | None = None  # the key's own limits; None: the CHAT_RATE_LIMIT_* defaults


def tenant_of(digest: bytes) -> str:
    """Depends on the key alone, never on its name, limits or where it is configured: a key moved
    from CHAT_API_KEYS to the keys file, or renamed, keeps its sessions and its limits' state."""
    return hashlib.sha256(_TENANT_SALT + digest).hexdigest()[:24]


class Authenticator:
    """The keys in force, which `replace` swaps whole (a reloaded keys file) between two requests.

    `closed` keeps the API shut even when there is no key at all: with a keys file configured, an
    API is never open, whatever the file holds.
    """

    def __init__(
        self,
        keys: Sequence[KeyEntry],
        trusted_proxies: Sequence[str] = (),
        *,
        defaults: Limits | None = None,
        closed: bool = False,
    ) -> None:
        self.defaults = defaults or Limits()
        self.closed = closed
        self._callers: dict[bytes, Caller] = {}
        self.replace(keys)
        self._proxies: list[IPv4Network | IPv6Network] = [
            ip_network(proxy, strict=False) for proxy in trusted_proxies
        ]

    def replace(self, keys: Sequence[KeyEntry]) -> None:
        callers: dict[bytes, Caller] = {}
        for entry in keys:
            tenant = tenant_of(entry.digest)
            callers[entry.digest] = Caller(tenant, tenant, entry.name, self._limits(entry))
        self._callers = callers  # one assignment: a request sees the old keys or the new, never a mix

    @property
    def names(self) -> list[str]:
        return [caller.key for caller in self._callers.values() if caller.key is not None]

    @property
    def open(self) -> bool:
        return not self._callers and not self.closed

    def identify(self, key: str | None, peer: str | None, forwarded_for: str | None) -> Caller:
        """The caller of a request, or `AuthenticationFailed`. `key` is the header value as Starlette
        decoded it (latin-1), so its bytes are exactly the bytes that were sent."""
        if self.open:
            return Caller(PUBLIC_TENANT, "a." + self.client_address(peer, forwarded_for))
        if not key:
            raise AuthenticationFailed(
                "an API key is required: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        presented = hashlib.sha256(key.encode("latin-1")).digest()
        callers = self._callers
        found: bytes | None = None
        # Every digest is compared, so the time taken does not depend on which key matched, or where.
        for digest in callers:
            if hmac.compare_digest(presented, digest):
                found = digest
        if found is None:
            raise AuthenticationFailed("the API key is not valid")
        return callers[found]

    def _limits(self, entry: KeyEntry) -> Limits | None:
        if (
            entry.requests_per_minute is None
            and entry.tokens_per_minute is None
            and entry.streams_at_once is None
        ):
            return None
        defaults = self.defaults
        return Limits(
            defaults.requests if entry.requests_per_minute is None else entry.requests_per_minute,
            defaults.tokens if entry.tokens_per_minute is None else entry.tokens_per_minute,
            defaults.streams if entry.streams_at_once is None else entry.streams_at_once,
        )

    def client_address(self, peer: str | None, forwarded_for: str | None) -> str:
        """The socket's peer, or, when that peer is a trusted proxy, the nearest untrusted address it
        forwarded for. Entries left of that one were written by the client and prove nothing."""
        address = _normal(peer)
        if address is None:
            return "unknown"
        if not forwarded_for or not self._trusted(address):
            return address
        for hop in reversed(forwarded_for.split(",")):
            forwarded = _normal(hop.strip())
            if forwarded is None:
                break  # a hop the proxy did not write: stop at the last address we can vouch for
            address = forwarded
            if not self._trusted(forwarded):
                break
        return address

    def _trusted(self, address: str) -> bool:
        parsed = ip_address(address)
        return any(parsed in network for network in self._proxies)


def _normal(text: str | None) -> str | None:
    if not text:
        return None
    try:
        address = ip_address(text)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.scope_id is not None:
        # A zone ("fe80::1%eth0") names an interface of whoever wrote it, and may be any text at all:
        # it would reach the Redis keys of the caller's limits.
        address = IPv6Address(int(address))
    return str(address)
