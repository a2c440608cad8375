"""make bench: udpProxyServer against wireguard-go, fastd, socat and the kernel's VXLAN, then at scale.

Every tunnel gets two fresh test hosts in network namespaces joined by one veth
pair (MTU 1500) and the same link at MTU 1400 inside (1420 for the encrypted
ones); each is measured the same way in the same run: ping RTT, one iperf3 TCP
stream with the tunnel processes' CPU per GB, and 64-byte UDP packets per
second; an encrypted one also its handshake. Then one daemon takes 2,000
tunnels; an encrypted tunnel carries TCP under handshake floods (bench/hostile.py);
and one daemon holds 1,000 encrypted tunnels to dead peers. Prints the tables and
the project's goals against them, writes bench/results.json and bench/results.png.
Run as root; everything it makes is removed when it ends, even on ^C or SIGTERM.
"""

import argparse
import datetime
import os
import signal
import subprocess
import sys

import hostile
import measure
import report
import scale
import tunnels
from pair import Pair, lablib

HERE = os.path.dirname(os.path.abspath(__file__))
# Every length can be cut for a quick run, from the environment (make bench BENCH_SECONDS=2) or a flag.
# iperf3's own default length: long enough for TCP to leave slow start.
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
# 1,000 pings make the p99 the 10th worst, not one scheduling hiccup of a shared machine.
PINGS = int(os.environ.get("BENCH_PINGS", "1000"))
# A large mesh: one tunnel per peer, 2,000 peers.
SCALE_TUNNELS = int(os.environ.get("BENCH_TUNNELS", "2000"))
# Fresh encrypted tunnels whose first ping is timed: a median and a spread, in seconds of renewals.
HANDSHAKES = int(os.environ.get("BENCH_HANDSHAKES", "10"))
# Long enough for timers, if the daemon had any, to fire many times.
IDLE_SECONDS = int(os.environ.get("BENCH_IDLE_SECONDS", "10"))
SCALE = "scale"
# Encrypted TCP under a handshake flood; encrypted tunnels to dead peers at rest.
FLOOD, IDLE = "flood", "idle"
# What --only can pick: a tunnel of the comparison, the scale part, or a hostile one.
PARTS = tuple(kind.label for kind in tunnels.KINDS) + (SCALE, FLOOD, IDLE)
# Lines kept from each process's log when a tunnel fails: the error and what led to it.
LOG_LINES = 5


def say(line=""):
    print(line, flush=True)


def measure_kind(kind, args):
    """One tunnel on fresh hosts: its figures, or why it was skipped."""
    row = {"kind": kind.label, "mtu": kind.mtu}
    with lablib.Lab(show_logs=False) as lab:
        try:
            pair = Pair(lab)
            processes = kind.start(pair)
            lablib.wait_until(lambda: pair.a.ping(pair.b.tunnel_address, count=1),
                              "ping through %s" % kind.label)
        except tunnels.Skipped as e:
            row["skipped"] = str(e)
            return row
        except Exception as e:
            row["skipped"] = "set-up failed: %s" % tunnels.last_line(e)
            row["logs"] = log_tails(lab)
            return row
        row["userspace"] = bool(processes)
        row["ping"] = attempt(measure.ping_rtt, pair, args.pings)
        row["tcp"] = attempt(measure.tcp_throughput, pair, processes, args.seconds)
        row["udp64"] = attempt(measure.udp_small_packets, pair, args.seconds)
        if kind.renew:  # last: it remakes the tunnel the other tests ran through
            row["handshake"] = attempt(measure.handshake, pair, kind.renew, args.handshakes,
                                       row["ping"].get("median_ms"))
        if any("error" in row.get(test, {}) for test in report.TESTS):
            row["logs"] = log_tails(lab)
    return row


def log_tails(lab):
    """The last lines each process of the lab wrote: what a failed row needs to be understood."""
    tails = {}
    for proc in lab.processes:
        with open(proc.log_path, errors="replace") as f:
            tails[os.path.basename(proc.log_path)] = f.read().splitlines()[-LOG_LINES:]
    return tails


def attempt(measurement, *args):
    """A measurement's figures, or its error: one failed test does not lose the others."""
    try:
        return measurement(*args)
    except Exception as e:
        return {"error": tunnels.last_line(e)}


def environment():
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "kernel": os.uname().release,
        "cpu": cpu_model(),
        "nproc": len(os.sched_getaffinity(0)),
        # Anything else running shares the two cores: this tells a reader whether it did.
        "loadavg_at_start": os.getloadavg(),
        "python": sys.version.split()[0],
        "versions": {tool: tool_version(tool, flag) for tool, flag in
                     (("iperf3", "--version"), ("fastd", "--version"), ("socat", "-V"),
                      ("wireguard-go", "--version"), ("wg", "--version"))},
        "daemon": daemon_revision(),
    }


def daemon_revision():
    """The commit the measured daemon comes from, and whether its file differed from it."""
    def git(*argv):
        return subprocess.run(["git", "-C", lablib.REPO, *argv], capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--", "udpProxyServer.py").stdout.strip()
    except OSError:  # no git here: the figures still stand
        return None
    return {"commit": head.stdout.strip() or None, "modified": bool(changed)}


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def tool_version(tool, flag):
    try:
        out = subprocess.run([tool, flag], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return None
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    # socat says who wrote it before its version; iperf3 says "iperf 3.12" first.
    return next((line for line in lines if "version" in line.lower()), lines[0] if lines else None)


def write_results(results, folder):
    os.makedirs(folder, exist_ok=True)  # --out may name a folder not made yet
    written = [os.path.join(folder, "results.json")]
    report.write_json(results, written[0])
    if any("skipped" not in row for row in results["tunnels"]):
        written.append(os.path.join(folder, "results.png"))
        report.draw_chart(results, written[1])
    say()
    say("wrote %s" % " and ".join(written))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=SECONDS,
                        help="length of each iperf3 test (BENCH_SECONDS, default %(default)s)")
    parser.add_argument("--pings", type=int, default=PINGS,
                        help="pings for the RTT figures (BENCH_PINGS, default %(default)s)")
    parser.add_argument("--handshakes", type=int, default=HANDSHAKES,
                        help="fresh encrypted tunnels whose first ping is timed (BENCH_HANDSHAKES, "
                             "default %(default)s)")
    parser.add_argument("--tunnels", type=int, default=SCALE_TUNNELS,
                        help="tunnels added at scale (BENCH_TUNNELS, default %(default)s)")
    parser.add_argument("--idle-seconds", type=int, default=IDLE_SECONDS,
                        help="how long the idle CPU is watched (BENCH_IDLE_SECONDS, default %(default)s)")
    parser.add_argument("--only", action="append", choices=PARTS, metavar="PART",
                        help="run only this part (repeatable): %s" % ", ".join(map(repr, PARTS)))
    parser.add_argument("--out", default=HERE, help="folder for results.json and results.png")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if not lablib.is_root():
        say("bench: must run as root (it creates network namespaces): sudo make bench")
        return 1
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # tear down on kill as on ^C
    results = {"environment": environment(),
               "settings": {"seconds": args.seconds, "pings": args.pings,
                            "tunnel_mtu": tunnels.TUNNEL_MTU, "encrypted_mtu": tunnels.ENCRYPTED_MTU,
                            "udp_payload": measure.UDP_PAYLOAD, "handshakes": args.handshakes},
               "tunnels": []}
    parts = args.only or PARTS
    for kind in tunnels.KINDS:
        if kind.label in parts:
            say("measuring %s ..." % kind.label)
            results["tunnels"].append(measure_kind(kind, args))
    if SCALE in parts:
        say("adding %d tunnels to one daemon ..." % args.tunnels)
        results["scale"] = attempt(scale.run, args.tunnels, args.idle_seconds)
    if FLOOD in parts:
        say("encrypted TCP under handshake floods ...")
        results.setdefault("hostile", {})["flood"] = attempt(hostile.flood_tcp, args.seconds)
    if IDLE in parts:
        say("%d encrypted tunnels to dead peers, %d s and more ..."
            % (hostile.DEAD_PEERS, hostile.GIVE_UP_SECONDS))
        results.setdefault("hostile", {})["idle"] = attempt(hostile.idle_dead_peers)
    report.add_ratios(results)
    say()
    report.print_tables(results, say)
    if "hostile" in results:
        say()
        hostile.print_hostile(results["hostile"], say)
    write_results(results, args.out)
    # The bench is of our daemon: when it could not even be set up, the run failed.
    ours = (tunnels.OURS, tunnels.OURS_ENCRYPTED)
    return 1 if any(row["kind"] in ours and "skipped" in row for row in results["tunnels"]) else 0


if __name__ == "__main__":
    sys.exit(main())
