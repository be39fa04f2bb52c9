#!/usr/bin/env bash
# Test-only Debian packages: Chromium renders the report; sysbench + MariaDB let the sysbench
# adapter run for real on the host (the guests have their own).
#
#   test-deps.sh install   install what is missing; record every package that was not there
#   test-deps.sh remove    purge exactly the recorded packages (nothing the host had before)
#
# `make test` installs them before the tests and removes them after, so a host is left with the
# packages it had (KSM_LAB_KEEP_TEST_DEPS=1 keeps them for the next run). Service starts are
# denied while installing: mariadb-server would otherwise start a MariaDB daemon on the host
# (the tests start their own, in a temporary folder, and stop it).
set -euo pipefail
exec </dev/null
export DEBIAN_FRONTEND=noninteractive LC_ALL=C

PACKAGES=(chromium sysbench mariadb-server mariadb-client)
RECORD=${KSM_LAB_TEST_DEPS_RECORD:-/var/lib/ksm-lab/test-deps-installed}  # one package a line
MYSQL_DIR_RECORD=$RECORD.mysql-datadir-created

say() { printf 'test-deps: %s\n' "$*"; }

installed_packages() {
    dpkg-query -W -f='${Status} ${Package}\n' 2>/dev/null | awk '$3 == "installed" {print $4}' | sort -u
}

finish_install() {
    if [[ $MADE_POLICY == 1 ]]; then rm -f /usr/sbin/policy-rc.d; fi
    installed_packages | comm -13 "$BEFORE" - >>"$RECORD"
    sort -u -o "$RECORD" "$RECORD"
    rm -f "$BEFORE"
}

install() {
    local missing=() p
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        say "already installed: ${PACKAGES[*]}"
        return 0
    fi
    mkdir -p "$(dirname "$RECORD")"
    # Globals, not locals: the EXIT trap below runs after this function has returned.
    BEFORE=$(mktemp)
    local had_mysql_dir=0
    installed_packages >"$BEFORE"
    [[ -e /var/lib/mysql ]] && had_mysql_dir=1
    MADE_POLICY=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # invoke-rc.d asks policy-rc.d; 101 = "action forbidden": no daemon starts during install
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d
        MADE_POLICY=1
    fi
    # However apt ends, the file that denies every service start goes, and what got installed
    # is recorded (a half-finished install is still removed by `remove`).
    trap 'finish_install' EXIT
    say "installing ${missing[*]}"
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    if [[ $had_mysql_dir == 0 && -e /var/lib/mysql ]]; then
        touch "$MYSQL_DIR_RECORD"
    fi
}

remove() {
    if [[ -n ${KSM_LAB_KEEP_TEST_DEPS:-} ]]; then
        say "KSM_LAB_KEEP_TEST_DEPS is set: test packages kept"
        return 0
    fi
    if [[ ! -s $RECORD ]]; then
        say "nothing to remove: no packages recorded in $RECORD"
        return 0
    fi
    local pkgs=() p
    while read -r p; do
        [[ -n $p ]] && dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" && pkgs+=("$p")
    done <"$RECORD"
    if [[ ${#pkgs[@]} -gt 0 ]]; then
        say "removing the ${#pkgs[@]} packages the tests installed"
        apt-get purge -y -q "${pkgs[@]}" >/dev/null
    fi
    # MariaDB's packages keep the data folder their install created; it was not the host's.
    if [[ -e $MYSQL_DIR_RECORD ]]; then
        rm -rf /var/lib/mysql
        rm -f "$MYSQL_DIR_RECORD"
    fi
    rm -f "$RECORD"
}

case ${1:-} in
    install) install ;;
    remove) remove ;;
    *) echo "usage: $0 install|remove" >&2; exit 2 ;;
esac
