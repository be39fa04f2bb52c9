"""Are the noise floor's and design's numbers what they claim? Seeded simulated studies through
the real functions (stats.py, studymetrics.noise_floor, design.py).

A simulated study has KSM-off trials and KSM-on settings in blocks; a block's KSM-off tps is the
lab's speed that block (times 1 + 30% sd when there is a block effect) times trial noise, and each
setting's tps is its block's KSM-off tps changed by its true effect plus a per-block difference
of sd SD_D_PCT (percent): the paired design's model, in which the block effect cancels.

1. The paired MDE (stats.paired_minimum_detectable_effect at the study's blocks, what the report
   prints for sd SD_D_PCT) is found by the study's paired test (stats.compare_pct) with power
   0.80 +- 0.03 at 3, 5 and 8 blocks, with and without a block effect.
2. The noise floor's "5% needs N (low-high) blocks" range, printed from pilot studies of 3 blocks
   x 3 settings and 2 blocks x 4 settings, contains the true number in >= 90% of pilots.
3. design on a 2-block pilot (4 settings; and 1 setting) recommends blocks and predicts the
   smallest change those blocks find; a study run at that size with that true change finds it
   with power 0.80 +- 0.05 averaged over pilots. For contrast (no target) the same pilots sized
   as if their sd were exact.

    .venv/bin/python benchmarks/stats_calibration.py [--scale X] [--seed S]
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np
import pandas as pd

from orchestrator.analysis import design, stats, studymetrics

SD_D_PCT = 4.0  # sd of a setting's per-block change vs KSM off, percent
TPS_OFF = 1000.0
BLOCK_SD = 0.30  # the lab's speed from block to block, when there is a block effect
TRIAL_CV = 0.03  # KSM-off trial noise (cancels in the pair too: the setting rides on it)
TARGET_PCT = 5.0
EFFECTS_PCT = (-2.0, -8.0, -15.0, -4.0)  # the settings' true changes (the pooled sd keeps each mean)


def block_values(
    rng: np.random.Generator, blocks: int, effects_pct: list[float], block_effect: bool, studies: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(off[study, block], on[study, setting, block]) tps. Half of a difference's variance is the
    KSM-off trial's own noise, which every setting of the block shares (their differences are
    correlated, as in a real study), half the setting's."""
    speed = np.abs(TPS_OFF * (1 + (rng.normal(0, BLOCK_SD, (studies, blocks)) if block_effect else 0.0)))
    shared = rng.normal(0, SD_D_PCT / math.sqrt(2), (studies, 1, blocks))
    own = rng.normal(0, SD_D_PCT / math.sqrt(2), (studies, len(effects_pct), blocks))
    change = np.asarray(effects_pct)[None, :, None] + own - shared
    off = speed * (1 + rng.normal(0, TRIAL_CV, (studies, blocks)))
    return off, off[:, None, :] * (1 + change / 100)


def trials_frame(off: np.ndarray, on: np.ndarray) -> pd.DataFrame:
    """One study's trials as studymetrics' trials table holds them (the columns the noise floor
    and design read): KSM off and every setting once per block."""
    rows = []
    for block, value in enumerate(off):
        rows.append({"setting": "KSM off", "ksm_off": True, "repetition": block, "tps": value, "_group": "off"})
    for s, values in enumerate(on):
        for block, value in enumerate(values):
            rows.append(
                {
                    "setting": f"pages_to_scan={s}",
                    "ksm_off": False,
                    "repetition": block,
                    "tps": value,
                    "_group": f"s{s}",
                }
            )
    frame = pd.DataFrame(rows)
    return frame.assign(
        status="ok",
        used_in_stats=True,
        _offkey="{}",
        latency_p95_ms=math.nan,
        mem_available_rise_mib=math.nan,
        trial_wall_s=60.0,
    )


def paired_test_rejects(on: np.ndarray, off: np.ndarray) -> bool:
    """The study's comparison of one setting with KSM off (per-block values): does it differ?"""
    return bool(stats.compare_pct(on, off, on, off).differs)


def mde_power(rng: np.random.Generator, blocks: int, block_effect: bool, studies: int) -> float:
    mde = float(stats.paired_minimum_detectable_effect(SD_D_PCT, blocks))
    off, on = block_values(rng, blocks, [-mde], block_effect, studies)
    return float(np.mean([paired_test_rejects(on[i, 0], off[i]) for i in range(studies)]))


def range_coverage(rng: np.random.Generator, blocks: int, settings: int, pilots: int) -> float:
    truth = stats.blocks_needed(SD_D_PCT, TARGET_PCT)
    hits = 0
    for _ in range(pilots):
        off, on = block_values(rng, blocks, list(EFFECTS_PCT[:settings]), block_effect=True)
        tps = studymetrics.noise_floor(trials_frame(off[0], on[0])).set_index("metric").loc["tps"]
        assert tps["design"] == studymetrics.PAIRED_DESIGN
        hits += tps["repetitions_for_5pct_low"] <= truth <= tps["repetitions_for_5pct_high"]
    return hits / pilots


def _achieved(rng: np.random.Generator, blocks: int, change_pct: float, studies: int) -> float:
    off, on = block_values(rng, blocks, [-change_pct], block_effect=True, studies=studies)
    return float(np.mean([paired_test_rejects(on[i, 0], off[i]) for i in range(studies)]))


def design_power(
    rng: np.random.Generator, settings: int, pilots: int, studies_per_pilot: int
) -> tuple[float, float, int, float]:
    """(achieved power averaged over pilots, median recommended blocks, pilots past the cap, and
    for contrast the achieved power of sizing on the pilot's sd as if it were exact)."""
    powers, naive, recommended, past_cap = [], [], [], 0
    for _ in range(pilots):
        off, on = block_values(rng, 2, list(EFFECTS_PCT[:settings]), block_effect=True)
        plan = design.design_from_pilot(design.pilot_from_trials(trials_frame(off[0], on[0])), TARGET_PCT)
        if not (math.isfinite(plan.blocks) and math.isfinite(plan.blocks_if_sd_as_measured)):
            past_cap += 1
            continue
        recommended.append(int(plan.blocks))
        powers.append(_achieved(rng, int(plan.blocks), plan.mde_pct, studies_per_pilot))
        as_measured = int(plan.blocks_if_sd_as_measured)
        naive_mde = float(stats.paired_minimum_detectable_effect(plan.design_sd_pct, as_measured))
        naive.append(_achieved(rng, as_measured, naive_mde, studies_per_pilot))
    return float(np.mean(powers)), float(np.median(recommended)), past_cap, float(np.mean(naive))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every number of simulated studies")
    parser.add_argument("--seed", type=int, default=18)
    args = parser.parse_args()
    started = time.monotonic()
    rng = np.random.default_rng(args.seed)
    mde_studies, pilots, design_pilots, per_pilot = (max(1, round(n * args.scale)) for n in (2000, 500, 400, 20))
    failed = 0
    simulated = 0

    def report(name: str, value: float, ok: bool, target: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {name:<66} {value:7.3f}   target {target}", flush=True)

    for blocks in (3, 5, 8):
        for block_effect in (False, True):
            power = mde_power(rng, blocks, block_effect, mde_studies)
            simulated += mde_studies
            label = "with" if block_effect else "without"
            mde = float(stats.paired_minimum_detectable_effect(SD_D_PCT, blocks))
            report(
                f"paired MDE {mde:.2f}% at {blocks} blocks, {label} block effect: power",
                power,
                abs(power - 0.80) <= 0.03,
                "0.80 +- 0.03",
            )
    for blocks, settings in ((3, 3), (2, 4)):
        coverage = range_coverage(rng, blocks, settings, pilots)
        simulated += pilots
        report(
            f"5% needs range contains the true {stats.format_repetitions(stats.blocks_needed(SD_D_PCT, TARGET_PCT))}"
            f" blocks ({blocks}-block pilots, {settings} settings)",
            coverage,
            coverage >= 0.90,
            ">= 0.90",
        )
    for settings in (4, 1):
        power, median_blocks, past_cap, naive = design_power(rng, settings, design_pilots, per_pilot)
        simulated += design_pilots * (1 + 2 * per_pilot)
        report(
            f"design on 2-block pilots ({settings} setting(s); median {median_blocks:.0f} blocks, "
            f"{past_cap} past cap): achieved power",
            power,
            abs(power - 0.80) <= 0.05,
            "0.80 +- 0.05",
        )
        print(f"info  the same pilots sized as if their sd were exact: achieved power {naive:.3f}")
    print(
        f"{simulated} simulated studies (sd of the per-block change {SD_D_PCT}%, target {TARGET_PCT}%), "
        f"seed {args.seed}, {time.monotonic() - started:.0f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
