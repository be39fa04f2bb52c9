"""history: discovery, the incremental Parquet index, trends, version changes, regressions."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from orchestrator.analysis import studymetrics
from orchestrator.analysis.across import history
from orchestrator.cli import main as cli
from orchestrator.store import catalog, studydata
from orchestrator.analysis.across.compare import REGRESSION
from tests.nightly_studies import write_night

DAY_S = 86_400.0
DATA_URI = re.compile(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


def _nights(root: Path) -> list[Path]:
    """Four nights on lab1 (kernel changes on night 3, saving at 1000 drops 25% on night 4) and
    one night on lab2."""
    studies = []
    for night, (kernel, saving) in enumerate((("6.1", 40.0), ("6.1", 40.2), ("6.6", 39.9), ("6.6", 30.0))):
        studies.append(
            write_night(
                root / "lab1" / f"2025010{night + 1}",
                kernel=kernel,
                created_wall=1_735_700_000 + night * DAY_S,
                saved_mib={100: [3.0, 3.1, 2.9], 1000: [saving, saving + 0.5, saving - 0.5]},
            )
        )
    studies.append(write_night(root / "lab2" / "20250101", hostname="lab2", created_wall=1_735_700_000))
    return studies


def test_discovery_any_depth_skips_hidden_folders_and_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "results"
    deep = write_night(root / "a" / "b" / "c")
    write_night(root / ".collect" / "partial")  # half-copied: invisible
    outside = write_night(tmp_path / "elsewhere")
    (root / "link").symlink_to(outside.parent, target_is_directory=True)
    assert list(catalog.find_study_dirs(root)) == [deep]


def test_index_matches_the_metrics_settings_table(tmp_path: Path) -> None:
    root = tmp_path / "results"
    study = write_night(root, saved_mib={100: [3.0, 3.2, 2.8], 1000: [40.0, 41.0, 39.0]})
    index = history.build_index(root).index.set_index("setting")
    settings = studymetrics.compute_study(studydata.load_study(study)).settings.set_index("setting")
    for setting in ("ksm.pages_to_scan=100", "ksm.pages_to_scan=1000"):
        for column in ("saved_mib", "saved_mib_ci95", "ksmd_cpu_pct", "time_to_90pct_s"):
            assert index.loc[setting, column] == pytest.approx(settings.loc[setting, column]), column
        assert index.loc[setting, "n"] == 3 and index.loc[setting, "saved_mib_n"] == 3
    assert index.loc["KSM off", "ksm_off"]
    assert set(index["host"]) == {"lab1"} and set(index["kernel"]) == {"6.1.0-test"}
    assert set(index["state"]) == {catalog.GOOD}


def test_index_is_rebuilt_incrementally(tmp_path: Path) -> None:
    root = tmp_path / "results"
    studies = _nights(root)
    first = history.build_index(root)
    assert (first.studies, first.reread) == (5, 5) and first.path == root / history.INDEX_NAME
    again = history.build_index(root)
    assert again.reread == 0
    pd.testing.assert_frame_equal(again.index, first.index)
    trials_csv = studies[1] / "trials.csv"
    stat = trials_csv.stat()
    os.utime(trials_csv, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a rewritten trials.csv
    write_night(root / "lab1" / "20250105", created_wall=1_735_700_000 + 4 * DAY_S)
    import shutil

    shutil.rmtree(studies[4].parent)
    third = history.build_index(root)
    assert (third.studies, third.reread) == (5, 2)
    assert "lab2" not in set(third.index["host"])


def test_index_of_another_version_is_rebuilt(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "results"
    write_night(root)
    history.build_index(root)
    monkeypatch.setattr(history, "INDEX_VERSION", history.INDEX_VERSION + 1)
    assert history.build_index(root).reread == 1


def test_unfinished_study_is_indexed_but_has_no_numbers(tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_night(root / "n1", missing=("p1000-r1",))
    rows = history.build_index(root).index
    assert len(rows) == 1 and rows.iloc[0]["state"] == catalog.UNFINISHED and rows.iloc[0]["setting"] is None
    assert history.filtered(rows).empty


def test_version_changes_and_regressions_against_the_previous_run(tmp_path: Path) -> None:
    root = tmp_path / "results"
    studies = _nights(root)
    rows = history.filtered(history.build_index(root).index, host="lab1")
    changes = history.version_changes(rows)
    assert [(c.study, c.what) for c in changes] == [(os.path.relpath(studies[2], root), "kernel 6.1 -> 6.6")]
    flags = history.flags(rows)
    regressions = {(f.study, f.setting, f.metric) for f in flags if f.verdict == REGRESSION}
    night4 = os.path.relpath(studies[3], root)
    assert (night4, "ksm.pages_to_scan=1000", "saved_mib") in regressions
    assert all(f.study == night4 for f in flags)  # nights 2 and 3 moved by < 1%
    assert all(f.previous == os.path.relpath(studies[2], root) for f in flags)
    # only night 4 has the 3 earlier nights a band needs: 2 KSM-on settings x the 4 metrics whose
    # trials spread (ksmd CPU and pss are equal in every hand-made trial: no spread, not judged)
    assert history.count_comparisons(rows) == 8


def test_filters_by_plan_and_host(tmp_path: Path) -> None:
    root = tmp_path / "results"
    _nights(root)
    write_night(root / "other", name="other-plan")
    index = history.build_index(root).index
    assert set(history.filtered(index, plan="nightly")["host"]) == {"lab1", "lab2"}
    assert set(history.filtered(index, host="lab2")["study"]) == {os.path.join("lab2", "20250101", "nightly")}
    assert set(history.filtered(index, plan="other-plan")["plan"]) == {"other-plan"}


def test_history_command_writes_a_self_contained_page(tmp_path: Path, capsys) -> None:
    root = tmp_path / "results"
    _nights(root)
    assert cli.main(["history", str(root)]) == 0
    assert "5 studies (5 read" in " ".join(capsys.readouterr().out.split())
    html = (root / "history.html").read_text()
    images = [Image.open(io.BytesIO(base64.b64decode(m, validate=True))) for m in DATA_URI.findall(html)]
    assert len(images) == 2  # one figure per plan x host
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "kernel 6.1 -&gt; 6.6" in html and 'class="regression"' in html
    assert "8 changes were judged against their band" in html and "chance alone" in html
    assert "significant" not in html.lower()
    assert cli.main(["history", str(root), "--host", "lab2", "--json", "--out", str(tmp_path / "h.html")]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reread"] == 0 and data["flags"] == []
    assert len(DATA_URI.findall((tmp_path / "h.html").read_text())) == 1
