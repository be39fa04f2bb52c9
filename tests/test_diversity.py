"""Guests of several images ([guests] groups): the plan's validation, each guest booting its own
image (libvirt's test:///default driver, real qcow2 overlays), the saved-state keys following
each group's image, and the within/across split's known answer on crafted trials."""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import libvirt
import numpy as np
import pandas as pd
import pytest

from orchestrator.analysis import costs as diversity
from orchestrator.errors import PlanError
from orchestrator.guests import images, states
from orchestrator.guests.provision import GuestRequest, GuestSet, GuestSetOptions
from orchestrator.plan import expand, parse_plan
from orchestrator.report import study as report
from orchestrator.runners import vm
from orchestrator.units import MIB
from tests.builders import PAGE, computed, finish_study, ramp_ksm_frame, start_study, write_trial

REPO = Path(__file__).resolve().parent.parent


HEAD = '[study]\nname = "x"\n[workload]\ntype = "idle"\n'


# ----------------------------------------------------------------------------- the plan


def test_groups_give_each_guest_its_image_and_fill_count() -> None:
    plan = parse_plan(
        HEAD + '[guests]\nimage = {recipe = "debian-sysbench"}\n'
        'groups = [{count = 1}, {count = 2, image = "debian-web"}]\n'
    )
    assert plan.guests.count == 3
    assert plan.guests.guest_images() == [
        {"recipe": "debian-sysbench"},
        {"recipe": "debian-web"},
        {"recipe": "debian-web"},
    ]
    trial = expand(plan)[0]
    assert trial.guests["groups"] == [{"count": 1}, {"count": 2, "image": {"recipe": "debian-web"}}]


def test_a_plan_without_groups_keeps_its_guests_table_and_trial_ids() -> None:
    """No groups key in the trial's [guests]: ids and cache keys hash what they always did (the
    ids below are the shipped plans' first trials as expanded before groups existed)."""
    from orchestrator.plan import load_plan

    before = {"vm-idle.toml": "pts300-use-zero-pages0_r0_73a83b74", "demo.toml": "ksmoff_r0_8bc3d783"}
    for name, trial_id in before.items():
        trials = expand(load_plan(REPO / "plans" / name)[0])
        assert trial_id in {t.trial_id for t in trials}
        assert all("groups" not in t.guests for t in trials)
    plain = expand(parse_plan(HEAD + "[guests]\ncount = 2\n"))[0]
    with_groups = expand(parse_plan(HEAD + "[guests]\ncount = 2\ngroups = [{count = 2}]\n"))[0]
    assert with_groups.trial_id != plain.trial_id  # groups given: another trial


@pytest.mark.parametrize(
    ("guests", "message"),
    [
        (
            'count = 3\ngroups = [{count = 2, image = "debian-sysbench"}, {count = 2, image = "debian-web"}]',
            "guests: groups add up to 4 guests but count = 3",
        ),
        ('groups = [{count = 0, image = "debian-web"}]', "guests.groups.0.count: Input should be greater"),
        ("groups = [{count = 2, image = 5}]", "guests.groups.0.image: image must name a recipe"),
        ('groups = [{count = 2, image = ""}]', "guests.groups.0.image: image must name a recipe"),
        ('groups = [{count = 2, imag = "debian-web"}]', "guests.groups.0.imag: unknown key"),
        ("groups = []", "guests.groups: List should have at least 1 item"),
    ],
)
def test_bad_groups_are_one_line_naming_the_key(guests: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(HEAD + "[guests]\n" + guests + "\n")
    problems = str(info.value).split("\n")[1:]
    assert len(problems) == 1 and message in problems[0]


def test_a_swept_groups_axis_must_add_up_to_count_and_names_the_point() -> None:
    text = HEAD + (
        '[guests]\ncount = 4\n[sweep.guests]\ngroups = [[{count = 4, image = "debian-web"}], '
        '[{count = 2, image = "debian-web"}]]\n'
    )
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert "[sweep] point" in str(info.value) and "groups add up to 2 guests but count = 4" in str(info.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[density]\nbudget_mib = 2048\n", "[density] restores guests of one image"),
    ],
)
def test_groups_with_density_are_refused_in_one_line(extra: str, message: str) -> None:
    with pytest.raises(PlanError) as info:
        parse_plan(HEAD + '[guests]\ngroups = [{count = 1}, {count = 1, image = "debian-web"}]\n' + extra)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_groups_with_prepared_sysbench_layers_are_refused_in_one_line() -> None:
    text = (
        '[study]\nname = "x"\n[workload]\ntype = "sysbench"\n'
        '[guests]\ngroups = [{count = 1}, {count = 1, image = "debian-web"}]\n'
    )
    with pytest.raises(PlanError) as info:
        parse_plan(text)
    assert "reuse_prepared" in str(info.value) and "\n" not in str(info.value)
    parse_plan(text.replace('type = "sysbench"', 'type = "sysbench"\nreuse_prepared = false'))


def test_the_shipped_diversity_plan_has_three_designs_of_four_guests() -> None:
    from orchestrator.plan import load_plan

    plan, _ = load_plan(REPO / "plans" / "diversity.toml")
    trials = expand(plan)
    designs = {t.label.removeprefix("KSM off (groups=").removeprefix("groups=").rstrip(")") for t in trials}
    assert designs == {"4xdebian-sysbench", "4xdebian-web", "2xdebian-sysbench+2xdebian-web"}
    assert all(t.guests_model.count == 4 for t in trials)
    assert sum(t.ksm_off for t in trials) == 3 * plan.study.repetitions  # KSM off per design per block
    assert all(t.ksm.get("use_zero_pages") == 1 for t in trials if not t.ksm_off)


def test_the_second_recipe_differs_in_kernel_and_packages() -> None:
    one = images.load_recipe(images.RECIPES_DIR / "debian-sysbench.toml")
    two = images.load_recipe(images.RECIPES_DIR / "debian-web.toml")
    assert one.debootstrap.suite == two.debootstrap.suite == "bookworm"
    assert "linux-image-cloud-amd64" in one.debootstrap.packages and "linux-image-amd64" in two.debootstrap.packages
    assert "mariadb-server" not in two.debootstrap.packages and "nginx-light" in two.debootstrap.packages
    assert images.image_key(images.RECIPES_DIR / "debian-web.toml") != images.image_key(images.DEFAULT_RECIPE)


# ----------------------------------------------------------------------------- provisioning


@dataclass(frozen=True)
class FakeImage:
    """What provisioning and GuestSession read of an ImageRef (sessions are not opened here)."""

    disk_path: Path
    kernel_path: Path
    name: str
    disk_format: str = "qcow2"
    initrd_path: Path | None = None
    cmdline: str | None = "console=ttyS0"
    key: str | None = None
    manifest_path: Path | None = None


def _fake_image(folder: Path, name: str) -> FakeImage:
    folder.mkdir(parents=True, exist_ok=True)
    base = folder / "base.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "4M"], check=True)
    return FakeImage(disk_path=base, kernel_path=folder / "vmlinuz", name=name, key=f"{name}-0123456789ab")


def test_each_guest_boots_its_own_image_on_the_test_driver(tmp_path: Path) -> None:
    conn = libvirt.open("test:///default")  # held: the test driver keeps state while one is open
    try:
        one, two = _fake_image(tmp_path / "one", "one"), _fake_image(tmp_path / "two", "two")
        requests = [
            GuestRequest(memory_mib=256, image=one),
            GuestRequest(memory_mib=256, image=two),
            GuestRequest(memory_mib=256),
        ]
        options = GuestSetOptions(
            domain_type="test", arch="i686", work_root=tmp_path / "work", port_state_dir=tmp_path / "run"
        )
        with GuestSet("test:///default", "mix", requests, one, options) as guest_set:
            backing = {}
            for guest in guest_set.guests:
                info = json.loads(
                    subprocess.run(
                        ["qemu-img", "info", "--output=json", str(guest.overlay_path)], capture_output=True, check=True
                    ).stdout
                )
                backing[guest.name] = info["backing-filename"]
                assert (
                    str(guest_set.images_by_name()[guest.name].kernel_path) in conn.lookupByName(guest.name).XMLDesc()
                )
            assert backing == {
                "ksmlab-mix-0": str(one.disk_path),
                "ksmlab-mix-1": str(two.disk_path),
                "ksmlab-mix-2": str(one.disk_path),
            }  # no image of its own: the set's
    finally:
        conn.close()


def _runner_and_trial(
    text: str, monkeypatch: pytest.MonkeyPatch, cache: Path, fakes: dict[str, FakeImage]
) -> tuple[vm.VmRunner, object]:
    monkeypatch.setenv(images.CACHE_DIR_ENV, str(cache))
    monkeypatch.setattr(images, "resolve_image", lambda spec, **_: fakes[(spec or {}).get("recipe", "debian-sysbench")])
    plan = parse_plan(text)
    return vm.VmRunner(plan, None, threading.Event(), lambda _: None), expand(plan)[0]


def _keys(
    text: str, monkeypatch: pytest.MonkeyPatch, cache: Path, fakes: dict[str, FakeImage]
) -> tuple[str, str, Path]:
    runner, trial = _runner_and_trial(text, monkeypatch, cache, fakes)
    g = vm.guests_of(trial)
    image = runner._image(g)
    spec = runner._state_spec(trial, image, None)
    return states.state_key(spec), vm.guest_set_key(trial), runner._states_root(trial, image)


def test_saved_state_keys_follow_each_groups_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = {name: _fake_image(tmp_path / "images" / name, name) for name in ("debian-sysbench", "debian-web", "other")}
    cache = tmp_path / "cache"
    base = HEAD + '[guests]\ncount = 4\ndomain_type = "qemu"\n'

    def keys(groups: str | None) -> tuple[str, str, Path]:
        return _keys(base + (f"groups = {groups}\n" if groups else ""), monkeypatch, cache, fakes)

    plain = keys(None)
    all_one = keys('[{count = 4, image = "debian-sysbench"}]')
    mixed = keys('[{count = 2, image = "debian-sysbench"}, {count = 2, image = "debian-web"}]')
    mixed_other = keys('[{count = 2, image = "debian-sysbench"}, {count = 2, image = "other"}]')
    swapped = keys('[{count = 2, image = "debian-web"}, {count = 2, image = "debian-sysbench"}]')
    three_one = keys('[{count = 3, image = "debian-sysbench"}, {count = 1, image = "debian-web"}]')
    state_keys = [k[0] for k in (plain, all_one, mixed, mixed_other, swapped, three_one)]
    assert len(set(state_keys)) == len(state_keys)  # a group's image or count changes the key
    assert len({k[1] for k in (plain, all_one, mixed, mixed_other, swapped, three_one)}) == 6
    # one image: states beside it (as before groups); several: under the cache's states/mixed-*
    assert plain[2] == all_one[2] == states.states_root(None, cache, fakes["debian-sysbench"].disk_path)
    assert mixed[2].parent == cache / "states" and mixed[2].name.startswith("mixed-")
    assert mixed[2] == swapped[2] != mixed_other[2]
    mixed[2].mkdir(parents=True)
    assert mixed[2] in states.all_roots(cache)  # `image list`, `cleanup` and `image rm` see them


def test_a_plan_without_groups_keys_its_state_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fakes = {"debian-sysbench": _fake_image(tmp_path / "images" / "a", "debian-sysbench")}
    runner, trial = _runner_and_trial(
        HEAD + '[guests]\ncount = 2\ndomain_type = "qemu"\n', monkeypatch, tmp_path / "cache", fakes
    )
    spec = runner._state_spec(trial, runner._image(vm.guests_of(trial)), None)
    assert set(spec) == {"image", "hardware", "workload", "template_sha256"}
    assert "groups" not in spec["hardware"]


# ----------------------------------------------------------------------------- the split


SYS, WEB = {"recipe": "debian-sysbench"}, {"recipe": "debian-web"}


def _guests(groups: list[tuple[int, dict]]) -> dict:
    return {
        "count": sum(c for c, _ in groups),
        "memory_mib": 512,
        "groups": [{"count": c, "image": image} for c, image in groups],
    }


def _processes(ksm: pd.DataFrame, zero_pages: list[int], merging: list[int]) -> pd.DataFrame:
    rows = []
    measure = ksm["phase"] == "measure"
    for index, (zero, merged) in enumerate(zip(zero_pages, merging)):
        rows.append(
            pd.DataFrame(
                {
                    "t_wall": ksm["t_wall"],
                    "t_s": ksm["t_s"],
                    "phase": ksm["phase"],
                    "label": f"ksmlab-st0badc0de-{index}",
                    "pid": 100 + index,
                    "rss_kib": 8000.0,
                    "pss_kib": np.nan,
                    "uss_kib": np.nan,
                    "swap_kib": 0.0,
                    "ksm_merging_pages": np.where(measure, merged, 0),
                    "ksm_rmap_items": 0,
                    "ksm_zero_pages": np.where(measure, zero, 0),
                    "ksm_process_profit": 0,
                }
            )
        )
    return pd.concat(rows).sort_values(["t_s", "label"], kind="stable").reset_index(drop=True)


KNOBS = {"run": 1, "pages_to_scan": 2000, "sleep_millisecs": 20, "use_zero_pages": 1}


def _crafted_study(root: Path, across_pages: list[int]) -> Path:
    """Per block: 4 x sysbench shares 3000 pages, 4 x web 1500; the 2 + 2 mix shares
    3000/3 + 1500/3 = 1500 within the groups plus across_pages[block] across them, and 256 zero
    pages (64 per guest: 2 x 64 per image)."""
    study = start_study(root, plan='[study]\nname = "study"\n')
    designs = {"sys": [(4, SYS)], "web": [(4, WEB)], "mix": [(2, SYS), (2, WEB)]}
    for block, across in enumerate(across_pages):
        sharing = {"sys": 3000, "web": 1500, "mix": 1500 + across}
        for name, groups in designs.items():
            settings = {"guests.groups": [{"count": c, "image": i["recipe"]} for c, i in groups]}
            write_trial(
                study,
                f"off-{name}-r{block}",
                settings,
                repetition=block,
                ksm_off=True,
                ksm_knobs={"run": 0},
                ksm=ramp_ksm_frame(final_sharing=0),
                extra={"guests": _guests(groups)},
            )
            ksm = ramp_ksm_frame(final_sharing=sharing[name], zero_pages=256, plateau=True)
            # pages_shared = final // 10: every KSM page mapped by (sharing + shared) / shared pages
            shared = sharing[name] // 10
            write_trial(
                study,
                f"on-{name}-r{block}",
                settings,
                repetition=block,
                ksm_knobs=KNOBS,
                ksm=ksm,
                processes=_processes(ksm, [64] * 4, [(sharing[name] + shared) // 4] * 4),
                extra={"guests": _guests(groups)},
            )
    return finish_study(study)


def test_estimate_block_known_answer() -> None:
    mixed = {"layout": ["a", "a", "b", "b"], "content_mib": 10.0, "zero_mib": 2.0}
    est = diversity.estimate_block(
        mixed, {"a": {"guests": 4, "content_mib": 9.0}, "b": {"guests": 4, "content_mib": 6.0}}
    )
    assert est["within_mib"] == pytest.approx(9.0 / 3 + 6.0 / 3)
    assert est["across_mib"] == pytest.approx(10.0 - 5.0)
    assert est["across_pct"] == pytest.approx(50.0) and est["zero_pct"] == pytest.approx(100 * 2 / 12)
    missing = diversity.estimate_block(mixed, {"a": {"guests": 4, "content_mib": 9.0}})
    assert np.isnan(missing["within_mib"]) and np.isnan(missing["across_mib"])
    # a group of one guest shares nothing within itself
    single = diversity.estimate_block({"layout": ["a", "b"], "content_mib": 1.0, "zero_mib": 0.0}, {})
    assert single["within_mib"] == 0 and single["across_mib"] == 1.0


def test_split_of_crafted_trials_has_the_known_answer_and_interval(tmp_path: Path) -> None:
    study_dir = _crafted_study(tmp_path, across_pages=[300, 500])
    sm = computed(study_dir)
    from orchestrator.store import studydata

    rows = diversity.split(studydata.load_study(study_dir), sm.trials, sm.per_process, sm.page_size_bytes)
    assert list(rows["block"]) == [0, 1]
    page_mib = PAGE / MIB
    assert rows["within_mib"].tolist() == pytest.approx([1500 * page_mib] * 2)
    assert rows["across_mib"].tolist() == pytest.approx([300 * page_mib, 500 * page_mib])
    assert rows["zero_mib"].tolist() == pytest.approx([256 * page_mib] * 2)
    assert rows["across_pct"].tolist() == pytest.approx([100 * 300 / 1800, 100 * 500 / 2000])
    assert rows["zero_by_image_mib"].iloc[0] == "debian-sysbench 0.5; debian-web 0.5"  # 128 pages each
    summary = diversity.summarize(rows).iloc[0]
    assert summary["blocks"] == 2
    assert summary["across_mib"] == pytest.approx(400 * page_mib)
    # 95% t interval over 2 blocks: t(0.975, 1) = 12.706 x sd / sqrt(2), sd = 200 pages / sqrt(2)
    assert summary["across_mib_ci95"] == pytest.approx(12.7062 * (200 * page_mib / np.sqrt(2)) / np.sqrt(2), rel=1e-4)
    trials = sm.trials.set_index("trial_id")
    assert trials.loc["on-mix-r0", "across_group_pct"] == pytest.approx(100 * 300 / 1800)
    assert trials.loc["on-mix-r0", "across_group_pct_of_ram"] == pytest.approx(100 * 300 * page_mib / 2048)
    assert trials.loc["on-sys-r0", "one_image_content_pct_of_ram"] == pytest.approx(100 * 3000 * page_mib / 2048)
    assert trials.loc["on-sys-r0", "one_image_saved_pct_of_ram"] == pytest.approx(100 * 3256 * page_mib / 2048)
    # mappings per KSM page from ksm_stat: sum of merging pages / pages_shared = (3000 + 300) / 300
    # (the crafted ramp's pages_shared is a tenth of pages_sharing)
    assert trials.loc["on-sys-r0", "mappings_per_ksm_page"] == pytest.approx(3300 / 300)
    assert np.isnan(trials.loc["on-mix-r0", "mappings_per_ksm_page"])


def test_one_block_gives_no_interval_and_the_report_says_so(tmp_path: Path) -> None:
    study_dir = _crafted_study(tmp_path, across_pages=[300])
    html = report.write_report(study_dir).read_text()
    assert 'id="image-diversity"' in html
    finding = next(line for line in html.splitlines() if "across groups" in line)
    assert "one block: no interval" in finding and "±" not in finding.split("across groups")[1].split(";")[0]
    two = _crafted_study(tmp_path / "two", across_pages=[300, 500])
    html = report.write_report(two).read_text()
    finding = next(line for line in html.splitlines() if "across groups" in line)
    assert "2 blocks" in finding and "±" in finding.split("across groups")[1]
    assert "2xdebian-sysbench+2xdebian-web" in finding  # the setting's label, not its JSON
