"""MQSPN's dev MNER F1 against the BIO tagger's, seed by seed, from ``mner_real.py``'s result files: the
tables that bench/RESULTS.md §6 judges issue 12's GMNER target (MQSPN ≥ the tagger + 1.0) by.

    python bench/mner_gap.py bench/results/mner_real_gmner_full_e10_tagger_s*_*.json \\
        bench/results/mner_real_gmner_full_e10_softmax_u12_null0.216_s*_*.json

Give every file at once, in any order:

- **training files** (``mner_real.py`` without ``--checkpoint``): each holds a tagger run (``--variants none`` or
  the default baseline) or an MQSPN run or both, for one ``--seed``. Each seed needs exactly one tagger run and one
  MQSPN run; all MQSPN runs must share one setting (everything but the seed) and all runs the training budget.
- **fold files** (``mner_real.py --checkpoint DIR --calibration --cross_fit_folds ...``): the cross-fitting study
  of a kept MQSPN checkpoint. A fold file is matched to the training run whose kept checkpoint it scores (the same
  dev F1 without a threshold, the same chosen threshold and F1 there); one that matches no run is an error.

Per seed, MQSPN's number is its kept checkpoint (``examples/train.py``'s rule: the epoch with the best dev GMNER
F1) under each **estimate**: without a threshold; at the one threshold chosen on all of dev (in-sample, optimistic
by construction); cross-fitted over 2 folds by position (what train.py reports); and, where every seed has a fold
file, each fold count by position and as the mean over the file's seeded shuffles. The tagger's number is one of
four **references**: its last epoch; its epoch at MQSPN's kept epoch; its epoch kept by the same rule as MQSPN's;
its best epoch by dev MNER F1 (chosen on the split it is scored on, like MQSPN's in-sample threshold).
Where every tagger run holds its own
threshold calibration (``mner_real.py`` writes one since commit ede898b: a threshold on the entity confidence, the
least confident word's tag probability), a fifth reference is the tagger's kept epoch under the *same estimate* as
MQSPN's: both models then get a threshold chosen on dev. The gap table gives every estimate against every reference:
the gap per seed, the mean, the standard deviation and how many seeds reach ``--target``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import format_table  # noqa: E402

TAGGER = "BIO baseline"
# Arguments that the tagger and MQSPN runs must share: the data and the training budget.
BUDGET_ARGS = ("datasets", "epochs", "batch_size", "learning_rate", "new_layers_learning_rate", "warmup_ratio",
               "freeze_text_epochs", "max_train", "max_dev", "ema_decay")
# Arguments that every MQSPN run must share besides the budget: the MQSPN setting.
MQSPN_ARGS = ("variants", "num_queries", "num_fusion_layers", "model_config")
REFERENCES = ("last epoch", "at MQSPN's kept epoch", "kept by the same rule", "best epoch (in-sample)")
# With the tagger's own threshold (mner_real.py calibrates it since ede898b): its kept epoch under MQSPN's estimate.
SAME_ESTIMATE = "its own threshold, same estimate"
F1_TOLERANCE = 1e-9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="JSON", help="mner_real.py result files: training runs and fold studies")
    parser.add_argument("--target", type=float, default=1.0, help="the gap in F1 points a seed must reach (default 1.0)")
    parser.add_argument("--output", default=None, help="also write the tables as JSON here")
    return parser.parse_args(argv)


def _load(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except FileNotFoundError:
        raise SystemExit(f"{path}: no such file")
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not JSON ({error})")
    if not isinstance(record, dict) or record.get("benchmark") != "mner_real":
        raise SystemExit(f"{path}: not a mner_real.py result file")
    return record


def _mner_f1(epoch: Dict[str, Any]) -> float:
    return 100.0 * epoch["mner"]["f1"]


def _same_checkpoint(study: Dict[str, Any], calibration: Dict[str, Any]) -> bool:
    """Whether a fold study (``--checkpoint --calibration``) scored the checkpoint a training run kept: the same dev
    F1 without a threshold, the same chosen threshold and the same F1 there (the decoding is deterministic)."""
    return (study.get("chosen") == calibration.get("chosen")
            and abs(study["default_f1"] - calibration["default_f1"]) <= F1_TOLERANCE
            and abs(study["in_sample_f1"] - calibration["chosen_f1"]) <= F1_TOLERANCE)


def _setting(record: Dict[str, Any], names: Sequence[str]) -> Dict[str, Any]:
    args = record.get("args", {})
    setting = {name: args.get(name) for name in names}
    setting["data"] = Path(str(args.get("data_dir", ""))).name  # the release, wherever it was mounted
    return setting


def _check_same(kind: str, first: Tuple[str, Dict[str, Any]], path: str, setting: Dict[str, Any]) -> None:
    first_path, first_setting = first
    differ = sorted(key for key in setting if setting[key] != first_setting.get(key))
    if differ:
        raise SystemExit(f"{path}: {kind} with a different setting from {first_path} ({', '.join(differ)}); compare runs "
                         "that differ only in --seed")


def collect(paths: Sequence[str]) -> Tuple[Dict[int, Dict[str, Any]], Dict[int, Dict[str, Any]], List[Tuple[str, Dict[str, Any]]]]:
    """The tagger and MQSPN runs by seed, and the fold studies (path, calibration of the one threshold)."""
    taggers: Dict[int, Dict[str, Any]] = {}
    mqspns: Dict[int, Dict[str, Any]] = {}
    folds: List[Tuple[str, Dict[str, Any]]] = []
    budget: Optional[Tuple[str, Dict[str, Any]]] = None
    mqspn_setting: Optional[Tuple[str, Dict[str, Any]]] = None
    for path in paths:
        record = _load(path)
        if "calibration" in record:
            datasets = record["calibration"]
            if len(datasets) != 1:
                raise SystemExit(f"{path}: a fold study of {len(datasets)} datasets; give one dataset per file")
            (calibration,) = datasets.values()
            if "one threshold" not in calibration or "study" not in calibration["one threshold"]:
                raise SystemExit(f"{path}: no cross-fitting study; run mner_real.py --checkpoint DIR --calibration "
                                 "--cross_fit_folds 2,5,10 --cross_fit_seeds 0,...,9")
            folds.append((path, calibration["one threshold"]))
            continue
        if "runs" not in record:
            raise SystemExit(f"{path}: neither training runs nor a fold study")
        setting = _setting(record, BUDGET_ARGS)
        if budget is None:
            budget = (path, setting)
        _check_same("the training budget", budget, path, setting)
        seed = record["args"]["seed"]
        if len(record["args"].get("datasets", [])) != 1:
            raise SystemExit(f"{path}: runs of several datasets; give one dataset per file")
        if len([run for run in record["runs"] if run["model"] != TAGGER]) > 1:
            raise SystemExit(f"{path}: several MQSPN variants; give one variant per file")
        for run in record["runs"]:
            if run["model"] == TAGGER:
                table = taggers
            else:
                table = mqspns
                if "threshold_calibration" not in run["best"]:
                    raise SystemExit(f"{path}: the MQSPN run has no threshold calibration of its kept checkpoint")
                this = _setting(record, MQSPN_ARGS)
                if mqspn_setting is None:
                    mqspn_setting = (path, this)
                _check_same("MQSPN", mqspn_setting, path, this)
            if seed in table:
                raise SystemExit(f"{path}: a second {run['model']} run with --seed {seed} (the first: {table[seed]['path']})")
            table[seed] = {"path": path, "run": run}
    unpaired = sorted(set(taggers) ^ set(mqspns))
    if unpaired:
        missing = [f"seed {seed}: no {'MQSPN' if seed in taggers else 'tagger'} run" for seed in unpaired]
        raise SystemExit("every seed needs one tagger run and one MQSPN run; " + "; ".join(missing))
    if not taggers:
        raise SystemExit("no training runs among the files")
    return taggers, mqspns, folds


def estimates(run: Dict[str, Any], study: Optional[Sequence[Dict[str, Any]]] = None) -> Dict[str, float]:
    """A training run's kept epoch under each estimate (F1 in %): without a threshold, at the threshold chosen on
    all of dev, cross-fitted over 2 folds by position, and for each fold count of ``study`` (``cross_fitted_study``
    rows: ``{"folds", "seed", "f1"}``) by position and as the mean over its shuffles."""
    calibration = run["best"]["threshold_calibration"]
    out = {"no threshold": _mner_f1(run["epochs"][run["best_epoch"]]),
           "in-sample": 100.0 * calibration["chosen_f1"],
           "2 folds, position": 100.0 * calibration["cross_fitted_f1"]}
    by_estimate: Dict[str, List[float]] = {}
    for row in study or ():
        if row["f1"] is None:
            continue
        name = f"{row['folds']} folds, " + ("position" if row["seed"] is None else "mean of shuffles")
        by_estimate.setdefault(name, []).append(100.0 * row["f1"])
    for name, values in sorted(by_estimate.items(), key=lambda item: (int(item[0].split()[0]), "shuffles" in item[0])):
        out.pop(name, None)  # 2 folds by position: the run's own number, recomputed by the study
        out[name] = statistics.fmean(values)
    return out


def estimates_by_seed(mqspns: Dict[int, Dict[str, Any]], folds: List[Tuple[str, Dict[str, Any]]]) -> Dict[int, Dict[str, float]]:
    """Each seed's MQSPN number (%) under each estimate, with the fold study matched to its checkpoint."""
    studies: Dict[int, Tuple[str, Dict[str, Any]]] = {}
    for path, study in folds:
        candidates = [seed for seed, entry in mqspns.items() if _same_checkpoint(study, entry["run"]["best"]["threshold_calibration"])]
        if len(candidates) != 1:
            what = "no" if not candidates else "more than one"
            raise SystemExit(f"{path}: scores {what} kept checkpoint of the MQSPN runs given (matched by the dev F1 without a "
                             "threshold, the chosen threshold and its F1); give the fold study of each run's own checkpoint")
        seed = candidates[0]
        if seed in studies:
            raise SystemExit(f"{path}: a second fold study of seed {seed}'s checkpoint (the first: {studies[seed][0]})")
        studies[seed] = (path, study)
    return {seed: estimates(entry["run"], studies[seed][1]["study"] if seed in studies else None)
            for seed, entry in mqspns.items()}


def summarize(paths: Sequence[str], target: float = 1.0) -> Dict[str, Any]:
    """``{"seeds": [per-seed numbers], "gaps": [one row per estimate and reference], "missing": [...]}``."""
    taggers, mqspns, folds = collect(paths)
    mqspn_estimates = estimates_by_seed(mqspns, folds)
    seeds = sorted(taggers)
    per_seed = []
    references: Dict[int, Dict[str, float]] = {}
    tagger_estimates: Dict[int, Dict[str, float]] = {}
    for seed in seeds:
        tagger = taggers[seed]["run"]
        mqspn = mqspns[seed]["run"]
        if len(tagger["epochs"]) != len(mqspn["epochs"]):
            raise SystemExit(f"seed {seed}: the tagger ran {len(tagger['epochs'])} epochs ({taggers[seed]['path']}), "
                             f"MQSPN {len(mqspn['epochs'])} ({mqspns[seed]['path']})")
        curve = [_mner_f1(epoch) for epoch in tagger["epochs"]]
        kept = mqspn["best_epoch"]
        references[seed] = {"last epoch": curve[-1], "at MQSPN's kept epoch": curve[kept],
                            "kept by the same rule": curve[tagger["best_epoch"]], "best epoch (in-sample)": max(curve)}
        if "threshold_calibration" in tagger["best"]:
            tagger_estimates[seed] = estimates(tagger, tagger["best"]["threshold_calibration"].get("cross_fitted_study"))
        per_seed.append({"seed": seed, "mqspn_kept_epoch": kept + 1, "tagger_kept_epoch": tagger["best_epoch"] + 1,
                         "tagger": references[seed], "mqspn": mqspn_estimates[seed],
                         "tagger_own_threshold": tagger_estimates.get(seed)})
    names = list(mqspn_estimates[seeds[0]])
    for seed in seeds:
        names += [name for name in mqspn_estimates[seed] if name not in names]
    complete = [name for name in names if all(name in mqspn_estimates[seed] for seed in seeds)]
    missing = [f"{name}: no fold file for seed(s) {', '.join(str(s) for s in seeds if name not in mqspn_estimates[s])}"
               for name in names if name not in complete]
    uncalibrated = [seed for seed in seeds if seed not in tagger_estimates]
    if uncalibrated:
        missing.append(f"{SAME_ESTIMATE}: the tagger run of seed(s) {', '.join(map(str, uncalibrated))} has no threshold "
                       "calibration (mner_real.py writes one since commit ede898b)")
    gaps = []
    for name in complete:
        rows = [(reference, [references[seed][reference] for seed in seeds]) for reference in REFERENCES]
        if not uncalibrated:
            if all(name in tagger_estimates[seed] for seed in seeds):
                rows.append((SAME_ESTIMATE, [tagger_estimates[seed][name] for seed in seeds]))
            else:
                missing.append(f"{SAME_ESTIMATE}: no {name} for the tagger of every seed")
        for reference, tagger_values in rows:
            values = [mqspn_estimates[seed][name] - value for seed, value in zip(seeds, tagger_values)]
            gaps.append({"estimate": name, "reference": reference, "gaps": dict(zip(seeds, values)),
                         "mean": statistics.fmean(values),
                         "sd": statistics.stdev(values) if len(values) > 1 else math.nan,
                         "at_target": sum(value >= target for value in values)})
    return {"target": target, "seeds": per_seed, "gaps": gaps, "missing": missing}


def print_summary(summary: Dict[str, Any]) -> None:
    per_seed = summary["seeds"]
    names = list(per_seed[0]["mqspn"])
    columns = ["seed", "tagger: last", "tagger: at MQSPN's epoch", "tagger: kept (epoch)", "tagger: best", "MQSPN kept epoch"] + names
    rows = [[row["seed"], row["tagger"]["last epoch"], row["tagger"]["at MQSPN's kept epoch"],
             f"{row['tagger']['kept by the same rule']:.2f} ({row['tagger_kept_epoch']})", row["tagger"]["best epoch (in-sample)"],
             row["mqspn_kept_epoch"]]
            + [row["mqspn"].get(name) for name in names] for row in per_seed]
    print("Dev MNER F1 in %: the tagger's references and MQSPN's kept checkpoint under each estimate")
    print(format_table(columns, rows))
    print()
    if all(row["tagger_own_threshold"] for row in per_seed):
        own = list(per_seed[0]["tagger_own_threshold"])
        print("Dev MNER F1 in %: the tagger's kept epoch with its own threshold on the entity confidence, under each estimate")
        print(format_table(["seed"] + own, [[row["seed"]] + [row["tagger_own_threshold"].get(name) for name in own] for row in per_seed]))
        print()
    seeds = [row["seed"] for row in per_seed]
    print(f"Gap MQSPN - tagger in F1 points (seeds {', '.join(map(str, seeds))}); target {summary['target']:+.2f}")
    print(format_table(["estimate", "tagger reference", "gaps", "mean", "sd", f"seeds >= {summary['target']:+.2f}"],
                       [[row["estimate"], row["reference"], ", ".join(f"{row['gaps'][s]:+.2f}" for s in seeds),
                         f"{row['mean']:+.2f}", row["sd"], f"{row['at_target']} of {len(seeds)}"] for row in summary["gaps"]]))
    for line in summary["missing"]:
        print(f"left out: {line}", file=sys.stderr)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    summary = summarize(args.files, args.target)
    print_summary(summary)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    return summary


if __name__ == "__main__":
    main()
