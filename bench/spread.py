"""Several runs of make bench side by side: each figure of the table as its runs' values,
and each goal as its verdict in each run, so a figure is given with its spread.

    bench/spread.py DIR [DIR ...]    (each DIR holds one run's results.json, from --out)
"""

import json
import os
import sys

import report


def load(folders):
    runs = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    return runs


def print_spread(runs, say=print):
    say("%d runs: %s" % (len(runs), ", ".join(
        "%s (%s)" % (run["environment"]["date"], report.daemon_label(run["environment"]))
        for run in runs)))
    kinds = [row["kind"] for row in runs[0]["tunnels"]]
    for metric in report.METRICS:
        say()
        say("%s (%s), run by run:" % (metric.heading, metric.unit))
        for kind in kinds:
            values = [figure_of(run, kind, metric) for run in runs]
            known = [v for v in values if v is not None]
            spread = ("  (%s to %s)" % (metric.format % min(known), metric.format % max(known))
                      if known else "")
            say("  %-28s %s%s" % (kind, "  ".join("-" if v is None else metric.format % v
                                                 for v in values), spread))
    say()
    say("Goals, run by run:")
    for goal in report.GOALS:
        verdicts = []
        for run in runs:
            by_kind = {row["kind"]: row for row in run["tunnels"] if "skipped" not in row}
            if goal.kind in by_kind:
                figures, verdict = report.judge(goal, by_kind)
                verdicts.append("%s: %s" % (verdict, figures.split(" (")[0]))
        if verdicts:
            say("  %s" % goal.text)
            for verdict in verdicts:
                say("      %s" % verdict)
    stops = [run["scale"] for run in runs if run.get("scale", {}).get("requested")]
    if stops:
        say("  %s" % report.STOP_GOAL_TEXT)
        for scale in stops:
            figures, verdict = report.judge_stop(scale)
            say("      %s: %s" % (verdict, figures))


def figure_of(run, kind, metric):
    row = next((r for r in run["tunnels"] if r["kind"] == kind), None)
    return None if row is None else report.figure(row, metric)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print_spread(load(sys.argv[1:]))
