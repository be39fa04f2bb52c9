"""Relative paths in a plan are taken from the plan file's folder, not the current directory."""

from pathlib import Path

import pytest

from orchestrator.plan import expand, load_plan, parse_plan

PLANS = Path(__file__).resolve().parent.parent / "plans"

VM_PLAN = """
[study]
name = "paths"
[workload]
type = "idle"
[guests]
count = 1
template = "tpl/my.xml.j2"
workdir = "../work"
image_cache_dir = "/srv/cache"
[guests.image]
disk = "img/disk.qcow2"
ssh_key = "img/id"
kernel = "~/vmlinuz"
initrd = "img/initrd"
cmdline = "root=/dev/vda"
known_host_key = "ssh-ed25519 AAAA"
"""


def _write(tmp_path: Path, text: str) -> Path:
    plan = tmp_path / "plans" / "p.toml"
    plan.parent.mkdir()
    plan.write_text(text)
    return plan


def test_guest_paths_resolve_against_the_plan_folder(tmp_path, monkeypatch):
    plan_path = _write(tmp_path, VM_PLAN)
    monkeypatch.chdir("/")
    plan, text = load_plan(plan_path)
    folder = plan_path.parent.resolve()
    assert text == VM_PLAN  # the study stores the plan as written
    assert plan.guests.template == str(folder / "tpl/my.xml.j2")
    assert plan.guests.workdir == str(tmp_path.resolve() / "work")
    assert plan.guests.image_cache_dir == "/srv/cache"
    image = plan.guests.image
    assert image["disk"] == str(folder / "img/disk.qcow2")
    assert image["ssh_key"] == str(folder / "img/id")
    assert image["kernel"] == str(Path("~/vmlinuz").expanduser())
    assert image["cmdline"] == "root=/dev/vda" and image["known_host_key"] == "ssh-ed25519 AAAA"
    assert expand(plan)[0].guests["template"] == str(folder / "tpl/my.xml.j2")


def test_a_bare_recipe_name_stays_a_shipped_recipe_and_a_recipe_path_resolves(tmp_path):
    text = (
        '[study]\nname = "r"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\n'
        '[guests.image]\nrecipe = "debian-sysbench"\n'
        '[sweep.guests.image]\nrecipe = ["debian-sysbench", "mine.toml", "sub/other"]\n'
    )
    plan, _ = load_plan(_write(tmp_path, text))
    folder = (tmp_path / "plans").resolve()
    assert plan.guests.image == {"recipe": "debian-sysbench"}
    recipes = sorted(t.guests["image"]["recipe"] for t in expand(plan))
    assert recipes == sorted(["debian-sysbench", str(folder / "mine.toml"), str(folder / "sub/other")])


def test_swept_templates_and_their_excludes_resolve_alike(tmp_path):
    text = (
        '[study]\nname = "s"\n[workload]\ntype = "idle"\n[guests]\ncount = 1\n'
        '[sweep.guests]\ntemplate = ["a.j2", "b.j2"]\ncount = [1, 2]\n'
        '[[sweep.exclude]]\nguests = { template = "a.j2", count = 2 }\n'
        '[[sweep.include]]\nguests = { template = "c.j2", count = 3 }\n'
    )
    plan, _ = load_plan(_write(tmp_path, text))
    folder = (tmp_path / "plans").resolve()
    points = sorted((Path(t.guests["template"]).name, t.guests["count"]) for t in expand(plan))
    assert points == [("a.j2", 1), ("b.j2", 1), ("b.j2", 2), ("c.j2", 3)]
    assert {Path(t.guests["template"]).parent for t in expand(plan)} == {folder}


def test_a_plan_without_paths_is_returned_unchanged(tmp_path):
    text = (PLANS / "quickstart.toml").read_text()
    plan, _ = load_plan(_write(tmp_path, text))
    assert [t.trial_id for t in expand(plan)] == [t.trial_id for t in expand(parse_plan(text))]


@pytest.mark.parametrize("name", sorted(p.name for p in PLANS.glob("*.toml")))
def test_shipped_plans_keep_their_trial_ids_wherever_they_are_loaded_from(name):
    text = (PLANS / name).read_text()
    plan, _ = load_plan(PLANS / name)
    assert [t.trial_id for t in expand(plan)] == [t.trial_id for t in expand(parse_plan(text))]
