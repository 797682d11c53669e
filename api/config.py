"""Every knob of the service, read from the environment (or `.env`, or Docker secrets) and validated once."""

from __future__ import annotations

import os
import sys
from ipaddress import ip_network
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from redis.asyncio.connection import parse_url

from api.keyring import (
    MAX_REQUESTS,
    MAX_STREAMS,
    MAX_TOKENS,
    KeysInvalid,
    check_key,
    combine,
    env_keys,
    read_keys_file,
)

DEFAULT_MODEL = "claude-sonnet-4-6"
# The stand-in model's key (`chat-api dev` and docker compose set it when no real key is given): it is
# worth nothing to anyone, so an API that serves it needs no keys of its own.
STANDIN_KEY = "local-stand-in"

# pydantic-settings warns about a missing secrets directory, so it is only named when it exists.
_SECRETS_DIR = "/run/secrets" if os.path.isdir("/run/secrets") else None

CommaList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CHAT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        secrets_dir=_SECRETS_DIR,
        populate_by_name=True,
    )

    # Standard names, shared with other tools.
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0", validation_alias=AliasChoices("REDIS_URL", "redis_url")
    )
    anthropic_api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_API_KEY", "anthropic_api_key")
    )
    anthropic_base_url: str | None = Field(
        None, validation_alias=AliasChoices("ANTHROPIC_BASE_URL", "anthropic_base_url")
    )

    # Model and request limits.
    model: str = DEFAULT_MODEL
    allowed_models: CommaList = Field(default_factory=list)
    max_tokens: int = Field(1024, ge=1)
    max_tokens_limit: int = Field(8192, ge=1)
    system_prompt: str = ""
    max_message_chars: int = Field(32_000, ge=1)
    max_body_bytes: int = Field(262_144, ge=1024)

    # Sessions.
    session_ttl_seconds: int = Field(7 * 24 * 3600, ge=1)
    history_max_messages: int = Field(200, ge=2)
    history_page_size: int = Field(50, ge=1)  # messages per page when a history read names no limit
    history_page_max: int = Field(200, ge=1)  # the largest limit a history read may ask for
    context_max_tokens: int = Field(100_000, ge=1)
    lock_ttl_seconds: float = Field(30.0, gt=0)
    # Resumed replies and idempotent turns (docs/resume.md).
    # on_demand: a reply is written to Redis once a reader asks for it; always: every reply, from its
    # first text; off: never (the resume GET answers 204, an idempotent repeat waits for the commit).
    reply_log: Literal["on_demand", "always", "off"] = "on_demand"
    disconnect_grace_seconds: float = Field(0.0, ge=0, le=3600)
    idempotency_ttl_seconds: int = Field(86_400, ge=1, le=30 * 86_400)
    redis_prefix: str = Field("chat", pattern=r"^[A-Za-z0-9_.-]{1,32}$")
    redis_timeout_seconds: float = Field(5.0, gt=0)
    redis_max_connections: int = Field(200, ge=1)
    # Topology: one Redis, a master found through Sentinel, or a Redis Cluster (docs/redis-topologies.md).
    redis_mode: Literal["single", "sentinel", "cluster"] = "single"
    redis_sentinels: CommaList = Field(default_factory=list)
    redis_sentinel_master: str = ""
    redis_sentinel_password: SecretStr | None = None
    redis_cluster_nodes: CommaList = Field(default_factory=list)
    # Replicas that must hold a commit before the reply ends (WAIT); 0 trusts asynchronous replication.
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    # With one Redis, a turn's two script calls share one connection rather than take one from the
    # pool each: a third of a turn's CPU (api/store/multiplex.py). Ignored with Sentinel or a cluster.
    redis_shared_connection: bool = True

    # Upstream.
    upstream_max_retries: int = Field(2, ge=0, le=10)
    upstream_timeout_seconds: float = Field(60.0, gt=0)
    upstream_max_connections: int = Field(10_000, ge=1)
    # "lean": api/upstream/transport.py under the SDK; "httpx": the SDK's own transport. Each hand-written
    # part has a switch back to the library it replaces, for the bench's ablation and as a way out.
    upstream_transport: Literal["lean", "httpx"] = "lean"
    # "direct": api/upstream/direct.py sends the request the SDK would; "sdk": the SDK builds each one.
    upstream_client: Literal["direct", "sdk"] = "direct"
    # "auto": each request marks the conversation for Claude's prompt cache (docs/usage-and-caching.md).
    prompt_cache: Literal["auto", "off"] = "auto"

    # Admission control.
    # Secret, so that printing the settings never shows a key.
    api_keys: SecretList = Field(default_factory=list)
    # Named keys with limits of their own, followed while the workers run (api/keyring.py, docs/keys.md).
    api_keys_file: Path | None = None
    # Serving a real ANTHROPIC_API_KEY without CHAT_API_KEYS hands Claude, and its bill, to anyone who
    # reaches the port: a process refuses to start that way unless this says it is meant.
    allow_open_api: bool = False
    trusted_proxies: CommaList = Field(default_factory=list)
    # Bounded so that a bucket's arithmetic in Lua stays exact (doubles hold integers up to 2**53).
    rate_limit_requests: int = Field(0, ge=0, le=MAX_REQUESTS)
    rate_limit_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    rate_limit_concurrent: int = Field(0, ge=0, le=MAX_STREAMS)
    worker_max_streams: int = Field(0, ge=0)
    worker_queue_seconds: float = Field(0.0, ge=0, le=3600)
    # Days each UTC day's usage is kept after it ended; also the longest range GET /usage answers.
    usage_retention_days: int = Field(90, ge=1, le=3660)

    # Serving.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1)
    # "httptools": uvicorn's own protocol; "chat": api/http/protocol.py, which did not buy the 15% it must
    # to be the default (docs/hand-written-parts.md).
    http_protocol: Literal["chat", "httptools"] = "httptools"
    # The two chat routes served straight from the app (api/http/app.py ChatAPI), or through FastAPI.
    fast_path: bool = True
    drain_seconds: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # The chat page at `/` (api/web/): on under `chat-api dev` and compose, off in production unless asked.
    web_ui: bool = False

    # Clients.
    cors_origins: CommaList = Field(default_factory=list)
    sse_heartbeat_seconds: float = Field(15.0, gt=0, le=3600)

    @field_validator(
        "allowed_models",
        "api_keys",
        "trusted_proxies",
        "redis_sentinels",
        "redis_cluster_nodes",
        "cors_origins",
        mode="before",
    )
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for secret in keys:
            check_key(secret.get_secret_value())
        return keys

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _unset_when_empty(cls, value: object) -> object:
        # Compose passes an unset variable on as an empty one.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        """Read once here so that a broken file stops the process at start; workers read it again,
        and then follow it (api/http/keys_file.py)."""
        if path is not None:
            env = env_keys(secret.get_secret_value() for secret in info.data.get("api_keys", ()))
            try:
                combine(env, read_keys_file(path))
            except KeysInvalid as exc:
                raise ValueError(str(exc)) from None
        return path

    # Checked at start, or a typo would surface only at the first request, as a traceback or a 503.
    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, url: str) -> str:
        parts = _split_url(
            url,
            ("redis", "rediss", "unix"),
            "must be a redis://, rediss:// or unix:// URL, e.g. redis://127.0.0.1:6379/0",
        )
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError("needs the socket's absolute path, e.g. unix:///run/redis.sock")
        elif not parts.hostname:
            raise ValueError(f"needs a host, e.g. {parts.scheme}://127.0.0.1:6379/0")
        return url

    @field_validator("redis_sentinels", "redis_cluster_nodes")
    @classmethod
    def _check_nodes(cls, nodes: list[str]) -> list[str]:
        for node in nodes:
            host_port(node)
        return nodes

    @field_validator("anthropic_base_url")
    @classmethod
    def _check_base_url(cls, url: str | None) -> str | None:
        if url is not None:
            parts = _split_url(
                url, ("http", "https"), "must be an http:// or https:// URL, e.g. https://api.anthropic.com"
            )
            if not parts.hostname:
                raise ValueError(f"needs a host, e.g. {parts.scheme}://api.anthropic.com")
        return url

    @field_validator("trusted_proxies")
    @classmethod
    def _check_proxies(cls, proxies: list[str]) -> list[str]:
        for proxy in proxies:
            try:
                ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy!r} is not an IP address or network (CIDR)") from None
        return proxies

    @field_validator("cors_origins")
    @classmethod
    def _check_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            # The browser sends an origin as scheme://host[:port], nothing more: anything else never matches.
            if (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or origin != f"{parts.scheme}://{parts.netloc}"
            ):
                raise ValueError(f"{origin!r} is not an origin like https://app.example.com, nor *")
        return origins

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if not self.allowed_models:
            self.allowed_models = [self.model]
        elif self.model not in self.allowed_models:
            raise ValueError(f"CHAT_MODEL {self.model!r} is not in CHAT_ALLOWED_MODELS")
        if self.history_page_size > self.history_page_max:
            raise ValueError("CHAT_HISTORY_PAGE_SIZE is above CHAT_HISTORY_PAGE_MAX")
        if self.max_tokens > self.max_tokens_limit:
            raise ValueError("CHAT_MAX_TOKENS is above CHAT_MAX_TOKENS_LIMIT")
        self._check_topology()
        if self.anthropic_api_key is None or not self.anthropic_api_key.get_secret_value().strip():
            raise ValueError(
                "ANTHROPIC_API_KEY is required (or run `chat-api dev` to use the local stand-in model)"
            )
        return self

    def _check_topology(self) -> None:
        scheme = urlsplit(self.redis_url).scheme
        if self.redis_mode == "sentinel":
            if not self.redis_sentinels:
                raise ValueError(
                    "CHAT_REDIS_SENTINELS is required with CHAT_REDIS_MODE=sentinel (host:port,...)"
                )
            if not self.redis_sentinel_master:
                raise ValueError("CHAT_REDIS_SENTINEL_MASTER (the service name) is required with sentinel")
            if scheme == "unix":
                raise ValueError("REDIS_URL must be redis:// or rediss:// with CHAT_REDIS_MODE=sentinel")
        elif self.redis_sentinels or self.redis_sentinel_master:
            raise ValueError(
                "CHAT_REDIS_SENTINELS and CHAT_REDIS_SENTINEL_MASTER need CHAT_REDIS_MODE=sentinel"
            )
        if self.redis_mode == "cluster":
            if scheme == "unix":
                raise ValueError("REDIS_URL must name a cluster node (redis:// or rediss://) in cluster mode")
            if parse_url(self.redis_url).get("db", 0) != 0:
                raise ValueError("a Redis Cluster has only database 0: drop the /db from REDIS_URL")
        elif self.redis_cluster_nodes:
            raise ValueError("CHAT_REDIS_CLUSTER_NODES needs CHAT_REDIS_MODE=cluster")

    @property
    def api_key(self) -> str:
        assert self.anthropic_api_key is not None  # enforced by the validator
        return self.anthropic_api_key.get_secret_value()


def _split_url(url: str, schemes: tuple[str, ...], expected: str) -> SplitResult:
    """The URL's parts, its scheme and port checked. No message repeats the URL: it may hold a password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError(expected) from None
    if parts.scheme not in schemes:
        raise ValueError(expected)
    try:
        parts.port  # noqa: B018 - raises for a port that is not a number from 0 to 65535
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    return parts


def host_port(node: str) -> tuple[str, int]:
    """`host:port` (or `[v6]:port`) as a pair; a message that says what is wrong otherwise."""
    try:
        parts = urlsplit(f"//{node}")
        port = parts.port
    except ValueError:
        port = None
        parts = None
    if parts is None or not parts.hostname or port is None or parts.path or parts.username:
        raise ValueError(f"{node!r} is not host:port, e.g. 10.0.0.5:26379")
    return parts.hostname, port


def describe_error(error: ValidationError) -> str:
    """One line that names the offending variable, for a process that must refuse to start."""
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    message = first["msg"].removeprefix("Value error, ")
    if not field:
        return message
    standard = {
        "redis_url": "REDIS_URL",
        "anthropic_api_key": "ANTHROPIC_API_KEY",
        "anthropic_base_url": "ANTHROPIC_BASE_URL",
    }
    name = field if field.isupper() else standard.get(field, f"CHAT_{field.upper()}")
    return f"{name}: {message}"


def open_api_refusal(settings: Settings) -> str | None:
    """Why a process must not serve these settings, or None: a real key behind an open API."""
    configured = settings.api_keys or settings.api_keys_file is not None
    if configured or settings.allow_open_api or settings.api_key == STANDIN_KEY:
        return None
    return (
        "ANTHROPIC_API_KEY is set but CHAT_API_KEYS is empty, so anyone who reaches the port could use "
        "Claude on that key; set CHAT_API_KEYS (or CHAT_API_KEYS_FILE), or CHAT_ALLOW_OPEN_API=true "
        "to serve it open"
    )


def load_settings(**overrides: object) -> Settings:
    """The settings for a process about to serve, or exit 2 with one line naming the offending variable."""
    refusal: str | None
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        refusal = describe_error(exc)
    else:
        refusal = open_api_refusal(settings)
        if refusal is None:
            return settings
    print(f"chat-api: configuration error: {refusal}", file=sys.stderr)
    raise SystemExit(2)
