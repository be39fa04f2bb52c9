"""compare: two hand-made nights of one plan, whose right answers are known."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.analysis import stats
from orchestrator.analysis.across import compare
from orchestrator.cli import main as cli
from orchestrator.analysis.across.compare import (
    CANNOT_TELL,
    IMPROVEMENT,
    NO_CHANGE,
    REGRESSION,
    UNCONFIRMED,
    WITHIN_THRESHOLD,
    Thresholds,
    judge,
)
from orchestrator.errors import CompareError
from tests.nightly_studies import write_night

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
SPEC = {m.name: m for m in compare.METRICS}


def _pair(tmp_path: Path, a: dict, b: dict) -> tuple[Path, Path]:
    return write_night(tmp_path / "a", **a), write_night(tmp_path / "b", **b)


def _result(study_a: Path, study_b: Path, thresholds: Thresholds = Thresholds()) -> compare.Comparison:
    return compare.compare_studies(*compare.load_pair(study_a, study_b), thresholds)


def _change(result: compare.Comparison, setting: str, metric: str) -> compare.MetricChange:
    for s in result.settings:
        if s.setting == setting:
            for m in s.metrics:
                if m.metric == metric:
                    return m
    raise KeyError((setting, metric))


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("pct", "half", "higher", "verdict"),
    [
        (-20.0, 5.0, True, REGRESSION),  # saving fell 20% +- 5: beyond 10%, excludes 0
        (20.0, 5.0, True, IMPROVEMENT),
        (20.0, 5.0, False, REGRESSION),  # latency rose 20%: higher is bad
        (-20.0, 25.0, True, NO_CHANGE),  # interval includes 0: no claim, however large
        (-4.0, 1.0, True, WITHIN_THRESHOLD),  # excludes 0 but under the threshold
        (-4.0, 5.0, True, NO_CHANGE),
    ],
)
def test_judge_needs_threshold_and_interval(pct: float, half: float, higher: bool, verdict: str) -> None:
    assert judge(pct, half, True, higher, 10.0)[0] == verdict


def test_judge_without_interval_cannot_tell_even_a_large_change() -> None:
    verdict, note = judge(-50.0, math.nan, False, True, 10.0)
    assert verdict == CANNOT_TELL
    assert "no interval" in note and "repetitions >= 2" in note


def test_judge_says_when_the_interval_is_too_wide_to_rule_out_a_regression() -> None:
    verdict, note = judge(-2.0, 15.0, True, True, 10.0)
    assert verdict == NO_CHANGE and "-17.0%" in note and "too few trials" in note


# ----------------------------------------------------------------------------- two nights


def test_saving_drop_beyond_threshold_is_a_regression(tmp_path: Path) -> None:
    a, b = _pair(
        tmp_path,
        {"saved_mib": {100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]}},
        {"saved_mib": {100: [3.0, 3.05, 2.95], 1000: [30.0, 30.5, 29.5]}},
    )
    result = _result(a, b)
    drop = _change(result, "ksm.pages_to_scan=1000", "saved_mib")
    assert drop.a_mean == pytest.approx(40.0, abs=0.01) and drop.b_mean == pytest.approx(30.0, abs=0.01)
    assert drop.change_pct == pytest.approx(-25.0, abs=0.1)
    assert drop.method == stats.WELCH and drop.a_n == drop.b_n == 3
    expected_half = stats.welch_ci95([30.0, 30.5, 29.5], [40.0, 40.5, 39.5])[1]
    assert drop.change_ci95 == pytest.approx(expected_half, rel=1e-3)
    assert drop.verdict == UNCONFIRMED  # two single studies: beyond the threshold, but no night spread known
    assert _change(result, "ksm.pages_to_scan=100", "saved_mib").verdict in (NO_CHANGE, WITHIN_THRESHOLD)
    assert not result.regressions and result.mode == compare.TWO_STUDIES
    assert not any("by chance" in n for n in result.notes)  # 12 judged changes: under MANY_COMPARISONS


def test_many_judged_changes_come_with_a_chance_warning(tmp_path: Path, monkeypatch) -> None:
    a, b = _pair(
        tmp_path,
        {"saved_mib": {100: [3.0, 3.1], 1000: [40.0, 40.5]}},
        {"saved_mib": {100: [3.0, 3.1], 1000: [40.0, 40.5]}},
    )
    monkeypatch.setattr(compare, "MANY_COMPARISONS", 4)
    result = _result(a, b)
    judged = sum(1 for s in result.settings for m in s.metrics if m.method == stats.WELCH)
    assert judged >= 4
    assert any(n.startswith(f"{judged} changes were judged") and "by chance" in n for n in result.notes)


def test_cli_exit_status_is_1_on_a_regression_and_0_with_a_looser_threshold(tmp_path: Path, capsys) -> None:
    a, b = _pair(
        tmp_path,
        {"saved_mib": {100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]}},
        {"saved_mib": {100: [3.0, 3.1, 2.9], 1000: [30.0, 30.5, 29.5]}},
    )
    code, out, _ = _run(capsys, "compare", str(a), str(b))
    assert code == 0  # two studies: "unconfirmed", never exit 1
    assert "unconfirmed" in out and "excludes 0" in out and "significant" not in out.lower()
    code, out, _ = _run(capsys, "compare", str(a), str(b), "--night-sd", "saved_mib=0.5")
    assert code == 1 and "regression" in out
    code, _, _ = _run(
        capsys, "compare", str(a), str(b), "--night-sd", "saved_mib=0.5", "--max-saving-drop-pct", "30", "--no-html"
    )
    assert code == 0


def test_more_cpu_is_bad_less_cpu_is_an_improvement(tmp_path: Path) -> None:
    saved = {100: [3.0, 3.0, 3.0], 1000: [40.0, 40.0, 40.0]}
    a, b = _pair(
        tmp_path,
        {"saved_mib": saved, "cpu_pct": {100: [2.0, 2.1, 1.9], 1000: [10.0, 10.2, 9.8]}},
        {"saved_mib": saved, "cpu_pct": {100: [3.0, 3.1, 2.9], 1000: [5.0, 5.1, 4.9]}},
    )
    result = _result(a, b)
    assert _change(result, "ksm.pages_to_scan=100", "ksmd_cpu_pct").verdict == UNCONFIRMED  # +50%, two studies
    assert _change(result, "ksm.pages_to_scan=1000", "ksmd_cpu_pct").verdict == IMPROVEMENT  # -50%
    flat = _change(result, "ksm.pages_to_scan=1000", "saved_mib")  # every trial 40.0 on both sides
    assert flat.verdict == CANNOT_TELL and "no spread measured" in flat.note and math.isnan(flat.change_ci95)


def test_tps_and_latency_directions_and_ksm_off_compares_only_the_workload(tmp_path: Path) -> None:
    tps_a = {"off": [100.0, 101.0, 99.0], 100: [95.0, 96.0, 94.0], 1000: [90.0, 91.0, 89.0]}
    tps_b = {"off": [100.0, 101.0, 99.0], 100: [95.0, 96.0, 94.0], 1000: [80.0, 81.0, 79.0]}
    saved = {100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]}
    a, b = _pair(tmp_path, {"saved_mib": saved, "tps": tps_a}, {"saved_mib": saved, "tps": tps_b})
    result = _result(a, b)
    assert _change(result, "ksm.pages_to_scan=1000", "tps").verdict == UNCONFIRMED
    assert _change(result, "ksm.pages_to_scan=1000", "tps_vs_off_pct").verdict == UNCONFIRMED  # -10 points
    assert _change(result, "KSM off", "tps").verdict == NO_CHANGE
    off = next(s for s in result.settings if s.ksm_off)
    assert {m.metric for m in off.metrics} == {"tps", "latency_p95_ms"}  # no saving / ksmd without KSM


def test_one_trial_per_side_has_no_interval_and_says_so(tmp_path: Path, capsys) -> None:
    a, b = _pair(tmp_path, {"saved_mib": {100: [3.0], 1000: [40.0]}}, {"saved_mib": {100: [3.0], 1000: [20.0]}})
    result = _result(a, b)
    change = _change(result, "ksm.pages_to_scan=1000", "saved_mib")
    assert change.verdict == CANNOT_TELL and change.method == stats.NO_INTERVAL
    assert math.isnan(change.change_ci95) and change.change_pct == pytest.approx(-50.0, abs=0.1)
    assert "no interval" in change.note
    assert any("one repetition" in n for n in result.notes)
    code, out, _ = _run(capsys, "compare", str(a), str(b), "--no-html")
    assert code == 0 and "cannot tell" in out


def test_zero_saving_has_no_percent(tmp_path: Path) -> None:
    a, b = _pair(
        tmp_path,
        {"saved_mib": {100: [0.0, 0.0], 1000: [40.0, 40.2]}},
        {"saved_mib": {100: [0.0, 0.0], 1000: [40.0, 40.2]}},
    )
    change = _change(_result(a, b), "ksm.pages_to_scan=100", "saved_mib")
    assert math.isnan(change.change_pct) and change.verdict == CANNOT_TELL  # all zero: no spread, no percent


def test_no_percent_of_a_mean_that_its_own_interval_cannot_tell_from_zero() -> None:
    spec = SPEC["pss_drop_mib"]
    assert compare.percent_defined(spec, 40.0, 2.0)
    assert not compare.percent_defined(spec, 2.0, 19.0)  # 2 +- 19 MiB: "+500%" would mean nothing
    assert not compare.percent_defined(spec, 0.5, math.nan)  # under the 1 MiB floor
    assert compare.percent_defined(spec, 2.0, math.nan)  # one trial: only the floor applies
    change = compare.compare_values(spec, [0.5, 3.5], [10.0, 12.0], Thresholds())
    assert math.isnan(change.change_pct) and change.verdict in (NO_CHANGE, CANNOT_TELL)
    assert "cannot be told from 0" in change.note


def test_hosts_and_plan_differences_are_shown(tmp_path: Path) -> None:
    plan_b = '[study]\nname = "nightly"\nrepetitions = 3\n\n[sweep.ksm]\npages_to_scan = [100, 1000]\n'
    a, b = _pair(
        tmp_path,
        {"kernel": "6.1.0", "qemu": "QEMU 7.2"},
        {"kernel": "6.6.0", "qemu": "QEMU 8.2", "hostname": "lab2", "plan": plan_b},
    )
    result = _result(a, b)
    diff = {d["key"]: (d["a"], d["b"]) for d in result.host_diff}
    assert diff["kernel"] == ("6.1.0", "6.6.0")
    assert diff["versions.qemu"] == ("QEMU 7.2", "QEMU 8.2")
    assert diff["hostname"] == ("lab1", "lab2")
    assert "collected_wall" not in diff
    assert [d["key"] for d in result.host_diff][:2] == ["hostname", "kernel"]  # what matters first
    assert "-repetitions = 2" in result.plan_diff and "+repetitions = 3" in result.plan_diff


def test_json_output_is_valid_json_without_nan(tmp_path: Path, capsys) -> None:
    a, b = _pair(tmp_path, {"saved_mib": {100: [3.0], 1000: [40.0]}}, {"saved_mib": {100: [3.0], 1000: [39.0]}})
    code, out, _ = _run(capsys, "compare", str(a), str(b), "--json", "--no-html")
    data = json.loads(out)  # strict: NaN would not parse as JSON null
    assert code == 0 and data["regressions"] == 0 and data["rule"] == compare.RULE
    setting = next(s for s in data["settings"] if s["setting"] == "ksm.pages_to_scan=1000")
    saved = next(m for m in setting["metrics"] if m["metric"] == "saved_mib")
    assert saved["change_ci95"] is None and saved["verdict"] == CANNOT_TELL
    assert data["thresholds"]["saving_drop_pct"] == 10.0


def test_html_page_is_self_contained_with_side_by_side_plots(tmp_path: Path, capsys) -> None:
    a, b = _pair(
        tmp_path,
        {"saved_mib": {100: [3.0, 3.1], 1000: [40.0, 40.5]}},
        {"saved_mib": {100: [3.0, 3.1], 1000: [30.0, 30.5]}},
    )
    code, _, _ = _run(capsys, "compare", str(a), str(b))
    html = (b / "report" / "compare.html").read_text()
    images = [Image.open(io.BytesIO(base64.b64decode(m, validate=True))) for m in DATA_URI.findall(html)]
    assert code == 0 and len(images) == 3 and all(i.format == "PNG" for i in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "unconfirmed" in html and compare.RULE.split(";")[0] in html.replace("&#39;", "'")
    assert compare.RULES[compare.TWO_STUDIES].split(",")[0] in html.replace("&#39;", "'")
    assert "significant" not in html.lower()


# ----------------------------------------------------------------------------- refusals


def test_different_study_names_are_refused(tmp_path: Path, capsys) -> None:
    a, b = _pair(tmp_path, {"name": "nightly"}, {"name": "other"})
    with pytest.raises(CompareError, match="different plans"):
        _result(a, b)
    code, _, err = _run(capsys, "compare", str(a), str(b))
    assert code == 2 and "different plans" in " ".join(err.split())


def test_different_swept_axes_are_refused(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, {}, {"axis": "ksm.sleep_millisecs"})
    with pytest.raises(CompareError, match="different axes"):
        _result(a, b)


def test_no_setting_in_common_is_refused(tmp_path: Path) -> None:
    a, b = _pair(
        tmp_path, {"saved_mib": {100: [3.0]}, "ksm_off": False}, {"saved_mib": {5000: [3.0]}, "ksm_off": False}
    )
    with pytest.raises(CompareError, match="no setting in common"):
        _result(a, b)


def test_settings_only_on_one_side_are_listed_not_compared(tmp_path: Path) -> None:
    a, b = _pair(tmp_path, {"saved_mib": {100: [3.0], 1000: [4.0]}}, {"saved_mib": {100: [3.0], 5000: [4.0]}})
    result = _result(a, b)
    assert result.only_in_a == ["ksm.pages_to_scan=1000"] and result.only_in_b == ["ksm.pages_to_scan=5000"]
    assert {s.setting for s in result.settings} == {"KSM off", "ksm.pages_to_scan=100"}


def test_not_a_study_is_a_clear_error(tmp_path: Path, capsys) -> None:
    a = write_night(tmp_path / "a")
    code, _, err = _run(capsys, "compare", str(a), str(tmp_path / "nothing"))
    assert code == 2 and "no such study folder" in " ".join(err.split())  # rich wraps lines
