"""One source for every rule: each check fails when a second copy of a rule comes back.

Read from the source (AST, not text search where the AST can tell), so a comment or a docstring
that names a rule does not count as a copy of it.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

from orchestrator.host.ksm import KSM_INT_KNOBS, KSM_KNOBS, KSM_STR_KNOBS, THP_DEFRAG_MODES, THP_MODES
from orchestrator.plan import POLICY_KEYS, HostSection, KsmSection

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "orchestrator"
# Code that runs the package's rules: the package itself and the scripts beside it.
CODE_DIRS = ("orchestrator", "benchmarks", "scripts", "contrib")


def _modules(*dirs: str) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _names_used(node: ast.AST) -> set[str]:
    """Every bare name and attribute name referenced under node."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Attribute):
            out.add(n.attr)
        elif isinstance(n, ast.alias):
            out.add((n.asname or n.name).split(".")[-1])
    return out


def _function(path: Path, qualname: str) -> ast.AST:
    node: ast.AST = _tree(path)
    for part in qualname.split("."):
        node = next(
            n for n in ast.iter_child_nodes(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part
        )
    return node


def _where(predicate, dirs=CODE_DIRS, allowed: tuple[str, ...] = ()) -> list[str]:
    """file:line of every AST node for which predicate(node) is true, outside `allowed` files."""
    hits = []
    for path in _modules(*dirs):
        if _rel(path) in allowed:
            continue
        for node in ast.walk(_tree(path)):
            if predicate(node):
                hits.append(f"{_rel(path)}:{getattr(node, 'lineno', '?')}")
    return hits


# ----------------------------------------------------------------------------- 1. convergence


def test_every_convergence_decision_calls_the_one_rule():
    callers = {
        "orchestrator/runners/base.py": "measure",
        "orchestrator/runners/density.py": "VmDensityHost.wait_converged",
        "orchestrator/analysis/samplemetrics.py": "_convergence",
    }
    missing = [
        f"{f}:{fn}"
        for f, fn in callers.items()
        if "pages_sharing_converged" not in _names_used(_function(REPO / f, fn))
    ]
    assert not missing, f"decide convergence with plan.pages_sharing_converged: {missing}"


def test_no_second_convergence_tolerance():
    """A tolerance other than the plan's (a module constant, a hand-made spread test) is a copy."""

    def tolerance(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Name)
            and node.id.lower() in ("tolerance", "tolerance_pct", "converge_tolerance_pct", "convergence_tolerance")
        ) or (isinstance(node, ast.Attribute) and node.attr == "converge_tolerance_pct")

    def copy(node: ast.AST) -> bool:
        if isinstance(node, ast.Assign):
            return any(isinstance(t, ast.Name) and "CONVERGE" in t.id and "TOLERANCE" in t.id for t in node.targets)
        # "tolerance_pct / 100 * high", "tolerance * final": the rule's arithmetic done again
        return (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, (ast.Mult, ast.Div))
            and any(tolerance(n) for n in ast.walk(node))
        )

    assert _where(copy, allowed=("orchestrator/plan.py",)) == []


# ----------------------------------------------------------------------------- 2. t intervals


def test_t_quantiles_and_scipy_only_in_stats():
    """Every t interval and Welch computation goes through analysis/stats.py."""
    names = {"t_quantile_975", "_t_quantile", "ppf", "sps", "scipy"}

    def uses(node: ast.AST) -> bool:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = getattr(node, "module", None) or ""
            return module.startswith("scipy") or any(a.name.split(".")[0] in names for a in node.names)
        return (isinstance(node, ast.Name) and node.id in names) or (
            isinstance(node, ast.Attribute) and node.attr in names
        )

    assert _where(uses, allowed=("orchestrator/analysis/stats.py",)) == []


def test_history_judges_with_compares_verdict_rule():
    source = _function(PACKAGE / "analysis/across/history.py", "latest_nights")
    assert "band_verdict" in _names_used(source)


# ----------------------------------------------------------------------------- 3. /proc parsing


def _reads_proc_file(node: ast.AST) -> bool:
    """A read (read_text/open/_read) of a path built from a "stat" or "meminfo" literal."""
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    target = None
    if isinstance(func, ast.Attribute) and func.attr in ("read_text", "read_bytes", "open"):
        target = func.value
    elif isinstance(func, ast.Name) and func.id in ("open", "_read") and node.args:
        target = node.args[0]
    if target is None:
        return False
    literals = [n.value for n in ast.walk(target) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return any(s.rstrip("/").endswith(("stat", "meminfo")) and not s.endswith("ksm_stat") for s in literals)


def test_proc_stat_and_meminfo_parsed_only_in_probes():
    assert _where(_reads_proc_file, allowed=("orchestrator/host/probes.py",)) == []


def test_no_hand_split_of_a_stat_line():
    """comm may hold ')' and spaces: only probes.parse_proc_stat splits at the last ')'."""

    def split(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("rsplit", "rpartition")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and node.args[0].value == ")"
        )

    assert _where(split, dirs=(*CODE_DIRS, "tests"), allowed=("orchestrator/host/probes.py",)) == []


# ----------------------------------------------------------------------------- 4. formatting


NO_VALUE_SPELLINGS = ("n/a", "N/A", "–", "—")  # as text of their own; "" and "-" have other jobs


def test_one_number_formatter_and_one_no_value_spelling():
    """units.number writes every number; a missing one is units.NO_VALUE (a dash inside an
    f-string, "12–15", is a range, not a spelling of "no value")."""

    def formatter(node: ast.AST) -> bool:  # a function named like a formatter that returns text
        return (
            isinstance(node, ast.FunctionDef)
            and node.name.strip("_") in ("fmt", "num", "format_number")
            and isinstance(node.returns, ast.Name)
            and node.returns.id == "str"
        )

    in_fstrings = {
        id(v)
        for path in _modules(*CODE_DIRS)
        for n in ast.walk(_tree(path))
        if isinstance(n, ast.JoinedStr)
        for v in n.values
    }

    def spelling(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and node.value in NO_VALUE_SPELLINGS and id(node) not in in_fstrings

    assert _where(formatter, allowed=("orchestrator/units.py",)) == []
    assert _where(spelling, allowed=("orchestrator/units.py",)) == []


# ----------------------------------------------------------------------------- 5. constants


def test_one_mib():
    def mib(node: ast.AST) -> bool:
        if isinstance(node, ast.Assign):
            return any(isinstance(t, ast.Name) and t.id == "MIB" for t in node.targets)
        if isinstance(node, ast.BinOp):
            pair = (node.left, node.right)
            if all(isinstance(s, ast.Constant) for s in pair):
                values = tuple(s.value for s in pair)
                return values in ((1024, 1024), (2, 20)) and isinstance(node.op, (ast.Mult, ast.Pow))
        return False

    assert _where(mib, allowed=("orchestrator/units.py",)) == []


def test_one_list_of_ksm_knobs_and_thp_modes():
    """The lists live in host/ksm.py; the plan's models must name exactly those knobs."""
    assert set(KsmSection.model_fields) - set(POLICY_KEYS) == set(KSM_INT_KNOBS) | set(KSM_STR_KNOBS)
    assert KSM_KNOBS == ("run", *KSM_INT_KNOBS, *KSM_STR_KNOBS)
    assert set(HostSection.model_fields) == {"thp_enabled", "thp_defrag"}
    lists = {tuple(THP_MODES), tuple(THP_DEFRAG_MODES), tuple(k for k in KSM_KNOBS if k != "run")}

    def copy(node: ast.AST) -> bool:
        if (
            isinstance(node, (ast.Tuple, ast.List))
            and len(node.elts) >= 3
            and all(isinstance(e, ast.Constant) for e in node.elts)
        ):
            values = tuple(e.value for e in node.elts)
            return values in lists or set(values) >= set(KSM_KNOBS) - {"run"}
        return False

    assert _where(copy, dirs=(*CODE_DIRS, "tests"), allowed=("orchestrator/host/ksm.py",)) == []


# ----------------------------------------------------------------------------- 6. dead code


FRAMEWORK_HOOKS = {"missing_host_key"}  # paramiko calls it: overridden, never called by us
DEAD_CHECKED = ("orchestrator/host/probes.py", "orchestrator/guests/guest.py", "orchestrator/analysis/studymetrics.py")


def test_no_public_function_is_called_only_from_tests():
    """Every public top-level function or class of these modules, and every public method of
    their classes, is used by the package, a benchmark, a script or contrib (tests do not count)."""
    used: set[str] = set()
    for path in _modules(*CODE_DIRS):
        tree = _tree(path)
        defined = {n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if node in defined:
                continue
            if isinstance(node, ast.Name):
                used.add(node.id)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
            elif isinstance(node, ast.alias):
                used.add(node.name.split(".")[-1])
    dead = []
    for rel in DEAD_CHECKED:
        tree = _tree(REPO / rel)
        for node in tree.body:
            members = [node]
            if isinstance(node, ast.ClassDef):
                members += [m for m in node.body if isinstance(m, ast.FunctionDef)]
            for member in members:
                if not isinstance(member, (ast.FunctionDef, ast.ClassDef)) or member.name.startswith("_"):
                    continue
                if member.name not in used and member.name not in FRAMEWORK_HOOKS:
                    dead.append(f"{rel}:{member.lineno} {member.name}")
    assert dead == [], f"remove it (and its tests) or use it: {dead}"


# ----------------------------------------------------------------------------- 7. signals


def test_the_stop_request_lives_in_one_module():
    """Signal -> flag -> StopRequested -> teardown: the handler and the exception side by side."""

    def installs(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "signal"
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "signal"
        )

    def defines(node: ast.AST) -> bool:
        return isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name in (
            "StopFlag",
            "stop_on_signals",
            "StopRequested",
        )

    # guests/provision.py holds signals while a teardown runs and delivers them after: it defers
    # whatever the handler in place does, it does not decide a stop (and guests/ sits below runners/)
    assert (
        _where(
            installs,
            dirs=("orchestrator",),
            allowed=("orchestrator/runners/base.py", "orchestrator/guests/provision.py"),
        )
        == []
    )
    assert _where(defines, dirs=("orchestrator",), allowed=("orchestrator/runners/base.py",)) == []
