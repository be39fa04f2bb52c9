#!/usr/bin/env bash
# Make this host ready to run ksm-lab guests as libvirt's unprivileged user: packages, libvirt's
# directories and user, /dev/kvm for that user where no udev gave it (and no qemu.conf: libvirt's
# defaults), then virtlogd + libvirtd (systemctl where systemd is PID 1, by hand otherwise).
#
#   host-setup.sh          set up; every step is skipped when already in place
#   host-setup.sh --stop   stop only the daemons this script started (by recorded PID) and put
#                          back what it changed (/dev/kvm, an earlier version's qemu.conf)
#   host-setup.sh --packages-only   only the Debian packages (what the venv needs)
#
# It ships inside the package (orchestrator/guests/host-setup.sh): `ksm-lab host setup|stop` runs it
# from an installed wheel, the Makefile from the checkout.
#
# Never installs libvirt-daemon-system: it pulls libvirt-daemon-config-network, which defines
# and autostarts libvirt's 'default' NAT network. Guests here use QEMU user networking only.
set -euo pipefail
exec </dev/null
export DEBIAN_FRONTEND=noninteractive CI=true LC_ALL=C

PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
          libvirt-dev pkg-config debootstrap debian-archive-keyring e2fsprogs openssh-client ksmtuned)
# debian-archive-keyring: debootstrap runs with --force-check-gpg and verifies against it.
# ksmtuned is installed for the "ksmtuned" KSM policy, which starts it per trial and stops it by
# PID. It must never run on its own: its package enables ksmtuned.service and ksm.service (which
# writes run=1 at boot), so they are installed with service starts denied and then disabled.
# Overridable so tests can work on a scratch copy instead of the host's files.
STATE_DIR=${KSM_LAB_STATE_DIR:-/run/ksm-lab}
STATE_FILE=$STATE_DIR/host-daemons          # "<name> <pid>" per daemon this script started
QEMU_CONF=${KSM_LAB_QEMU_CONF:-/etc/libvirt/qemu.conf}
QEMU_CONF_RECORD=${KSM_LAB_QEMU_CONF_RECORD:-/var/lib/ksm-lab/qemu-conf-replaced}  # what --stop restores
# Versions before this one wrote a block running QEMU as root with no security driver; it is
# removed wherever it is found. Nothing else is written: libvirt's defaults run guests as
# libvirt-qemu under its DAC driver with dynamic ownership, which is what ksm-lab wants.
MARK_BEGIN_ANY="# >>> ksm-lab"
MARK_END="# <<< ksm-lab"
URI=qemu:///system
KVM_DEVICE=${KSM_LAB_KVM_DEVICE:-/dev/kvm}
KVM_RECORD=${KSM_LAB_KVM_RECORD:-/var/lib/ksm-lab/kvm-device-changed}  # what --stop puts back

say() { printf 'host-setup: %s\n' "$*"; }
die() { printf 'host-setup: error: %s\n' "$*" >&2; exit 1; }

# A daemon is alive when its pid file names a live process running the expected binary
# (the binary check guards against a stale pid file whose PID was reused).
pid_alive() {  # pid binary
    local pid=$1 binary=$2
    [[ $pid =~ ^[0-9]+$ ]] && [[ -d /proc/$pid ]] &&
        [[ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" == "$(readlink -f "$binary")" ]]
}
pidfile_alive() {  # pidfile binary
    [[ -r $1 ]] && pid_alive "$(head -n1 "$1")" "$2"
}

stop_started_daemons() {  # [name...]: only these (default: every recorded daemon)
    if [[ ! -s $STATE_FILE ]]; then
        say "nothing to stop: no daemons recorded in $STATE_FILE"
        return 0
    fi
    local only=" $* "
    # Reverse order: libvirtd before the virtlogd it logs through.
    tac "$STATE_FILE" | while read -r name pid; do
        [[ $# -eq 0 || $only == *" $name "* ]] || continue
        local binary
        binary=$(command -v "$name" || echo "/usr/sbin/$name")
        if ! pid_alive "$pid" "$binary"; then
            say "$name (pid $pid) already gone"
            continue
        fi
        kill -TERM "$pid"
        for _ in $(seq 50); do pid_alive "$pid" "$binary" || break; sleep 0.2; done
        if pid_alive "$pid" "$binary"; then
            kill -KILL "$pid"
            say "stopped $name (pid $pid) with SIGKILL after 10 s"
        else
            say "stopped $name (pid $pid)"
        fi
    done
    if [[ $# -eq 0 ]]; then
        rm -f "$STATE_FILE"
    else
        local kept
        kept=$(grep -v -E "^($(IFS='|'; echo "$*")) " "$STATE_FILE" || true)
        if [[ -n $kept ]]; then printf '%s\n' "$kept" >"$STATE_FILE"; else rm -f "$STATE_FILE"; fi
    fi
}

# qemu.conf changed under a running libvirtd: restart the one we run so the change applies
# (systemd's, or the one this script started by hand: stopped here, started again by main).
restart_libvirtd_for_new_conf() {
    if have_systemd && systemctl is-active --quiet libvirtd.service 2>/dev/null; then
        systemctl restart libvirtd.service
        say "libvirtd: restarted with systemctl for the new qemu.conf"
    elif grep -q "^libvirtd " "$STATE_FILE" 2>/dev/null; then
        stop_started_daemons libvirtd
    fi
}

# What building the venv needs (libvirt-python compiles against libvirt-dev), when the
# python3 in PATH lacks it: a fresh Debian has python3 without venv or headers.
python_build_packages() {
    command -v gcc >/dev/null || echo gcc
    python3 -c 'import ensurepip' 2>/dev/null || echo python3-venv
    python3 -c 'import os, sysconfig; raise SystemExit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
        2>/dev/null || echo python3-dev
}

install_packages() {
    local missing=() pkg
    mapfile -t extra < <(python_build_packages)
    for pkg in "${PACKAGES[@]}" "${extra[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if ((${#missing[@]} == 0)); then
        say "packages: all ${#PACKAGES[@]} present"
        return 0
    fi
    say "packages: installing ${missing[*]}"
    apt-get update -q >/dev/null
    local denied_starts=""
    if [[ " ${missing[*]} " == *" ksmtuned "* && ! -e /usr/sbin/policy-rc.d ]]; then
        # invoke-rc.d asks policy-rc.d; 101 = "action forbidden": no daemon starts during install
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        denied_starts=1
        # gone again however this ends (apt fails under set -e, a signal): it denies every service start
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [[ -n $denied_starts ]]; then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    if [[ " ${missing[*]} " == *" ksmtuned "* ]]; then
        if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
            systemctl disable ksmtuned.service ksm.service >/dev/null 2>&1 || true
        fi
        if pgrep -x ksmtuned >/dev/null; then
            say "warning: ksmtuned is running (pid $(pgrep -x ksmtuned | tr '\n' ' ')); sweeps refuse to start" \
                "until it is stopped"
        fi
    fi
    say "packages: installed ${#missing[@]}"
    if dpkg-query -W -f='${Status}' libvirt-daemon-system 2>/dev/null | grep -q "ok installed"; then
        say "warning: libvirt-daemon-system is installed (not by this script); it may autostart" \
            "libvirt's 'default' NAT network"
    fi
}

prepare_dirs_and_user() {
    local dir
    for dir in /var/log/libvirt/qemu /var/lib/libvirt/qemu /run/libvirt "$STATE_DIR"; do
        if [[ ! -d $dir ]]; then mkdir -p "$dir"; say "created $dir"; fi
    done
    # Debian's QEMU driver resolves this compiled-in user before reading qemu.conf.
    if ! getent group libvirt-qemu >/dev/null; then
        groupadd --system libvirt-qemu
        say "created group libvirt-qemu"
    fi
    if ! getent passwd libvirt-qemu >/dev/null; then
        useradd --system --gid libvirt-qemu --no-create-home --home-dir /var/lib/libvirt \
            --shell /usr/sbin/nologin libvirt-qemu
        say "created user libvirt-qemu"
    fi
}

# A host whose libvirt was set up its own way (libvirt-daemon-system, a running libvirtd we did
# not start, AppArmor/SELinux) keeps that set-up: guests run under its policy. Only a bare host
# (no daemon answering, no libvirt-daemon-system: CI's) is ours to configure.
host_has_own_libvirt() {
    dpkg-query -W -f='${Status}' libvirt-daemon-system 2>/dev/null | grep -q "ok installed" && return 0
    if virsh -c "$URI" version >/dev/null 2>&1 && ! grep -q "^libvirtd " "$STATE_FILE" 2>/dev/null; then
        return 0
    fi
    return 1
}

# Put back the qemu.conf an earlier set-up replaced (its record names the original, or "absent").
# Returns 1 when there was nothing to put back.
restore_qemu_conf() {
    [[ -s $QEMU_CONF_RECORD ]] || return 1
    local original
    original=$(head -n1 "$QEMU_CONF_RECORD")
    if [[ $original == absent ]]; then
        rm -f "$QEMU_CONF"
        say "qemu.conf: removed (there was none before host-setup)"
    elif [[ -f $original ]]; then
        cp -p "$original" "$QEMU_CONF" && rm -f "$original"
        say "qemu.conf: put back the original from $original"
    else
        say "warning: the original qemu.conf $original is missing; $QEMU_CONF left as it is"
    fi
    rm -f "$QEMU_CONF_RECORD"
    return 0
}

# Guests run as libvirt's unprivileged user: a bare host needs no qemu.conf at all. What an
# earlier ksm-lab wrote there (QEMU as root, security_driver "none") is taken out again: the
# recorded original is put back, or, with no record, our block is removed and the settings it
# commented out are restored. Returns 0 when qemu.conf changed (libvirtd must be restarted).
configure_qemu_conf() {
    if host_has_own_libvirt; then
        say "qemu.conf: this host has its own libvirt set-up; left as it is"
        return 1
    fi
    if [[ ! -f $QEMU_CONF ]] || ! grep -q "^$MARK_BEGIN_ANY" "$QEMU_CONF"; then
        say "qemu.conf: libvirt's defaults (guests as libvirt-qemu under the DAC driver)"
        return 1
    fi
    if ! restore_qemu_conf; then
        local tmp
        tmp=$(mktemp "$QEMU_CONF.XXXXXX")
        sed -e "\\|^$MARK_BEGIN_ANY |,\\|^$MARK_END\$|d" -e 's/^# (ksm-lab) //' "$QEMU_CONF" >"$tmp"
        chmod --reference="$QEMU_CONF" "$tmp"
        mv "$tmp" "$QEMU_CONF"
        say "qemu.conf: removed the block an earlier ksm-lab wrote (guests as root, no security driver)"
    fi
    return 0
}

# libvirt 9.0 asks "can QEMU's user open /dev/kvm?" with a plain access check as that user every
# time it looks up QEMU's capabilities, but probes those capabilities with CAP_DAC_OVERRIDE. With
# /dev/kvm 0600 root (no udev rule gave it to group kvm, as on this kind of machine) the probe
# finds KVM and the check does not, so every look-up throws the cached capabilities away and
# probes QEMU again, ~4 s each: a restore makes about a dozen look-ups (61 s for one guest, 113-126
# s for two at once, against 0.4 s as root). Hosts with udev have /dev/kvm in group kvm (0660 or
# 0666) and libvirt's packages put libvirt-qemu in group kvm: a bare host gets the same here.
open_kvm_to_qemu_user() {
    [[ -c $KVM_DEVICE ]] || return 0
    if runuser -u libvirt-qemu -- test -r "$KVM_DEVICE" -a -w "$KVM_DEVICE"; then
        say "$KVM_DEVICE: QEMU's user (libvirt-qemu) can open it"
        return 0
    fi
    mkdir -p "$(dirname "$KVM_RECORD")"
    if [[ ! -s $KVM_RECORD ]]; then
        local group_was=created member_was=added
        getent group kvm >/dev/null && group_was=there
        id -nG libvirt-qemu | grep -qw kvm && member_was=there
        echo "$(stat -c '%a %G' "$KVM_DEVICE") $group_was $member_was" >"$KVM_RECORD"
    fi
    getent group kvm >/dev/null || groupadd --system kvm
    id -nG libvirt-qemu | grep -qw kvm || gpasswd -a libvirt-qemu kvm >/dev/null
    chgrp kvm "$KVM_DEVICE"
    chmod 0660 "$KVM_DEVICE"
    say "$KVM_DEVICE: group kvm, mode 0660, libvirt-qemu in group kvm (what udev and libvirt's packages do)"
}

restore_kvm_device() {
    [[ -s $KVM_RECORD ]] || return 0
    local mode group group_was member_was
    read -r mode group group_was member_was <"$KVM_RECORD"
    if [[ -c $KVM_DEVICE ]]; then
        chgrp "$group" "$KVM_DEVICE"
        chmod "$mode" "$KVM_DEVICE"
    fi
    if [[ $member_was == added ]]; then gpasswd -d libvirt-qemu kvm >/dev/null || true; fi
    if [[ $group_was == created ]]; then groupdel kvm || true; fi
    rm -f "$KVM_RECORD"
    say "$KVM_DEVICE: put back to mode $mode group $group (group kvm $group_was, libvirt-qemu $member_was)"
}

have_systemd() { [[ -d /run/systemd/system ]]; }

# Close every descriptor above stderr in this (sub)shell: what a daemon started from it must not
# inherit. The list is read first: the glob itself opens /proc/<pid>/fd while it runs.
close_inherited_fds() {
    local fds=() fd
    for fd in /proc/$BASHPID/fd/*; do fds+=("${fd##*/}"); done
    for fd in "${fds[@]}"; do
        if ((fd > 2)) && [[ -e /proc/$BASHPID/fd/$fd ]]; then exec {fd}>&-; fi
    done
}

start_daemon() {  # name pidfile args...
    local name=$1 pidfile=$2
    shift 2
    local binary
    binary=$(command -v "$name") || die "$name not found"
    if have_systemd && systemctl cat "$name.service" >/dev/null 2>&1; then
        if systemctl is-active --quiet "$name.service"; then
            say "$name: running (systemd)"
        else
            systemctl start "$name.service"
            say "$name: started with systemctl"
        fi
        return 0
    fi
    if pidfile_alive "$pidfile" "$binary"; then
        say "$name: running (pid $(head -n1 "$pidfile"))"
        return 0
    fi
    rm -f "$pidfile"
    # Daemonized; its start-up messages go to a log instead of our caller's pipes. It gets no
    # descriptor but 0-2: a daemon lives on and holds what it inherits for its whole life, so
    # this script's lock, or a caller's (`flock /tmp/x.lock make demo` ran `make host`), would
    # stay held after they exit and every later flock on it would wait forever.
    (
        close_inherited_fds
        exec "$binary" -d --pid-file "$pidfile" "$@" >>"/var/log/libvirt/ksm-lab-$name.log" 2>&1
    )
    local _
    for _ in $(seq 50); do pidfile_alive "$pidfile" "$binary" && break; sleep 0.1; done
    pidfile_alive "$pidfile" "$binary" ||
        die "$name did not start; see /var/log/libvirt/ksm-lab-$name.log"
    local pid
    pid=$(head -n1 "$pidfile")
    echo "$name $pid" >>"$STATE_FILE"
    say "$name: started by hand (pid $pid, recorded in $STATE_FILE)"
}

wait_for_libvirt() {
    local _
    for _ in $(seq 60); do
        if virsh -c "$URI" version >/dev/null 2>&1; then
            say "libvirt answers at $URI: $(virsh -c "$URI" version 2>/dev/null |
                grep -E 'Running hypervisor|Using library' | sed 's/  */ /g' | paste -sd';')"
            return 0
        fi
        sleep 0.5
    done
    die "libvirt did not answer at $URI within 30 s"
}

main() {
    [[ $EUID -eq 0 ]] || die "run as root"
    if [[ ${1:-} == --stop ]]; then
        mkdir -p "$STATE_DIR"
        exec 9>"$STATE_DIR/host-setup.lock"
        flock 9
        stop_started_daemons
        restore_kvm_device
        if restore_qemu_conf; then restart_libvirtd_for_new_conf; fi
        return 0
    fi
    if [[ ${1:-} == --packages-only ]]; then
        install_packages
        return 0
    fi
    [[ $# -eq 0 ]] || die "usage: $0 [--stop | --packages-only]"
    mkdir -p "$STATE_DIR"
    # Two set-ups at once would both find libvirtd down and both start one.
    exec 9>"$STATE_DIR/host-setup.lock"
    flock 9
    install_packages
    prepare_dirs_and_user
    if configure_qemu_conf; then restart_libvirtd_for_new_conf; fi
    if ! host_has_own_libvirt; then open_kvm_to_qemu_user; fi
    start_daemon virtlogd /run/virtlogd.pid
    start_daemon libvirtd /run/libvirtd.pid
    wait_for_libvirt
}

# Sourcing the script (tests) defines the functions without running anything.
if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    main "$@"
fi
