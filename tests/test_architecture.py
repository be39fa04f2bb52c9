"""docs/ARCHITECTURE.md lists every module of the package, and only modules that exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGE = REPO / "orchestrator"


# An entry starts with a file name ("sweep.py", "host-setup.sh") or a folder ("workloads/");
# other lines continue the description above them.
_ENTRY = re.compile(r"^( *)([A-Za-z0-9_][\w.-]*(?:/|\.\w+))(?:\s|$)")


def _tree() -> list[tuple[int, str]]:
    """(indent, name) of each entry of the first ``` block: the module tree."""
    block = re.search(r"^```\n(.*?)^```", DOC.read_text(), re.S | re.M)
    assert block, f"no module tree in {DOC}"
    return [(len(m.group(1)), m.group(2)) for line in block.group(1).splitlines() if (m := _ENTRY.match(line))]


def _listed_paths() -> list[str]:
    """Every name in the tree as a path from the repository root ("orchestrator/workloads/x.py")."""
    paths, parents = [], []  # parents: (indent, folder) of the folders we are inside
    for indent, name in _tree():
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = "".join(folder for _, folder in parents) + name
        paths.append(path)
        if name.endswith("/"):
            parents.append((indent, name))
    return paths


def test_every_listed_name_exists():
    missing = [p for p in _listed_paths() if not (REPO / p).exists()]
    assert not missing, f"{DOC.name} names what is not in the repository: {missing}"


def test_every_module_is_listed():
    listed = {p for p in _listed_paths() if p.endswith(".py")}
    modules = {
        p.relative_to(REPO).as_posix()
        for p in PACKAGE.rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    assert modules - listed == set(), f"modules missing from {DOC.name}"
    assert listed - modules == set(), f"{DOC.name} lists modules that do not exist"


def _imports(path: Path) -> set[str]:
    """Every orchestrator module `path` imports, at module level or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("orchestrator"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("orchestrator"))
    return found


def test_no_module_imports_one_that_imports_it_back():
    """Data flows one way: no circle of imports, function-level imports included."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph = {name: {d for d in _imports(path) if d in modules and d != name} for name, path in modules.items()}
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                circles.append(" -> ".join(stack[stack.index(dep) :] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not circles, "import circles:\n" + "\n".join(circles)


# The layers, lowest first: a module imports its own group and the groups before it, never one
# after it, and never a peer on its own rank (policies and workloads do not import each other).
LAYERS = (
    ("vocabulary",),
    ("host",),
    ("policies", "workloads"),
    ("plan",),
    ("guests",),
    ("runners",),
    ("store",),
    ("analysis",),
    ("report",),
    ("preflight",),
    ("sweep",),
    ("cli",),
)
VOCABULARY = {"__init__", "errors", "validation", "fsutil", "resources", "units", "plugins"}


def _group(module: str) -> str:
    """The layer group of a dotted module name ("orchestrator.host.ksm" -> "host")."""
    parts = module.split(".")[1:]
    head = parts[0] if parts else "__init__"
    if head in VOCABULARY or head == "__version__":
        return "vocabulary"
    if head in ("plan", "planpaths"):
        return "plan"
    if head == "__main__":
        return "cli"
    return head


def test_imports_follow_the_layer_order():
    rank = {group: i for i, groups in enumerate(LAYERS) for group in groups}
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        mine = _group(name)
        assert mine in rank, f"{path} is in no layer: add its folder to LAYERS"
        for dep in _imports(path):
            theirs = _group(dep)
            if theirs == mine or theirs not in rank:  # "orchestrator.x.name" of a non-module: its module counts
                continue
            if rank[theirs] >= rank[mine]:
                wrong.append(f"{path.relative_to(REPO)} ({mine}) imports {dep} ({theirs})")
    assert not wrong, "imports against the layer order:\n" + "\n".join(sorted(set(wrong)))


def test_no_folder_is_crowded():
    """A reader finds a module by its role: a short top level, small folders."""
    top = [p for p in PACKAGE.iterdir() if p.name not in ("__pycache__",)]
    assert len(top) <= 21, sorted(p.name for p in top)
    for folder in (p for p in PACKAGE.rglob("*") if p.is_dir() and p.name != "__pycache__"):
        modules = [p for p in folder.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= 12, f"{folder.relative_to(PACKAGE)}/ holds {len(modules)} modules"
