"""The one Jinja environment every HTML page renders through (templates/ ships in the package)."""

from __future__ import annotations

import functools

import jinja2


@functools.cache
def _environment() -> jinja2.Environment:
    # StrictUndefined: a name the page uses but the caller did not pass is a bug to see at once,
    # never an empty cell in a report someone trusts.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("orchestrator.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


def page_template(name: str) -> jinja2.Template:
    """A page template by file name ("report.html.j2")."""
    return _environment().get_template(name)
