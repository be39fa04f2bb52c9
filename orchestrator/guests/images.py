"""Guest base images: build from a TOML recipe, cache by recipe hash, or bring your own.

A built image is a folder `<cache>/<recipe name>-<hash12>/` holding
  base.qcow2       the root filesystem (ext4 on the whole disk, no partition table)
  vmlinuz, initrd.img   copied out of the image's /boot for direct kernel boot
  id_ed25519       the key the host logs in with (authorized for the recipe's ssh user)
  host_key.pub     the guest's SSH host key, generated at build time, so sessions verify it
  image.json       the manifest (paths, cmdline, ssh user, known host key, hashes, sizes)

The hash covers the validated recipe, the guest files it names and BUILD_SCRIPT_VERSION, so
an unchanged recipe is built once and reused. Builds happen in a hidden temp folder next to
the cache entry and are renamed into place at the end: a failed or killed build leaves no
half-made entry, and a per-key lock keeps two concurrent builds of one recipe apart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.errors import HostError, PlanError, ProvisionError
from orchestrator.resources import is_recipe_name, package_file
from orchestrator.host.subproc import run_bounded

log = logging.getLogger(__name__)

# Bump when the build steps below change what ends up in an image.
BUILD_SCRIPT_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1
# Shipped recipes; a bare recipe name ("debian-sysbench") means one of these.
RECIPES_DIR = package_file("guests", "image_recipes")
DEFAULT_RECIPE = RECIPES_DIR / "debian-sysbench.toml"
DEFAULT_CACHE_DIR = Path("/var/lib/ksm-lab/images")
CACHE_DIR_ENV = "KSM_LAB_IMAGE_CACHE"
HostKeyPolicy = Literal["verify", "accept-any"]
# A cache entry's secrets are root's alone (guests run as root: host-setup.sh). The
# login key opens every guest of the image; the base disk holds the guest's SSH host private
# key, which is what sessions trust. The disk stays read-only too: a write to the shared base
# would corrupt every overlay on it.
SSH_KEY_MODE = 0o600
BASE_DISK_MODE = 0o440


# --- recipe ------------------------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DebootstrapSection(_Section):
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    variant: Literal["minbase", "buildd", "-"] = "minbase"
    components: list[str] = ["main"]
    packages: list[str] = Field(min_length=1)


class DiskSection(_Section):
    size_mib: int = Field(4096, ge=512)


class BootSection(_Section):
    cmdline: str = "root=/dev/vda rw console=ttyS0"


class GuestSection(_Section):
    hostname: str = Field("ksm-guest", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    ssh_user: str = Field("root", pattern=r"^[a-z_][a-z0-9_-]{0,31}$")
    dhcp_interfaces: str = "en*"
    serial_getty: bool = True


class DatabaseSection(_Section):
    init_sql: list[str] = []


class Recipe(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    debootstrap: DebootstrapSection
    disk: DiskSection = DiskSection()
    boot: BootSection = BootSection()
    guest: GuestSection = GuestSection()
    database: DatabaseSection = DatabaseSection()
    # guest path -> file relative to the recipe's folder
    files: dict[str, str] = {}


def load_recipe(recipe_path: Path) -> Recipe:
    try:
        raw = tomllib.loads(Path(recipe_path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"image recipe {recipe_path}: {exc}") from exc
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PlanError(f"image recipe {recipe_path}: {where}: {first['msg']}") from exc
    for guest_path, source in recipe.files.items():
        where = f"image recipe {recipe_path}: files: {guest_path!r} = {source!r}"
        if problem := _guest_path_problem(guest_path):
            raise PlanError(f"{where}: the guest path {problem}")
        if problem := _source_problem(Path(recipe_path).parent, source):
            raise PlanError(f"{where}: {problem}")
    return recipe


def _guest_path_problem(guest_path: str) -> str | None:
    """Why a recipe's guest path could land outside the image root (None when it cannot).

    It is joined to the build's rootfs, which the build writes as root: `..` or an empty
    path would write on the build host instead.
    """
    if not guest_path.startswith("/"):
        return "must be absolute"
    if "\0" in guest_path:
        return "holds a NUL byte"
    parts = PurePosixPath(guest_path).parts[1:]
    if not parts:
        return "names the image root itself, not a file"
    if ".." in parts:
        return "may not contain '..'"
    return None


def _source_problem(recipe_dir: Path, source: str) -> str | None:
    """Why a recipe's source file may not be copied into the image (None when it may).

    Sources come from the recipe's own folder; a `..`, an absolute path or a symlink out of
    it would copy a file of the build host (say /etc/shadow) into every guest.
    """
    if "\0" in source:
        return "the source holds a NUL byte"
    folder = recipe_dir.resolve()
    resolved = (recipe_dir / source).resolve()
    if not resolved.is_relative_to(folder):
        return f"the source resolves to {resolved}, outside the recipe's folder {folder}"
    if not resolved.is_file():
        return f"the source {source!r} not found (or not a regular file)"
    return None


def recipe_hash(recipe_path: Path) -> str:
    """sha256 of the validated recipe (comments and layout do not count), its files, the builder."""
    recipe = load_recipe(recipe_path)
    folder = Path(recipe_path).parent
    files = {
        guest_path: hashlib.sha256((folder / source).read_bytes()).hexdigest()
        for guest_path, source in recipe.files.items()
    }
    canonical = json.dumps(
        {"build_script_version": BUILD_SCRIPT_VERSION, "recipe": recipe.model_dump(mode="json"), "files": files},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def image_key(recipe_path: Path) -> str:
    return f"{load_recipe(recipe_path).name}-{recipe_hash(recipe_path)[:12]}"


# --- image reference -----------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRef:
    """Everything provision and guest need to boot and reach one image."""

    name: str
    disk_path: Path
    ssh_user: str
    ssh_key_path: Path
    known_host_key: str | None  # "ssh-ed25519 AAAA..." or None with host_key_policy accept-any
    host_key_policy: HostKeyPolicy = "verify"
    kernel_path: Path | None = None  # None: the disk's own bootloader boots it
    initrd_path: Path | None = None
    cmdline: str | None = None
    disk_format: str = "qcow2"
    key: str | None = None  # cache key for built images, None for brought ones
    manifest_path: Path | None = None
    recipe_hash: str | None = None

    @property
    def boot(self) -> Literal["direct", "bootloader"]:
        return "direct" if self.kernel_path is not None else "bootloader"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR)


def load_manifest(manifest_path: Path) -> ImageRef:
    manifest_path = Path(manifest_path).resolve()
    try:
        data = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProvisionError(f"image manifest {manifest_path}: {exc}") from exc
    if data.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ProvisionError(f"image manifest {manifest_path}: unknown schema_version {data.get('schema_version')!r}")

    def path(field: str) -> Path:
        # Relative paths (hand-edited manifests) are taken from the manifest's folder.
        return manifest_path.parent / data["paths"][field]

    ref = ImageRef(
        name=data["name"],
        key=data["key"],
        disk_path=path("disk"),
        kernel_path=path("kernel"),
        initrd_path=path("initrd"),
        cmdline=data["cmdline"],
        ssh_user=data["ssh_user"],
        ssh_key_path=path("ssh_key"),
        known_host_key=data["known_host_key"],
        manifest_path=manifest_path,
        recipe_hash=data["recipe_hash"],
    )
    _check_files_exist(ref, f"image {ref.key}")
    if manifest_path.parent.name == ref.key:
        # A cache entry: entries built before the modes above were 0644/0444; fix them now.
        _restrict_secrets(ref)
    return ref


def _restrict_secrets(ref: ImageRef) -> None:
    """Take group/other (and write) bits off a cache entry's login key and base disk, and give
    them back to root where another owner was left.

    Only files inside the entry's own folder are touched (a hand-edited manifest may point
    elsewhere), symlinks are not followed, and bits are only ever removed.
    """
    entry = ref.manifest_path.parent if ref.manifest_path else None
    for path, mode in ((ref.ssh_key_path, SSH_KEY_MODE), (ref.disk_path, BASE_DISK_MODE)):
        if entry is None or path.parent.resolve() != entry or path.is_symlink():
            continue
        st = path.stat()
        if st.st_uid != 0 and os.geteuid() == 0:
            # libvirt gives a guest's backing files to QEMU's user and never back (GuestSet
            # puts them back; a killed sweep cannot): a QEMU owning the base could chmod it.
            try:
                os.chown(path, 0, 0)
                log.warning("%s was owned by uid %d (left by a killed guest set): given back to root", path, st.st_uid)
            except OSError as exc:
                log.warning(
                    "%s is owned by uid %d; could not give it back to root: %s", path, st.st_uid, exc.strerror or exc
                )
        current = st.st_mode & 0o7777
        if current & ~mode:
            try:
                path.chmod(current & mode)
            except OSError as exc:
                log.warning(
                    "%s is mode %o, readable beyond root; could not change it to %o: %s",
                    path,
                    current,
                    current & mode,
                    exc.strerror or exc,
                )


class _BroughtImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disk: Path
    disk_format: Literal["qcow2", "raw"] = "qcow2"
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None
    ssh_user: str = "root"
    ssh_key: Path
    known_host_key: str | None = None
    known_host_key_file: Path | None = None
    host_key_policy: HostKeyPolicy = "verify"
    name: str = "brought"


def image_from_table(table: Mapping[str, Any], base_dir: Path = Path(".")) -> ImageRef:
    """A user-brought image from a plan's [image] table; relative paths are from base_dir."""
    try:
        spec = _BroughtImage.model_validate(dict(table))
    except ValidationError as exc:
        first = exc.errors()[0]
        raise PlanError(f"image.{'.'.join(map(str, first['loc']))}: {first['msg']}") from exc

    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (base_dir / p).resolve()

    known = spec.known_host_key
    if spec.known_host_key_file is not None:
        if known is not None:
            raise PlanError("image: give known_host_key or known_host_key_file, not both")
        known = absolute(spec.known_host_key_file).read_text().strip()  # type: ignore[union-attr]
    if known is not None:
        known = " ".join(known.split()[:2])  # drop the comment
        if len(known.split()) != 2:
            raise PlanError("image.known_host_key: expected '<type> <base64>'")
    if spec.host_key_policy == "verify" and known is None:
        raise PlanError(
            "image: known_host_key (or known_host_key_file) is required unless "
            'host_key_policy = "accept-any" is set explicitly'
        )
    if (spec.kernel is None) != (spec.initrd is None) or (spec.kernel and not spec.cmdline):
        raise PlanError("image: direct kernel boot needs kernel, initrd and cmdline together")
    ref = ImageRef(
        name=spec.name,
        disk_path=absolute(spec.disk),
        disk_format=spec.disk_format,  # type: ignore[arg-type]
        kernel_path=absolute(spec.kernel),
        initrd_path=absolute(spec.initrd),
        cmdline=spec.cmdline,
        ssh_user=spec.ssh_user,
        ssh_key_path=absolute(spec.ssh_key),  # type: ignore[arg-type]
        known_host_key=known,
        host_key_policy=spec.host_key_policy,
    )
    _check_files_exist(ref, "image")
    return ref


def _check_files_exist(ref: ImageRef, what: str) -> None:
    for path in (ref.disk_path, ref.kernel_path, ref.initrd_path, ref.ssh_key_path):
        if path is not None and not path.is_file():
            raise ProvisionError(f"{what}: {path} is missing")


# --- cache ---------------------------------------------------------------------------------


def find_cached(recipe_path: Path, cache_dir: Path | None = None) -> ImageRef | None:
    manifest = (cache_dir or default_cache_dir()) / image_key(recipe_path) / "image.json"
    return load_manifest(manifest) if manifest.is_file() else None


def list_images(cache_dir: Path | None = None) -> list[ImageRef]:
    cache_dir = cache_dir or default_cache_dir()
    if not cache_dir.is_dir():
        return []
    return [
        load_manifest(entry / "image.json")
        for entry in sorted(cache_dir.iterdir())
        if not entry.name.startswith(".") and (entry / "image.json").is_file()
    ]


def remove_image(cache_dir: Path | None, key: str) -> None:
    """Delete one cached image. Overlays backed by it stop working: remove those first."""
    cache_dir = cache_dir or default_cache_dir()
    if not key or "/" in key or key.startswith("."):
        raise ProvisionError(f"not an image key: {key!r}")
    with _build_lock(cache_dir, key):
        entry = cache_dir / key
        if not (entry / "image.json").is_file():
            raise ProvisionError(f"no image {key!r} in {cache_dir}")
        _safe_rmtree(entry)


def resolve_image(
    spec: Mapping[str, Any] | None = None,
    *,
    cache_dir: Path | None = None,
    base_dir: Path = Path("."),
    build: bool = True,
) -> ImageRef:
    """The image a plan asks for.

    spec (a plan's [image] table) is one of:
      None / {}                          the default recipe, built if not cached
      {"recipe": path or recipe name}    that recipe, built if not cached (unless build=False)
      {"manifest": path}                 an image.json written by a build
      {"disk": ..., "ssh_key": ..., ...} an image you brought (see image_from_table)
    """
    spec = dict(spec or {})
    if "disk" in spec:
        return image_from_table(spec, base_dir)
    if set(spec) - {"recipe", "manifest"} or len(spec) > 1:
        raise PlanError(f"image: use one of recipe, manifest or disk (got {sorted(spec)})")
    if "manifest" in spec:
        return load_manifest(base_dir / spec["manifest"])
    recipe_path = _recipe_path(spec.get("recipe"), base_dir)
    cached = find_cached(recipe_path, cache_dir)
    if cached is not None:
        return cached
    if not build:
        raise ProvisionError(f"image for {recipe_path} is not built yet: run `ksm-lab image build`")
    return build_image(recipe_path, cache_dir)


def _recipe_path(value: str | None, base_dir: Path) -> Path:
    if value is None:
        return DEFAULT_RECIPE
    if is_recipe_name(value):
        return RECIPES_DIR / f"{value}.toml"
    return (base_dir / value).resolve()


# Bounds on every build step (a mirror that stops answering must not hang a nightly run), and
# on waiting for another process's build of the same image.
DEBOOTSTRAP_TIMEOUT_S = 1800.0
STEP_TIMEOUT_S = 600.0
BUILD_LOCK_WAIT_S = 2400.0


@contextmanager
def _build_lock(cache_dir: Path, key: str, wait_s: float = BUILD_LOCK_WAIT_S) -> Iterator[None]:
    """One build of an image at a time; waits at most `wait_s` for another, naming it."""
    lock_dir = cache_dir / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "a+") as lock_file:
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                lock_file.seek(0)
                holder = lock_file.read().strip() or "unknown pid"
                if time.monotonic() > deadline:
                    raise ProvisionError(
                        f"another build of image {key} ({holder}) still holds {lock_file.name} after {wait_s:.0f} s"
                    ) from None
                if not announced:
                    log.info("waiting for another build of %s (%s) to finish", key, holder)
                    announced = True
                time.sleep(1.0)
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(f"pid {os.getpid()}\n")
        lock_file.flush()
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _safe_rmtree(path: Path) -> None:
    """rmtree that refuses to descend into anything still mounted (a chroot's /proc, say)."""
    prefix = str(path.resolve())
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = line.split()[4]
            if mount_point == prefix or mount_point.startswith(prefix + "/"):
                raise ProvisionError(f"{mount_point} is still mounted; unmount it and remove {path} by hand")
    shutil.rmtree(path)


# --- build ---------------------------------------------------------------------------------


_BUILD_TOOLS = ("debootstrap", "mkfs.ext4", "qemu-img", "ssh-keygen", "unshare", "chroot")


def build_image(recipe_path: Path = DEFAULT_RECIPE, cache_dir: Path | None = None) -> ImageRef:
    """Build the recipe's image into the cache, or return the cached one at once."""
    recipe_path = Path(recipe_path).resolve()
    cache_dir = (cache_dir or default_cache_dir()).resolve()
    recipe = load_recipe(recipe_path)
    digest = recipe_hash(recipe_path)
    key = f"{recipe.name}-{digest[:12]}"
    final_dir = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache_dir, key):
        if (final_dir / "image.json").is_file():
            return load_manifest(final_dir / "image.json")
        _check_build_host()
        for stale in cache_dir.glob(f".tmp-{key}-*"):
            log.info("removing %s left by an interrupted build", stale)
            _safe_rmtree(stale)
        work_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=cache_dir))
        try:
            out_dir = work_dir / "out"
            out_dir.mkdir()
            _build_into(recipe, recipe_path, digest, key, work_dir, out_dir, final_dir)
            os.rename(out_dir, final_dir)
        finally:
            _safe_rmtree(work_dir)
    return load_manifest(final_dir / "image.json")


def _check_build_host() -> None:
    if os.geteuid() != 0:
        raise HostError("building an image needs root (debootstrap, chroot)")
    missing = [tool for tool in _BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise HostError(f"missing {', '.join(missing)}: run `ksm-lab host setup`")


def _build_into(
    recipe: Recipe, recipe_path: Path, digest: str, key: str, work_dir: Path, out_dir: Path, final_dir: Path
) -> None:
    started = time.monotonic()
    rootfs = work_dir / "rootfs"
    boot = recipe.debootstrap
    log.info("debootstrap %s (%s, %d packages) from %s", boot.suite, boot.variant, len(boot.packages), boot.mirror)
    # A private mount namespace: whatever debootstrap mounts in the rootfs goes away with it,
    # even if it is killed, so the temp folder can always be deleted.
    # --force-check-gpg: a Release file that cannot be verified against the host's archive keyring
    # fails the build instead of being used unchecked (the mirror is plain http).
    _run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "debootstrap",
            "--force-check-gpg",
            f"--variant={boot.variant}",
            f"--components={','.join(boot.components)}",
            f"--include={','.join(boot.packages)}",
            boot.suite,
            str(rootfs),
            boot.mirror,
        ],
        work_dir / "debootstrap.log",
    )

    _run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"ksm-lab@{key}", "-f", str(out_dir / "id_ed25519")], None
    )
    (out_dir / "id_ed25519").chmod(SSH_KEY_MODE)  # ssh-keygen's 0600 too; not left to chance
    _run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            f"root@{recipe.guest.hostname}",
            "-f",
            str(work_dir / "host_key"),
        ],
        None,
    )
    _configure_rootfs(
        rootfs, recipe, recipe_path.parent, work_dir / "host_key", (out_dir / "id_ed25519.pub").read_text()
    )
    kernel_version = _copy_kernel(rootfs, out_dir)
    shutil.copyfile(work_dir / "host_key.pub", out_dir / "host_key.pub")
    rootfs_bytes = _tree_bytes(rootfs)

    ext4 = work_dir / "root.ext4"
    log.info("mkfs.ext4 -d (%d MiB filesystem, %d MiB of files)", recipe.disk.size_mib, rootfs_bytes >> 20)
    _run(["mkfs.ext4", "-q", "-F", "-L", "ksm-root", "-d", str(rootfs), str(ext4), f"{recipe.disk.size_mib}M"], None)
    _safe_rmtree(rootfs)
    _run(["qemu-img", "convert", "-O", "qcow2", str(ext4), str(out_dir / "base.qcow2")], None)
    ext4.unlink()
    (out_dir / "base.qcow2").chmod(BASE_DISK_MODE)  # see BASE_DISK_MODE

    known_host_key = " ".join((out_dir / "host_key.pub").read_text().split()[:2])
    manifest = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "name": recipe.name,
        "key": key,
        "recipe_hash": digest,
        "recipe_path": str(recipe_path),
        "recipe": recipe.model_dump(mode="json"),
        "build_script_version": BUILD_SCRIPT_VERSION,
        # Paths as they will be after the rename into the cache.
        "paths": {
            "disk": str(final_dir / "base.qcow2"),
            "kernel": str(final_dir / "vmlinuz"),
            "initrd": str(final_dir / "initrd.img"),
            "ssh_key": str(final_dir / "id_ed25519"),
            "known_host_key": str(final_dir / "host_key.pub"),
        },
        "disk_format": "qcow2",
        "cmdline": recipe.boot.cmdline,
        "ssh_user": recipe.guest.ssh_user,
        "known_host_key": known_host_key,
        "kernel_version": kernel_version,
        "built_wall": time.time(),
        "build_duration_s": round(time.monotonic() - started, 1),
        "sizes": {
            "rootfs_bytes": rootfs_bytes,
            "disk_virtual_bytes": recipe.disk.size_mib << 20,
            "disk_file_bytes": (out_dir / "base.qcow2").stat().st_size,
            "kernel_bytes": (out_dir / "vmlinuz").stat().st_size,
            "initrd_bytes": (out_dir / "initrd.img").stat().st_size,
        },
    }
    (out_dir / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("image %s built in %.0f s", key, manifest["build_duration_s"])


def _configure_rootfs(rootfs: Path, recipe: Recipe, recipe_dir: Path, host_key: Path, login_pubkey: str) -> None:
    guest = recipe.guest

    def write(guest_path: str, text: str, mode: int = 0o644) -> None:
        target = _inside_rootfs(rootfs, guest_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    write("/etc/hostname", f"{guest.hostname}\n")
    write(
        "/etc/hosts", f"127.0.0.1\tlocalhost\n127.0.1.1\t{guest.hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # debootstrap copied the build host's resolv.conf; the guest has no DNS to use.
    write("/etc/resolv.conf", "# no DNS: ksm-lab guests reach nothing but the host\n")
    write("/etc/fstab", "/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n")
    write(
        "/etc/systemd/network/10-ksm-lab-dhcp.network",
        f"[Match]\nName={guest.dhcp_interfaces}\n\n[Network]\nDHCP=ipv4\n",
    )

    # Only our pre-generated ed25519 host key is offered, so the key recorded in the manifest
    # is the one the guest presents. ssh-keygen -A only creates missing keys, never replaces.
    for old in (rootfs / "etc/ssh").glob("ssh_host_*"):
        old.unlink()
    shutil.copyfile(host_key, rootfs / "etc/ssh/ssh_host_ed25519_key")
    (rootfs / "etc/ssh/ssh_host_ed25519_key").chmod(0o600)
    write("/etc/ssh/ssh_host_ed25519_key.pub", Path(f"{host_key}.pub").read_text())
    write(
        "/etc/ssh/sshd_config.d/ksm-lab.conf",
        "HostKey /etc/ssh/ssh_host_ed25519_key\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n",
    )

    if guest.ssh_user == "root":
        home = "/root"
    else:
        _chroot(rootfs, ["useradd", "--create-home", "--shell", "/bin/bash", guest.ssh_user])
        home = f"/home/{guest.ssh_user}"
    write(f"{home}/.ssh/authorized_keys", login_pubkey, 0o600)
    (rootfs / home.lstrip("/") / ".ssh").chmod(0o700)
    if guest.ssh_user != "root":
        _chroot(rootfs, ["chown", "-R", f"{guest.ssh_user}:{guest.ssh_user}", f"{home}/.ssh"])

    write("/etc/ksm-lab/db-init.sql", "".join(f"{s.rstrip(';')};\n" for s in recipe.database.init_sql))
    for guest_path, source in recipe.files.items():
        try:
            write(guest_path, (recipe_dir / source).read_text())
        except ProvisionError as exc:
            raise ProvisionError(f"image recipe files: {guest_path!r} = {source!r}: {exc}") from None

    units = ["systemd-networkd.service"]
    units += [Path(p).name for p in recipe.files if p.startswith("/etc/systemd/system/")]
    if guest.serial_getty:
        units.append("serial-getty@ttyS0.service")
    _chroot(rootfs, ["systemctl", "enable", *units])
    # Periodic jobs would wake at random in some guests and not others, disturbing the memory
    # and CPU picture KSM is measured against.
    _chroot(
        rootfs, ["systemctl", "mask", "apt-daily.timer", "apt-daily-upgrade.timer", "fstrim.timer", "e2scrub_all.timer"]
    )

    # The downloaded .debs and package lists are not needed in the guest (~150 MiB).
    for leftover in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        leftover.unlink()
    for leftover in (rootfs / "var/lib/apt/lists").glob("*_*"):
        leftover.unlink()


def _inside_rootfs(rootfs: Path, guest_path: str) -> Path:
    """rootfs/guest_path, refused if it (or a symlink on the way) leads out of rootfs.

    A symlink the packages put in the rootfs is resolved as the build host sees it: an
    absolute one (`/etc/x -> /usr/share/x`) would point into the build host's own tree, so it
    is refused too rather than followed.
    """
    if problem := _guest_path_problem(guest_path):
        raise ProvisionError(f"image file {guest_path!r}: the guest path {problem}")
    root = rootfs.resolve()
    target = rootfs / guest_path.lstrip("/")
    resolved = target.resolve()
    if resolved == root or not resolved.is_relative_to(root):
        raise ProvisionError(
            f"image file {guest_path!r}: a symlink in the image leads it to {resolved}, "
            f"outside the image root {root}; refusing to write there"
        )
    return resolved


def _copy_kernel(rootfs: Path, out_dir: Path) -> str:
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ProvisionError("the image has no /boot/vmlinuz-*: add a linux-image package")
    version = kernels[-1].name.removeprefix("vmlinuz-")
    initrd = rootfs / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ProvisionError(f"the image has no {initrd.name}: add initramfs-tools")
    shutil.copyfile(kernels[-1], out_dir / "vmlinuz")
    shutil.copyfile(initrd, out_dir / "initrd.img")
    return version


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


def _chroot(rootfs: Path, argv: list[str]) -> None:
    _run(["unshare", "--mount", "--propagation", "private", "chroot", str(rootfs), *argv], None)


def _run(argv: list[str], log_path: Path | None, timeout_s: float | None = None) -> None:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
        "HOME": "/root",
    }
    if timeout_s is None:
        timeout_s = DEBOOTSTRAP_TIMEOUT_S if "debootstrap" in argv else STEP_TIMEOUT_S
    try:
        proc = run_bounded(argv, timeout_s, text=True, env=env)  # debootstrap's and apt's children too
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"") + (exc.stderr or b"")
        text = output.decode(errors="replace") if isinstance(output, bytes) else str(output)
        if log_path is not None:
            log_path.write_text(text)
        tail = "\n".join(text.strip().splitlines()[-15:])
        raise ProvisionError(f"`{' '.join(argv)}` did not finish within {timeout_s:.0f} s:\n{tail}") from None
    if log_path is not None:
        log_path.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise ProvisionError(f"`{' '.join(argv)}` failed (exit {proc.returncode}):\n{tail}")
