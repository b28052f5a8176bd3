"""The reliability report: run the reliability suites at full scale in the
real kernel and print (and write to docs/reliability.md) what they did.

    .venv/bin/python tests/reliability_report.py [--reduced] [--no-write]

The figures come from the tests themselves (see tests/support/reliability.py):
each suite records what it did only after its checks passed, so a failing
check shows up as a failed test below the table, never as a good figure
(the stateful test records what it found even when it fails: its losses,
disagreements and wedged pools are counted, and the report fails).

The report fails, saying why, when a suite did not run (no test of it in
the results, or none of the figures it records), when the full counts
were asked for and the stateful test did fewer than 2,000 steps or 200
kills, or when anything was lost, disagreed or wedged.  The operations and
crash points the randomized suites reached are listed, and those no suite
reached are named as gaps.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
# The longest first: with test kernels side by side (one per CPU), one
# kernel takes the crowded host's hours while the others share the rest.
SUITES = [
    "test_stateful_world.py",
    "test_stateful.py",
    "test_reliability_random.py",
    "test_pool_crash.py",
    "test_power_cut.py",
    "test_faults.py",
    "test_hostile_input.py",
    "test_pool_concurrency.py",
    "test_pool_removal.py",
    "test_pool_growth.py",
    "test_full_pool.py",
]
# The suites that record figures, and the figure suite each records under.
RECORDS = {
    "test_reliability_random.py": "random kills",
    "test_pool_crash.py": "named crash points",
    "test_power_cut.py": "power cuts",
    "test_faults.py": "faults",
    "test_hostile_input.py": "hostile input",
    "test_pool_concurrency.py": "concurrency",
    "test_stateful.py": "stateful",
    "test_stateful_world.py": "stateful world",
}
# What the full counts must reach in the stateful tests.
STATEFUL_FULL = {"steps": 2000, "kills": 200}
FULL_COUNTS = {"stateful": "test_stateful.py", "stateful world": "test_stateful_world.py"}
ROWS = [
    ("random kills", "trials", "randomized crash trials (SIGKILL at random moments or points)"),
    ("random kills", "crash_points", "named crash points reached in those trials"),
    ("random kills", "disagreements", "disagreements between store, kernel and thin_dump"),
    ("random kills", "leaked_ids", "leaked thin ids"),
    ("named crash points", "trials", "kills at each named crash point, one by one"),
    ("power cuts", "power_cuts", "kernel power cuts (halt without sync), each reopened"),
    ("power cuts", "losses", "synced data or lineage lost across power cuts"),
    ("faults", "faults", "faults injected under data or metadata (dm-error, dm-flakey)"),
    ("faults", "losses", "store records lost to faults"),
    ("hostile input", "inputs", "hostile inputs tried (names, uuids, sizes, tables, status)"),
    ("hostile input", "crashes", "inputs that raised anything but ValueError/TypeError"),
    ("concurrency", "operations", "operations raced by processes and threads on one pool"),
    ("concurrency", "lost_records", "records lost or ids given twice in races"),
    (
        "stateful",
        "steps",
        "steps of the model-based stateful test, each checked against "
        "its model, the store, dmsetup/sysfs and thin_dump",
    ),
    (
        "stateful",
        "kills",
        "stateful steps killed (at a crash point or a random time), "
        "then reopened by Pool.open in a fresh process",
    ),
    ("stateful", "losses", "written and flushed pages that did not read back"),
    (
        "stateful",
        "disagreements",
        "stateful steps whose result matched no allowed outcome, or whose witnesses disagreed",
    ),
    (
        "random kills",
        "wedged",
        "wedged pools (suspended, or a read that never returned) after randomized crash trials",
    ),
    ("stateful", "wedged", "wedged pools in the stateful test"),
    (
        "stateful world",
        "steps",
        "steps of the stateful test of a crowded host (two pools with colliding "
        "names, other programs' devices and files) through the library, the CLI, "
        "a fresh Pool.load and the monitor service",
    ),
    (
        "stateful world",
        "kills",
        "of those, steps killed in a subprocess, settled by the next change "
        "through a random entry point (no Pool.open)",
    ),
    (
        "stateful world",
        "hostile_full",
        "times the state filesystem was filled (ENOSPC) for one to three steps, "
        "then given space back",
    ),
    (
        "stateful world",
        "hostile_read_only",
        "times it was remounted read-only for one to three steps, then made writable again",
    ),
    ("stateful world", "losses", "written pages of a crowded host that did not read back"),
    (
        "stateful world",
        "disagreements",
        "crowded-host steps whose result matched no allowed outcome, or whose witnesses disagreed",
    ),
    ("stateful world", "wedged", "wedged pools on the crowded host"),
    (
        "stateful world",
        "foreign_touched",
        "devices, loop devices or files not made by the acting pool that a step changed",
    ),
    (
        "stateful world",
        "bad_errors",
        "errors that were not libdm's (sqlite3, KeyError, an OSError without a path)",
    ),
]
BAD = (
    "disagreements",
    "leaked_ids",
    "losses",
    "crashes",
    "lost_records",
    "wedged",
    "foreign_touched",
    "bad_errors",
)
# Lists the randomized suites record: what they reached, and their gaps.
COVERAGE = ("random kills", "stateful", "stateful world")


def _counts_text(args: argparse.Namespace) -> str:
    if args.full_only:
        return (
            f"full counts for {', '.join(f'`tests/{s}`' for s in args.full_only)}, "
            f"reduced counts for the other suites"
        )
    return f"{'reduced' if args.reduced else 'full'} counts"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reduced", action="store_true", help="the everyday counts instead of the full ones"
    )
    parser.add_argument("--no-write", action="store_true", help="do not write docs/reliability.md")
    parser.add_argument(
        "--full-only",
        metavar="SUITE",
        action="append",
        default=[],
        choices=SUITES,
        help="run only these suites at the full counts, the others reduced "
        "(repeatable; for a run that must fit in less time)",
    )
    args = parser.parse_args(argv)
    if args.full_only:
        args.reduced = False
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "figures")  # one file per kernel
        os.mkdir(log)
        # One pytest run per count: the reduced suites, then the full ones.
        runs = (
            ([(s for s in SUITES if s not in args.full_only), "reduced"], [args.full_only, "full"])
            if args.full_only
            else ([SUITES, "reduced" if args.reduced else "full"],)
        )
        returncode, passed, failed = 0, 0, 0
        per_file: collections.Counter[str] = collections.Counter()
        for n, (suites, counts) in enumerate(runs):
            junit = os.path.join(tmp, f"junit{n}.xml")
            env = dict(os.environ, LIBDM_RELIABILITY_LOG=log)
            if counts == "full":
                env["LIBDM_RELIABILITY"] = "full"
            # The full counts take hours in the test kernel, not its default 30 min.
            cmd = [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                "--dm-kernel-timeout=21600",
                *[os.path.join(HERE, s) for s in suites],
            ]
            returncode = max(returncode, subprocess.run(cmd, cwd=ROOT, env=env).returncode)
            run_passed, run_failed, run_files = _junit_counts(junit)
            passed, failed = passed + run_passed, failed + run_failed
            per_file.update(run_files)
        proc: subprocess.CompletedProcess[bytes] = subprocess.CompletedProcess(cmd, returncode)
        totals: collections.defaultdict[tuple[str, str], int] = collections.defaultdict(int)
        lists: collections.defaultdict[tuple[str, str], set[str]] = collections.defaultdict(set)
        recorded: set[str] = set()
        for name in sorted(os.listdir(log)):
            with open(os.path.join(log, name)) as fh:
                for line in fh:
                    entry = json.loads(line)
                    suite = entry.pop("suite")
                    recorded.add(suite)
                    for key, value in entry.items():
                        if isinstance(value, list):
                            lists[(suite, key)].update(value)
                        else:
                            totals[(suite, key)] += value
    not_run: list[str] = []
    for suite in SUITES:
        if not per_file.get(suite[:-3]):
            not_run.append(f"`tests/{suite}` did not run (no test of it in the results)")
        elif suite in RECORDS and RECORDS[suite] not in recorded:
            not_run.append(
                f"`tests/{suite}` recorded no figures (it did not run, or failed before recording)"
            )
    for figures, suite in FULL_COUNTS.items():
        if args.reduced or figures not in recorded:
            continue
        if args.full_only and suite not in args.full_only:
            continue  # run at the reduced counts on purpose
        for key, least in STATEFUL_FULL.items():
            if totals[(figures, key)] < least:
                not_run.append(
                    f"`tests/{suite}` did {totals[(figures, key)]} {key}, "
                    f"fewer than the {least} of the full counts"
                )
    losses = sum(totals[(s, k)] for s, k, _ in ROWS if k in BAD and k != "wedged")
    wedged = sum(totals[(s, k)] for s, k, _ in ROWS if k == "wedged")
    lines = [
        "# Reliability report",
        "",
        f"Run {datetime.date.today().isoformat()} in the User-Mode Linux test kernel, "
        f"{_counts_text(args)}, by `tests/reliability_report.py`.",
        "",
        "| figure | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {text} | {totals[(suite, key)]} |" for suite, key, text in ROWS]
    lines += [
        "",
        f"Tests: {passed} passed, {failed} failed. Losses and disagreements in total: "
        f"{losses}. Wedged pools: {wedged}.",
    ]
    if not_run:
        lines += ["", "**These figures are incomplete:**", ""] + [f"* {n}" for n in not_run]
    lines += ["", "## Coverage of the randomized suites", ""]
    from libdm.thin import crash

    reached_anywhere: set[str] = set()
    for suite in COVERAGE:
        ops = sorted(lists[(suite, "operations")])
        points = sorted(lists[(suite, "crash_points_reached")])
        reached_anywhere.update(points)
        gaps = sorted(lists[(suite, "gaps")])
        lines += [
            f"* {suite}: operations {', '.join(ops) or 'none'}; crash points that fired: "
            f"{', '.join(points) or 'none'}.",
            f"  Gaps (never reached): {', '.join(gaps) or 'none'}.",
        ]
    missing = sorted(set(crash.POINTS) - reached_anywhere)
    lines += ["", f"Crash points no randomized suite reached: {', '.join(missing) or 'none'}."]
    lines += [
        "",
        "The suites: " + ", ".join(f"`tests/{s}`" for s in SUITES) + ".",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        with open(os.path.join(ROOT, "docs", "reliability.md"), "w") as fh:
            fh.write(text)
    for reason in not_run:
        print(f"reliability report: {reason}", file=sys.stderr)
    ok = proc.returncode == 0 and losses == 0 and wedged == 0 and not not_run
    return 0 if ok else 1


def _junit_counts(path: str) -> tuple[int, int, collections.Counter[str]]:
    """(passed, failed, {test module: test cases run}) from the JUnit XML."""
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return 0, 0, collections.Counter()
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        raise SystemExit(f"reliability report: no testsuite in {path}")
    total = int(suite.get("tests", 0))
    bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    per_file: collections.Counter[str] = collections.Counter()
    for case in suite.iter("testcase"):
        if case.find("skipped") is None:
            per_file[case.get("classname", "").rsplit(".", 1)[-1]] += 1
    return total - bad - skipped, bad, per_file


if __name__ == "__main__":
    sys.exit(main())
