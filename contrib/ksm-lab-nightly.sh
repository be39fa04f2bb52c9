#!/usr/bin/env bash
# ksm-lab nightly job: run PLAN into a dated study folder under RESULTS_ROOT, compare it with the
# last good study of the same plan on this host, and update the history page.
#
#   ksm-lab-nightly.sh PLAN [RESULTS_ROOT]
#
# - study folder: RESULTS_ROOT/<study name>/<UTC date-time>/<study name> (sweep names the last
#   level after the plan's [study] name; the dated level keeps every night apart)
# - an interrupted night is finished, not restarted: when the newest study of this plan on this
#   host is unfinished and was started with the same plan text, it is resumed (sweep --resume)
# - never two at once: a second run while one is going exits 75 at once (flock on
#   RESULTS_ROOT/.ksm-lab-nightly.lock; the kernel drops the lock when the holder dies); when the
#   holder started more than KSM_LAB_STUCK_S (default a day) ago it is stuck: exit 2, not 75; so
#   is the KSM_LAB_MAX_SKIPPED-th (default 3rd) run in a row that finds the lock held
# - then `compare LAST_GOOD NEW --history RESULTS_ROOT` (page: NEW/report/compare.html, JSON:
#   NEW/report/compare.json): NEW is judged against the band of the earlier nights of this plan and
#   host (the night is the level; Holm across the headline family), then `confirm NEW`: a headline
#   change outside the band is re-measured in a short confirmation study (NEW/confirm/, bounded by
#   the plan's [nightly] confirm_max_s) and is a regression only when it is still there
#   (NEW/report/confirm.json says "confirmed" or "not confirmed");
#   then `history RESULTS_ROOT` (RESULTS_ROOT/history.html); `prune --keep N` when KSM_LAB_KEEP=N
#
# Exit status: 0 no regression; 1 a confirmed regression or some trials failed; 2 an error (or a stuck run)
# (bad plan, sweep or compare refused or failed); 75 another nightly run is still going;
# 128 + signal (130 SIGINT, 143 SIGTERM) the sweep was interrupted (the next run resumes it).
#
# Environment:
#   KSM_LAB_RESULTS_ROOT   results root when not given as $2 (default /var/lib/ksm-lab/results)
#   KSM_LAB                the ksm-lab command (default: `ksm-lab` if on PATH, else `python3 -m orchestrator`)
#   KSM_LAB_PYTHON         a Python >= 3.11, to read the plan's study name (default python3)
#   KSM_LAB_NIGHTLY_SWEEP  the sweep command (default: "$KSM_LAB sweep"); tests point it at a fake
#   KSM_LAB_COMPARE_ARGS   extra compare and confirm arguments (thresholds), e.g. "--max-tps-drop-pct 3"
#   KSM_LAB_STUCK_S        a run holding the lock longer than this is stuck (default 86400)
#   KSM_LAB_MAX_SKIPPED    this many runs in a row finding the lock held exit 2, not 75 (default 3)
#   KSM_LAB_NO_CONFIRM     set to 1: judge only, no confirmation study (the compare verdict stands)
#   KSM_LAB_KEEP           keep this many studies per plan and host (prune); unset: keep all

set -u -o pipefail

log() { printf '%s ksm-lab-nightly: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }
die() { log "error: $*"; exit 2; }

[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 PLAN [RESULTS_ROOT]" >&2; exit 2; }
PLAN=$1
ROOT=${2:-${KSM_LAB_RESULTS_ROOT:-/var/lib/ksm-lab/results}}
PY=${KSM_LAB_PYTHON:-python3}
if [ -z "${KSM_LAB:-}" ]; then
    if command -v ksm-lab >/dev/null 2>&1; then KSM_LAB=ksm-lab; else KSM_LAB="$PY -m orchestrator"; fi
fi
SWEEP=${KSM_LAB_NIGHTLY_SWEEP:-"$KSM_LAB sweep"}
read -r -a KSM <<<"$KSM_LAB"
read -r -a SWEEP_CMD <<<"$SWEEP"
read -r -a COMPARE_ARGS <<<"${KSM_LAB_COMPARE_ARGS:-}"

[ -f "$PLAN" ] || die "no plan file $PLAN"
mkdir -p "$ROOT" || die "cannot create results root $ROOT"

exec 9>>"$ROOT/.ksm-lab-nightly.lock" || die "cannot open the lock file in $ROOT"
STARTED="$ROOT/.ksm-lab-nightly.started"  # "<epoch s> <pid>" of the run holding the lock
SKIPS="$ROOT/.ksm-lab-nightly.skipped"  # how many runs in a row found the lock held
if ! flock -n 9; then
    read -r SINCE HOLDER <"$STARTED" 2>/dev/null || SINCE=""
    AGE=$(( $(date +%s) - ${SINCE:-$(date +%s)} ))
    if [ -n "$SINCE" ] && [ "$AGE" -gt "${KSM_LAB_STUCK_S:-86400}" ]; then
        # a run older than a night is stuck, not busy: say so loudly instead of skipping silently
        log "error: the run holding $ROOT/.ksm-lab-nightly.lock (pid ${HOLDER:-?}) started $((AGE / 3600)) h ago: stuck? (not killed)"
        exit 2
    fi
    # Skipping is fine once; night after night it means no night is measured: count the skips
    # in a row (a run that gets the lock resets the count) and fail loudly at the limit.
    SKIPPED=$(( $(cat "$SKIPS" 2>/dev/null || echo 0) + 1 ))
    echo "$SKIPPED" >"$SKIPS" 2>/dev/null || true
    if [ "$SKIPPED" -ge "${KSM_LAB_MAX_SKIPPED:-3}" ]; then
        log "error: $SKIPPED nights in a row skipped: the run holding $ROOT/.ksm-lab-nightly.lock (pid ${HOLDER:-?}) has not finished since"
        exit 2
    fi
    log "another nightly run still holds $ROOT/.ksm-lab-nightly.lock: not starting a second one (skipped $SKIPPED in a row)"
    exit 75
fi
printf '%s %s\n' "$(date +%s)" "$$" >"$STARTED"
rm -f "$SKIPS"

NAME=$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["study"]["name"])' "$PLAN") \
    || die "cannot read [study] name from $PLAN"
HOST=$(uname -n)  # what host.json records as hostname
log "plan $PLAN (study $NAME), host $HOST, results $ROOT"

# newest study of this plan on this host: "path<TAB>name<TAB>host<TAB>state"
NEWEST=$("${KSM[@]}" studies "$ROOT" --plan "$NAME" --host "$HOST" --latest) || NEWEST=""
NEWEST_PATH=$(printf '%s' "$NEWEST" | cut -f1)
NEWEST_STATE=$(printf '%s' "$NEWEST" | cut -f4)

if [ "$NEWEST_STATE" = unfinished ] && cmp -s "$PLAN" "$NEWEST_PATH/plan.toml"; then
    RESULTS_DIR=$(dirname "$NEWEST_PATH")
    log "resuming the unfinished study $NEWEST_PATH"
    "${SWEEP_CMD[@]}" "$PLAN" --results "$RESULTS_DIR" --resume
    SWEEP_RC=$?
else
    if [ "$NEWEST_STATE" = unfinished ]; then
        log "the unfinished study $NEWEST_PATH was started with another plan text: starting a new one"
    fi
    RESULTS_DIR="$ROOT/$NAME/$(date -u +%Y%m%dT%H%M%SZ)"
    log "new study under $RESULTS_DIR"
    "${SWEEP_CMD[@]}" "$PLAN" --results "$RESULTS_DIR"
    SWEEP_RC=$?
fi
STUDY="$RESULTS_DIR/$NAME"
log "sweep exited $SWEEP_RC"
if [ "$SWEEP_RC" -ge 128 ]; then  # 128 + signal (130 SIGINT, 143 SIGTERM): knobs restored, data kept
    log "interrupted: the next run resumes $STUDY"
    exit "$SWEEP_RC"
fi
RC=$SWEEP_RC  # 1: some trials failed
JUDGE=1
# A failed sweep (2 a clear error, e.g. a full disk; 3 a bug, traceback in sweep.log) is not
# judged, but history and prune still run: they do not depend on tonight, and a full disk is
# exactly when prune must run.
case $SWEEP_RC in
    0 | 1) ;;
    *) log "error: sweep failed (exit $SWEEP_RC): tonight is not compared"; RC=2; JUDGE=0 ;;
esac
if [ "$JUDGE" = 1 ] && [ ! -f "$STUDY/study.json" ]; then
    log "error: sweep left no study at $STUDY"; RC=2; JUDGE=0
fi

BASELINE=""
if [ "$JUDGE" = 1 ]; then
    BASELINE=$("${KSM[@]}" studies "$ROOT" --plan "$NAME" --host "$HOST" --state good --latest --exclude "$STUDY" --paths) \
        || BASELINE=""
fi
if [ "$JUDGE" = 0 ]; then
    :
elif [ -n "$BASELINE" ]; then
    log "compare $BASELINE -> $STUDY, judged against the earlier nights under $ROOT"
    "${KSM[@]}" compare "$BASELINE" "$STUDY" --history "$ROOT" --json-file "$STUDY/report/compare.json" \
        "${COMPARE_ARGS[@]}"
    COMPARE_RC=$?
    case $COMPARE_RC in
        0 | 1)
            CONFIRM_FLAGS=()
            [ "${KSM_LAB_NO_CONFIRM:-0}" = 1 ] && CONFIRM_FLAGS=(--no-confirm)
            "${KSM[@]}" confirm "$STUDY" --history "$ROOT" "${CONFIRM_FLAGS[@]}" "${COMPARE_ARGS[@]}"
            CONFIRM_RC=$?
            case $CONFIRM_RC in
                0) log "no confirmed regression (see $STUDY/report/compare.html)" ;;
                1) if [ "${KSM_LAB_NO_CONFIRM:-0}" = 1 ]; then
                       log "REGRESSION (not re-measured: KSM_LAB_NO_CONFIRM=1; see $STUDY/report/compare.html)"
                   else
                       log "REGRESSION confirmed (see $STUDY/report/compare.html, $STUDY/report/confirm.json)"
                   fi
                   RC=1 ;;
                *) log "confirm refused or failed (exit $CONFIRM_RC)"; RC=2 ;;
            esac ;;
        *) log "compare refused or failed (exit $COMPARE_RC)"; RC=2 ;;
    esac
else
    log "no earlier good study of $NAME on $HOST: nothing to compare with (first night)"
fi

"${KSM[@]}" history "$ROOT" || { log "history failed"; RC=2; }
if [ -n "${KSM_LAB_KEEP:-}" ]; then
    "${KSM[@]}" prune "$ROOT" --keep "$KSM_LAB_KEEP" || { log "prune failed"; RC=2; }
fi
log "done (exit $RC)"
exit "$RC"
