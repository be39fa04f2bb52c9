#!/bin/bash
# Re-captures the real sysbench/MariaDB outputs in this folder. Run as root on Debian 12 with
# sysbench, mariadb-server and mariadb-client installed. Starts its own mariadbd in a temp
# datadir (no networking), and stops it by PID and deletes the datadir on exit.
set -u
out="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d /tmp/ksmlab-mariadb.XXXXXX)"
sock="$tmp/sock"

stop_db() {
    if [ -s "$tmp/pid" ]; then
        pid="$(cat "$tmp/pid")"
        kill "$pid" 2>/dev/null
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -rf "$tmp"
}
trap stop_db EXIT

mariadb-install-db --datadir="$tmp/data" --auth-root-authentication-method=socket \
    --skip-test-db --user=root >"$tmp/install.log" 2>&1 || { cat "$tmp/install.log"; exit 1; }
mariadbd --datadir="$tmp/data" --socket="$sock" --skip-networking --pid-file="$tmp/pid" \
    --user=root --log-error="$tmp/error.log" &
for _ in $(seq 1 60); do [ -S "$sock" ] && break; sleep 0.5; done
[ -S "$sock" ] || { echo "mariadbd did not start"; cat "$tmp/error.log"; exit 1; }

common=(--db-driver=mysql --mysql-socket="$sock" --mysql-user=root --mysql-db=sbtest
        --tables=2 --table-size=1000 --rand-seed=42)

run() {  # run NAME CMD...: stdout to NAME.stdout, stderr to NAME.stderr, exit status to NAME.rc
    local name="$1"; shift
    "$@" >"$out/$name.stdout" 2>"$out/$name.stderr"
    echo $? >"$out/$name.rc"
}

run create_database mariadb --socket="$sock" -u root -e 'CREATE DATABASE IF NOT EXISTS sbtest'
run prepare sysbench oltp_read_write "${common[@]}" prepare
run run_1thread sysbench oltp_read_write "${common[@]}" --threads=1 --time=10 --report-interval=1 run
run run_2threads sysbench oltp_read_write "${common[@]}" --threads=2 --time=10 --report-interval=1 run
run run_rate sysbench oltp_read_write "${common[@]}" --threads=2 --time=10 --report-interval=1 \
    --rate=20 run
run run_histogram sysbench oltp_point_select "${common[@]}" --threads=1 --time=3 \
    --report-interval=1 --percentile=99 --histogram=on run
run buffer_pool mariadb --socket="$sock" -u root --batch --skip-column-names -e \
    "SHOW GLOBAL VARIABLES LIKE 'innodb_buffer_pool_size'; SHOW GLOBAL STATUS WHERE Variable_name IN ('Innodb_buffer_pool_pages_data', 'Innodb_buffer_pool_bytes_data')"
run cleanup sysbench oltp_read_write "${common[@]}" cleanup
run fatal_wrong_socket sysbench oltp_read_write --db-driver=mysql \
    --mysql-socket="$tmp/no-such.sock" --mysql-user=root --mysql-db=sbtest --tables=2 \
    --table-size=1000 --threads=1 --time=2 --report-interval=1 run
run help sysbench --help
run help_oltp_read_write sysbench oltp_read_write help
cat /proc/meminfo >"$out/meminfo.txt"
{ sysbench --version; mariadbd --version; uname -r; } >"$out/versions.txt"
