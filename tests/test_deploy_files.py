"""What `docker compose up` would run, checked without a Docker engine: docker-compose.yml, the Dockerfile,
nginx.conf and .env.example hold together with each other and with the app's own settings."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, ip_network
from typing import Any

import yaml

from api.config import STANDIN_KEY, Settings, open_api_refusal
from api.http.auth import Authenticator
from api.http.server import CLOSE_SECONDS
from api.keyring import parse_keys_file
from tests.conftest import LiveApp
from tests.processes import ROOT, free_port

COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX_CONF = (ROOT / "deploy" / "nginx.conf").read_text()


def default(name: str) -> Any:
    return Settings.model_fields[name].default


def seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration))


def directives(conf: str, name: str) -> list[list[str]]:
    """The arguments of every `name ...;` directive in an nginx config, comments left out."""
    text = "\n".join(line.split("#", 1)[0] for line in conf.splitlines())
    return [shlex.split(m[1]) for m in re.finditer(rf"(?:^|[;{{}}\s]){name}\s+([^;]*);", text)]


def only(conf: str, name: str) -> list[str]:
    found = directives(conf, name)
    assert len(found) == 1, f"{name}: {found}"
    return found[0]


def check_command(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    return " ".join(test[1:])


# --- docker-compose.yml ------------------------------------------------------------------------------


def test_compose_runs_redis_the_model_three_api_replicas_and_nginx() -> None:
    assert set(SERVICES) == {"redis", "model", "api", "lb"}
    assert SERVICES["api"]["deploy"]["replicas"] == 3
    assert "ports" not in SERVICES["api"], "replicas cannot share a host port; nginx publishes the one port"
    dockerfile = ROOT / SERVICES["api"]["build"]["context"] / SERVICES["api"]["build"]["dockerfile"]
    assert dockerfile == ROOT / "deploy" / "Dockerfile" and dockerfile.is_file()
    assert SERVICES["model"]["image"] == SERVICES["api"]["image"]


def test_redis_keeps_every_turn_in_an_append_only_file_on_a_named_volume() -> None:
    redis = SERVICES["redis"]
    assert redis["image"].startswith("redis:7")
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    volume, target = redis["volumes"][0].split(":")[:2]
    assert target == "/data"
    assert volume in COMPOSE["volumes"], "a named volume, so the data outlives the container"
    assert check_command(redis) == "redis-cli ping"


def test_the_api_waits_for_a_healthy_redis_is_ready_checked_and_drains_before_docker_kills_it() -> None:
    api = SERVICES["api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert check_command(api) == "python -m api.ops.probe /readyz"
    assert {"path": ".env", "required": False} in api["env_file"]
    env = api["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert env["CHAT_HOST"] == "0.0.0.0"
    # docker stop waits this long before SIGKILL: the whole drain must fit in it.
    assert seconds(api["stop_grace_period"]) > default("drain_seconds") + CLOSE_SECONDS


def test_without_a_key_the_api_uses_the_stand_in_model_service() -> None:
    env = SERVICES["api"]["environment"]
    assert env["ANTHROPIC_API_KEY"].startswith("${ANTHROPIC_API_KEY:-") and env["ANTHROPIC_API_KEY"] != ""
    base_url = re.fullmatch(r"\$\{ANTHROPIC_BASE_URL:-http://model:(\d+)\}", env["ANTHROPIC_BASE_URL"])
    assert base_url is not None
    command = SERVICES["model"]["command"]
    assert command[:3] == ["python", "-m", "api.dev.standin"]
    assert command[command.index("--port") + 1] == base_url[1]
    assert command[command.index("--host") + 1] == "0.0.0.0"


def test_out_of_the_box_the_stand_in_key_starts_and_a_real_key_needs_api_keys() -> None:
    env = SERVICES["api"]["environment"]
    assert env["ANTHROPIC_API_KEY"] == f"${{ANTHROPIC_API_KEY:-{STANDIN_KEY}}}"
    assert open_api_refusal(Settings(anthropic_api_key=STANDIN_KEY)) is None
    assert open_api_refusal(Settings(anthropic_api_key="sk-ant-from-dotenv")) is not None


def test_the_published_port_is_on_loopback_unless_chat_public_host_says_otherwise() -> None:
    [published] = SERVICES["lb"]["ports"]
    assert published == "${CHAT_PUBLIC_HOST:-127.0.0.1}:${CHAT_PUBLIC_PORT:-8080}:8080"


def test_nginx_runs_the_projects_config_on_the_one_published_port() -> None:
    lb = SERVICES["lb"]
    assert lb["image"].startswith("nginx:")
    source, target = lb["volumes"][0].split(":")[:2]
    assert (ROOT / source).resolve() == ROOT / "deploy" / "nginx.conf"
    assert target == "/etc/nginx/nginx.conf"
    assert lb["depends_on"]["api"]["condition"] == "service_healthy"
    [published] = lb["ports"]
    assert published.rsplit(":", 1)[1] == only(NGINX_CONF, "listen")[0]
    # nginx sends to the port the workers listen on.
    [server] = [args for args in directives(NGINX_CONF, "server") if args and ":" in args[0]]
    assert server[0] == f"api:{SERVICES['api']['environment']['CHAT_PORT']}"


def test_the_workers_believe_x_forwarded_for_from_nginx_and_from_nothing_else_on_the_network() -> None:
    """Behind nginx every client's socket peer is nginx: without trusting it, per-address limits on an open
    API would put every client in one bucket."""
    [(name, attachment)] = SERVICES["lb"]["networks"].items()
    lb_address = IPv4Address(attachment["ipv4_address"])
    # Every service is on that one network (those naming none are on `default`), so the workers see nginx
    # at that address.
    assert all(set(service.get("networks", ["default"])) == {name} for service in SERVICES.values())
    [pool] = COMPOSE["networks"][name]["ipam"]["config"]
    subnet, dynamic = IPv4Network(pool["subnet"]), IPv4Network(pool["ip_range"])
    gateway = IPv4Address(pool["gateway"])
    assert lb_address in subnet and dynamic.subnet_of(subnet)
    # Outside the range Docker hands out, so no container that starts before nginx can take its address.
    assert lb_address not in dynamic and lb_address != gateway

    trusted = Settings(
        anthropic_api_key="k", trusted_proxies=SERVICES["api"]["environment"]["CHAT_TRUSTED_PROXIES"]
    ).trusted_proxies
    networks = [ip_network(proxy, strict=False) for proxy in trusted]
    assert any(lb_address in network for network in networks)
    # Nothing else on the network is trusted: not the other containers, nor the gateway, where clients that
    # Docker's userland proxy forwards come from (trusting it would let them forge X-Forwarded-For).
    assert not any(network.overlaps(dynamic) or gateway in network for network in networks)

    auth = Authenticator([], trusted)
    # nginx appends the address it saw to what the client sent; the workers take that appended address.
    assert only_header("x-forwarded-for") == "$proxy_add_x_forwarded_for"
    assert auth.client_address(str(lb_address), "198.51.100.7, 203.0.113.9") == "203.0.113.9"
    assert auth.client_address(str(lb_address), f"203.0.113.9, {gateway}") == str(gateway)


def only_header(name: str) -> str:
    [value] = [args[1] for args in directives(NGINX_CONF, "proxy_set_header") if args[0].lower() == name]
    return value


# --- deploy/Dockerfile ---------------------------------------------------------------------------------


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "deploy" / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def test_the_image_is_multi_stage_slim_and_runs_as_a_non_root_user() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    final = stages[-1]
    assert "slim" in final[0][1]
    users = [args for instruction, args in final if instruction == "USER"]
    assert users, "the final stage must name a user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(i == "COPY" and args.startswith("--from=") for i, args in final)
    [command] = [args for instruction, args in final if instruction == "CMD"]
    assert "chat-api" in command and "serve" in command


def test_the_final_image_has_no_dev_or_test_dependencies_and_a_healthcheck() -> None:
    stages = dockerfile_stages()
    everything = " ".join(args for stage in stages for _, args in stage)
    assert "[test]" not in everything and "[dev]" not in everything
    assert not any(i == "RUN" and "pip install" in args for i, args in stages[-1])
    [healthcheck] = [args for instruction, args in stages[-1] if instruction == "HEALTHCHECK"]
    assert "api.ops.probe" in healthcheck
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".env", "tests"} <= set(ignored)


def test_the_health_probe_exits_0_only_for_a_200(live_app: Callable[..., LiveApp]) -> None:
    app = live_app()

    def probe(port: int, path: str) -> int:
        env = {"CHAT_PORT": str(port), "PATH": "/usr/bin:/bin"}
        return subprocess.run(
            [sys.executable, "-m", "api.ops.probe", path], env=env, cwd=ROOT, timeout=10
        ).returncode

    assert probe(app.server.port, "/readyz") == 0
    assert probe(app.server.port, "/no-such-path") == 1
    assert probe(free_port(), "/healthz") == 1


# --- deploy/nginx.conf -------------------------------------------------------------------------------


def test_nginx_is_made_for_streaming() -> None:
    assert only(NGINX_CONF, "proxy_buffering") == ["off"]
    assert only(NGINX_CONF, "proxy_request_buffering") == ["off"]
    assert only(NGINX_CONF, "proxy_http_version") == ["1.1"]
    assert ["Connection", ""] in directives(NGINX_CONF, "proxy_set_header")
    assert int(only(NGINX_CONF, "keepalive")[0]) > 0
    assert seconds(only(NGINX_CONF, "proxy_read_timeout")[0]) >= 300
    assert only(NGINX_CONF, "gzip") == ["off"]


def test_nginx_passes_request_ids_and_limits_bodies_like_the_app() -> None:
    header = {args[0].lower(): args[1] for args in directives(NGINX_CONF, "proxy_set_header")}
    assert header["x-request-id"] == "$chat_request_id"
    assert "$http_x_request_id" in NGINX_CONF and "$request_id" in NGINX_CONF
    size = only(NGINX_CONF, "client_max_body_size")[0]
    factor = {"k": 1024, "m": 1024 * 1024}.get(size[-1].lower(), 1)
    assert int(size.rstrip("kKmM")) * factor == default("max_body_bytes")


def test_nginx_retries_only_what_never_reached_a_worker() -> None:
    # Neither `non_idempotent` (re-sending a POST a worker started) nor `http_5xx` (re-sending a
    # request a worker answered).
    assert set(only(NGINX_CONF, "proxy_next_upstream")) <= {"error", "timeout"}


# --- .env.example --------------------------------------------------------------------------------------


def test_env_example_names_only_real_settings() -> None:
    text = (ROOT / ".env.example").read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.MULTILINE)
    assert names
    compose_only = {"CHAT_PUBLIC_PORT", "CHAT_PUBLIC_HOST"}
    known = {"ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "REDIS_URL"} | {
        f"CHAT_{field.upper()}" for field in Settings.model_fields
    }
    assert set(names) - compose_only <= known
    assert all(name in (ROOT / "docker-compose.yml").read_text() for name in compose_only)


def test_compose_mounts_the_keys_directory_whose_example_is_a_valid_keys_file() -> None:
    """A directory, not a file: a file mount would stay on the old file once an editor renames a new one
    over it, and the workers would never see the change."""
    [mount] = SERVICES["api"]["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == ROOT / "deploy" / "keys" and (ROOT / source).is_dir()
    assert (target, mode) == ("/etc/chat-api", "ro")
    example = ROOT / "deploy" / "keys" / "keys.example.toml"
    assert [entry.name for entry in parse_keys_file(example.read_text())] == ["web", "batch-jobs"]
