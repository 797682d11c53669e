"""The README and docs/ say only what holds: the commands CI runs, links that lead somewhere, paths and
modules that exist, and every setting of `api/config.py` in the configuration table."""

from __future__ import annotations

import importlib
import importlib.util
import re
from pathlib import Path

import pytest
from pydantic import AliasChoices

from api.config import Settings

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"
DOCS = [README, *sorted((ROOT / "docs").rglob("*.md"))]
# Named in the docs, read by docker-compose.yml or the terminal client rather than by the service.
COMPOSE_ONLY = {"CHAT_PUBLIC_PORT", "CHAT_PUBLIC_HOST", "CHAT_CLIENT_KEY"}

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]+`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
REPO_PATH = re.compile(
    r"(?:api|tests|deploy|docs|\.ci)/[A-Za-z0-9_./-]*|[A-Za-z0-9_.-]+\.(?:yml|toml|example)"
)
DOTTED = re.compile(r"api(?:\.[A-Za-z_]\w*)+(?::\w+)?")
PYTHON_M = re.compile(r"python3? -m ([A-Za-z_][\w.]*)")
CHAT_NAME = re.compile(r"\bCHAT_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_*])")


def prose(text: str) -> str:
    """The text without its code: links and headings in code are not links or headings."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code_spans(text: str) -> list[str]:
    return [span.strip("`") for span in INLINE_CODE.findall(FENCE.sub("", text))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors as its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = anchor = slug(heading)
        n = 0
        while anchor in found:
            n += 1
            anchor = f"{base}-{n}"
        found.add(anchor)
    return found


def env_name(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        return str(alias.choices[0])
    return f"CHAT_{field.upper()}"


SETTINGS = {env_name(field) for field in Settings.model_fields}


def test_the_readme_stays_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_the_readme_opens_with_the_two_set_up_commands_the_second_being_what_ci_runs() -> None:
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    ci_command = ci[-1]
    first_block = FENCE.search(README.read_text(encoding="utf-8"))
    assert first_block is not None
    commands = [
        line.strip()
        for line in first_block.group(0).splitlines()[1:-1]
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert len(commands) == 2, commands
    run, test = commands
    assert run.startswith("python3 -m venv .venv && ") and run.endswith(" && .venv/bin/chat-api dev"), run
    assert test == ci_command, f"the README's test command differs from .ci/run's:\n{test}\n{ci_command}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(doc: Path) -> None:
    broken = []
    for target in LINK.findall(prose(doc.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
            continue
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading in {linked.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_path_and_module_named_in_code_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = []
    for span in code_spans(text):
        if REPO_PATH.fullmatch(span) and not (ROOT / span).exists():
            missing.append(f"path {span}")
        if DOTTED.fullmatch(span) and not _resolves(span):
            missing.append(f"name {span}")
    for module in PYTHON_M.findall(text):
        if importlib.util.find_spec(module) is None:
            missing.append(f"python -m {module}")
    assert not missing, "\n".join(missing)


def _resolves(dotted: str) -> bool:
    """A module, or a name defined in one. After a colon (`api.main:app`) only the module is checked:
    the app is built when the name is read."""
    parts = dotted.partition(":")[0].split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:  # a parent that is a module, not a package
            found = False
        if found:
            if end == len(parts):
                return True
            return hasattr(importlib.import_module(name), parts[end])
    return False


def test_the_configuration_table_lists_every_setting() -> None:
    documented = set()
    for line in CONFIGURATION.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            first_cell = line.split("|")[1]
            documented.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    missing = sorted(SETTINGS - documented)
    assert not missing, f"settings of api/config.py missing from docs/configuration.md: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_every_chat_setting_the_docs_name_exists(doc: Path) -> None:
    unknown = sorted(set(CHAT_NAME.findall(doc.read_text(encoding="utf-8"))) - SETTINGS - COMPOSE_ONLY)
    assert not unknown, f"not settings of api/config.py: {unknown}"
