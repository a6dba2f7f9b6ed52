"""The module map (docs/design.md) as a rule: the map lists the modules in this order,
and a module of snapfs imports only modules listed before it, so dependencies point
one way (core below adapter below lifecycle) and the core never imports the FUSE
layer. Every module must be in the map.

The backup package (snapfs/backup/) sits between ``fiemap`` and ``cli``: it talks to a
mount only through ``client`` and may use the pure leaves (errors, params, cbt), never
the daemon (registry, control, fs, mount, ...); inside it, modules import only those
listed before them in BACKUP, and only ``mountfs`` knows pyfuse3."""

import ast
import re
from pathlib import Path

import snapfs

# lowest first: the order of docs/design.md's module map
LAYERS = [
    "errors", "params", "commands", "osutil", "blockdev", "mountinfo",           # leaves
    "namespace", "procs", "ioprio", "aio", "workers", "fileio",
    "guard", "freeze", "claims",
    "source", "cbt", "events", "protect", "diffstorage", "diffarea", "readahead",    # the core
    "tracker", "snapshot",
    "migrate",
    "journal", "cdp",                                               # continuous data protection
    "cbtstate", "registry", "control",                              # persistence, registry, commands
    "fusecommon", "fs", "stop", "detach", "mount",                  # the FUSE adapter, lifecycle
    "client", "fiemap", "backup", "cli", "__main__",               # the other side: the CLI
]
BACKUP = ["repo", "chunks", "output", "pace", "parallel", "create", "restore", "verify", "prune", "mountfs",
          "cli"]
# of snapfs's own modules:
BACKUP_MAY_USE = {"__version__", "errors", "params", "commands", "osutil", "ioprio", "cbt", "client",
                  "detach", "fusecommon"}
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
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == set(LAYERS), (modules - set(LAYERS), set(LAYERS) - modules)


def test_imports_point_down_the_map():
    wrong = []
    for name in LAYERS:
        if name == "backup":
            continue                         # test_backup_package_layers
        for dep in imported(PACKAGE / f"{name}.py"):
            if dep in LAYERS and LAYERS.index(dep) >= LAYERS.index(name):
                wrong.append(f"{name} imports {dep}")
    assert not wrong, wrong


def test_the_core_knows_nothing_of_fuse():
    for name in CORE:
        text = (PACKAGE / f"{name}.py").read_text()
        assert "pyfuse3" not in imported(PACKAGE / f"{name}.py") and "import pyfuse3" not in text, name


def backup_imports(path: Path) -> tuple[set[str], set[str]]:
    """(snapfs modules, snapfs.backup modules) a file of the backup package imports."""
    top, own = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = {a.name for a in node.names}
            if node.level == 1:
                own |= {node.module.split(".")[0]} if node.module else names
            elif node.level == 2:
                top |= {node.module.split(".")[0]} if node.module else names
            elif node.module and node.module.startswith("snapfs."):
                top.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            top |= {a.name.split(".")[1] for a in node.names if a.name.startswith("snapfs.")}
    return top, own


def test_backup_package_layers():
    files = {p.stem for p in (PACKAGE / "backup").glob("*.py")} - {"__init__"}
    assert files == set(BACKUP), (files - set(BACKUP), set(BACKUP) - files)
    wrong = []
    for name in BACKUP:
        path = PACKAGE / "backup" / f"{name}.py"
        top, own = backup_imports(path)
        wrong += [f"backup.{name} imports snapfs.{d}" for d in top - BACKUP_MAY_USE]
        wrong += [f"backup.{name} imports backup.{d}" for d in own
                  if d in BACKUP and BACKUP.index(d) >= BACKUP.index(name)]
        if name != "mountfs" and "import pyfuse3" in path.read_text():
            wrong.append(f"backup.{name} imports pyfuse3")
    assert not wrong, wrong


def test_only_the_cli_imports_backup():
    users = [name for name in LAYERS if name not in ("backup", "cli")
             and "backup" in imported(PACKAGE / f"{name}.py")]
    assert not users, users


def test_design_md_module_map_is_the_layer_order():
    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    rows = re.findall(r"^\| `((?:backup/)?\w+\.py|backup/)` \|", text, re.M)
    top = [r.removesuffix(".py").rstrip("/") for r in rows if not r.startswith("backup/") or r == "backup/"]
    assert top == [m for m in LAYERS if m != "__main__"]
    assert [r[len("backup/"):-3] for r in rows if r.startswith("backup/") and r != "backup/"] == BACKUP
