"""The dependency direction of DESIGN.md, read from the source: which subpackage imports which.

``blocks``, ``losses`` and ``data`` import no other blockyard subpackage; ``train`` may import
``data`` (durable writes, locks) but not ``blocks`` or ``losses``; nothing imports ``examples``.
At module level only torch, einops, numpy, safetensors and the standard library are imported;
optional extras are imported inside the function that needs them. Every ``import``/``from``
statement counts, wherever it sits in the file.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import blockyard

SRC = Path(blockyard.__file__).parent
SUBPACKAGES = ("blocks", "data", "losses", "train")
MAY_IMPORT = {"blocks": set(), "data": set(), "losses": set(), "train": {"data"}}
# The one sanctioned crossing: the router losses live with the gates that compute them
# (blocks/router_losses.py) and losses/moe.py re-exports them; nothing else in losses uses blocks.
RE_EXPORTS = {("blockyard.losses.moe", "blockyard.blocks.router_losses")}
THIRD_PARTY = {"torch", "einops", "numpy", "safetensors"}


def _modules() -> list[tuple[str, Path]]:
    out = []
    for sub in SUBPACKAGES:
        for path in sorted((SRC / sub).rglob("*.py")):
            parts = path.relative_to(SRC).with_suffix("").parts
            name = ".".join(("blockyard", *parts)).removesuffix(".__init__")
            out.append((name, path))
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """``(absolute module, at module level, line)`` of every import statement of the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try blocks at module level count as module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            targets = [module]
            if node.module is None:  # `from . import x`: x is a module of the package
                targets = [f"{module}.{alias.name}" for alias in node.names]
            found += [(t, id(node) in top_level, node.lineno) for t in targets]
    return found


MODULES = _modules()


def test_every_subpackage_is_scanned():
    names = {n for n, _ in MODULES}
    assert {f"blockyard.{s}" for s in SUBPACKAGES} <= names
    assert "blockyard.blocks.gates" in names and "blockyard.data.shards" in names


@pytest.mark.parametrize("name, path", MODULES, ids=[n for n, _ in MODULES])
def test_subpackages_import_only_what_the_design_allows(name, path):
    own = name.split(".")[1]
    bad = []
    for module, _, line in _imports(name, path):
        parts = module.split(".")
        if parts[0] == "examples":
            bad.append(f"line {line}: {module} (nothing in src imports examples)")
        if parts[0] != "blockyard" or len(parts) < 2:
            continue
        other = parts[1]
        if other == own or other in MAY_IMPORT[own] or (name, module) in RE_EXPORTS:
            continue
        bad.append(f"line {line}: {module}")
    assert not bad, f"{name} imports other blockyard subpackages: {bad}"


@pytest.mark.parametrize("name, path", MODULES, ids=[n for n, _ in MODULES])
def test_module_level_imports_are_torch_numpy_einops_safetensors_or_stdlib(name, path):
    allowed = THIRD_PARTY | set(sys.stdlib_module_names) | {"blockyard", "__future__"}
    bad = [f"line {line}: {module}" for module, top, line in _imports(name, path)
           if top and module.split(".")[0] not in allowed]
    assert not bad, f"{name} imports optional packages at module level (import them lazily): {bad}"


def test_the_scan_catches_a_crossing(tmp_path):
    # the checker itself, on the import that used to be in blocks/gates.py and on a lazy one
    fake = tmp_path / "gates.py"
    fake.write_text("from ..losses.moe import router_z_loss\nfrom . import norm\n\n\n"
                    "def f():\n    import matplotlib.pyplot\n    from ..train import unwrap\n")
    found = _imports("blockyard.blocks.gates", fake)
    assert found == [("blockyard.losses.moe", True, 1), ("blockyard.blocks.norm", True, 2),
                     ("matplotlib.pyplot", False, 6), ("blockyard.train", False, 7)]
    init = tmp_path / "__init__.py"
    init.write_text("from .moe import x\n")
    assert _imports("blockyard.losses", init) == [("blockyard.losses.moe", True, 1)]


def test_router_losses_are_one_definition_under_both_names():
    import blockyard.blocks as blocks
    import blockyard.losses as losses

    assert losses.switch_balance_loss is blocks.switch_balance_loss
    assert losses.router_z_loss is blocks.router_z_loss
