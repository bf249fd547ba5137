"""Imports run one way: data -> models/loss -> runs -> train -> infer/report -> app -> demo/cli (DEVELOPERS.md,
"Architecture map").

The foundation modules (errors, io, device, sample, metrics, the package root) import no layer; a layer imports
only itself, the foundation and the layers below it. Checked on the source text, so a wrong arrow fails here before it
becomes an import cycle somewhere else.
"""

from __future__ import annotations

import ast
from pathlib import Path

import histodetect

PACKAGE = Path(histodetect.__file__).parent
# Rank of each top-level module or sub-package; a module may import only ranks <= its own (same rank: same layer).
RANK = {
    "__init__": 0,
    "errors": 0,
    "io": 0,
    "device": 0,
    "sample": 0,
    "metrics": 0,
    "data": 1,
    "models": 2,
    "loss": 2,
    "runs": 3,
    "train": 4,
    "infer": 5,
    "report": 5,
    "app": 6,
    "demo": 7,
    "cli": 7,
    "__main__": 8,
}


def _layer(dotted: str) -> str:
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    """Every histodetect module ``path`` imports, at module level or inside functions."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histodetect"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("histodetect")]
    return found


def test_imports_run_one_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("histodetect", *path.relative_to(PACKAGE).with_suffix("").parts))
        own = _layer(module)
        assert own in RANK, f"{module}: add its layer to RANK"
        for target in _imports(path):
            other = _layer(target)
            # report and infer share a rank; report draws what infer computes, never the reverse
            upward = RANK[other] > RANK[own] or (own == "report" and other == "infer")
            if upward and not (RANK[own] == 0 and other == "__init__"):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)
