"""Imports run one way: each room imports only rooms below it, and the math imports only torch.

Parsed from the source (nothing imported), so a new upward import fails here, naming the file, the
line and both rooms, before it can become a cycle worked around with a function-local import.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "streamquant"

# Lowest first. A module may import its own room and any room listed before it. The most specific
# prefix names a module's room (`quant.math` before `quant`).
ROOMS = (
    ("quant.math",),
    ("parallel", "memory", "progress"),
    ("checkpoint",),
    ("loading",),
    ("quant",),
    ("layers",),
    ("models",),
    ("formats",),
    ("config",),
    ("offline",),
    ("fingerprint", "snapshot", "update", "api", "reload"),
    ("inference",),
    ("rl",),
    ("cli",),
    ("__init__", "__main__"),
)
RANK = {prefix: rank for rank, prefixes in enumerate(ROOMS) for prefix in prefixes}
# The only third-party packages the pure math may import (the standard library it may): torch, and
# ninja, which the native kernels' build imports only to put its binary on PATH.
MATH_ALLOWED = {"torch", "ninja"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def room_of(name: str) -> str:
    """The room prefix of `name` (a module name relative to the package)."""
    best = max((p for p in RANK if name == p or name.startswith(p + ".")), key=len, default=None)
    if best is None:
        raise AssertionError(f"module streamquant.{name} is in no room of ROOMS: add its room to this test")
    return best


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, absolute module name, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, id(node) in local) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; streamquant imports absolutely"
            base = node.module or ""
            # `from streamquant.x import y` may name a submodule y: judge the deeper name when it is one
            for alias in node.names:
                deeper = f"{base}.{alias.name}"
                is_module = (PACKAGE.parent / deeper.replace(".", "/")).with_suffix(".py").exists() or \
                    (PACKAGE.parent / deeper.replace(".", "/")).is_dir()
                out.append((node.lineno, deeper if is_module else base, id(node) in local))
    return out


SOURCES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    here = module_name(path)
    here_room = room_of(here)
    for line, target, in_function in imports(path):
        if target != "streamquant" and not target.startswith("streamquant."):
            continue
        assert not in_function, f"{path.name}:{line}: function-local import of {target} (a cycle dodged?)"
        there_room = room_of(target.removeprefix("streamquant."))
        assert RANK[there_room] <= RANK[here_room], (
            f"streamquant.{here} (room {here_room!r}) imports {target} (room {there_room!r}, above it) at line {line}")


@pytest.mark.parametrize("path", sorted((PACKAGE / "quant" / "math").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_math_imports_only_torch(path):
    for line, target, _ in imports(path):
        top = target.split(".")[0]
        if top in sys.stdlib_module_names or top in MATH_ALLOWED:
            continue
        assert target.startswith("streamquant.quant.math"), f"{path.name}:{line}: the pure math imports {target}"


def test_the_rules_can_fail():
    """The checker itself: an upward import is caught, a downward one is not."""
    assert RANK[room_of("loading.session")] < RANK[room_of("api")]
    assert room_of("quant.math.quantize") == "quant.math" and room_of("quant.scaled.weights") == "quant"
    with pytest.raises(AssertionError, match="no room"):
        room_of("nowhere")
