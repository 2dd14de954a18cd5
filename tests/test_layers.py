"""The package's folders are the pipeline's stages, and imports only go down.

Every ``import`` of every module (module level and inside functions, which is
where he2st keeps its heavy imports) is read with :mod:`ast`; a module may import
he2st modules of its own stage or of a lower one, never of a higher one.
docs/DEVELOPING.md shows the same order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import he2st

PACKAGE = Path(he2st.__file__).parent

#: Stages, lowest first. Modules of one stage may import each other.
LAYERS: list[tuple[str, ...]] = [
    ("_utils", "_stats", "errors"),  # foundation: no he2st imports above it
    ("data",),
    ("image",),
    ("io",),
    ("pp", "datasets"),
    ("encoders",),
    ("retrieval",),
    ("methods",),
    ("inference",),
    ("evaluate",),
    ("analysis",),
    ("benchmark",),
    ("cli",),
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _stage(module: str) -> str | None:
    """Top-level stage of a dotted he2st module name (None for the package itself)."""
    parts = module.split(".")
    if parts[0] != "he2st" or len(parts) == 1:
        return None
    return parts[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported he2st module) for every import statement of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("he2st")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("he2st"):
                # ``from he2st import x`` / ``from . import x`` import the submodule x.
                bare = target == "he2st" or node.module is None
                names = [f"{target}.{a.name}" for a in node.names] if bare else [target]
                found += [(node.lineno, n) for n in names]
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_ranked() -> None:
    stages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _modules()}
    stages.discard("__init__")
    assert stages <= set(RANK), f"stages missing from LAYERS (and docs/DEVELOPING.md): {sorted(stages - set(RANK))}"


def test_imports_only_go_down() -> None:
    upward = []
    for path in _modules():
        own = _stage(_module_name(path))
        if own is None:  # he2st/__init__.py imports submodules lazily by name
            continue
        for line, target in _imports(path):
            other = _stage(target)
            if other is None or other not in RANK:
                continue
            if RANK[other] > RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {target} ({other})")
    assert not upward, "imports that go up the pipeline:\n" + "\n".join(upward)


def test_layer_checker_sees_function_level_and_relative_imports(tmp_path) -> None:
    """The checker itself: imports inside functions and relative ones are found."""
    pkg = tmp_path / "he2st" / "io"
    pkg.mkdir(parents=True)
    f = pkg / "x.py"
    f.write_text("def f():\n    from he2st.methods import create_method\nfrom . import _common\nfrom ..benchmark import run\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "he2st"
    try:
        got = [t for _, t in _imports(f)]
    finally:
        PACKAGE = saved
    assert sorted(got) == ["he2st.benchmark", "he2st.io._common", "he2st.methods"]
