"""The module map (docs/design.md) as a rule: a module of snapfs imports only modules
listed before it, so dependencies point one way (core below adapter below lifecycle)
and the core never imports the FUSE layer. Every module must be in the map."""

import ast
from pathlib import Path

import snapfs

# lowest first: the order of docs/design.md's module map
LAYERS = [
    "errors", "params", "mountinfo", "namespace", "workers", "stack", "freeze",  # leaves, the kernel's view
    "source", "cbt", "events", "diffstorage", "diffarea", "tracker", "snapshot",   # the core
    "state", "registry", "control",                                 # persistence, registry, commands
    "fs", "mount",                                                  # the FUSE adapter, lifecycle
    "client", "fiemap", "cli", "__main__",                         # the other side: the CLI
]
CORE = LAYERS[: LAYERS.index("control") + 1]
PACKAGE = Path(snapfs.__file__).parent


def imported(path: Path) -> set[str]:
    """snapfs modules a file imports (relative or absolute, at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found |= {alias.name for alias in node.names if alias.name != "__version__"}
            elif node.module and node.module.startswith("snapfs."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("snapfs.")}
    return found


def test_every_module_is_in_the_map():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), (modules - set(LAYERS), set(LAYERS) - modules)


def test_imports_point_down_the_map():
    wrong = []
    for name in LAYERS:
        for dep in imported(PACKAGE / f"{name}.py"):
            if dep in LAYERS and LAYERS.index(dep) >= LAYERS.index(name):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_the_core_knows_nothing_of_fuse():
    for name in CORE:
        text = (PACKAGE / f"{name}.py").read_text()
        assert "pyfuse3" not in imported(PACKAGE / f"{name}.py") and "import pyfuse3" not in text, name
