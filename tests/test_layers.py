"""The layering rule, checked on the source: every import of every module, at
any depth (function-level imports and ``TYPE_CHECKING`` blocks included).

    node < dht < crdt < training < bench, cli

A module may import from its own layer and the layers below it, never above.
``gossamer.logs`` sits below everything (it imports nothing of ours) and the
package root ``gossamer`` is the SDK face, above training.  py-libp2p is
imported only by the host adapter (:data:`LIBP2P_MODULES`): every workaround
for it lives there, each naming the bug.

Run as a script (``python tests/test_layers.py``) it prints every back-edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gossamer"

LAYERS: dict[str, int] = {
    "logs": 0,
    "node": 1,
    "dht": 2,
    "crdt": 3,
    "training": 4,
    "": 5,  # gossamer/__init__.py, the SDK face
    "bench": 6,
    "cli": 7,  # cli wires the bench command; bench never imports cli
}
LIBP2P_MODULES = {"gossamer.node._libp2p_compat", "gossamer.node.host"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "gossamer", module
    top = parts[1] if len(parts) > 1 else ""
    if top not in LAYERS:
        raise AssertionError(f"{module}: no layer assigned to gossamer.{top}")
    return LAYERS[top]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import statement in ``path``."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, here: str, is_package: bool) -> list[tuple[int, str]]:
    tree = ast.parse(source)
    package = here if is_package else here.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            # ``from gossamer import training`` names a module, not an attribute
            if target == "gossamer":
                out.extend(
                    (node.lineno, f"gossamer.{alias.name}")
                    for alias in node.names
                    if alias.name in LAYERS
                )
    return out


def violations() -> list[str]:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = module_name(path)
        own = layer_of(here)
        where = path.relative_to(ROOT)
        for line, target in imports_of(path):
            top = target.split(".")[0]
            if top == "libp2p" and here not in LIBP2P_MODULES:
                found.append(f"{where}:{line}: imports {target} outside the host adapter")
            if top != "gossamer":
                continue
            if target == "gossamer":
                continue  # ``from gossamer import x`` is checked through x above
            theirs = layer_of(target)
            if theirs > own:
                found.append(f"{where}:{line}: {here} imports {target} from a higher layer")
    return found


def test_no_module_imports_a_higher_layer_or_libp2p_outside_the_host_adapter() -> None:
    found = violations()
    assert not found, f"{len(found)} layering violation(s):\n" + "\n".join(found)


def test_the_checker_sees_function_level_relative_and_typing_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from gossamer import training, __version__\n"
        "if TYPE_CHECKING:\n"
        "    from ..crdt import run\n"
        "def f():\n"
        "    from gossamer.training import model\n"
        "    import libp2p.peer.id\n"
    )
    targets = sorted(t for _, t in imports_in(source, "gossamer.node.probe", False))
    # a ``from X import y`` is an import of X (layers are decided by X's package)
    assert targets == [
        "gossamer",
        "gossamer.crdt",
        "gossamer.node",
        "gossamer.training",
        "gossamer.training",
        "libp2p.peer.id",
        "typing",
    ]
    assert layer_of("gossamer.training.model") > layer_of("gossamer.node.probe")
    assert layer_of("gossamer.cli.main") > layer_of("gossamer.bench.dht") > layer_of("gossamer")


if __name__ == "__main__":
    rows = violations()
    print("\n".join(rows))
    print(f"{len(rows)} violation(s)")
