from pathlib import Path

import pytest

from orchestrator.errors import PlanError
from orchestrator.plan import check_against_host, expand, load_plan, parse_plan

PLANS = Path(__file__).resolve().parent.parent / "plans"

GOOD = """
[study]
name = "t"
ksm_off_baseline = true
repetitions = 2
[workload]
type = "processes"
[sweep.ksm]
pages_to_scan = [100, 1000]
[sweep.workload]
fill = ["same", "random"]
"""


def test_grid_is_product_plus_baseline_times_repetitions():
    trials = expand(parse_plan(GOOD))
    assert len(trials) == (4 + 2) * 2
    assert sum(t.ksm_off for t in trials) == 4
    assert [t.index for t in trials] == list(range(12))
    off = [t for t in trials if t.ksm_off][0]
    assert off.ksm == {} and "ksm.pages_to_scan" not in off.settings


def test_trial_ids_are_stable_and_depend_on_every_setting():
    a = [t.trial_id for t in expand(parse_plan(GOOD))]
    assert a == [t.trial_id for t in expand(parse_plan(GOOD))]
    assert len(set(a)) == len(a)
    changed = [t.trial_id for t in expand(parse_plan(GOOD.replace('type = "processes"', 'type = "processes"\nprocesses = 3')))]
    assert not set(a) & set(changed)


def test_shuffled_order_is_seeded_and_ids_do_not_change():
    plan = GOOD.replace('repetitions = 2', 'repetitions = 2\norder = "shuffled"\nseed = 7')
    first = [t.trial_id for t in expand(parse_plan(plan))]
    assert first == [t.trial_id for t in expand(parse_plan(plan))]
    assert sorted(first) == sorted(t.trial_id for t in expand(parse_plan(GOOD)))
    assert first != [t.trial_id for t in expand(parse_plan(GOOD))]


def test_exclude_and_include():
    plan = GOOD.replace("ksm_off_baseline = true", "") + """
[[sweep.exclude]]
ksm = { pages_to_scan = 100 }
workload = { fill = "random" }
[[sweep.include]]
ksm = { pages_to_scan = 5000 }
workload = { fill = "zero" }
"""
    trials = [t for t in expand(parse_plan(plan)) if t.repetition == 0]
    points = {(t.ksm["pages_to_scan"], t.workload["fill"]) for t in trials}
    assert points == {(100, "same"), (1000, "same"), (1000, "random"), (5000, "zero")}


def test_sweep_values_are_validated_per_point():
    bad = GOOD.replace("pages_to_scan = [100, 1000]", "pages_to_scan = [100, -1]")
    with pytest.raises(PlanError, match="pages_to_scan"):
        parse_plan(bad)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[study\nname=1", "not valid TOML"),
        ('[workload]\ntype = "processes"', "study: required key is missing"),
        ('[study]\nname = "x"\ncolour = 1\n[workload]\ntype = "processes"', "study.colour: unknown key"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\nprocesses = 0', "workload.processes: Input should be greater than or equal to 1"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\nfill = "stripes"', "workload.fill"),
        ('[study]\nname = "x"\n[workload]\ntype = "teleport"', "workload"),
        ('[study]\nname = "x"\n[ksm]\nmerge_across_nodes = 3\n[workload]\ntype = "processes"', "merge_across_nodes = 3 is out of range"),
        ('[study]\nname = "x"\n[ksm]\nrun = 1\n[workload]\ntype = "processes"', "ksm.run: unknown key"),
        ('[study]\nname = "../evil"\n[workload]\ntype = "processes"', "study.name"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\n[sweep.ksm]\npages_to_scan = 5', "must be a non-empty list"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\n[sweep.bogus]\nx = [1]', "axes live in"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\n[sweep.guests]\ncount = [1, 2]', "does not have"),
        ('[study]\nname = "x"\n[workload]\ntype = "sysbench"', "add a [guests] table"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\n[phases]\nmeasure_s = "long"', "phases.measure_s"),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\n[sweep.ksm]\npages_to_scan = [1, 1]', "twice"),
    ],
)
def test_bad_plans_name_the_key_and_the_problem(text, message):
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert message in str(info.value)


def test_cli_reports_bad_plan_without_traceback(tmp_path, capsys):
    from orchestrator.cli import main

    plan = tmp_path / "bad.toml"
    plan.write_text('[study]\nname = "x"\n[workload]\ntype = "processes"\nprocesses = -2\n')
    assert main(["sweep", str(plan), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "workload.processes" in err and "Traceback" not in err
    assert main(["sweep", str(tmp_path / "missing.toml")]) == 2


def test_knob_this_kernel_lacks(tmp_path):
    ksm_dir = tmp_path / "ksm"
    ksm_dir.mkdir()
    for knob in ("run", "pages_to_scan", "sleep_millisecs"):
        (ksm_dir / knob).write_text("0\n")
    trials = expand(parse_plan('[study]\nname = "x"\n[ksm]\nsmart_scan = 1\n[workload]\ntype = "processes"'))
    with pytest.raises(PlanError, match="no KSM knob.*smart_scan"):
        check_against_host(trials, ksm_dir)


@pytest.mark.parametrize("name", sorted(p.name for p in PLANS.glob("*.toml")))
def test_shipped_plans_are_valid(name):
    plan, _ = load_plan(PLANS / name)
    assert expand(plan)


def test_dry_run_touches_nothing(tmp_path, capsys):
    from orchestrator.cli import main

    assert main(["sweep", str(PLANS / "quickstart.toml"), "--dry-run", "--results", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "quickstart" in capsys.readouterr().out


def test_workload_adapter_rules_are_checked_at_load():
    text = ('[study]\nname = "x"\n[workload]\ntype = "sysbench"\ntest = "select_random_points"\ntables = 4\n'
            '[guests]\ncount = 1\n')
    with pytest.raises(PlanError, match="tables = 1"):
        parse_plan(text)


def test_guest_count_is_a_sweep_axis_and_changes_the_guest_set():
    from orchestrator.vmrunner import guest_set_key

    text = ('[study]\nname = "x"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\n'
            '[sweep.guests]\ncount = [1, 3]\n[sweep.ksm]\npages_to_scan = [100, 1000]\n')
    trials = expand(parse_plan(text))
    assert sorted({t.guests["count"] for t in trials}) == [1, 3]
    keys = {t.guests["count"]: set() for t in trials}
    for t in trials:
        keys[t.guests["count"]].add(guest_set_key(t))
    # Trials differing only in KSM knobs share booted guests; a new count boots a new set.
    assert all(len(k) == 1 for k in keys.values()) and keys[1] != keys[3]
