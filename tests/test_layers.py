"""The layering rule, checked on the source: every import of every module, at
any depth (function-level imports and ``TYPE_CHECKING`` blocks included).

    node < dht < crdt < training < bench, cli

A module may import from its own layer and the layers below it, never above.
``gossamer.logs`` sits below everything (it imports nothing of ours) and the
package root ``gossamer`` is the SDK face, above training.  py-libp2p is
imported only by the host adapter (:data:`LIBP2P_MODULES`): every workaround
for it lives there, each naming the bug.

One name, one import path: code outside a layer's package imports a name the package's face
(its ``__init__``: :data:`FACES`) exports from the face, never from the module behind it.

Run as a script (``python tests/test_layers.py``) it prints every back-edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gossamer"

LAYERS: dict[str, int] = {
    "logs": 0,
    "_lazy": 0,
    "node": 1,
    "dht": 2,
    "crdt": 3,
    "training": 4,
    "": 5,  # gossamer/__init__.py, the SDK face
    "bench": 6,
    "cli": 7,  # cli wires the bench command; bench never imports cli
}
LIBP2P_MODULES = {"gossamer.node._libp2p_compat", "gossamer.node.host"}
FACES = (
    "gossamer.node",
    "gossamer.dht",
    "gossamer.crdt",
    "gossamer.training",
    "gossamer.training.diffusion",
)


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


def face_exports(face: str) -> set[str]:
    """The names a face exports: its lazy ``_EXPORTS`` keys, else its ``__all__``."""
    tree = ast.parse((PACKAGE.parent / face.replace(".", "/") / "__init__.py").read_text())
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        if not isinstance(target, ast.Name) or node.value is None:
            continue
        if target.id == "_EXPORTS" and isinstance(node.value, ast.Dict):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        if target.id == "__all__" and isinstance(node.value, ast.List):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return set()


def face_of(module: str) -> str | None:
    inside = [f for f in FACES if module == f or module.startswith(f + ".")]
    return max(inside, key=len) if inside else None


def second_paths(path: Path) -> list[str]:
    here, where = module_name(path), path.relative_to(ROOT)
    return second_paths_in(path.read_text(), here, path.name == "__init__.py", str(where))


def second_paths_in(source: str, here: str, is_package: bool, where: str) -> list[str]:
    """Imports from outside a face of a name the face exports, through the module behind it."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        target = imports_in(ast.unparse(node), here, is_package)[0][1]
        face = face_of(target)
        if face is None or target == face or here == face or here.startswith(face + "."):
            continue
        exported = face_exports(face) & {a.name for a in node.names}
        if exported:
            found.append(
                f"{where}:{node.lineno}: imports {', '.join(sorted(exported))} "
                f"from {target}; the face is {face}"
            )
    return found


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
        found.extend(second_paths(path))
    return found


def test_no_module_imports_a_higher_layer_or_libp2p_outside_the_host_adapter_or_past_a_face() -> (
    None
):
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


def test_the_checker_sees_a_second_import_path() -> None:
    assert "Node" in face_exports("gossamer.node") and "DHT" in face_exports("gossamer.dht")
    assert face_of("gossamer.training.diffusion.flow") == "gossamer.training.diffusion"
    source = (
        "from gossamer.node.node import Node\n"  # a second path: the face exports Node
        "from gossamer.node import Stream\n"
        "from ..crdt.sync import CrdtService\n"  # relative, also a second path
        "from gossamer.node.rpc import rpc\n"  # not exported by the face (it is a module name)
    )
    found = second_paths_in(source, "gossamer.bench.probe", False, "probe.py")
    assert found == [
        "probe.py:1: imports Node from gossamer.node.node; the face is gossamer.node",
        "probe.py:3: imports CrdtService from gossamer.crdt.sync; the face is gossamer.crdt",
    ]
    # inside the node layer, its defining modules are the one path (only the crdt import counts)
    inside = second_paths_in(source, "gossamer.node.probe", False, "p.py")
    assert inside == [found[1].replace("probe.py", "p.py")]


if __name__ == "__main__":
    rows = violations()
    print("\n".join(rows))
    print(f"{len(rows)} violation(s)")
