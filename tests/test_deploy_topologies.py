"""The Kubernetes manifests (deploy/k8s/) validated against Kubernetes' own schemas, offline, and held
together with each other and with the app's settings; and the Sentinel compose file beside the default."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from api.config import Settings
from tests.processes import ROOT

K8S = ROOT / "deploy" / "k8s"


def manifests() -> dict[str, dict[str, Any]]:
    """Each resource by its kind; a Secret by `Secret/<name>`, as there are two."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kind = doc["kind"]
            found[f"Secret/{doc['metadata']['name']}" if kind == "Secret" else kind] = doc
    return found


@pytest.mark.parametrize("path", sorted(K8S.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "Kustomization":  # kustomize's own file, not a Kubernetes resource
            assert {p.name for p in K8S.glob("*.yaml")} - {path.name} == set(doc["resources"])
            continue
        # strict: a misspelt or misplaced field fails too, rather than being silently dropped.
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_a_manifest_with_a_misplaced_field_is_refused() -> None:
    deployment = manifests()["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def env_of(found: dict[str, dict[str, Any]]) -> dict[str, str]:
    return {**found["ConfigMap"]["data"], **found["Secret/chat-api"]["stringData"]}


def test_the_deployment_drains_probes_and_takes_its_settings_from_the_configmap_and_secret(
    tmp_path: Path,
) -> None:
    found = manifests()
    deployment, env = found["Deployment"], env_of(found)
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > float(env["CHAT_DRAIN_SECONDS"]) + 2
    refs = {next(iter(ref)): ref[next(iter(ref))]["name"] for ref in container["envFrom"]}
    assert refs == {"configMapRef": found["ConfigMap"]["metadata"]["name"],
                    "secretRef": found["Secret/chat-api"]["metadata"]["name"]}  # fmt: skip
    assert int(env["CHAT_PORT"]) == container["ports"][0]["containerPort"]
    # Every name is a setting the app reads, and together they pass its start-up checks.
    fields = {f"CHAT_{name.upper()}" for name in Settings.model_fields} | {"REDIS_URL", "ANTHROPIC_API_KEY"}
    assert set(env) <= fields, set(env) - fields
    # The keys file as the pods see it: the keys Secret's file, where the Deployment mounts it.
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_mounted_at(found, Path(env["CHAT_API_KEYS_FILE"])))
    env["CHAT_API_KEYS_FILE"] = str(keys_file)
    settings = Settings(**{name.removeprefix("CHAT_").lower(): value for name, value in env.items()})
    assert settings.redis_mode == "sentinel"
    assert settings.api_keys_file == keys_file


def keys_mounted_at(found: dict[str, dict[str, Any]], path: Path) -> str:
    """The text of the Secret's file that the Deployment mounts at `path`, mounted whole: a subPath mount
    never sees an update of its Secret, and the workers follow the file for exactly those."""
    pod = found["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    assert "subPath" not in mount and mount["readOnly"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    secret = found[f"Secret/{volume['secret']['secretName']}"]
    text: str = secret["stringData"][path.name]
    return text


def test_the_service_budget_and_autoscaler_all_select_the_deployments_pods() -> None:
    found = manifests()
    labels = found["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert found["Deployment"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert found["Service"]["spec"]["selector"].items() <= labels.items()
    assert found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    target = found["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", found["Deployment"]["metadata"]["name"])
    assert found["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2  # the budget leaves one serving


def test_the_sentinel_compose_file_adds_two_replicas_and_three_sentinels_beside_the_default() -> None:
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    extra = yaml.safe_load((ROOT / "deploy" / "compose.sentinel.yml").read_text())["services"]
    # It adds services and extends the workers' settings; it redefines none of the default's services.
    assert set(extra) & set(base) == {"api"}
    assert set(extra["api"]) <= {"environment", "depends_on"}
    replicas = [name for name, s in extra.items() if "--replicaof redis 6379" in str(s.get("command"))]
    sentinels = [name for name, s in extra.items() if "--sentinel" in str(s.get("command"))]
    assert len(replicas) == 2 and len(sentinels) == 3
    env = {**base["api"]["environment"], **extra["api"]["environment"]}
    named = [node.split(":")[0] for node in env["CHAT_REDIS_SENTINELS"].split(",")]
    assert sorted(named) == sorted(sentinels)
    for name in sentinels:
        command = str(extra[name]["command"])
        quorum = re.search(r"sentinel monitor (\S+) redis 6379 (\d+)", command)
        assert quorum is not None and quorum[1] == env["CHAT_REDIS_SENTINEL_MASTER"]
        assert int(quorum[2]) == 2  # a majority of three: one sentinel alone cannot promote
    wait = re.fullmatch(r"\$\{CHAT_REDIS_WAIT_REPLICAS:-(\d+)\}", env["CHAT_REDIS_WAIT_REPLICAS"])
    assert wait is not None and 1 <= int(wait[1]) <= len(replicas)
    values = {k: v for k, v in env.items() if not str(v).startswith("${")}
    settings = Settings(
        anthropic_api_key="k",
        **{k.removeprefix("CHAT_").lower(): v for k, v in values.items() if k != "ANTHROPIC_API_KEY"},
    )
    assert settings.redis_mode == "sentinel"
