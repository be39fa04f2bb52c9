"""Relative paths in a plan name files beside the plan, wherever the sweep is started from.

load_plan() hands the loaded plan and its folder to `relative_to_plan`, which makes every path
of [guests] (template, workdir, image_cache_dir) and of [guests.image] and each guests.groups
image (recipe, manifest, disk, kernel, initrd, ssh_key, known_host_key_file) absolute: in the
tables, in [sweep.guests] axes and in [[sweep.include]]/[[sweep.exclude]] entries alike, so
excludes still match. A bare recipe name ("debian-sysbench") means a shipped recipe and is left as it is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from orchestrator.errors import PlanError
from orchestrator.resources import is_recipe_name

GUEST_PATH_KEYS = ("template", "workdir", "image_cache_dir")
IMAGE_PATH_KEYS = ("manifest", "disk", "kernel", "initrd", "ssh_key", "known_host_key_file")

PlanT = TypeVar("PlanT", bound=BaseModel)


def absolute(value: Any, base_dir: Path) -> Any:
    """`value` made absolute against base_dir (`~` expanded); anything but a path unchanged."""
    if not isinstance(value, str) or not value:
        return value
    path = Path(value).expanduser()
    return path.as_posix() if path.is_absolute() else os.path.normpath(base_dir / path)


def _image_value(key: str, value: Any, base_dir: Path) -> Any:
    if key == "recipe" and isinstance(value, str) and is_recipe_name(value):
        return value
    return absolute(value, base_dir) if key in IMAGE_PATH_KEYS + ("recipe",) else value


def _fix_image(image: Any, each: Callable[[Callable[[Any], Any], Any], Any], base_dir: Path) -> Any:
    if not isinstance(image, dict):
        return image
    return {k: each(lambda v, k=k: _image_value(k, v, base_dir), v) for k, v in image.items()}


def _fix_guests(guests: Any, base_dir: Path, axes: bool) -> Any:
    """A [guests]-shaped table with its paths absolute. With axes=True every leaf is a list of
    values ([sweep.guests]); an `image` axis may also be a list of whole image tables."""
    if not isinstance(guests, dict):
        return guests

    def each(fix: Callable[[Any], Any], value: Any) -> Any:
        return [fix(v) for v in value] if axes and isinstance(value, list) else fix(value)

    fixed = dict(guests)
    for key in GUEST_PATH_KEYS:
        if key in fixed:
            fixed[key] = each(lambda v: absolute(v, base_dir), fixed[key])
    image = fixed.get("image")
    if axes and isinstance(image, list):
        fixed["image"] = [_fix_image(table, lambda f, v: f(v), base_dir) for table in image]
    elif image is not None:
        fixed["image"] = _fix_image(image, each, base_dir)
    groups = fixed.get("groups")
    if isinstance(groups, list):
        # [guests] groups is a list of groups; a [sweep.guests] groups axis, a list of such lists
        fixed["groups"] = [_fix_groups(value, base_dir) for value in groups] if axes else _fix_groups(groups, base_dir)
    return fixed


def _fix_groups(groups: Any, base_dir: Path) -> Any:
    """guests.groups with each group's image paths absolute (a bare string is a recipe)."""
    if not isinstance(groups, list):
        return groups

    def fix(group: Any) -> Any:
        if not isinstance(group, dict) or group.get("image") is None:
            return group
        image = group["image"]
        if isinstance(image, str):
            return dict(group, image=_image_value("recipe", image, base_dir))
        return dict(group, image=_fix_image(image, lambda f, v: f(v), base_dir))

    return [fix(group) for group in groups]


def relative_to_plan(plan: PlanT, base_dir: Path) -> PlanT:
    """The plan with its relative paths taken from base_dir (the plan file's folder)."""
    base_dir = Path(base_dir).resolve()
    data = plan.model_dump()
    if data.get("guests") is not None:
        data["guests"] = _fix_guests(data["guests"], base_dir, axes=False)
    sweep = data.get("sweep") or {}
    if "guests" in sweep:
        sweep["guests"] = _fix_guests(sweep["guests"], base_dir, axes=True)
    for kind in ("include", "exclude"):
        sweep[kind] = [
            dict(entry, guests=_fix_guests(entry["guests"], base_dir, axes=False))
            if isinstance(entry, dict) and "guests" in entry
            else entry
            for entry in sweep.get(kind, [])
        ]
    if data == plan.model_dump():
        return plan
    try:
        return type(plan).model_validate(data)
    except ValidationError as exc:  # only paths changed, so this would be a bug here
        raise PlanError(f"plan paths made absolute against {base_dir} no longer validate: {exc}") from None
