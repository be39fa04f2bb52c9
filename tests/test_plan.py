import math
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.errors import PlanError
from orchestrator import plan as plan_mod
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
    changed = [
        t.trial_id for t in expand(parse_plan(GOOD.replace('type = "processes"', 'type = "processes"\nprocesses = 3')))
    ]
    assert not set(a) & set(changed)


def test_shuffled_order_is_seeded_and_ids_do_not_change():
    plan = GOOD.replace("repetitions = 2", 'repetitions = 2\norder = "shuffled"\nseed = 7')
    first = [t.trial_id for t in expand(parse_plan(plan))]
    assert first == [t.trial_id for t in expand(parse_plan(plan))]
    assert sorted(first) == sorted(t.trial_id for t in expand(parse_plan(GOOD)))
    assert first != [t.trial_id for t in expand(parse_plan(GOOD))]


def test_exclude_and_include():
    plan = (
        GOOD.replace("ksm_off_baseline = true", "")
        + """
[[sweep.exclude]]
ksm = { pages_to_scan = 100 }
workload = { fill = "random" }
[[sweep.include]]
ksm = { pages_to_scan = 5000 }
workload = { fill = "zero" }
"""
    )
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
        (
            '[study]\nname = "x"\n[workload]\ntype = "processes"\nprocesses = 0',
            "workload.processes: Input should be greater than or equal to 1",
        ),
        ('[study]\nname = "x"\n[workload]\ntype = "processes"\nfill = "stripes"', "workload.fill"),
        ('[study]\nname = "x"\n[workload]\ntype = "teleport"', "workload"),
        (
            '[study]\nname = "x"\n[ksm]\nmerge_across_nodes = 3\n[workload]\ntype = "processes"',
            "merge_across_nodes = 3 is out of range",
        ),
        ('[study]\nname = "x"\n[ksm]\nrun = 1\n[workload]\ntype = "processes"', "ksm.run: unknown key"),
        ('[study]\nname = "../evil"\n[workload]\ntype = "processes"', "study.name"),
        (
            '[study]\nname = "x"\n[workload]\ntype = "processes"\n[sweep.ksm]\npages_to_scan = 5',
            "must be a non-empty list",
        ),
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
    from orchestrator.cli.main import main

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
    from orchestrator.cli.main import main

    assert main(["sweep", str(PLANS / "quickstart.toml"), "--dry-run", "--results", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []
    assert "quickstart" in capsys.readouterr().out


def test_workload_adapter_rules_are_checked_at_load():
    text = (
        '[study]\nname = "x"\n[workload]\ntype = "sysbench"\ntest = "select_random_points"\ntables = 4\n'
        "[guests]\ncount = 1\n"
    )
    with pytest.raises(PlanError, match="tables = 1"):
        parse_plan(text)


def test_guest_count_is_a_sweep_axis_and_changes_the_guest_set():
    from orchestrator.runners.vm import guest_set_key

    text = (
        '[study]\nname = "x"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\n'
        "[sweep.guests]\ncount = [1, 3]\n[sweep.ksm]\npages_to_scan = [100, 1000]\n"
    )
    trials = expand(parse_plan(text))
    assert sorted({t.guests["count"] for t in trials}) == [1, 3]
    keys = {t.guests["count"]: set() for t in trials}
    for t in trials:
        keys[t.guests["count"]].add(guest_set_key(t))
    # Trials differing only in KSM knobs share booted guests; a new count boots a new set.
    assert all(len(k) == 1 for k in keys.values()) and keys[1] != keys[3]


# -- one model per workload: the plan validates with the adapter's own ---------------------------

SYSBENCH = '[study]\nname = "x"\n[workload]\ntype = "sysbench"\n{extra}\n[guests]\ncount = 1\n'
PROCESSES = '[study]\nname = "x"\n[workload]\ntype = "processes"\n{extra}\n'


def test_the_plan_builds_the_adapters_own_models():
    from orchestrator.workloads.probe import ProbeParams
    from orchestrator.workloads.processes import ProcessesParams
    from orchestrator.workloads.sysbench import SysbenchWorkload

    assert type(parse_plan(PROCESSES.format(extra="")).workload) is ProcessesParams
    assert type(parse_plan(SYSBENCH.format(extra="")).workload) is SysbenchWorkload
    probe = '[study]\nname = "x"\n[workload]\ntype = "probe"\n'
    assert type(expand(parse_plan(probe))[0].workload_model) is ProbeParams


def test_processes_rounds_default_is_one_in_plan_and_adapter():
    """One default (the README's rounds = 1: fill once, then hold), not 1 here and 0 there."""
    from orchestrator.workloads.processes import ProcessesParams

    trial = expand(parse_plan(PROCESSES.format(extra="")))[0]
    assert trial.workload["rounds"] == trial.workload_model.rounds == ProcessesParams().rounds == 1
    assert not trial.workload_model.writes_during_measure


@pytest.mark.parametrize("tables, ok", [(1000, True), (1001, False), (1024, False)])
def test_sysbench_tables_limit_is_one_limit(tables, ok):
    """The plan refused tables > 1000 at load before (the adapter's check), while its own
    model said 1024: one limit now, 1000, the same from the plan and from the adapter."""
    from orchestrator.workloads.sysbench import SysbenchParams

    text = SYSBENCH.format(extra=f"tables = {tables}")
    if ok:
        assert parse_plan(text).workload.tables == tables
        assert SysbenchParams(tables=tables).tables == tables
        return
    with pytest.raises(PlanError, match=r"workload\.tables: Input should be less than or equal to 1000"):
        parse_plan(text)
    with pytest.raises(ValidationError, match=r"tables\n  Input should be less than or equal to 1000"):
        SysbenchParams(tables=tables)


@pytest.mark.parametrize(
    "extra, key",
    [
        ("processes = true", "workload.processes"),  # a whole number, not a bool (the adapter's rule)
        ("processes = 5000", "workload.processes"),  # <= 4096 (the plan's rule)
        ("seed = -1", "workload.seed"),  # numpy's SeedSequence takes no negative seed
        ("round_wait_s = inf", "workload.round_wait_s"),
        ("cpu_pin = []", "workload.cpu_pin"),
        ("cpu_pin = [0, -1]", "workload.cpu_pin"),
        ("pages_per_process = 2.5", "workload.pages_per_process"),
    ],
)
def test_processes_rules_of_plan_and_adapter_both_hold_at_load(extra, key):
    with pytest.raises(PlanError, match=rf"\n  {re.escape(key)}: "):
        parse_plan(PROCESSES.format(extra=extra))


@pytest.mark.parametrize(
    "extra, key",
    [
        ('test = "oltp_bogus"', "workload.test"),  # the adapter's list of Lua tests
        ("duration_s = 100000", "workload.duration_s"),  # the plan's cap
        ('mysql_socket = "/tmp/x.sock"', "workload.mysql_socket"),  # the image's, not a plan key
    ],
)
def test_sysbench_rules_of_plan_and_adapter_both_hold_at_load(extra, key):
    with pytest.raises(PlanError, match=rf"\n  {re.escape(key)}: "):
        parse_plan(SYSBENCH.format(extra=extra))


def test_probe_plan_rules_hold_for_the_adapter_too():
    from orchestrator.workloads.probe import ProbeParams

    for bad in ({"overhead_writes": 1}, {"duplicate_fraction": 0}, {"merge_timeout_s": 0}, {"seed": -1}):
        with pytest.raises(ValidationError, match=rf"^1 validation error for ProbeParams\n{next(iter(bad))}\n"):
            ProbeParams(**bad)


def test_a_bad_swept_workload_value_names_the_axis_and_the_key():
    text = PROCESSES.format(extra="") + "[sweep.workload]\nrounds = [1, -1]\n"
    with pytest.raises(PlanError, match=r"point \{'workload.rounds': -1\}: workload.rounds: Input should be greater"):
        parse_plan(text)


def test_trials_give_runners_typed_settings_with_the_swept_values():
    text = PROCESSES.format(extra="cpu_pin = [1, 0]") + (
        "[phases]\nmeasure_s = 12\n[sampling]\ninterval_s = 0.5\n[sweep.workload]\nrounds = [0, 3]\n"
    )
    trials = expand(parse_plan(text))
    assert [t.workload_model.rounds for t in trials] == [0, 3]
    first = trials[0]
    assert first.workload_model.cpu_pin == (1, 0) and first.workload["cpu_pin"] == [1, 0]
    assert first.phases_model.measure_s == 12.0 and first.sampling_model.interval_s == 0.5
    assert first.guests_model is None
    vm = expand(parse_plan(SYSBENCH.format(extra="warmup_s = 7\ntables = 2")))[0]
    assert vm.guests_model.count == 1 and vm.workload_model.warmup_s == 7
    params = vm.workload_model.params(duration_s=7)
    assert (params.tables, params.duration_s, params.mysql_db) == (2, 7, "sbtest")


def test_trial_ids_are_what_they_were_before_the_workload_models_moved():
    """Resume finds finished trials by id: the ids of these plans were recorded before the
    workloads' models moved into their adapters, and must not change."""
    plans = {
        PROCESSES.format(extra="cpu_pin = [0, 1]") + "[sweep.workload]\nrounds = [0, 1]\nround_wait_s = [0.5]\n": [
            "rounds0-round-wait-s0.5_r0_2c043481",
            "rounds1-round-wait-s0.5_r0_cad8a5c0",
        ],
        SYSBENCH.format(extra="tables = 2\nwarmup_s = 5").replace("count = 1", "count = 2")
        + "[sweep.ksm]\npages_to_scan = [100]\n": ["pts100_r0_fda30752"],
        '[study]\nname = "t"\n[workload]\ntype = "probe"\npages = 64\n[sweep.host]\nthp_enabled = ["never"]\n': [
            "thpnever_r0_a28a8e8d"
        ],
        '[study]\nname = "t"\nksm_off_baseline = true\n[workload]\ntype = "idle"\n[guests]\ncount = 1\n'
        "[sweep.ksm]\npages_to_scan = [100]\n": ["ksmoff_r0_d356b048", "pts100_r0_128741fa"],
    }
    for text, ids in plans.items():
        assert [t.trial_id for t in expand(parse_plan(text.replace('name = "x"', 'name = "t"')))] == ids


def test_the_plan_reference_lists_each_workloads_keys_and_defaults():
    """The plan reference's [workload] reference names every key of each workload's one model, and no
    other; its values are the models' defaults (sysbench's warmup_s = 30 is advice, not one)."""
    import tomllib

    from orchestrator.plan import WORKLOAD_MODELS

    text = (PLANS.parent / "docs" / "plan-reference.md").read_text()
    start = text.index("[workload]                   # one of four types:")
    block = text[start : text.index("\n[guests]", start)]
    tables: dict[str, dict] = {}
    current: dict | None = None
    subtables: set[str] = set()
    for line in block.splitlines()[1:]:
        line = line.removeprefix("# ").split(" #", 1)[0].strip()
        if line.startswith("[workload."):
            subtables.add(line.strip("[]").split(".", 1)[1])
            current = None  # a workload's sub-table (probe's [workload.exposure]): its own model's keys
            continue
        if "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        if key == "type":
            current = tables.setdefault(tomllib.loads(f"v = {value}")["v"], {})
        elif current is not None:
            current[key] = tomllib.loads(f"v = {value}")["v"]
    assert set(tables) == set(WORKLOAD_MODELS)
    for kind, model in WORKLOAD_MODELS.items():
        assert set(tables[kind]) == set(model.model_fields) - {"type"} - subtables, kind
        defaults = {k: field.get_default(call_default_factory=True) for k, field in model.model_fields.items()}
        advice = {"warmup_s"} if kind == "sysbench" else set()
        assert {k: v for k, v in tables[kind].items() if k not in advice} == {
            k: defaults[k] for k in tables[kind] if k not in advice
        }, kind


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_a_timeout_of_inf_or_nan_is_refused_naming_the_key(value: str) -> None:
    text = (
        '[study]\nname = "t"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\nmemory_mib = 512\n'
        f"boot_timeout_s = {value}\n"
    )
    with pytest.raises(PlanError, match="boot_timeout_s"):
        parse_plan(text)
    with pytest.raises(PlanError, match="confirm_max_s"):
        parse_plan(f'[study]\nname = "t"\n[workload]\ntype = "processes"\n[nightly]\nconfirm_max_s = {value}\n')


def test_two_ksm_off_trials_per_block_with_their_own_ids_the_first_id_unchanged():
    one = expand(parse_plan(GOOD))
    two = expand(parse_plan(GOOD.replace("ksm_off_baseline = true", "ksm_off_baseline = true\nksm_off_per_block = 2")))
    assert len(two) == len(one) + 4  # 2 fill groups x 2 blocks, one more KSM-off trial each
    assert len({t.trial_id for t in two}) == len(two)
    assert {t.trial_id for t in one} <= {t.trial_id for t in two}  # resume of an older study finds its trials
    for block in (0, 1):
        offs = [t for t in two if t.ksm_off and t.repetition == block]
        assert len(offs) == 4 and sum(t.trial_id.startswith("ksmoff-c1-") for t in offs) == 2
    with pytest.raises(PlanError, match="ksm_off_per_block needs ksm_off_baseline"):
        parse_plan(GOOD.replace("ksm_off_baseline = true", "ksm_off_per_block = 2"))


# ----------------------------------------------------------------------------- convergence rule


def test_flat_series_is_converged():
    assert plan_mod.pages_sharing_converged([1000, 1000, 1000, 1000], tolerance_pct=1.0)


def test_zero_series_is_not_converged():
    """ksmd merges nothing on its first full scan: a window of zeros is "not begun"."""
    assert not plan_mod.pages_sharing_converged([0, 0, 0, 0], tolerance_pct=1.0)
    assert not plan_mod.pages_sharing_converged([], tolerance_pct=1.0)
    assert not plan_mod.pages_sharing_converged([math.nan, math.nan], tolerance_pct=1.0)


def test_rising_series_is_not_converged():
    assert not plan_mod.pages_sharing_converged([600, 700, 800, 900, 1000], tolerance_pct=1.0)
    # the same rise is within a 50% tolerance: the plan's tolerance decides
    assert plan_mod.pages_sharing_converged([600, 700, 800, 900, 1000], tolerance_pct=50.0)


def test_tolerance_edge_is_inclusive_and_relative_to_the_largest_sample():
    assert plan_mod.pages_sharing_converged([99, 100, 100], tolerance_pct=1.0)  # 1 <= 1% of 100
    assert not plan_mod.pages_sharing_converged([98.9, 100, 100], tolerance_pct=1.0)
    # relative to the largest value, wherever it sits in the window (a falling series too)
    assert plan_mod.pages_sharing_converged([200, 199, 198], tolerance_pct=1.0)
    assert not plan_mod.pages_sharing_converged([200, 199, 197.9], tolerance_pct=1.0)
    # NaN ticks (a missed read) are left out, not counted as zero
    assert plan_mod.pages_sharing_converged([100, math.nan, 100], tolerance_pct=1.0)


def test_stored_tolerance_is_the_plans_else_the_default():
    assert plan_mod.stored_converge_tolerance_pct("[phases]\nconverge_tolerance_pct = 2.5\n") == 2.5
    assert plan_mod.stored_converge_tolerance_pct('[study]\nname = "x"\n') == plan_mod.CONVERGE_TOLERANCE_PCT
    assert plan_mod.stored_converge_tolerance_pct("") == plan_mod.CONVERGE_TOLERANCE_PCT
    assert plan_mod.stored_converge_tolerance_pct("not toml [") == plan_mod.CONVERGE_TOLERANCE_PCT
    assert plan_mod.PhasesSection().converge_tolerance_pct == plan_mod.CONVERGE_TOLERANCE_PCT
