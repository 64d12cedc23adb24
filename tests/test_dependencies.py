"""The package structure holds: one direction of dependency, no import cycles (function-level imports included),
no module importing another's private names. Read from the source with `ast`, so it fails on the line that breaks it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pipelines -> jowa_data -> jowa_model -> jowa_common: a package may import those to its right, never to its left.
ORDER = ["jowa_common", "jowa_model", "jowa_data", "pipelines"]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in ORDER:
        for p in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(p.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


def edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import mod` counts as importing pkg.mod)."""
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for _, target, names in imports(p):
            if target.split(".")[0] not in ORDER:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            g[m] |= set(subs) or ({target} if target in mods else set())
    return g


def test_one_direction_of_dependency():
    bad = []
    for m, p in modules().items():
        rank = ORDER.index(m.split(".")[0])
        for line, target, _ in imports(p):
            top = target.split(".")[0]
            if top in ORDER and ORDER.index(top) > rank:
                bad.append(f"{p.relative_to(ROOT)}:{line}: {m.split('.')[0]} imports {target}")
    assert bad == [], "\n".join(bad)


def test_no_import_cycles():
    g = edges(modules())
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert cycles == [], "\n".join(cycles)


def test_no_private_names_from_other_modules():
    bad = []
    for m, p in modules().items():
        for line, target, names in imports(p):
            if target.split(".")[0] in ORDER and target != m:
                bad += [f"{p.relative_to(ROOT)}:{line}: from {target} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert bad == [], "\n".join(bad)


def test_the_checks_can_fail(tmp_path):
    """The readers above see function-level imports and `from pkg import module`."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from jowa_data import stream\n    from jowa_data.build import _private\n")
    assert imports(f) == [(2, "jowa_data", ["stream"]), (3, "jowa_data.build", ["_private"])]
