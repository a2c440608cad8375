"""TCP through a plain tunnel under random loss on the underlay: this tree's daemon (TCP
super-packets in chunks between two daemons with offloads) against the daemon of an
earlier commit (per-segment datagrams), interleaved in one run.

    sudo python3 bench/loss.py --against COMMIT [--seconds S] [--runs N]

Each host drops that share of the datagrams it receives on the data port, at random
(nftables numgen), both ways. Prints Mbit/s and TCP retransmits for each loss rate,
daemon and run. Everything it makes is removed when it ends.
"""

import argparse
import os
import subprocess

import measure
import tunnels
from pair import Pair, lablib

HERE = os.path.dirname(os.path.abspath(__file__))
LOSSES = (0, 0.1, 1)


def measure_tcp(daemon, percent, seconds):
    with lablib.Lab(show_logs=False) as lab:
        if daemon:
            with open(lab.script("udpProxyServer.py"), "w") as f:
                f.write(daemon)
        pair = Pair(lab)
        processes = tunnels.start_udpproxy(pair)
        lablib.wait_until(lambda: pair.a.ping(pair.b.tunnel_address, count=1), "ping through")
        for host in pair.hosts():
            lablib.lose(host, percent, tunnels.DATA_PORT)
        tcp = measure.tcp_throughput(pair, processes, seconds)
        listed = pair.a.tunnels()["udp0"]
        return tcp["mbit_s"], tcp["retransmits"], listed.get("superPackets", "segments")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", required=True, help="the commit whose daemon sends segments")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    before = subprocess.run(["git", "-C", HERE, "show", "%s:udpProxyServer.py" % args.against],
                            capture_output=True, text=True, check=True).stdout
    print("loss %  daemon                 Mbit/s  retransmits  superPackets")
    for percent in LOSSES:
        for run in range(args.runs):
            for label, daemon in (("this tree", None), (args.against, before)):
                mbit_s, retransmits, how = measure_tcp(daemon, percent, args.seconds)
                print("%-6s  %-21s  %6.0f  %11s  %s" % (percent, label, mbit_s, retransmits, how),
                      flush=True)


if __name__ == "__main__":
    main()
