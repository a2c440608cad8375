"""The bench's results for people: a table on stdout, a JSON file, a bar chart."""

import collections
import json

Metric = collections.namedtuple("Metric", "test field heading unit scale format better")
# What each tunnel row shows, from the figures measure.py gives.
METRICS = (
    Metric("tcp", "mbit_s", "TCP", "Mbit/s", 1, "%.0f", "higher"),
    Metric("udp64", "received_pps", "UDP 64 B", "kpps", 1e-3, "%.1f", "higher"),
    Metric("udp64", "loss_pct", "UDP loss", "%", 1, "%.1f", "lower"),
    Metric("ping", "median_ms", "RTT median", "ms", 1, "%.3f", "lower"),
    Metric("ping", "p99_ms", "RTT p99", "ms", 1, "%.3f", "lower"),
    Metric("tcp", "cpu_s_per_gb", "CPU", "s/GB", 1, "%.2f", "lower"),
)
# The handshake is timed for encrypted tunnels alone: in its own lines, not a column.
HANDSHAKE = Metric("handshake", "median_ms", "Handshake", "ms", 1, "%.3f", "lower")
TESTS = ("ping", "tcp", "udp64", "handshake")
# The references every figure is also given against: a userspace tunnel in C and the kernel.
REFERENCES = (("fastd", "fastd (null)"), ("vxlan", "VXLAN (kernel)"))
# One colour per tunnel, the same order as the table; matplotlib's default cycle.
COLOURS = ("#1f77b4", "#aec7e8", "#d62728", "#9467bd", "#ff7f0e", "#2ca02c", "#7f7f7f")
CHART_WIDTH, CHART_HEIGHT, CHART_DPI = 12, 6.5, 100
# Loss is often 0 for a reference, and a ratio to 0 says nothing.
CHARTED = tuple(m for m in METRICS if m.field != "loss_pct")

# A goal is a figure of one tunnel held against another's times factor (or plus a margin,
# when plus is set), or against the bound itself when there is no reference.
Goal = collections.namedtuple("Goal", "text kind test field higher reference bound plus",
                              defaults=(None,))
OURS, NO_OFFLOAD = "udpProxyServer", "udpProxyServer --no-offload"
ENCRYPTED, WIREGUARD_GO, FASTD = "udpProxyServer encrypted", "wireguard-go", "fastd (null)"
VXLAN = "VXLAN (kernel)"
# The scale part's one goal: how long a daemon holding every tunnel takes to stop.
STOP_GOAL_TEXT, STOP_GOAL_SECONDS = "stop with 2,000 tunnels under 5 s", 5
# The issue tracker's goals: plain tunnels between new daemons, then encrypted tunnels.
GOALS = (
    Goal("TCP at least 4x fastd (null)'s", OURS, "tcp", "mbit_s", True, FASTD, 4),
    Goal("TCP at least 0.4x VXLAN's", OURS, "tcp", "mbit_s", True, VXLAN, 0.4),
    Goal("RTT median at most fastd (null)'s + 0.1 ms", OURS, "ping", "median_ms", False, FASTD,
         None, 0.1),
    Goal("64-byte UDP at least 1.2x fastd (null)'s", OURS, "udp64", "received_pps", True, FASTD,
         1.2),
    Goal("--no-offload TCP at least 1.2x fastd (null)'s", NO_OFFLOAD, "tcp", "mbit_s", True, FASTD,
         1.2),
    Goal("--no-offload 64-byte UDP at least 1.2x fastd (null)'s", NO_OFFLOAD, "udp64",
         "received_pps", True, FASTD, 1.2),
    Goal("encrypted TCP at least 2.5x wireguard-go's", ENCRYPTED, "tcp", "mbit_s", True,
         WIREGUARD_GO, 2.5),
    Goal("encrypted TCP at least 1.5x fastd (null)'s", ENCRYPTED, "tcp", "mbit_s", True,
         FASTD, 1.5),
    Goal("encrypted 64-byte UDP at least 1.2x wireguard-go's", ENCRYPTED, "udp64", "received_pps",
         True, WIREGUARD_GO, 1.2),
    Goal("encrypted RTT median at most wireguard-go's", ENCRYPTED, "ping", "median_ms", False,
         WIREGUARD_GO, 1),
    Goal("handshake under 5 ms", ENCRYPTED, "handshake", "median_ms", False, None, 5),
)


def figure(row, metric):
    """The row's figure for metric in the table's unit, or None when it is missing."""
    value = row.get(metric.test, {}).get(metric.field)
    return None if value is None else value * metric.scale


def is_kernel_cpu(row, metric):
    """The kernel's tunnels have no process whose CPU time could be counted."""
    return metric.field == "cpu_s_per_gb" and not row.get("userspace")


def add_ratios(results):
    """Put each row's figures over the references' into the row, as ratios[reference][field]."""
    by_kind = {row["kind"]: row for row in results["tunnels"]}
    for row in results["tunnels"]:
        if "skipped" in row:
            continue
        row["ratios"] = {}
        for key, kind in REFERENCES:
            reference = by_kind.get(kind, {})
            row["ratios"][key] = {m.field: ratio(figure(row, m), figure(reference, m)) for m in METRICS}


def ratio(value, reference):
    return value / reference if value is not None and reference else None


# --- The table ----------------------------------------------------------------


def print_tables(results, say):
    if results["tunnels"]:
        print_tunnels(results, say)
        print_handshakes(results, say)
        print_goals(results, say)
    if "scale" in results:
        if results["tunnels"]:
            say()
        print_scale(results["scale"], say)


def print_tunnels(results, say):
    settings = results["settings"]
    say("Tunnels at %s over a veth pair (MTU 1500); iperf3 %d s a test, %d pings"
        % (mtu_text(results), settings["seconds"], settings["pings"]))
    say("udpProxyServer.py %s" % daemon_label(results["environment"]))
    say("Each cell: the figure (its ratio to fastd, its ratio to VXLAN)")
    header = ["tunnel"] + ["%s %s" % (m.heading, m.unit) for m in METRICS]
    rows = [header] + [cells(row) for row in results["tunnels"] if "skipped" not in row]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        say("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip())
    for row in results["tunnels"]:
        if "skipped" in row:
            say("%s  skipped: %s" % (row["kind"].ljust(widths[0]), row["skipped"]))
    for row in results["tunnels"]:
        for test in TESTS:
            if "error" in row.get(test, {}):
                say("%s: %s failed: %s" % (row["kind"], test, row[test]["error"]))
        for log, lines in row.get("logs", {}).items():
            say("  %s:" % log)
            for line in lines:
                say("    " + line)


def mtu_text(results):
    """MTU 1400, and the rows at another MTU named: MTU 1400 (1420: a, b)."""
    usual = results["settings"]["tunnel_mtu"]
    kinds = collections.defaultdict(list)
    for row in results["tunnels"]:
        if "skipped" not in row:
            kinds[row.get("mtu", usual)].append(row["kind"])
    base = usual if usual in kinds or not kinds else next(iter(kinds))
    others = "; ".join("%d: %s" % (mtu, ", ".join(names)) for mtu, names in kinds.items() if mtu != base)
    return "MTU %d%s" % (base, " (%s)" % others if others else "")


def print_handshakes(results, say):
    rows = [row for row in results["tunnels"] if "median_ms" in row.get("handshake", {})]
    if not rows:
        return
    say()
    say("Handshake: the first ping through a fresh tunnel less the tunnel's median RTT")
    width = max(len(row["kind"]) for row in rows)
    for row in rows:
        shake = row["handshake"]
        say("%s  median %.3f ms (%.3f to %.3f) over %d fresh tunnels%s"
            % (row["kind"].ljust(width), shake["median_ms"], shake["min_ms"], shake["max_ms"],
               shake["rounds"], ", %d unanswered" % shake["unanswered"] if shake["unanswered"] else ""))


def print_goals(results, say):
    """Each goal of the issue tracker whose tunnel this run measured against its figures:
    met, short, or not measured (its reference skipped); and the stop time at scale."""
    by_kind = {row["kind"]: row for row in results["tunnels"] if "skipped" not in row}
    lines = [(goal.text,) + judge(goal, by_kind) for goal in GOALS if goal.kind in by_kind]
    if results.get("scale", {}).get("requested"):
        lines.append((STOP_GOAL_TEXT,) + judge_stop(results["scale"]))
    if not lines:
        return
    say()
    say("Goals, against this run's figures:")
    width = max(len(line[0]) for line in lines)
    figures = max(len(line[1]) for line in lines)
    for text, figures_text, verdict in lines:
        say("  %s  %s  %s" % (text.ljust(width), figures_text.ljust(figures), verdict))


def judge(goal, by_kind):
    """(the figures, the verdict) of goal in this run."""
    value = by_kind[goal.kind].get(goal.test, {}).get(goal.field)
    if value is None:
        return "-", "not measured"
    if goal.reference is None:
        met = value > goal.bound if goal.higher else value < goal.bound
        return in_unit(goal, value), "met" if met else "not met"
    reference = by_kind.get(goal.reference, {}).get(goal.test, {}).get(goal.field)
    if not reference:
        return "-", "not measured (%s)" % goal.reference
    if goal.plus is not None:
        above = value - reference
        return ("%+.3f ms (%s against %s)" % (above, in_unit(goal, value), in_unit(goal, reference)),
                "met" if above <= goal.plus else "not met")
    share = value / reference
    met = share >= goal.bound if goal.higher else share <= goal.bound
    return ("%.2fx (%s against %s)" % (share, in_unit(goal, value), in_unit(goal, reference)),
            "met" if met else "not met")


def judge_stop(scale):
    seconds = scale.get("stop_seconds")
    if seconds is None:
        return "still running after the wait", "not met"
    return ("%.1f s with %d tunnels" % (seconds, scale["added"]),
            "met" if seconds < STOP_GOAL_SECONDS and scale["added"] >= 2000 else "not met")


def in_unit(goal, value):
    """A figure of goal's as the table gives it: 41.5 kpps, not 41500."""
    metric = next(m for m in METRICS + (HANDSHAKE,) if (m.test, m.field) == (goal.test, goal.field))
    return "%s %s" % (metric.format % (value * metric.scale), metric.unit)


def cells(row):
    out = [row["kind"]]
    for metric in METRICS:
        value = figure(row, metric)
        if is_kernel_cpu(row, metric):
            out.append("kernel")
        elif value is None:
            out.append("error" if "error" in row.get(metric.test, {}) else "-")
        else:
            ratios = [short(row["ratios"][key][metric.field]) for key, _ in REFERENCES]
            out.append("%s (%s, %s)" % (metric.format % value, *ratios))
    return out


def short(value):
    if value is None:
        return "-"
    return "%.2f" % value if value < 10 else "%.0f" % value


def print_scale(scale, say):
    if "error" in scale:
        say("Scale: failed: %s" % scale["error"])
        return
    say("Scale: one daemon, %d tunnels asked for, %d to a control message"
        % (scale["requested"], scale["batch"]))
    say("  added        %d (%d TUN devices) in %.2f s: %.0f tunnels/s, slowest message %.2f s"
        % (scale["added"], scale["devices"], scale["add_seconds"], scale["tunnels_per_second"] or 0,
           scale["slowest_batch_seconds"]))
    if scale["first_error"]:
        say("  refused      %d messages; first error: %s" % (scale["failed_batches"], scale["first_error"]))
    per_tunnel = scale["rss_per_tunnel_kib"]
    say("  memory       RSS %.1f MiB before, %.1f MiB after: %s KiB per tunnel"
        % (scale["rss_before_kib"] / 1024, scale["rss_after_kib"] / 1024,
           "-" if per_tunnel is None else "%.1f" % per_tunnel))
    say("  idle CPU     %.2f s in %d s: %.2f %% of a core"
        % (scale["idle_cpu_seconds"], scale["idle_seconds"], scale["idle_cpu_pct"]))
    listing = scale["list"]
    say("  -o list      %s" % ("all %d tunnels in %.2f s" % (listing["tunnels"], listing["seconds"])
                               if listing["ok"] else "failed: %s" % listing["error"]))
    stop = scale["stop_seconds"]
    say("  SIGTERM      %s" % ("exited after %.1f s" % stop if stop is not None
                               else "still running after the wait; killed"))


# --- JSON and the chart -------------------------------------------------------


def write_json(results, path):
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")


def draw_chart(results, path):
    """Bars of each figure over fastd's, on a log scale, each labelled with the figure itself."""
    import matplotlib
    matplotlib.use("Agg")  # no screen: draw straight to the file
    import matplotlib.pyplot as plt

    # A tunnel keeps its colour, the one of its place in the table, when another is skipped.
    colours = {row["kind"]: COLOURS[n % len(COLOURS)] for n, row in enumerate(results["tunnels"])}
    rows = [row for row in results["tunnels"] if "skipped" not in row]
    fig, ax = plt.subplots(figsize=(CHART_WIDTH, CHART_HEIGHT), dpi=CHART_DPI)
    width = 0.8 / len(rows)
    for n, row in enumerate(rows):
        for x, metric in enumerate(CHARTED):
            draw_bar(ax, row, metric, x - 0.4 + n * width, width, colours[row["kind"]], x == 0)
    draw_axes(ax, rows)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=len(rows), fontsize=9,
              frameon=False)
    ax.set_title(chart_title(results), fontsize=10)
    skipped = ["%s skipped: %s" % (row["kind"], row["skipped"])
               for row in results["tunnels"] if "skipped" in row]
    if skipped:
        fig.text(0.01, 0.01, "\n".join(skipped), fontsize=8, va="bottom")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_bar(ax, row, metric, left, width, colour, in_legend):
    share = row["ratios"]["fastd"][metric.field]
    middle = left + width / 2
    if share is None:
        text = "kernel" if is_kernel_cpu(row, metric) else "n/a"
        ax.text(middle, 1, text, ha="center", va="bottom", rotation=90, fontsize=8)
        return
    ax.bar(left, share, width, align="edge", color=colour, label=row["kind"] if in_legend else None)
    ax.text(middle, share * 1.04, metric.format % figure(row, metric), ha="center", va="bottom",
            rotation=90, fontsize=8)


def draw_axes(ax, rows):
    """A log scale in powers of two around 1 (fastd), with room for the labels above the bars."""
    ax.set_yscale("log")
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xticks(range(len(CHARTED)))
    ax.set_xticklabels(["%s (%s)\n%s is better" % (m.heading, m.unit, m.better) for m in CHARTED])
    shares = [r["ratios"]["fastd"][m.field] for r in rows for m in CHARTED]
    shares = [share for share in shares if share] or [1]
    bottom, top = min(0.5, min(shares) / 1.5), max(2, max(shares)) * 3
    ax.set_ylim(bottom, top)
    ticks = [2.0 ** k for k in range(-8, 9) if bottom <= 2.0 ** k <= top]
    ax.set_yticks(ticks)
    ax.set_yticklabels([tick_label(tick) for tick in ticks])
    ax.minorticks_off()
    ax.set_ylabel("ratio to fastd (null), log scale")


def daemon_label(environment):
    revision = environment.get("daemon") or {}
    if not revision.get("commit"):
        return "from no known commit"
    return "at commit %s%s" % (revision["commit"], ", with changes not committed" if revision["modified"] else "")


def tick_label(ratio):
    """2x, 1x, 1/2x: a fraction reads better than 0.015625."""
    return "%g\u00d7" % ratio if ratio >= 1 else "1/%g\u00d7" % (1 / ratio)


def chart_title(results):
    env, settings = results["environment"], results["settings"]
    return ("Point-to-point tunnels at %s over a veth pair; bars: ratio to fastd, labels: the figures\n"
            "%s, %d CPUs, Linux %s, %s; iperf3 %d s a test; udpProxyServer.py %s"
            % (mtu_text(results), env["cpu"], env["nproc"], env["kernel"], env["date"][:10],
               settings["seconds"], daemon_label(env)))
