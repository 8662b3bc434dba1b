"""The layers of DESIGN.md hold: the models never import the converters (two packages never import
each other), checkpoint io knows no network, and samplers and schemes see plain callables, never Flax.

Each rule is checked twice: statically (every import statement of the layer's files, also those
inside functions) and by importing the layer in a fresh interpreter, which also sees what it pulls
in transitively (other tests' imports cannot hide anything there)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zmagic_jax"
# layer -> what it must never import, directly or transitively (a name covers its submodules)
FORBIDDEN = {
    "zmagic_jax.models": ("zmagic_jax.ports",),
    "zmagic_jax.checkpoint_io": ("zmagic_jax.models", "zmagic_jax.ports"),
    "zmagic_jax.schemes": ("flax",),
    "zmagic_jax.samplers": ("flax",),
}
# Run in a fresh interpreter: import the layer and report, for each forbidden module, the files of
# the package on the stack when it was first imported.
PROBE = """
import importlib, json, sys, traceback
layer, package, forbidden = sys.argv[1], sys.argv[2], sys.argv[3:]
found = {}

class Spy:
    def find_spec(self, name, path=None, target=None):
        if name not in found and any(name == f or name.startswith(f + ".") for f in forbidden):
            stack = traceback.extract_stack()
            found[name] = [f"{f.filename}:{f.lineno}" for f in stack if f.filename.startswith(package)]
        return None

sys.meta_path.insert(0, Spy())
importlib.import_module(layer)
print(json.dumps(found))
"""


def _covers(name: str, forbidden) -> bool:
    return any(name == f or name.startswith(f + ".") for f in forbidden)


def _files(layer: str) -> list:
    path = ROOT.joinpath(*layer.split("."))
    return sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]


def _imported_names(path: Path) -> set:
    """Every module an import statement of ``path`` names (``from a import b`` names ``a`` and ``a.b``)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_import_statement_crosses_a_layer(layer):
    files = _files(layer)
    assert files and all(f.is_file() for f in files), layer
    crossing = {f"{f.relative_to(ROOT)}: {name}" for f in files for name in _imported_names(f)
                if _covers(name, FORBIDDEN[layer])}
    assert not crossing, f"{layer} must not import {FORBIDDEN[layer]}: {sorted(crossing)}"


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_importing_a_layer_loads_nothing_above_it(layer):
    done = subprocess.run([sys.executable, "-c", PROBE, layer, str(PACKAGE), *FORBIDDEN[layer]], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert not found, f"importing {layer} imports {sorted(found)}, first through: {found}"


def test_the_probe_sees_a_crossing():
    """The probe itself works: the converters do load the models."""
    done = subprocess.run([sys.executable, "-c", PROBE, "zmagic_jax.ports", str(PACKAGE), "zmagic_jax.models"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert "zmagic_jax.models" in found and any("ports" in frame for frame in found["zmagic_jax.models"]), found
