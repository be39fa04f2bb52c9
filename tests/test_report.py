"""report.write_report on hand-made studies: files, plots, findings, failed trials, HTML."""

from __future__ import annotations

import base64
import json
import io
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from orchestrator.report import study as report
from orchestrator.errors import StoreError
from tests.builders import (
    block_study,
    disturbed_study,
    drift_study,
    family_study,
    finish_study,
    guests_summary,
    processes_frame,
    ramp_ksm_frame,
    start_study,
    sweep_study,
    sysbench_trial,
    write_trial,
)

DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _pngs_in(html: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) for b64 in DATA_URI.findall(html)]


def test_processes_study_writes_every_artifact(tmp_path: Path) -> None:
    html_path = report.write_report(sweep_study(tmp_path))
    out = html_path.parent
    assert html_path == tmp_path / "study" / "report" / "report.html"
    for name in (
        "summary.csv",
        "settings.csv",
        "per_process.csv",
        "samples.parquet",
        "saving_over_time.png",
        "vs_setting.png",
        "frontier.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert not (out / "workload.png").exists()  # no workload data, no empty plot
    assert not (out / "change_vs_off.png").exists()
    summary = pd.read_csv(out / "summary.csv").set_index("trial_id")
    assert summary.loc["p1000-r0", "saved_mib"] == pytest.approx(3.90625)
    assert summary.loc["p1000-r0", "pages_to_scan"] == 1000
    samples = pd.read_parquet(out / "samples.parquet")
    assert len(samples) == 4 * len(ramp_ksm_frame())
    assert set(samples["setting_pages_to_scan"]) == {100, 1000}


def test_html_is_self_contained_with_decodable_plots(tmp_path: Path) -> None:
    html = report.write_report(sweep_study(tmp_path)).read_text()
    images = _pngs_in(html)
    assert len(images) == 3
    assert all(img.format == "PNG" and img.width > 300 and img.height > 200 for img in images)
    assert not re.search(r'(src|href)="(https?:)?//', html)  # no external assets
    assert "6.18.0-test" in html and "thp.enabled" in html  # host facts
    assert 'id="trials-table"' in html and html.count('<tr class="ok">') == 4


def test_plan_text_is_escaped(tmp_path: Path) -> None:
    study = start_study(tmp_path, plan='# <script>alert("x")</script>\n[study]\nname = "s"\n')
    write_trial(study, "t0", {}, ksm=ramp_ksm_frame())
    html = report.write_report(finish_study(study)).read_text()
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert" in html


def test_findings_name_frontier_and_cheapest_near_max(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    for pages, final, cpu in ((50, 500, 0.01), (100, 950, 0.02), (1000, 1000, 0.10)):
        write_trial(study, f"p{pages}", {"pages_to_scan": pages}, ksm=ramp_ksm_frame(final, cpu_core_fraction=cpu))
    texts = [f.text for f in report.study_findings(_computed(finish_study(study)))]
    largest = next(t for t in texts if t.startswith("Largest saving"))
    assert largest.startswith("Largest saving: pages_to_scan=1000: 3.91 MiB")
    pareto = next(t for t in texts if t.startswith("Pareto-optimal"))
    assert all(f"pages_to_scan={p} " in pareto for p in (50, 100, 1000))
    cheapest = next(t for t in texts if t.startswith("Cheapest"))
    assert "pages_to_scan=100 (3.71 MiB at 2.00% of one core, vs 10.00% for the largest)" in cheapest
    assert any("3 of 3 successful KSM-on trials had not converged" in t for t in texts)


def _computed(study_dir: Path):  # noqa: ANN202 - test helper
    from orchestrator.analysis import studymetrics
    from orchestrator.store import studydata

    return studymetrics.compute_study(studydata.load_study(study_dir))


def test_failed_trial_is_shown_with_reason(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    write_trial(study, "good", {"pages_to_scan": 100}, ksm=ksm, processes=processes_frame(ksm))
    write_trial(study, "bad", {"pages_to_scan": 1000}, status="failed", reason="guest vm1 never answered SSH")
    html = report.write_report(finish_study(study)).read_text()
    failed_row = re.search(r'<tr class="failed">(.*?)</tr>', html, re.S)
    assert failed_row and "guest vm1 never answered SSH" in failed_row.group(1)
    assert "Trials without results: bad (failed: guest vm1 never answered SSH)" in html


def test_all_failed_study_says_data_is_insufficient(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    write_trial(study, "a", {"pages_to_scan": 100}, status="failed", reason="libvirtd not running")
    write_trial(study, "b", {"pages_to_scan": 1000}, status="failed", reason="libvirtd not running")
    html = report.write_report(finish_study(study)).read_text()
    assert "Insufficient data: no successful KSM-on trial" in html
    assert _pngs_in(html) == []
    assert html.count('<tr class="failed">') == 2


def test_single_setting_study_says_no_swept_axis(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    for rep in (0, 1):
        write_trial(study, f"r{rep}", {"pages_to_scan": 100}, repetition=rep, ksm=ramp_ksm_frame())
    html_path = report.write_report(finish_study(study))
    assert "No swept axis" in html_path.read_text()
    assert not (html_path.parent / "vs_setting.png").exists()
    assert (html_path.parent / "frontier.png").exists()


def test_vm_study_with_ksm_off_baseline_reports_workload_change(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    for rep, (a, b) in enumerate(((100.0, 104.0), (98.0, 102.0))):
        write_trial(
            study,
            f"off-r{rep}",
            {"pages_to_scan": 100},
            ksm_off=True,
            repetition=rep,
            kind="sysbench",
            ksm=ksm,
            workload_summary=guests_summary(a, b),
        )
        for pages in (100, 1000):
            factor = 0.9 if pages == 1000 else 0.99
            write_trial(
                study,
                f"p{pages}-r{rep}",
                {"pages_to_scan": pages},
                repetition=rep,
                kind="sysbench",
                ksm=ksm,
                workload_summary=guests_summary(a * factor, b * factor, p95_ms=25.0),
            )
    html_path = report.write_report(finish_study(study))
    html = html_path.read_text()
    assert (html_path.parent / "workload.png").exists() and (html_path.parent / "change_vs_off.png").exists()
    assert len(_pngs_in(html)) == 5
    worst = re.search(r"Worst throughput change vs KSM off: pages_to_scan=1000: -10\.0% ± [\d.]+%; (.*?)\.</li>", html)
    assert worst and worst.group(1) == (
        "differs from KSM off (95% level kept by Holm across the 2 KSM-on settings; n=2 blocks, paired)"
    )
    summary = pd.read_csv(html_path.parent / "summary.csv").set_index("trial_id")
    # per trial: vs the KSM-off trial of the same block (100 tps in r1); r1 ran at 0.9 x 100 = 90 tps
    assert summary.loc["p1000-r1", "tps_vs_off_pct"] == pytest.approx(-10.0)
    assert summary.loc["p1000-r1", "baseline"] == "same block"


def _findings(html: str) -> list[str]:
    return [re.sub(r"\s+", " ", li) for li in re.findall(r"<li[^>]*>(.*?)</li>", html, re.S)]


def _section(html: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">(.*?)</section>', html, re.S)
    assert match, section_id
    return match.group(1)


def test_one_repetition_report_claims_no_difference(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    sysbench_trial(study, "off", {"threads": 1}, 100.0, ksm_off=True, ksm=ksm)
    for pages, tps in ((100, 98.0), (1000, 67.0)):  # -33%: looks large, but it is one trial each
        sysbench_trial(
            study, f"p{pages}", {"threads": 1, "ksm.pages_to_scan": pages}, tps, ksm=ksm, processes=processes_frame(ksm)
        )
    html = report.write_report(finish_study(study)).read_text()
    assert "significant" not in html.lower()
    assert "distinguishable" not in html.lower()
    findings = _findings(html)
    assert any(f.startswith("One repetition: this study cannot tell workload differences from noise") for f in findings)
    worst = next(f for f in findings if f.startswith("Worst throughput change"))
    assert worst.endswith("-33.0%; one repetition: this study cannot tell workload differences from noise.")
    assert "No run-to-run noise estimate" in _section(html, "noise")
    assert "repetitions &gt;= 2 and ksm_off_baseline = true" in _section(html, "noise")


def test_guests_that_agree_do_not_make_a_difference(tmp_path: Path) -> None:
    html = report.write_report(block_study(tmp_path, on_tps=[6.0, 12.0], off_tps=[10.0, 9.0])).read_text()
    worst = next(f for f in _findings(html) if f.startswith("Worst throughput change"))
    assert worst.endswith("; no difference detectable at 95% (n=2 blocks, paired).")
    assert "differs from KSM off" not in html
    assert "significant" not in html.lower() and "distinguishable" not in html.lower()


def test_clear_effect_is_claimed_with_noise_floor_and_n(tmp_path: Path) -> None:
    off = [100.0, 104.8, 95.2]
    html = report.write_report(
        block_study(tmp_path, on_tps=[0.7 * t for t in off], off_tps=off, guest_spread=0.0)
    ).read_text()
    findings = _findings(html)
    worst = next(f for f in findings if f.startswith("Worst throughput change"))
    assert worst == (
        "Worst throughput change vs KSM off: all trials: -30.0% ± 0.0%; differs from KSM off "
        "(95% interval excludes 0; n=3 blocks, paired)."
    )
    noise = next(f for f in findings if f.startswith("Noise floor"))
    # every block's change is -30.0% exactly: the paired differences do not vary at all
    assert noise.startswith("Noise floor, paired by block (3 blocks, each KSM-on setting against the KSM off trial")
    assert "the per-block tps change vs KSM off varied by sd 0%" in noise
    assert "a 5% change needs 2 (2-2) blocks" in noise
    table = _section(html, "noise")
    cells = table.replace(' class="text"', "")
    assert 'id="noise-table"' in table and "<td>paired by block</td>" in cells and "<td>2 (2-2)</td>" in cells
    settings = _section(html, "settings")
    assert "(n=3)" in settings and "(n=3 blocks, paired)" in settings
    assert "<th>n</th>" in settings


def test_headline_says_net_of_drift_or_raw(tmp_path: Path) -> None:
    net = report.write_report(drift_study(tmp_path / "a")).read_text()
    largest = next(f for f in _findings(net) if f.startswith("Largest saving"))
    assert "PSS drop 100 ± 0 MiB, MemAvailable rise 100 ± 0 MiB" in largest
    assert "PSS drop and MemAvailable rise are net of drift" in largest
    # every target's PSS read on the same ticks here: the figures are as old as the tick
    assert "the PSS figures summed were up to 0 s old" in largest
    assert "<th>pss_age_max_s</th>" in _section(net, "trials")
    raw = report.write_report(sweep_study(tmp_path / "b")).read_text()
    largest = next(f for f in _findings(raw) if f.startswith("Largest saving"))
    assert "PSS drop and MemAvailable rise are the raw change" in largest


def test_disturbed_trials_are_listed_in_a_warning(tmp_path: Path) -> None:
    html = report.write_report(disturbed_study(tmp_path)).read_text()
    warning = re.search(r'<li class="warn">(2 disturbed trial\(s\).*?)</li>', html, re.S)
    assert warning
    assert "a (outside CPU 40.00%; rerun a-rerun used); b (outside CPU 35.00%; used, no ok rerun)" in warning.group(1)
    assert "disturbed; rerun a-rerun used" in _section(html, "trials")


def test_study_without_trials_still_reports(tmp_path: Path) -> None:
    html = report.write_report(finish_study(start_study(tmp_path))).read_text()
    assert "Insufficient data: the study has no trials." in html


def test_missing_study_folder_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        report.write_report(tmp_path / "nope")


# ----------------------------------------------------------------------------- browser

CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  for (const img of document.querySelectorAll('img')) {
    img.setAttribute('data-natural-width', String(img.naturalWidth));
  }
  document.body.setAttribute('data-loaded', 'yes');
});
</script>
"""


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    pytest.skip("chromium not installed (apt-get install --no-install-recommends chromium chromium-driver)")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    study = start_study(tmp_path)
    ksm = ramp_ksm_frame()
    write_trial(
        study,
        "off",
        {"pages_to_scan": 100},
        ksm_off=True,
        kind="sysbench",
        ksm=ksm,
        workload_summary=guests_summary(100.0, 104.0),
    )
    for pages in (100, 1000):
        write_trial(
            study,
            f"p{pages}",
            {"pages_to_scan": pages},
            kind="sysbench",
            ksm=ksm,
            processes=processes_frame(ksm),
            workload_summary=guests_summary(95.0, 99.0),
        )
    write_trial(study, "p5000", {"pages_to_scan": 5000}, status="failed", reason="sysbench prepare failed")
    html_path = report.write_report(finish_study(study))
    # a copy with a probe script: the report itself carries no script
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    profile = tmp_path / "chromium-profile"
    result = subprocess.run(
        [
            _chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = result.stdout
    assert 'data-loaded="yes"' in dom, result.stderr[-2000:]
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == 5 and all(w > 300 for w in widths)  # every plot decoded (workload change vs KSM off too)
    assert re.search(r'<table id="trials-table">', dom)
    assert re.search(r'<tr class="failed">.*?sysbench prepare failed', dom, re.S)
    assert dom.count('<tr class="ok">') == 3


def test_sequential_study_says_welch_and_never_paired(tmp_path: Path) -> None:
    off = [100.0, 104.8, 95.2]
    study = block_study(tmp_path, on_tps=[0.7 * t for t in off], off_tps=off, guest_spread=0.0)
    meta = json.loads((study / "study.json").read_text())
    (study / "study.json").write_text(json.dumps({**meta, "order": "sequential"}))
    html = report.write_report(study).read_text()
    findings = _findings(html)
    assert any(
        f.startswith(
            "Changes vs KSM off are compared by Welch across trials, not paired: the plan ran in sequential order"
        )
        for f in findings
    )
    assert "paired" not in _section(html, "settings")
    worst = next(f for f in findings if f.startswith("Worst throughput change"))
    assert "trials, Welch" in worst and "paired" not in worst


def test_blocked_study_says_why_it_pairs(tmp_path: Path) -> None:
    off = [100.0, 104.8, 95.2]
    html = report.write_report(
        block_study(tmp_path, on_tps=[0.7 * t for t in off], off_tps=off, guest_spread=0.0)
    ).read_text()
    assert any(
        f.startswith("Changes vs KSM off are paired by block: the plan ran in blocked order") for f in _findings(html)
    )


def test_worst_of_k_that_only_its_own_interval_calls_different_is_not_claimed(tmp_path: Path) -> None:
    """The worst of 3 settings is -7% ± 5.5% on its own (p ~ 0.03): after Holm across the 3 it is
    not a difference; the table marks only a change that survives (none here)."""
    study = family_study(tmp_path, {100: [-9.2, -4.8, -7.0], 200: [1.0, -1.0, 0.5], 300: [0.5, 0.0, -0.5]})
    html = report.write_report(study).read_text()
    worst = next(f for f in _findings(html) if f.startswith("Worst throughput change"))
    assert "pages_to_scan=100: -7.0%" in worst
    assert "no difference shown once the 3 settings are taken together" in worst
    assert "Holm across the 3 KSM-on settings" in worst
    assert "differs from KSM off" not in html
    assert " *</td>" not in _section(html, "settings")


def test_settings_table_marks_changes_that_survive_holm(tmp_path: Path) -> None:
    study = family_study(tmp_path, {100: [-30.0, -31.0, -29.0], 200: [1.0, -1.0, 0.5], 300: [0.5, 0.0, -0.5]})
    html = report.write_report(study).read_text()
    settings = _section(html, "settings")
    assert settings.count("paired) *</td>") == 1
    worst = next(f for f in _findings(html) if f.startswith("Worst throughput change"))
    assert "differs from KSM off (95% level kept by Holm across the 3 KSM-on settings" in worst


def test_the_findings_open_with_one_answer_per_setting(tmp_path: Path) -> None:
    """Saved MiB, ksmd CPU, and the workload change vs KSM off with its interval and the family's
    verdict: the -30% setting differs after Holm; the flat ones say no difference detectable."""
    study = family_study(tmp_path, {100: [-30.0, -31.0, -29.0], 200: [1.0, -1.0, 0.5], 300: [0.5, 0.0, -0.5]})
    findings = _findings(report.write_report(study).read_text())
    answers = [f for f in findings if f.startswith("ksm.pages_to_scan=")]
    assert [a.split(":")[0] for a in answers] == [f"ksm.pages_to_scan={v}" for v in (100, 200, 300)]
    first, second = answers[0], answers[1]
    assert "saved " in first and " MiB" in first
    assert "ksmd 5.00 ± 0% of one core" in first
    assert (
        "tps -30.00 ± 2.48% vs KSM off" in first
        and "differs from KSM off (95% level kept by Holm across the 3" in first
    )
    assert "no difference detectable at 95% (Holm across the 3 KSM-on settings" in second
    # They come before the other findings about settings.
    assert findings.index(answers[0]) < next(i for i, f in enumerate(findings) if f.startswith("Largest saving"))


def test_the_change_vs_off_plot_shows_the_paired_evidence_or_says_welch(tmp_path: Path) -> None:
    from orchestrator.analysis import studymetrics
    from orchestrator.report import plots as reportplots
    from orchestrator.store import studydata

    study = family_study(tmp_path / "a", {100: [-30.0, -31.0, -29.0], 200: [1.0, -1.0, 0.5]})
    out = report.write_report(study).parent
    image = Image.open(out / "change_vs_off.png")
    assert image.format == "PNG" and image.width > 300
    sm = studymetrics.compute_study(studydata.load_study(study))
    plot = next(p for p in reportplots.build_plots(studydata.load_study(study), sm) if p.name == "change_vs_off")
    assert "paired" in plot.caption and "each block's difference" in plot.caption
    meta = json.loads((study / "study.json").read_text())
    (study / "study.json").write_text(json.dumps({**meta, "order": "sequential"}))
    sm = studymetrics.compute_study(studydata.load_study(study))
    plot = next(p for p in reportplots.build_plots(studydata.load_study(study), sm) if p.name == "change_vs_off")
    assert plot.caption.startswith("Per KSM-on setting: the change vs KSM off (Welch)")
