"""Two test hosts joined by one veth pair: the underlay every tunnel of the bench rides on.

Built on tests/lab.py's Lab (namespaces named with our pid, processes and a
work folder, all torn down by close()) and its Host; only the wiring differs:
a direct cable instead of the switch, so no bridge sits in the measured path.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

import lab as lablib  # noqa: E402  (tests/ is not a package)

UNDERLAY_MTU = 1500
UNDERLAY_PREFIX = 24
# Inside the tunnel: one /30, host a takes .1 and host b .2.
TUNNEL_PREFIX = 30
TUNNEL_ADDRESSES = ("10.0.1.1", "10.0.1.2")


class Pair:
    """Hosts a (198.18.0.1) and b (198.18.0.2) in their own namespaces, eth0 to eth0."""

    def __init__(self, lab):
        self.lab = lab
        self.a = self.host("a", 1)
        self.b = self.host("b", 2)
        lablib.sh("ip", "-n", self.a.ns, "link", "add", "eth0", "mtu", str(UNDERLAY_MTU),
                  "type", "veth", "peer", "name", "eth0", "netns", self.b.ns)
        for host in (self.a, self.b):
            host.ip("addr", "add", "%s/%d" % (host.address, UNDERLAY_PREFIX), "dev", "eth0")
            host.ip("link", "set", "eth0", "up")

    def host(self, name, index):
        host = lablib.Host(self.lab, name, self.lab.namespace(name), lablib.UNDERLAY % index)
        host.tunnel_address = TUNNEL_ADDRESSES[index - 1]
        # No IPv6: its router and multicast chatter would cross the tunnels and
        # reach a peer that is not up yet.
        host.run("sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1")
        host.run("sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1")
        self.lab.hosts[name] = host
        return host

    def hosts(self):
        return (self.a, self.b)

    def peer(self, host):
        return self.b if host is self.a else self.a

    def address_tunnel(self, device):
        """Give device its tunnel address on both hosts and bring it up."""
        for host in self.hosts():
            host.ip("addr", "add", "%s/%d" % (host.tunnel_address, TUNNEL_PREFIX), "dev", device)
            host.ip("link", "set", device, "up")
