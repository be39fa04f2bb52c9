"""Image recipes, the cache keyed by recipe hash, brought images, and one real boot (vm)."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from orchestrator.guests import images
from orchestrator.errors import PlanError, ProvisionError
from orchestrator.guests.guest import GuestSession
from orchestrator.guests.images import (
    DEFAULT_RECIPE,
    build_image,
    image_from_table,
    image_key,
    list_images,
    load_recipe,
    recipe_hash,
    remove_image,
    resolve_image,
)

HOST_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ/S1wcbqLXbQbh1YJBMOutBjeSzlwrP8DcbnzeE1hfr"


def _copy_recipe(tmp_path: Path) -> Path:
    """The shipped recipe and its guest files, in a folder the test may edit."""
    folder = tmp_path / "recipes"
    shutil.copytree(DEFAULT_RECIPE.parent, folder)
    return folder / DEFAULT_RECIPE.name


def _fake_cache_entry(cache_dir: Path, key: str, name: str = "debian-sysbench") -> Path:
    """An entry laid out like a build's, with tiny files in place of the real ones."""
    entry = cache_dir / key
    entry.mkdir(parents=True)
    for file_name in ("base.qcow2", "vmlinuz", "initrd.img", "id_ed25519"):
        (entry / file_name).write_text("x")
    manifest = {
        "schema_version": 1,
        "name": name,
        "key": key,
        "recipe_hash": "0" * 64,
        "paths": {
            "disk": "base.qcow2",
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "ssh_key": "id_ed25519",
            "known_host_key": "host_key.pub",
        },
        "cmdline": "root=/dev/vda rw console=ttyS0",
        "ssh_user": "root",
        "known_host_key": HOST_KEY,
    }
    (entry / "image.json").write_text(json.dumps(manifest))
    return entry


# --- recipe ------------------------------------------------------------------------------


def test_shipped_recipe_has_what_sysbench_guests_need() -> None:
    recipe = load_recipe(DEFAULT_RECIPE)
    assert recipe.debootstrap.suite == "bookworm"
    assert {"mariadb-server", "sysbench", "openssh-server", "linux-image-cloud-amd64"} <= set(
        recipe.debootstrap.packages
    )
    assert recipe.boot.cmdline == "root=/dev/vda rw console=ttyS0"
    assert "CREATE DATABASE IF NOT EXISTS sbtest" in recipe.database.init_sql


def test_hash_ignores_comments_but_not_content(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path)
    original = recipe_hash(recipe)
    recipe.write_text("# a note for readers\n" + recipe.read_text().replace(" = ", "   =   "))
    assert recipe_hash(recipe) == original
    recipe.write_text(recipe.read_text().replace('"procps",', '"procps", "htop",'))
    with_htop = recipe_hash(recipe)
    assert with_htop != original
    (recipe.parent / "guest/ksm-lab-db-init.service").write_text("[Unit]\n")
    assert recipe_hash(recipe) != with_htop
    assert image_key(recipe) == f"debian-sysbench-{recipe_hash(recipe)[:12]}"


def test_unknown_recipe_key_is_named(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path)
    recipe.write_text(recipe.read_text().replace("[disk]\n", "[disk]\nsize_gib = 4\n"))
    with pytest.raises(PlanError, match="disk.size_gib"):
        load_recipe(recipe)


def test_recipe_naming_a_missing_guest_file_is_refused(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path)
    (recipe.parent / "guest/ksm-lab-db-init.service").unlink()
    with pytest.raises(PlanError, match="ksm-lab-db-init.service.*not found"):
        load_recipe(recipe)


def _with_files_entry(recipe: Path, guest_path: str, source: str) -> None:
    text = recipe.read_text()
    line = '"/etc/systemd/system/ksm-lab-db-init.service" = "guest/ksm-lab-db-init.service"'
    assert line in text
    recipe.write_text(text.replace(line, f"{line}\n{json.dumps(guest_path)} = {json.dumps(source)}"))


@pytest.mark.parametrize(
    "guest_path, problem",
    [
        ("/../../etc/cron.d/evil", "may not contain '..'"),
        ("/etc/../../../root/.bashrc", "may not contain '..'"),
        ("etc/relative", "must be absolute"),
        ("/", "names the image root itself"),
        ("//", "names the image root itself"),
    ],
)
def test_recipe_guest_paths_may_not_escape_the_image_root(tmp_path: Path, guest_path: str, problem: str) -> None:
    recipe = _copy_recipe(tmp_path)
    _with_files_entry(recipe, guest_path, "guest/ksm-lab-db-init.service")
    with pytest.raises(PlanError, match=f"files: '{re.escape(guest_path)}' = .*{problem}"):
        load_recipe(recipe)


@pytest.mark.parametrize("source", ["../outside.txt", "/etc/hostname", "guest/link"])
def test_recipe_sources_may_not_leave_the_recipe_folder(tmp_path: Path, source: str) -> None:
    recipe = _copy_recipe(tmp_path)
    (tmp_path / "outside.txt").write_text("host secret\n")
    (recipe.parent / "guest/link").symlink_to(tmp_path / "outside.txt")
    _with_files_entry(recipe, "/etc/stolen", source)
    with pytest.raises(
        PlanError, match=f"'/etc/stolen' = '{re.escape(source)}': the source resolves to .*outside the recipe's folder"
    ):
        load_recipe(recipe)


def test_a_symlink_inside_the_recipe_folder_is_fine(tmp_path: Path) -> None:
    recipe = _copy_recipe(tmp_path)
    (recipe.parent / "guest/alias").symlink_to("ksm-lab-db-init.service")
    _with_files_entry(recipe, "/etc/alias", "guest/alias")
    assert load_recipe(recipe).files["/etc/alias"] == "guest/alias"


def test_files_are_not_written_through_a_symlink_out_of_the_rootfs(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    host_side = tmp_path / "host-etc"
    host_side.mkdir()
    # An absolute symlink, as packages ship them, resolves into the build host's tree.
    (rootfs / "etc/cron.d").symlink_to(host_side)
    (rootfs / "etc/motd").symlink_to(tmp_path / "host-motd")
    for guest_path in ("/etc/cron.d/job", "/etc/motd"):
        with pytest.raises(
            ProvisionError,
            match=f"image file '{guest_path}': a symlink in the image leads it to .*outside the image root",
        ):
            images._inside_rootfs(rootfs, guest_path)
    assert images._inside_rootfs(rootfs, "/etc/hostname") == (rootfs / "etc/hostname").resolve()
    # Relative links that stay inside (merged /usr: /lib -> usr/lib) are followed.
    (rootfs / "usr/lib").mkdir(parents=True)
    (rootfs / "lib").symlink_to("usr/lib")
    assert images._inside_rootfs(rootfs, "/lib/x.conf") == (rootfs / "usr/lib/x.conf").resolve()
    with pytest.raises(ProvisionError, match="may not contain '..'"):
        images._inside_rootfs(rootfs, "/etc/../../x")


# --- cache ---------------------------------------------------------------------------------


def test_cached_image_is_returned_without_building(tmp_path: Path) -> None:
    key = image_key(DEFAULT_RECIPE)
    entry = _fake_cache_entry(tmp_path, key)
    started = time.monotonic()
    ref = build_image(DEFAULT_RECIPE, tmp_path)
    assert time.monotonic() - started < 1.0  # no debootstrap happened
    assert ref.key == key
    assert ref.disk_path == entry / "base.qcow2"
    assert ref.known_host_key == HOST_KEY
    assert ref.boot == "direct"
    assert resolve_image(None, cache_dir=tmp_path, build=False) == ref
    assert resolve_image({"recipe": "debian-sysbench"}, cache_dir=tmp_path, build=False) == ref
    assert resolve_image({"manifest": str(entry / "image.json")}) == ref


def test_cached_secrets_are_root_only_and_old_entries_are_fixed_on_use(tmp_path: Path) -> None:
    key = image_key(DEFAULT_RECIPE)
    entry = _fake_cache_entry(tmp_path, key)
    # How entries built before this fix were left: world-readable key and disk.
    (entry / "base.qcow2").chmod(0o444)
    (entry / "id_ed25519").chmod(0o644)
    ref = build_image(DEFAULT_RECIPE, tmp_path)
    assert ref.disk_path.stat().st_mode & 0o777 == 0o440
    assert ref.ssh_key_path.stat().st_mode & 0o777 == 0o600
    assert (entry / "vmlinuz").stat().st_mode & 0o777 == 0o644  # not a secret, left alone


def test_a_base_disk_left_to_qemu_s_user_is_given_back_to_root(tmp_path: Path) -> None:
    import os

    if os.geteuid() != 0:
        pytest.skip("needs root to change a file's owner")
    entry = _fake_cache_entry(tmp_path, image_key(DEFAULT_RECIPE))
    os.chown(entry / "base.qcow2", 65534, 65534)  # as libvirt leaves it after a killed guest set
    ref = build_image(DEFAULT_RECIPE, tmp_path)
    assert (ref.disk_path.stat().st_uid, ref.disk_path.stat().st_gid) == (0, 0)


def test_a_manifest_outside_the_cache_does_not_change_modes(tmp_path: Path) -> None:
    entry = _fake_cache_entry(tmp_path, "a-000000000001")
    moved = tmp_path / "my-image"  # a folder not named after the key: not a cache entry
    entry.rename(moved)
    (moved / "id_ed25519").chmod(0o644)
    images.load_manifest(moved / "image.json")
    assert (moved / "id_ed25519").stat().st_mode & 0o777 == 0o644


def test_uncached_image_without_build_says_how_to_build(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="not built yet.*image build"):
        resolve_image({"recipe": str(DEFAULT_RECIPE)}, cache_dir=tmp_path, build=False)


def test_list_and_remove_images(tmp_path: Path) -> None:
    _fake_cache_entry(tmp_path, "a-000000000001", name="a")
    _fake_cache_entry(tmp_path, "b-000000000002", name="b")
    (tmp_path / ".tmp-c-000000000003-xyz").mkdir()  # an interrupted build is not listed
    assert [ref.key for ref in list_images(tmp_path)] == ["a-000000000001", "b-000000000002"]
    remove_image(tmp_path, "a-000000000001")
    assert [ref.key for ref in list_images(tmp_path)] == ["b-000000000002"]
    with pytest.raises(ProvisionError, match="no image"):
        remove_image(tmp_path, "a-000000000001")
    with pytest.raises(ProvisionError, match="not an image key"):
        remove_image(tmp_path, "../etc")


def test_manifest_with_a_missing_file_is_refused(tmp_path: Path) -> None:
    entry = _fake_cache_entry(tmp_path, "a-000000000001")
    (entry / "vmlinuz").unlink()
    with pytest.raises(ProvisionError, match="vmlinuz is missing"):
        images.load_manifest(entry / "image.json")


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    if shutil.which("debootstrap") is None or images.os.geteuid() != 0:
        pytest.skip("needs root and debootstrap")
    recipe = _copy_recipe(tmp_path)
    # Port 1 on the loopback refuses at once: debootstrap fails without leaving the host.
    recipe.write_text(recipe.read_text().replace("http://deb.debian.org/debian", "http://127.0.0.1:1/debian"))
    cache = tmp_path / "cache"
    with pytest.raises(ProvisionError, match="debootstrap"):
        build_image(recipe, cache)
    assert sorted(p.name for p in cache.iterdir()) == [".locks"]


def test_second_builder_waits_for_the_first(tmp_path: Path) -> None:
    order: list[str] = []
    holding = threading.Event()

    def first() -> None:
        with images._build_lock(tmp_path, "k-1"):
            holding.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait(5)
    with images._build_lock(tmp_path, "k-1"):
        order.append("second in")
    thread.join()
    assert order == ["first done", "second in"]


# --- brought images ------------------------------------------------------------------------


def _brought_files(tmp_path: Path) -> Path:
    for name in ("my.qcow2", "id_ed25519", "vmlinuz", "initrd.img"):
        (tmp_path / name).write_text("x")
    (tmp_path / "host.pub").write_text(f"{HOST_KEY} root@box\n")
    return tmp_path


def test_brought_image_with_direct_boot_and_host_key_file(tmp_path: Path) -> None:
    base = _brought_files(tmp_path)
    ref = resolve_image(
        {
            "disk": "my.qcow2",
            "ssh_key": "id_ed25519",
            "kernel": "vmlinuz",
            "initrd": "initrd.img",
            "cmdline": "root=/dev/vda1 console=ttyS0",
            "known_host_key_file": "host.pub",
            "ssh_user": "debian",
        },
        base_dir=base,
    )
    assert ref.disk_path == base / "my.qcow2"
    assert ref.known_host_key == HOST_KEY  # comment dropped
    assert ref.boot == "direct"
    assert ref.ssh_user == "debian"
    assert ref.host_key_policy == "verify"


def test_brought_image_needs_a_host_key_or_an_explicit_policy(tmp_path: Path) -> None:
    base = _brought_files(tmp_path)
    table = {"disk": "my.qcow2", "ssh_key": "id_ed25519"}
    with pytest.raises(PlanError, match="known_host_key.*accept-any"):
        image_from_table(table, base)
    ref = image_from_table({**table, "host_key_policy": "accept-any"}, base)
    assert ref.known_host_key is None
    assert ref.boot == "bootloader"


def test_brought_image_errors_name_the_problem(tmp_path: Path) -> None:
    base = _brought_files(tmp_path)
    ok = {"disk": "my.qcow2", "ssh_key": "id_ed25519", "known_host_key": HOST_KEY}
    with pytest.raises(PlanError, match="image.sshkey"):
        image_from_table({**ok, "sshkey": "x"}, base)
    with pytest.raises(PlanError, match="kernel, initrd and cmdline"):
        image_from_table({**ok, "kernel": "vmlinuz"}, base)
    with pytest.raises(ProvisionError, match="nope.qcow2 is missing"):
        image_from_table({**ok, "disk": "nope.qcow2"}, base)
    with pytest.raises(PlanError, match="one of recipe, manifest or disk"):
        resolve_image({"recipe": "x", "manifest": "y"})


# --- the real image, booted ------------------------------------------------------------------


@pytest.mark.vm
def test_built_image_boots_and_serves_sysbench_over_verified_ssh() -> None:
    from tests.qemuboot import QemuGuest

    image = build_image()  # reuses the cached image when the recipe is unchanged
    assert image.disk_path.stat().st_mode & 0o222 == 0  # the shared base is read-only
    assert (image.ssh_key_path.stat().st_mode & 0o777) == 0o600
    guest = QemuGuest(image)
    pid, overlay = guest.pid, guest.overlay
    try:
        assert (
            f"backing file: {image.disk_path}"
            in images.subprocess.run(["qemu-img", "info", str(overlay)], capture_output=True, text=True).stdout
        )
        with GuestSession.for_image(image, guest.ssh_port, connect_deadline_s=400) as session:
            version = session.run(["sysbench", "--version"], timeout_s=60, check=True)
            assert version.stdout.startswith("sysbench 1.0")
            session.run(["systemctl", "start", "ksm-lab-db-init.service"], timeout_s=180, check=True)
            dbs = session.run(["mariadb", "--batch", "-e", "show databases"], timeout_s=60, check=True)
            assert "sbtest" in dbs.stdout.split()
            # The guest presents exactly the host key recorded at build time.
            on_guest = session.run(["cat", "/etc/ssh/ssh_host_ed25519_key.pub"], timeout_s=60, check=True).stdout
            assert " ".join(on_guest.split()[:2]) == image.known_host_key
    except Exception:
        print(guest.console_tail())
        raise
    finally:
        guest.stop()
    assert not Path(f"/proc/{pid}").exists()
    assert not overlay.exists()


def test_waiting_for_another_build_is_bounded_and_names_the_holder(tmp_path):
    import fcntl

    from orchestrator.errors import ProvisionError
    from orchestrator.guests.images import _build_lock

    (tmp_path / ".locks").mkdir()
    with open(tmp_path / ".locks" / "k.lock", "w") as other:
        other.write("pid 4242\n")
        other.flush()
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(ProvisionError, match="pid 4242"):
            with _build_lock(tmp_path, "k", wait_s=1.5):
                pass


def test_a_build_step_that_hangs_is_cut_at_its_time_limit():
    from orchestrator.errors import ProvisionError
    from orchestrator.guests.images import _run

    with pytest.raises(ProvisionError, match="did not finish within 1 s"):
        _run(["sleep", "30"], None, timeout_s=1)
