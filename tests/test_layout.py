"""The package's layering (ARCHITECTURE.md): every import inside `sidecar` points down.

Read from the source with ast, every import counted (function-level ones too), so that a
shortcut that would tangle the layers fails here rather than in a reviewer's head.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sidecar"

# Lowest first: a module may import from its own layer and the layers before it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "__init__"),
    ("host",),
    ("observe",),
    ("h2",),
    ("config",),
    ("pki",),
    ("auth",),
    ("dataplane",),
    ("splice", "grpcplane"),
    ("runtime",),
    ("certs",),  # above the run time, so that none of it can import the toolkit
    ("cli", "__main__"),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
# The two data planes are siblings: neither imports the other.
SIBLINGS = {"splice": "grpcplane", "grpcplane": "splice"}


def _top(module: str) -> str:
    """The first component below `sidecar`: `splice` for sidecar.splice.connection."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_import_reader_sees_every_form() -> None:
    """_imports finds absolute, relative, function-level and dynamic imports."""
    source = (
        "from ..runtime import route\n"
        "from . import listener\n"
        "import sidecar.cli\n"
        "def f():\n"
        "    from sidecar import runtime\n"
        "    importlib.import_module('sidecar.cli')\n"
    )
    found = [name for _, name in _imports(PACKAGE / "splice" / "example.py", source)]
    assert found == [
        "sidecar.runtime",
        "sidecar.splice.listener",
        "sidecar.cli",
        "sidecar.runtime",
        "sidecar.<import_module: not allowed>",
    ], found


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, module) for each `sidecar...` module the file imports (its text, or `source`
    as if it were the file's), relative imports resolved against the file's own package."""
    package = ["sidecar", *path.relative_to(PACKAGE).parent.parts]
    found = []
    text = path.read_text() if source is None else source
    for node in ast.walk(ast.parse(text, str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # `from . import x`, `from ..runtime import route`
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module == "sidecar" or (node.level and not node.module):
                # `from sidecar import x` / `from . import x`: each x may be a module
                found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
            elif module.startswith("sidecar."):
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("sidecar")]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            found.append((node.lineno, "sidecar.<import_module: not allowed>"))
    return found


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path) -> None:
    relative = path.relative_to(PACKAGE).with_suffix("")
    layer = relative.parts[0] if len(relative.parts) > 1 else relative.name
    assert layer in RANK, f"{relative} is in no layer of ARCHITECTURE.md: add it to LAYERS"
    for line, module in _imports(path):
        target = _top(module)
        if target == "__version__":
            continue  # the version string, defined in sidecar/__init__.py
        assert target in RANK, f"{relative}:{line} imports {module}, in no layer"
        assert RANK[target] <= RANK[layer], (
            f"{relative}:{line} imports {module}: {layer} may not depend on {target}"
        )
        assert SIBLINGS.get(layer) != target, f"{relative}:{line}: the planes are siblings"


def test_the_running_sidecar_never_loads_the_certs_toolkit() -> None:
    """Everything a route needs to run, imported in a fresh interpreter, leaves `sidecar.certs`
    out (it pulls in the certificate minting code)."""
    probe = (
        "import sys, sidecar.cli, sidecar.runtime.server, sidecar.runtime.route; "
        "print(sorted(m for m in sys.modules if m.startswith('sidecar.certs')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout
