"""The README's import floors are the code's: every module is on a floor, and each one
imports (at its top or inside a function) only modules on floors below its own."""
from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_floors() -> list[set[str]]:
    text = (REPO / "README.md").read_text()
    paragraph = text[text.index("Imports flow one way"):]
    paragraph = paragraph[:paragraph.index("\n\n")]
    floors = [set(re.findall(r"`(\w+)`", part)) for part in paragraph.split(";")]
    assert "the Darknet scripts on top" in paragraph.split(";")[0] and not floors[0]
    floors[0] = {p.stem for p in REPO.glob("darknet_train*.py")}
    return floors


def project_imports(module: str, modules: set[str]) -> set[str]:
    tree = ast.parse((REPO / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return (found & modules) - {module}


def test_every_module_imports_only_from_floors_below_its_own():
    floors = readme_floors()
    floor_of = {m: i for i, floor in enumerate(floors) for m in floor}
    modules = {p.stem for p in REPO.glob("*.py")}
    assert modules == set(floor_of), "README's floors and the modules differ"
    assert len(floors) >= 6 and sum(map(len, floors)) == len(floor_of)  # no module on two floors
    upward = [f"{m} (floor {floor_of[m]}) imports {n} (floor {floor_of[n]})"
              for m in sorted(modules) for n in sorted(project_imports(m, modules))
              if floor_of[n] <= floor_of[m]]
    assert not upward, "\n".join(upward)
