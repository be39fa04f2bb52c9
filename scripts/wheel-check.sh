#!/usr/bin/env bash
# Prove the installed (not editable) ksm-lab works: build the wheel from a clean copy of this
# checkout, install it into a fresh venv outside the checkout, and from a folder where the
# checkout is not importable run what a user would:
#   ksm-lab --version (and python -m orchestrator, the same program), ksm-lab check,
#   sweep --dry-run on every shipped plan, the default domain template rendered, the shipped
#   recipe and host-setup.sh found inside the package, and the quickstart study.
#
#   scripts/wheel-check.sh              all of it; the quickstart study changes the real KSM
#                                       (root, about 3 minutes; knobs are restored after)
#   scripts/wheel-check.sh --no-study   all but the quickstart study
#
# PYTHON   interpreter that builds the wheel and the venv (default: .venv/bin/python, else python3)
# KSM_LAB_WHEEL_DIR   work here and keep it (wheel, venv, study) instead of a removed temp folder
set -euo pipefail
exec </dev/null
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
run_study=yes
case ${1:-} in
    --no-study) run_study=no ;;
    "") ;;
    *) echo "usage: $0 [--no-study]" >&2; exit 2 ;;
esac

say() { printf 'wheel-check: %s\n' "$*"; }
fail() { printf 'wheel-check: FAILED: %s\n' "$*" >&2; exit 1; }

if [[ -n ${KSM_LAB_WHEEL_DIR:-} ]]; then
    WORK=$KSM_LAB_WHEEL_DIR
    rm -rf "$WORK/src" "$WORK/dist" "$WORK/venv" "$WORK/run"
    mkdir -p "$WORK"
else
    WORK=$(mktemp -d /tmp/ksm-lab-wheel.XXXXXX)
    trap 'rm -rf "$WORK"' EXIT
fi
mkdir -p "$WORK/src" "$WORK/run"

# A clean copy: a build/ folder left in the checkout would let deleted files into the wheel.
if git -C "$REPO" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$REPO" ls-files -z --cached --others --exclude-standard |
        tar -C "$REPO" --null --ignore-failed-read -T - -cf - 2>/dev/null | tar -C "$WORK/src" -xf -
else
    tar -C "$REPO" --exclude=./.venv --exclude=./results --exclude=./build -cf - . | tar -C "$WORK/src" -xf -
fi

say "building the wheel ($PYTHON)"
"$PYTHON" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
wheels=("$WORK"/dist/ksm_lab-*.whl)
[[ -f ${wheels[0]} ]] || fail "no wheel in $WORK/dist"
say "built $(basename "${wheels[0]}")"

say "installing it into a fresh venv (libvirt-python may compile: ~30 s)"
"$PYTHON" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "${wheels[0]}"
PY=$WORK/venv/bin/python
KSM=$WORK/venv/bin/ksm-lab

# From here on nothing may come from the checkout.
cd "$WORK/run"
where=$("$PY" -c 'import orchestrator; print(orchestrator.__file__)')
[[ $where == "$WORK/venv/"* ]] || fail "orchestrator was imported from $where, not from the wheel"

version=$("$KSM" --version)
[[ $version == "ksm-lab $("$PY" -c 'import orchestrator; print(orchestrator.__version__)')" ]] ||
    fail "ksm-lab --version printed '$version'"
[[ $("$PY" -m orchestrator --version) == "$version" ]] || fail "python -m orchestrator --version differs"
[[ $("$PY" -m orchestrator --help | head -n1) == "usage: ksm-lab "* ]] || fail "python -m orchestrator --help is not ksm-lab's"
say "$version ($where)"

# check may say the host is not ready (exit 1); it must say so, not crash.
set +e
check_out=$("$KSM" check 2>&1)
check_rc=$?
set -e
printf '%s\n' "$check_out" | sed 's/^/  /'
if ((check_rc > 1)) || grep -q Traceback <<<"$check_out"; then
    fail "ksm-lab check exited $check_rc"
fi
say "ksm-lab check: exit $check_rc"

for plan in "$REPO"/plans/*.toml; do
    "$KSM" sweep "$plan" --dry-run --json >"$WORK/dry-run.json" ||
        fail "ksm-lab sweep --dry-run $plan"
    trials=$("$PY" -c 'import json, sys; print(len(json.load(open(sys.argv[1]))["trials"]))' "$WORK/dry-run.json")
    ((trials > 0)) || fail "$plan: no trials"
    say "sweep --dry-run $(basename "$plan"): $trials trials"
done

"$PY" - <<'EOF' || fail "package data"
import subprocess
from pathlib import Path
from orchestrator.guests import domains, hostsetup, images

spec = domains.DomainSpec(
    name="ksmlab-wheel-0", uuid="00000000-0000-4000-8000-000000000001", study="wheel",
    domain_type="qemu", arch="x86_64", memory_mib=512, vcpus=1,
    overlay_path=Path("/tmp/wheel.qcow2"), console_log_path=Path("/tmp/wheel.log"),
    boot=domains.KernelBoot(Path("/tmp/vmlinuz"), Path("/tmp/initrd"), "console=ttyS0"),
    network=domains.UserNet(host_port=2222))
xml = domains.render_domain_xml(spec)
assert "<name>ksmlab-wheel-0</name>" in xml and "hostfwd=tcp:127.0.0.1:2222-:22" in xml, xml
print(f"wheel-check: default template {domains.DEFAULT_TEMPLATE} renders ({len(xml)} bytes)")
print(f"wheel-check: shipped recipe {images.image_key(images.DEFAULT_RECIPE)} ({images.DEFAULT_RECIPE})")
subprocess.run(["bash", "-n", str(hostsetup.SETUP_SCRIPT)], check=True)
print(f"wheel-check: {hostsetup.SETUP_SCRIPT} is there and parses")
EOF

if [[ $run_study == no ]]; then
    say "ok (quickstart study skipped: --no-study)"
    exit 0
fi
say "quickstart study from the wheel (real KSM)"
set +e
"$KSM" sweep "$REPO/plans/quickstart.toml" --results "$WORK/results" --json >"$WORK/summary.json"
rc=$?
set -e
if ((rc != 0)); then
    tail -n 30 "$WORK/results/quickstart/sweep.log" 2>/dev/null | sed 's/^/  /' >&2 || true
    fail "quickstart study exited $rc"
fi
"$PY" - "$WORK/summary.json" <<'EOF' || fail "quickstart study summary"
import json, sys
from pathlib import Path
summary = json.load(open(sys.argv[1]))
assert summary["exit_code"] == 0 and summary["failed"] == 0, summary
assert summary["report"] and Path(summary["report"]).is_file(), summary["report"]
assert Path(summary["log"]).is_file(), summary["log"]
print(f"wheel-check: quickstart: {summary['ran']} trials ok, report {summary['report']}")
EOF
say "ok"
