"""The reliability report: run the reliability suites at full scale in the
real kernel and print (and write to docs/reliability.md) what they did.

    .venv/bin/python tests/reliability_report.py [--reduced] [--no-write]

The figures come from the tests themselves (see tests/reliability.py):
each suite records what it did only after its checks passed, so a failing
check shows up as a failed test below the table, never as a good figure.
"""

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
SUITES = [
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
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reduced", action="store_true",
                        help="the everyday counts instead of the full ones")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/reliability.md")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "figures.jsonl")
        junit = os.path.join(tmp, "junit.xml")
        env = dict(os.environ, LIBDM_RELIABILITY_LOG=log)
        if not args.reduced:
            env["LIBDM_RELIABILITY"] = "full"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={junit}", *[os.path.join(HERE, s) for s in SUITES]]
        proc = subprocess.run(cmd, cwd=ROOT, env=env)
        totals = collections.defaultdict(int)
        if os.path.exists(log):
            with open(log) as fh:
                for line in fh:
                    entry = json.loads(line)
                    suite = entry.pop("suite")
                    for key, value in entry.items():
                        totals[(suite, key)] += value
        passed, failed = _junit_counts(junit)
    losses = sum(totals[(s, k)] for s, k, _ in ROWS
                 if k in ("disagreements", "leaked_ids", "losses", "crashes", "lost_records"))
    lines = [
        "# Reliability report",
        "",
        f"Run {datetime.date.today().isoformat()} in the User-Mode Linux test kernel, "
        f"{'reduced' if args.reduced else 'full'} counts, by `tests/reliability_report.py`.",
        "",
        "| figure | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {text} | {totals[(suite, key)]} |" for suite, key, text in ROWS]
    lines += [
        "",
        f"Tests: {passed} passed, {failed} failed. Losses and disagreements in total: {losses}.",
        "",
        "The suites: " + ", ".join(f"`tests/{s}`" for s in SUITES) + ".",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if not args.no_write:
        with open(os.path.join(ROOT, "docs", "reliability.md"), "w") as fh:
            fh.write(text)
    return 0 if proc.returncode == 0 and losses == 0 else 1


def _junit_counts(path):
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return 0, 0
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total = int(suite.get("tests", 0))
    bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    skipped = int(suite.get("skipped", 0))
    return total - bad - skipped, bad


if __name__ == "__main__":
    sys.exit(main())
