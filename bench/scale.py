"""One daemon, thousands of idle tunnels: how fast they are added, what they cost at rest.

The tunnels are only configured: their remotes (198.19.0.0/16) are routed
nowhere in the daemon's namespace, which holds nothing but lo, so whatever the
kernel might send into a device goes no further than the daemon's sendto.
"""

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time

from measure import cpu_seconds
from pair import lablib

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "send_batches.py")
# 50 tunnels a message: the request and its reply (about 40 bytes a tunnel) fit one datagram easily.
BATCH = 50
FIRST_REMOTE = ipaddress.IPv4Address("198.19.0.1")
TUNNEL_SPACE = ipaddress.IPv4Network("10.64.0.0/16")
TUNNEL_MTU = 1400
# Creating 50 devices takes well under a second; a minute means the daemon is stuck.
REPLY_TIMEOUT = 60
# Each part of a list is one reply datagram; give each time but not a minute.
LIST_TIMEOUT = 5
# SIGTERM deletes the devices together, 2,000 in about 2 s; one by one (without pyroute2)
# they take 40 s.
STOP_PATIENCE = 120


def tunnel_entry(index):
    """Tunnel t<index>: the first host address of the index-th /30 of 10.64.0.0/16."""
    block = TUNNEL_SPACE.network_address + 4 * index
    return {"name": "t%d" % index, "tunnelIP": str(block + 1), "netmask": "255.255.255.252",
            "mtu": TUNNEL_MTU, "remoteServer": str(FIRST_REMOTE + index)}


def add_requests(count):
    return [{"op": "add", "tunnel": [tunnel_entry(i) for i in range(start, min(start + BATCH, count))]}
            for start in range(0, count, BATCH)]


def rss_kib(proc):
    with open("/proc/%d/status" % proc.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % proc.pid)


def send(host, requests, timeout):
    result = host.run(sys.executable, "-I", HELPER, "5001", str(timeout),
                      input=json.dumps(requests), timeout=timeout * len(requests) + lablib.PATIENCE)
    return json.loads(result.stdout)


def run(count, idle_seconds):
    """Add count tunnels to one daemon and measure it; returns the figures as a dict."""
    with lablib.Lab(show_logs=False) as lab:
        host = lablib.Host(lab, "scale", lab.namespace("scale"), None)
        daemon = host.start_daemon()
        figures = {"requested": count, "batch": BATCH, "rss_before_kib": rss_kib(daemon)}
        figures.update(add_all(host, count))
        figures["rss_after_kib"] = rss_kib(daemon)
        added = figures["added"]
        grown = figures["rss_after_kib"] - figures["rss_before_kib"]
        figures["rss_per_tunnel_kib"] = grown / added if added else None
        figures["devices"] = count_devices(host)
        figures.update(idle_cpu(daemon, idle_seconds))
        figures["list"] = list_reply(host)
        figures["stop_seconds"] = stop(host)
        return figures


def add_all(host, count):
    answers = send(host, add_requests(count), REPLY_TIMEOUT)
    added, errors = 0, []
    for answer in answers:
        reply = answer["reply"]
        if reply is None:
            errors.append("no reply within %d s" % REPLY_TIMEOUT)
            continue
        added += sum(1 for result in reply.get("results", []) if result["ok"])
        if not reply["ok"]:
            errors.append(reply["error"])
    seconds = sum(answer["seconds"] for answer in answers)
    return {"added": added, "add_seconds": seconds,
            "tunnels_per_second": added / seconds if seconds else None,
            "slowest_batch_seconds": max(answer["seconds"] for answer in answers),
            "first_error": errors[0] if errors else None, "failed_batches": len(errors)}


def count_devices(host):
    return len(host.run("ip", "-o", "link", "show", "type", "tun").stdout.splitlines())


def idle_cpu(daemon, seconds):
    before = cpu_seconds([daemon])
    time.sleep(seconds)
    used = cpu_seconds([daemon]) - before
    return {"idle_seconds": seconds, "idle_cpu_seconds": used, "idle_cpu_pct": 100 * used / seconds}


def list_reply(host):
    """-o list as a user runs it: the control script fetches every part of the list."""
    started = time.monotonic()
    result = host.control("127.0.0.1", "-o", "list", "--json", "--timeout", str(LIST_TIMEOUT),
                          check=False)
    seconds = time.monotonic() - started
    if result.returncode != 0:
        return {"ok": False, "error": (result.stdout + result.stderr).strip()[-200:]}
    return {"ok": True, "tunnels": len(json.loads(result.stdout)["tunnels"]),
            "seconds": round(seconds, 2)}


def stop(host):
    """Seconds from SIGTERM until the daemon has closed every tunnel and exited."""
    started = time.monotonic()
    daemon, host.daemon = host.daemon, None
    daemon.send_signal(signal.SIGTERM)
    try:
        daemon.wait(STOP_PATIENCE)
    except subprocess.TimeoutExpired:
        return None  # the lab kills it on close
    return time.monotonic() - started
