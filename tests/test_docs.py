"""The docs build into a site with no broken link, and README's links point at files that exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path: Path) -> None:
    # --strict turns every warning (a link to a page or anchor that is not there) into a failure.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "glossary" / "index.html").exists()


def test_readme_links_point_at_files() -> None:
    text = (REPO / "README.md").read_text()
    targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert targets, "README links to no docs page"
    missing = [t for t in targets if not (REPO / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_every_docs_page_is_in_the_site_nav() -> None:
    nav = (REPO / "mkdocs.yml").read_text()
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    assert {p for p in pages if p not in nav} == set()


def test_results_doc_holds_the_trial_record_schema_generated_from_the_model() -> None:
    """docs/results.md's trial.json tables are the model's fields and docstrings, one copy:
    a field added to TrialRecord (or a part) without regenerating the page fails here."""
    from orchestrator.runners.record import TrialRecord, doc_with_schema

    text = (REPO / "docs" / "results.md").read_text()
    assert doc_with_schema(text) == text, (
        "docs/results.md's trial.json schema differs from the model: run "
        "`python -m orchestrator.runners.record docs/results.md`"
    )
    for name in TrialRecord.model_fields:
        assert f"| `{name}` |" in text
