"""Test hosts in network namespaces, joined by a switch, running the real scripts.

A Lab owns everything it makes: namespaces (unique per process and lab),
processes, and a work folder holding lone copies of the two scripts, so every
run also proves each script works when copied alone to a host. close() tears it
all down, whatever happened before.
"""

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("udpProxyServer.py", "udpProxyServerControl.py")
HELPERS = os.path.dirname(os.path.abspath(__file__))
UNDERLAY = "198.18.0.%d"
UNDERLAY_PREFIX = 24
# How long to wait for a process to come up or go away; never asserted on.
PATIENCE = 20
# Runs the script named after it as __main__ with the modules listed here not installed: their
# import fails, as on a host that lacks them.
WITHOUT_MODULES = ("import runpy, sys; sys.modules.update(dict.fromkeys(%r)); del sys.argv[0];"
                   " runpy.run_path(sys.argv[0], run_name='__main__')")

_labs = itertools.count(1)


def is_root():
    return os.geteuid() == 0


class Lab:
    def __init__(self, log=None, show_logs=True):
        self.show_logs = show_logs
        self.prefix = "ups%d-%d" % (os.getpid(), next(_labs))
        self.log = log or (lambda line: None)
        self.namespaces = []
        self.processes = []
        self.workdir = tempfile.mkdtemp(prefix=self.prefix + "-")
        for script in SCRIPTS:
            shutil.copy(os.path.join(REPO, script), self.workdir)
        self.switch = None
        self.hosts = {}
        self.closing = []  # what close() calls first

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def namespace(self, role):
        name = "%s-%s" % (self.prefix, role)
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def host(self, name, index):
        """A host on the underlay switch at 198.18.0.<index>, with a LAN 192.168.<index>.0/24."""
        if self.switch is None:
            self.switch = self.namespace("switch")
            sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        host = Host(self, name, self.namespace(name), UNDERLAY % index)
        port = "p%d" % index
        sh("ip", "-n", host.ns, "link", "add", "eth0", "type", "veth",
           "peer", "name", port, "netns", self.switch)
        sh("ip", "-n", self.switch, "link", "set", port, "master", "br0", "up")
        host.ip("addr", "add", "%s/%d" % (host.address, UNDERLAY_PREFIX), "dev", "eth0")
        host.ip("link", "set", "eth0", "up")
        # This kernel has no dummy driver: an empty bridge carries the LAN address.
        host.lan = "192.168.%d.1" % index
        host.ip("link", "add", "lan0", "type", "bridge")
        host.ip("addr", "add", host.lan + "/24", "dev", "lan0")
        host.ip("link", "set", "lan0", "up")
        self.hosts[name] = host
        return host

    def spawn(self, ns, argv, logname, env=None):
        """Start argv in namespace ns, its output going to a log file of the lab."""
        path = os.path.join(self.workdir, logname)
        with open(path, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **env) if env else None)
        proc.log_path = path
        self.processes.append(proc)
        return proc

    def script(self, name):
        return os.path.join(self.workdir, name)

    def close(self):
        for close in self.closing:
            close()
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(PATIENCE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for proc in self.processes if self.show_logs else ():
            print("--- %s (exit %s)" % (proc.log_path, proc.returncode))
            with open(proc.log_path, errors="replace") as f:
                print(f.read()[-5000:])
        for ns in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)
        self.namespaces.clear()
        self.processes.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


class Host:
    def __init__(self, lab, name, ns, address):
        self.lab = lab
        self.name = name
        self.ns = ns
        self.address = address
        self.lan = None
        self.daemon = None

    def run(self, *argv, check=True, timeout=60, input=None):
        """Run argv in this host's namespace and wait for it."""
        result = subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True,
                                text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise AssertionError("%s on %s exited %d: %s%s" % (
                " ".join(argv), self.name, result.returncode, result.stdout, result.stderr))
        return result

    def ip(self, *argv):
        sh("ip", "-n", self.ns, *argv)

    def start_daemon(self, *args, python=sys.executable, wait=True, env=None, without=()):
        """Run the daemon from its lone copy, as a user would; on a host without the
        modules named in without, if any."""
        self.lab.log("%s# udpProxyServer.py %s" % (self.name, " ".join(args)))
        hiding = ("-c", WITHOUT_MODULES % (list(without),)) if without else ()
        proc = self.lab.spawn(self.ns, [python, "-I", *hiding, self.lab.script("udpProxyServer.py"),
                                        *args],
                              "%s-daemon-%d.log" % (self.name, len(self.lab.processes)), env=env)
        self.daemon = proc
        if wait:
            port = args[args.index("-cp") + 1] if "-cp" in args else "5001"
            self.wait_for_daemon(proc, port)
        return proc

    def wait_for_daemon(self, proc, port="5001"):
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError("daemon on %s exited %d:\n%s"
                                     % (self.name, proc.returncode, open(proc.log_path).read()))
            # Any reply will do, a refusal too (a daemon with a secret refuses a plain list).
            if self.run(*self.control_argv("127.0.0.1", "-p", port, "-o", "list", "--timeout", "0.2"),
                        check=False).returncode in (0, 1):
                return
        raise AssertionError("daemon on %s did not answer on port %s" % (self.name, port))

    def start_2015_daemon(self):
        """The 2015 daemon's stand-in (tests/daemon2015.py) on its default ports. It never
        replies: it is up once it says it listens."""
        self.lab.log("%s# udpProxyServer.py  (the 2015 daemon)" % self.name)
        proc = self.lab.spawn(self.ns, [sys.executable, os.path.join(HELPERS, "daemon2015.py")],
                              "%s-daemon2015-%d.log" % (self.name, len(self.lab.processes)))
        self.daemon = proc

        def listening():
            with open(proc.log_path) as log:
                return proc.poll() is not None or "Listening" in log.read()

        wait_until(listening, "the 2015 daemon on %s listens" % self.name)
        if proc.poll() is not None:
            raise AssertionError("2015 daemon on %s exited %d:\n%s"
                                 % (self.name, proc.returncode, open(proc.log_path).read()))
        return proc

    def stop_daemon(self, signum=signal.SIGTERM):
        proc, self.daemon = self.daemon, None
        proc.send_signal(signum)
        return proc.wait(PATIENCE)

    def control(self, *args, check=True):
        """Run the control script from its lone copy with nothing but the standard library."""
        self.lab.log("%s# udpProxyServerControl.py %s" % (self.name, " ".join(args)))
        return self.run(*self.control_argv(*args), check=check)

    def control_argv(self, *args):
        return (sys.executable, "-I", "-S", self.lab.script("udpProxyServerControl.py"), *args)

    def control_2015(self, server, op, name, address, remote):
        """What the 2015 control script did: the request's JSON in one datagram to the
        control port, sent once, never waiting (it took every field, for del too)."""
        self.lab.log("%s# udpProxyServerControl.py (2015) -s %s -o %s -n %s -t %s -r %s"
                     % (self.name, server, op, name, address, remote))
        self.send_udp(server, 5001, [request_2015(op, name, address, remote)])

    def add_tunnel(self, name, address, remote, *extra):
        return self.control("127.0.0.1", "-o", "add", "-n", name, "-t", address,
                            "-r", remote.address if isinstance(remote, Host) else remote, *extra)

    def tunnels(self, port="5001", secret=None):
        """The daemon's list reply, name -> tunnel."""
        locked = ("--secret-file", secret) if secret else ()
        out = self.control("127.0.0.1", "-p", port, *locked, "-o", "list", "--json").stdout
        return {t["name"]: t for t in json.loads(out)["tunnels"]}

    def routes(self, *family):
        """The host's routes, one line each, as ip shows them."""
        return self.run("ip", *family, "route", "show").stdout

    def link_exists(self, name):
        return self.run("ip", "link", "show", name, check=False).returncode == 0

    def ping(self, destination, size=56, source=None, count=3):
        """True when the destination answered; -M do forbids fragmenting the probe."""
        argv = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "3", "-M", "do",
                "-s", str(size)]
        if source:
            argv += ["-I", source]
        return self.run(*argv, destination, check=False).returncode == 0

    def request(self, message, port=5001, to="127.0.0.1", wait=PATIENCE, sport=0):
        """Send one control datagram (bytes, or a dict as JSON) and return the reply dict,
        or None when none came within wait seconds; from source port sport if given (a
        cookie is good for one address and port)."""
        raw = message if isinstance(message, bytes) else json.dumps(message).encode()
        code = ("import socket,sys\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "s.bind(('0.0.0.0',%d))\n"
                "s.settimeout(%r)\n"
                "s.sendto(bytes.fromhex(sys.stdin.read()),(%r,%d))\n"
                "try: sys.stdout.write(s.recv(65535).decode())\n"
                "except socket.timeout: pass\n" % (sport, wait, to, port))
        out = self.run(sys.executable, "-c", code, input=raw.hex()).stdout
        return json.loads(out) if out else None

    def send_udp(self, destination, port, payloads):
        """Send raw datagrams from this host."""
        code = ("import socket,sys,json\n"
                "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
                "for p in json.load(sys.stdin): s.sendto(bytes.fromhex(p),(%r,%d))\n"
                % (destination, port))
        self.run(sys.executable, "-c", code, input=json.dumps([p.hex() for p in payloads]))


def ipv6_host(lab, name, index):
    """A host whose underlay also has an IPv6 address, from the benchmarking range 2001:2::/48."""
    host = lab.host(name, index)
    host.address6 = "2001:2::%d" % index
    host.ip("addr", "add", host.address6 + "/64", "dev", "eth0", "nodad")
    return host


def request_2015(op, name, address, remote):
    """The 2015 control script's request, with its defaults for netmask and MTU."""
    return json.dumps({"op": op, "tunnel": [{
        "name": name, "tunnelIP": address, "netmask": "255.255.255.252", "mtu": 1500,
        "remoteServer": remote}]}).encode()


def tunnel_pair(lab, mtu=None):
    """Two hosts, each running a daemon, joined by one tunnel (of mtu, if given):
    a (10.0.1.1, udp2) <-> b (10.0.1.2, udp1)."""
    a, b = lab.host("a", 1), lab.host("b", 2)
    a.start_daemon()
    b.start_daemon()
    extra = ("-m", str(mtu)) if mtu else ()
    a.add_tunnel("udp2", "10.0.1.1", b, *extra)
    b.add_tunnel("udp1", "10.0.1.2", a, *extra)
    return a, b


def lose(host, percent, port=5000):
    """Drop that share of the datagrams host receives on port, at random (nftables
    numgen); nothing for 0."""
    if percent:
        host.run("nft", "-f", "-", input=(
            "table inet loss {\n chain input {\n  type filter hook input priority 0;\n"
            "  udp dport %d numgen random mod 1000 < %d drop\n }\n}\n"
            % (port, round(percent * 10))))


def transfer(sender, receiver, address, size, port=7000):
    """Send size bytes over TCP from sender to receiver's address; return both (size, sha256)."""
    helper = os.path.join(HELPERS, "transfer.py")
    server = subprocess.Popen(["ip", "netns", "exec", receiver.ns, sys.executable, helper,
                               "serve", address, str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening", server.stderr.read()
        sent = sender.run(sys.executable, helper, "send", address, str(port), str(size),
                          timeout=120).stdout.split()
        out, err = server.communicate(timeout=120)
        assert server.returncode == 0, err
        received = out.split()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    return (int(sent[0]), sent[1]), (int(received[0]), received[1])


@contextlib.contextmanager
def meanwhile(work):
    """work() run in a thread while the with block runs (a transfer(), a ping): yields the
    list its result goes into when it ends, empty until then, and waits for it when the
    block ends. The work's own timeouts bound the wait."""
    results = []
    thread = threading.Thread(target=lambda: results.append(work()))
    thread.start()
    try:
        yield results
    finally:
        thread.join()


def key_file(lab, host, name=None):
    """A key file for host's daemon (host.key, or name, in the lab's folder), made by the
    daemon as a user makes it; returns (path, public key)."""
    path = os.path.join(lab.workdir, name or "%s.key" % host.name)
    public = host.run(sys.executable, lab.script("udpProxyServer.py"), "--public-key",
                      "--key-file", path, "--generate-key").stdout.strip()
    return path, public


def write_secret(lab, name="secret"):
    """A shared secret in the lab's folder, readable by its owner only."""
    path = os.path.join(lab.workdir, name)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as f:
        f.write(os.urandom(32).hex().encode() + b"\n")
    return path


def mesh_file(lab, hosts, name="mesh.json", extra_lan=None, mtu=1400, underlay="address"):
    """The mesh of hosts, each with its LAN, at their underlay addresses of that name;
    extra_lan: one more network for the last host; mtu None: the file gives none."""
    entries = [{"name": h.name, "address": getattr(h, underlay),
                "lan": [h.lan.rsplit(".", 1)[0] + ".0/24"]} for h in hosts]
    if extra_lan:
        entries[-1]["lan"].append(extra_lan)
    mesh = {"controlPort": 5001, "tunnelNet": "10.0.0.0/24", "hosts": entries}
    if mtu:
        mesh["mtu"] = mtu
    path = os.path.join(lab.workdir, name)
    with open(path, "w") as f:
        json.dump(mesh, f)
    return path


class Systemd:
    """What systemd is to a Type=notify service, as far as the tests need it: the socket
    its daemon tells READY=1 and WATCHDOG=1 on (NOTIFY_SOCKET), and when each came."""

    def __init__(self, lab, name="notify"):
        self.path = os.path.join(lab.workdir, name)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        lab.closing.append(self.sock.close)

    def env(self, watchdog_sec=None):
        env = {"NOTIFY_SOCKET": self.path}
        if watchdog_sec:
            env["WATCHDOG_USEC"] = str(int(watchdog_sec * 1e6))
        return env

    def wait_for(self, state, within=PATIENCE):
        """The time (time.time()) the daemon next said state; AssertionError when it did not
        within that many seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                said = self.sock.recv(4096).decode()
            except socket.timeout:
                break
            if state in said.split("\n"):
                return time.time()
        raise AssertionError("the daemon did not say %s within %s s" % (state, within))


class Pinger:
    """ping at 50 packets a second, each stamped and carrying marker (8 ASCII bytes), so a
    capture elsewhere can find them; stop() gives the times the replies came."""

    def __init__(self, lab, host, destination, marker, source=None, seconds=60):
        assert len(marker) == 8
        argv = ["ping", "-D", "-n", "-i", "0.02", "-W", "1", "-w", str(seconds),
                "-p", marker.encode().hex()]
        if source:
            argv += ["-I", source]
        self.proc = lab.spawn(host.ns, argv + [destination], "%s-ping-%s.log" % (host.name, marker))

    def replies(self):
        """The times of the replies so far."""
        with open(self.proc.log_path) as f:
            return [float(line[1:line.index("]")]) for line in f
                    if line.startswith("[") and "bytes from" in line]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(PATIENCE)
        return self.replies()


def longest_gap(replies, since=None):
    """The longest time without a reply between two replies (after since, if given)."""
    times = [t for t in replies if since is None or t >= since]
    return max((b - a for a, b in zip(times, times[1:])), default=None)


def wait_until(condition, what):
    """Poll condition until it holds; fail naming what never happened."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("never happened: %s" % what)


def sh(*argv):
    subprocess.run(argv, check=True, capture_output=True)


# The three-host mesh of the 2015 README, corrected: there host 1's tunnel to
# host 3 pointed at host 2, host 3 had two addresses, a tunnel name was used
# twice on one host and 10.0.2.3 is the broadcast address of 10.0.2.0/30.
MESH_HOSTS = (("minion-1", 1), ("minion-2", 2), ("minion-3", 3))
MESH_TUNNELS = (
    # host, tunnel name, tunnel address, peer
    ("minion-1", "udp2", "10.0.1.1", "minion-2"),
    ("minion-1", "udp3", "10.0.3.1", "minion-3"),
    ("minion-2", "udp1", "10.0.1.2", "minion-1"),
    ("minion-2", "udp3", "10.0.2.1", "minion-3"),
    ("minion-3", "udp1", "10.0.3.2", "minion-1"),
    ("minion-3", "udp2", "10.0.2.2", "minion-2"),
)


def build_mesh(lab, manager="minion-1", secret_file=None):
    """Start a daemon on every host, add every tunnel from the manager host, add the routes.
    With a secret file, the daemons take only requests authenticated with it."""
    locked = ("--secret-file", secret_file) if secret_file else ()
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    for host in hosts:
        host.start_daemon(*locked)
    for name, tunnel, address, peer in MESH_TUNNELS:
        lab.hosts[manager].control("-s", lab.hosts[name].address, *locked, "-o", "add",
                                   "-n", tunnel, "-t", address, "-r", lab.hosts[peer].address)
    for host in hosts:
        for other in hosts:
            if other is not host:
                route = ("route", "add", other.lan.rsplit(".", 1)[0] + ".0/24",
                         "dev", "udp" + other.name[-1])
                lab.log("%s# ip %s" % (host.name, " ".join(route)))
                host.ip(*route)
    return hosts
