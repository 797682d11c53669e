"""uv.lock drives CI and the image: it must say what pyproject.toml asks for, or both install stale sets.

`uv sync --locked` refuses an out-of-date lock too, but only once it runs; this fails in the gate, offline.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from packaging.requirements import Requirement

from tests.processes import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
LOCK = tomllib.loads((ROOT / "uv.lock").read_text())
NAME = PYPROJECT["project"]["name"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def asked() -> set[tuple[str, frozenset[str], str, str]]:
    wanted = [(Requirement(line), None) for line in PYPROJECT["project"]["dependencies"]]
    for extra, lines in PYPROJECT["project"]["optional-dependencies"].items():
        wanted += [(Requirement(line), extra) for line in lines]
    found = set()
    for req, extra in wanted:
        # uv writes a requirement's own marker first, then the extra that asks for it.
        parts = [str(req.marker).replace('"', "'")] if req.marker else []
        if extra:
            parts.append(f"extra == '{extra}'")
        marker = " and ".join(parts)
        found.add((canonical(req.name), frozenset(req.extras), marker, str(req.specifier)))
    return found


def locked() -> set[tuple[str, frozenset[str], str, str]]:
    [root] = [p for p in LOCK["package"] if p["name"] == NAME]
    entries: list[dict[str, Any]] = root["metadata"]["requires-dist"]
    return {
        (
            canonical(e["name"]),
            frozenset(e.get("extras", ())),
            e.get("marker", ""),
            str(Requirement(f"x{e.get('specifier', '')}").specifier),
        )
        for e in entries
    }


def test_the_lock_was_made_from_this_pyproject() -> None:
    missing, stale = asked() - locked(), locked() - asked()
    assert not missing and not stale, f"run `uv lock`: not locked {sorted(missing)}; gone {sorted(stale)}"
    assert LOCK["requires-python"] == PYPROJECT["project"]["requires-python"]


def test_every_locked_package_comes_from_pypi_with_hashes() -> None:
    """A lock made against a local mirror would name paths no other machine has."""
    for package in LOCK["package"]:
        if package["name"] == NAME:
            assert package["source"] == {"editable": "."}
            continue
        assert package["source"] == {"registry": "https://pypi.org/simple"}, package["name"]
        files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
        assert files and all(f["hash"].startswith("sha256:") for f in files), package["name"]


def test_ci_and_the_image_install_from_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "uv sync -q --locked --inexact --extra test" in ci
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "COPY pyproject.toml uv.lock ./" in dockerfile
    assert dockerfile.count("uv sync --locked") == 2
    assert "pip install -r" not in dockerfile
    # The uv that reads the lock is pinned in both, to one version.
    assert set(re.findall(r"uv==([0-9.]+)", ci)) == set(re.findall(r"UV_VERSION=([0-9.]+)", dockerfile))
