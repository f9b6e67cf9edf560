"""The folder layout is the architecture (DESIGN.md section 3): imports only flow one way."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO

OURS = {"gateway", "rules", "storage", "quotas"}
# What each package may import of ours (besides itself).
ALLOWED = {
    "gateway": {"rules", "quotas", "storage"},
    "quotas": {"storage"},
    "rules": set(),
    "storage": set(),
}


def imports_of(package: str) -> set[tuple[str, str]]:
    found = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in OURS and top != package:
                    found.add((str(path.relative_to(REPO)), top))
    return found


@pytest.mark.parametrize("package", sorted(OURS))
def test_import_direction(package: str) -> None:
    bad = sorted((f, top) for f, top in imports_of(package) if top not in ALLOWED[package])
    assert bad == [], f"{package} may import only {sorted(ALLOWED[package])}"


@pytest.mark.parametrize("folder", ["config", "systemd"])
def test_data_folders_hold_no_python(folder: str) -> None:
    root = REPO / folder
    assert (list(root.rglob("*.py")) if root.exists() else []) == []


def test_only_the_adapter_imports_aioimaplib() -> None:
    users = set()
    for pkg in OURS:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n.split(".")[0] == "aioimaplib" for n in names):
                    users.add(str(path.relative_to(REPO)))
    assert users == {"gateway/pull/imap_client.py"}


def test_shipped_json_schema_is_current() -> None:
    from gateway.config import json_schema

    shipped = (REPO / "config" / "mailgate.schema.json").read_text(encoding="utf-8")
    assert shipped == json_schema(), (
        "regenerate: python -c 'from gateway.config import json_schema; "
        'print(json_schema(), end="")\' > config/mailgate.schema.json'
    )
