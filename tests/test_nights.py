"""The night as a level: known answers for the band, the walk, Holm, BH and the two-study rule."""

from __future__ import annotations

import math
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator.analysis.across import compare, history, nights
from orchestrator.cli import main as cli, confirm
from orchestrator.analysis.across.compare import NightContext, Thresholds
from orchestrator.analysis.stats import bh_reject, holm_reject
from tests.nightly_studies import write_night

RULES = nights.NightRules()


def test_band_with_equal_trials_is_the_textbook_prediction_interval() -> None:
    means = [10.0, 11.0, 12.0, 11.5]
    band = nights.band_of([(m, 0.5, 3) for m in means], resolution=0.01)
    assert isinstance(band, nights.Band)
    s_b = np.std(means, ddof=1)
    expected = sps.t.ppf(0.975, 3) * s_b * math.sqrt(1 + 1 / 4)
    assert band.mean == pytest.approx(np.mean(means))
    assert band.half(3) == pytest.approx(expected, rel=1e-4)
    # sigma_night^2 = s_b^2 - s_w^2 / n
    assert band.night_sd == pytest.approx(math.sqrt(s_b**2 - 0.25 / 3))


def test_more_trials_tonight_narrow_only_the_within_part() -> None:
    band = nights.band_of([(10.0, 2.0, 3), (10.5, 2.0, 3), (9.5, 2.0, 3)], 0.01)
    assert isinstance(band, nights.Band)
    # s_b^2 = 0.25 < s_w^2 / n = 4/3: no night effect measured, the within part dominates
    assert band.night_sd == 0.0
    assert band.se(6) < band.se(3)
    assert band.se(6) == pytest.approx(math.sqrt(4 / 6 + 0.25 / 3))


def test_no_spread_is_cannot_tell_never_a_zero_width_band() -> None:
    assert nights.band_of([(7.0, 0.0, 3)] * 4, 0.01) == nights.NO_SPREAD
    j = nights.judge((8.0, 0.0, 3), nights.NO_SPREAD, False, 25.0, False, 0.5)
    assert j.band is None and not math.isfinite(j.p) and not j.outside
    # some spread, below the resolution: floored, never zero
    band = nights.band_of([(7.0, 0.0, 3), (7.0, 0.0, 3), (7.000001, 0.0, 3)], 0.01)
    assert isinstance(band, nights.Band) and band.between_sd == 0.01


def test_too_few_nights_give_no_band() -> None:
    judged, band = nights.walk([(1.0, 0.1, 3), (1.1, 0.1, 3)], True, 10, False, 0.0, 0.01, RULES)
    assert all(j.band is None for j in judged)
    assert isinstance(band, str) and "3 needed" in band


def test_a_step_stays_outside_for_three_nights_then_is_the_new_level() -> None:
    rng = np.random.default_rng(3)
    quiet = [(100 + rng.normal(0, 1), 1.0, 3) for _ in range(8)]
    step = [(80 + rng.normal(0, 1), 1.0, 3) for _ in range(5)]
    judged, _ = nights.walk(quiet + step, True, 10.0, False, 1.0, 0.01, RULES)
    assert [j.outside for j in judged[8:11]] == [True, True, True]
    assert all(j.beyond == -1 for j in judged[8:11])
    assert not judged[11].outside and not judged[12].outside  # the band restarted from the step


def test_holm_on_a_crafted_family() -> None:
    p = [0.001, 0.013, 0.04, 0.3]
    # thresholds 0.0125, 0.0167, 0.025, 0.05: the first two go, 0.04 > 0.025 stops
    assert holm_reject(p, 0.05).tolist() == [True, True, False, False]
    assert holm_reject([0.03, math.nan], 0.05).tolist() == [False, False]  # NaN counts in m: 0.03 > 0.025
    gate = nights.holm_gate([0.001, 0.001], [True, False], 0.05)
    assert gate.tolist() == [True, False]  # an improvement is no regression


def test_bh_on_crafted_flags() -> None:
    p = [0.001, 0.008, 0.039, 0.041, 0.6]
    # q k/m = 0.01, 0.02, 0.03, 0.04, 0.05: ranks 1-2 pass, 0.039 > 0.03, 0.041 > 0.04
    assert bh_reject(p, 0.05).tolist() == [True, True, False, False, False]
    assert nights.bh_flags(p, [1, 0, 1, 1, 1], 0.05).tolist() == [True, False, False, False, False]


# ----------------------------------------------------------------------------- compare and history


def _nights(tmp_path: Path, savings: list[list[float]], tonight: list[float]) -> list[Path]:
    out = []
    for i, s in enumerate([*savings, tonight]):
        out.append(
            write_night(
                tmp_path / f"n{i}", saved_mib={100: [3.0, 3.1, 2.9], 1000: s}, created_wall=1_700_000_000.0 + 86400 * i
            )
        )
    return out


def _change(result: compare.Comparison, setting: str, metric: str) -> compare.MetricChange:
    return next(m for s in result.settings if s.setting == setting for m in s.metrics if m.metric == metric)


def test_two_studies_call_a_bad_change_unconfirmed_and_exit_0(tmp_path: Path, capsys) -> None:
    a, b = (
        write_night(tmp_path / "a", saved_mib={100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]}),
        write_night(
            tmp_path / "b", saved_mib={100: [3.0, 3.1, 2.9], 1000: [30.0, 30.5, 29.5]}, created_wall=1_700_090_000.0
        ),
    )
    code = cli.main(["compare", str(a), str(b), "--no-html", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    assert '"verdict": "unconfirmed"' in out and '"mode": "two studies"' in out
    assert "never makes the exit status 1" in out


def test_with_history_a_drop_outside_the_band_is_a_regression(tmp_path: Path, capsys) -> None:
    paths = _nights(
        tmp_path, [[40.0, 40.5, 39.5], [41.0, 40.6, 40.9], [39.8, 40.2, 40.0], [40.4, 40.1, 40.0]], [30.0, 30.5, 29.5]
    )
    code = cli.main(["compare", str(paths[-2]), str(paths[-1]), "--no-html", "--history", str(tmp_path), "--json"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert '"mode": "history"' in out and '"regressions": 1' in out
    # the same drop as a quiet night: exit 0
    quiet = _nights(
        tmp_path / "q",
        [[40.0, 40.5, 39.5], [41.0, 40.6, 40.9], [39.8, 40.2, 40.0], [40.4, 40.1, 40.0]],
        [40.2, 40.0, 39.9],
    )
    assert cli.main(["compare", str(quiet[-2]), str(quiet[-1]), "--no-html", "--history", str(tmp_path / "q")]) == 0


def test_too_few_nights_with_history_stay_unconfirmed(tmp_path: Path) -> None:
    paths = _nights(tmp_path, [[40.0, 40.5, 39.5], [40.2, 40.4, 39.9]], [30.0, 30.5, 29.5])
    built = history.build_index(tmp_path)
    context = NightContext(history=history.filtered(built.index))
    result = compare.compare_studies(*compare.load_pair(paths[-2], paths[-1]), Thresholds(), context)
    drop = _change(result, "ksm.pages_to_scan=1000", "saved_mib")
    assert drop.verdict == compare.UNCONFIRMED and "3 needed" in drop.note
    assert not result.regressions and result.family_size == 0


def test_night_sd_widens_the_interval(tmp_path: Path, capsys) -> None:
    a = write_night(tmp_path / "a", saved_mib={100: [3.0, 3.1, 2.9], 1000: [40.0, 40.5, 39.5]})
    b = write_night(
        tmp_path / "b", saved_mib={100: [3.0, 3.1, 2.9], 1000: [35.0, 35.5, 34.5]}, created_wall=1_700_090_000.0
    )
    assert cli.main(["compare", str(a), str(b), "--no-html", "--night-sd", "saved_mib=0.2"]) == 1
    capsys.readouterr()
    assert cli.main(["compare", str(a), str(b), "--no-html", "--night-sd", "saved_mib=4"]) == 0
    assert cli.main(["compare", str(a), str(b), "--no-html", "--night-sd", "nope=1"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


def test_history_flags_use_the_band_and_bh(tmp_path: Path) -> None:
    _nights(
        tmp_path, [[40.0, 40.5, 39.5], [41.0, 40.6, 40.9], [39.8, 40.2, 40.0], [40.4, 40.1, 40.0]], [30.0, 30.5, 29.5]
    )
    rows = history.filtered(history.build_index(tmp_path).index)
    found = history.flags(rows)
    assert [(f.setting, f.metric, f.verdict) for f in found if f.metric == "saved_mib"] == [
        ("ksm.pages_to_scan=1000", "saved_mib", compare.REGRESSION)
    ]
    assert found[0].band_nights == 4 and math.isfinite(found[0].p)
    # compare judges that night as the page does: the same walk, the same band
    paths = sorted(p.parent for p in tmp_path.glob("n*/nightly/study.json"))
    result = compare.compare_studies(*compare.load_pair(paths[-2], paths[-1]), Thresholds(), NightContext(history=rows))
    drop = _change(result, "ksm.pages_to_scan=1000", "saved_mib")
    flag = next(f for f in found if f.metric == "saved_mib")
    assert drop.p == pytest.approx(flag.p) and drop.band_low == pytest.approx(flag.band_low)
    assert history.count_comparisons(rows) >= 1


def test_an_old_index_schema_is_rebuilt_with_a_warning(tmp_path: Path, caplog) -> None:
    _nights(tmp_path, [[40.0, 40.5, 39.5]], [40.0, 40.1, 39.9])
    built = history.build_index(tmp_path)
    old = built.index.assign(index_version=1)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), built.path)
    with caplog.at_level("WARNING"):
        again = history.build_index(tmp_path)
    assert "schema 1" in caplog.text and again.reread == 2


def test_nan_in_a_stored_mean_is_skipped() -> None:
    series = [(10.0, 0.5, 3), (math.nan, math.nan, 0), (10.2, 0.5, 3), (9.9, 0.5, 3), (10.1, 0.5, 3)]
    judged, band = nights.walk(series, True, 10, False, 1.0, 0.01, RULES)
    assert judged[1].why_no_band and isinstance(band, nights.Band) and band.nights == 4


def test_the_confirmation_deadline_fires(tmp_path: Path) -> None:
    fired = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: fired.set())
    try:
        timer = confirm._deadline(0.2)
        assert fired.wait(10), "the deadline never sent SIGTERM"
        timer.cancel()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_confirmation_plan_keeps_only_the_suspects() -> None:
    text = (
        '[study]\nname = "c"\nrepetitions = 3\n[workload]\ntype = "processes"\n'
        '[sweep.ksm]\npages_to_scan = [100, 1000, 5000]\n[sweep.workload]\nfill = ["same", "random"]\n'
    )
    plan, out = confirm.confirmation_plan(text, [{"ksm.pages_to_scan": 1000, "workload.fill": "same"}], 2)
    from orchestrator.plan import expand

    trials = expand(plan)
    on = {(t.settings["ksm.pages_to_scan"], t.settings["workload.fill"]) for t in trials if not t.ksm_off}
    assert on == {(1000, "same")}
    assert plan.study.repetitions == 2 and plan.study.order == "blocked"
    assert sum(t.ksm_off for t in trials) == 2 * 1  # KSM off for fill=same, per block
    with pytest.raises(confirm.ConfirmError, match="not in the plan"):
        confirm.confirmation_plan(text, [{"ksm.pages_to_scan": 7}], 2)


def test_an_unwritable_json_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    a = write_night(tmp_path / "a", saved_mib={100: [3.0, 3.1], 1000: [40.0, 40.5]})
    blocker = tmp_path / "file"
    blocker.write_text("")
    code = cli.main(["compare", str(a), str(a), "--no-html", "--json-file", str(blocker / "x.json")])
    assert code == 2 and "cannot write" in capsys.readouterr().err


def test_the_page_opens_with_the_latest_nights_headline_against_its_band(tmp_path: Path) -> None:
    _nights(
        tmp_path, [[40.0, 40.5, 39.5], [41.0, 40.6, 40.9], [39.8, 40.2, 40.0], [40.4, 40.1, 40.0]], [30.0, 30.5, 29.5]
    )
    rows = history.filtered(history.build_index(tmp_path).index)
    latest = {(r.setting, r.metric): r for r in history.latest_nights(rows)}
    drop = latest[("ksm.pages_to_scan=1000", "saved_mib")]
    assert drop.verdict == history.OUTSIDE_WORSE and drop.band_nights == 4 and drop.band_low < 40 < drop.band_high
    assert latest[("ksm.pages_to_scan=1000", "ksmd_cpu_pct")].verdict.startswith("no band")  # equal trials
    assert cli.main(["history", str(tmp_path), "--out", str(tmp_path / "h.html")]) == 0
    html = (tmp_path / "h.html").read_text()
    assert "The latest night, headline metrics" in html and "outside the band, the bad way" in html
