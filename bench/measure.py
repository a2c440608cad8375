"""What the bench measures through a tunnel: latency, TCP throughput, small-packet rate, CPU cost,
and for an encrypted tunnel the handshake.

Host a is always the sender or pinger and b the receiver, so every tunnel
carries the same load the same way. Each load runs for a set time and stops by
itself.
"""

import json
import os
import re
import statistics

from pair import lablib

IPERF_PORT = 5201
# 10 ms apart: far from a flood, so each ping finds the tunnel idle, as sparse traffic does.
PING_INTERVAL = 0.01
# The smallest payload iperf3 takes with its own header: a packet-rate test, not a byte-rate one.
UDP_PAYLOAD = 64
# Room for iperf3's connection set-up and its closing exchange after the timed part.
IPERF_SLACK = 30
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
RTT = re.compile(r"time=([\d.]+) ms")
# Longer than REKEY_TIMEOUT (5 s): a lost initiation shows as a slow handshake, not as no answer.
FIRST_PING_WAIT = 10
GB = 1e9


def cpu_seconds(processes):
    """utime + stime of every process, from /proc/<pid>/stat, in seconds."""
    total = 0
    for proc in processes:
        with open("/proc/%d/stat" % proc.pid) as f:
            # Fields after the command name, which may itself hold spaces and ')'.
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime and stime, fields 14 and 15
    return total / CLOCK_TICKS


def ping_rtt(pair, count):
    """Median and p99 round trip over the tunnel, in ms, and how many pings went unanswered."""
    result = pair.a.run("ping", "-n", "-c", str(count), "-i", str(PING_INTERVAL), "-W", "1",
                        pair.b.tunnel_address, check=False, timeout=2 * count * PING_INTERVAL + lablib.PATIENCE)
    rtts = sorted(float(ms) for ms in RTT.findall(result.stdout))
    if not rtts:
        raise AssertionError("no ping answered: %s" % (result.stdout + result.stderr)[-500:])
    return {"median_ms": statistics.median(rtts), "p99_ms": percentile(rtts, 99),
            "sent": count, "lost": count - len(rtts)}


def handshake(pair, renew, rounds, settled_ms):
    """A handshake as a user waits for it, timed from outside (the daemon logs none): the RTT
    of the first ping through a freshly made tunnel, which waits for the handshake, minus the
    tunnel's median RTT (settled_ms), over rounds fresh tunnels; in ms."""
    if settled_ms is None:
        raise AssertionError("no median RTT to subtract")
    firsts = []
    for _ in range(rounds):
        renew(pair)
        result = pair.a.run("ping", "-n", "-c", "1", "-W", str(FIRST_PING_WAIT),
                            pair.b.tunnel_address, check=False,
                            timeout=FIRST_PING_WAIT + lablib.PATIENCE)
        firsts += [float(ms) for ms in RTT.findall(result.stdout)]
    if not firsts:
        raise AssertionError("no first ping answered: %s" % (result.stdout + result.stderr)[-500:])
    extra = sorted(ms - settled_ms for ms in firsts)
    return {"median_ms": statistics.median(extra), "min_ms": extra[0], "max_ms": extra[-1],
            "first_ping_ms": firsts, "rounds": rounds, "unanswered": rounds - len(firsts)}


def percentile(ordered, p):
    """Nearest-rank percentile of an ordered list."""
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def tcp_throughput(pair, processes, seconds):
    """One TCP stream a -> b for seconds, and the tunnel processes' CPU seconds per GB carried."""
    before = cpu_seconds(processes)
    report = iperf(pair, seconds)
    used = cpu_seconds(processes) - before
    received = report["end"]["sum_received"]
    return {
        "mbit_s": received["bits_per_second"] / 1e6,
        "bytes": received["bytes"],
        "retransmits": report["end"]["sum_sent"].get("retransmits"),
        "cpu_seconds": used if processes else None,
        "cpu_s_per_gb": used / (received["bytes"] / GB) if processes and received["bytes"] else None,
    }


def udp_small_packets(pair, seconds):
    """64-byte UDP a -> b as fast as iperf3 sends: packets per second b received, and loss."""
    report = iperf(pair, seconds, "-u", "-l", str(UDP_PAYLOAD), "-b", "0")
    sent, received = report["end"]["sum_sent"], report["end"]["sum_received"]
    # The receiver's packets count every sequence number it saw, lost ones included.
    arrived = received["packets"] - received["lost_packets"]
    return {
        "sent_pps": sent["packets"] / sent["seconds"],
        "received_pps": arrived / received["seconds"],
        "loss_pct": received["lost_percent"],
    }


def iperf(pair, seconds, *options):
    """Run one iperf3 test from a to b's tunnel address and return its JSON report."""
    server = pair.lab.spawn(pair.b.ns, ["iperf3", "-s", "-1", "-B", pair.b.tunnel_address,
                                        "-p", str(IPERF_PORT)], "b-iperf3.log")
    lablib.wait_until(lambda: listening(pair.b, server), "iperf3 listening on b")
    result = pair.a.run("iperf3", "-c", pair.b.tunnel_address, "-p", str(IPERF_PORT),
                        "-t", str(seconds), "-J", *options, check=False,
                        timeout=seconds + IPERF_SLACK)
    report = json.loads(result.stdout) if result.stdout.strip() else {}
    if result.returncode != 0 or "error" in report:
        raise AssertionError("iperf3 %s: %s" % (" ".join(options) or "TCP",
                                                report.get("error") or result.stderr.strip()))
    return report


def listening(host, server):
    if server.poll() is not None:
        raise AssertionError("iperf3 server exited %d" % server.returncode)
    out = host.run("ss", "-Hltn", "sport = :%d" % IPERF_PORT).stdout
    return bool(out.strip())
