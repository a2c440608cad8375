"""One command for a whole mesh: --mesh against real daemons, with routes the daemons own."""

import json

import pytest

from lab import MESH_HOSTS, ipv6_host, mesh_file, transfer, write_secret


@pytest.fixture
def minions(lab):
    """The three hosts of the mesh, each running a daemon locked with the mesh's secret."""
    secret = write_secret(lab)
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    for host in hosts:
        host.start_daemon("--secret-file", secret)
    return hosts, secret


def apply(manager, path, secret, *extra, check=True):
    return manager.control("--mesh", path, "--secret-file", secret, *extra, check=check)


def every_lan_reaches_every_other(hosts):
    return all(a.ping(b.lan, source=a.lan) for a in hosts for b in hosts if a is not b)


def test_one_command_builds_the_mesh_and_again_changes_nothing(lab, minions):
    hosts, secret = minions
    path = mesh_file(lab, hosts)
    first = apply(hosts[0], path, secret).stdout
    assert "minion-1 (198.18.0.1): 2 added, 0 deleted, 0 unchanged" in first
    assert "mesh: all 3 hosts done" in first
    assert every_lan_reaches_every_other(hosts)
    assert "192.168.2.0/24 dev m-minion-2" in hosts[0].routes()
    sent, received = transfer(hosts[0], hosts[2], hosts[2].lan, 4 << 20)
    assert received == sent

    counts = {h.name: h.tunnels(secret=secret) for h in hosts}
    again = apply(hosts[0], path, secret).stdout
    for host in hosts:
        assert "%s (%s): 0 added, 0 deleted, 2 unchanged" % (host.name, host.address) in again
    for host in hosts:  # the same tunnels, not made anew: their counts went on
        for name, tunnel in host.tunnels(secret=secret).items():
            assert tunnel["tx_packets"] >= counts[host.name][name]["tx_packets"]


def fragments_made(host):
    """How many IPv6 fragments the host's kernel has cut from packets too large for a link."""
    snmp6 = dict(line.split() for line in host.run("cat", "/proc/net/snmp6").stdout.splitlines())
    return int(snmp6["Ip6FragCreates"])


def test_a_mesh_without_an_mtu_fits_a_1500_byte_ipv6_underlay_whole(lab):
    """The default MTU leaves room for IPv6, UDP and the packet information header: packets
    of the tunnel MTU cross, and no datagram is fragmented (nor GSO turned off for it)."""
    hosts = [ipv6_host(lab, name, index) for name, index in MESH_HOSTS[:2]]
    for host in hosts:
        host.start_daemon()
    one, two = hosts
    one.control("--mesh", mesh_file(lab, hosts, mtu=None, underlay="address6"))
    mtu = one.tunnels()["m-minion-2"]["mtu"]
    assert mtu == two.tunnels()["m-minion-1"]["mtu"] > 1400
    assert one.ping(two.lan, source=one.lan, size=mtu - 28)
    sent, received = transfer(one, two, two.lan, 4 << 20)
    assert received == sent
    sent, received = transfer(two, one, one.lan, 4 << 20)
    assert received == sent
    for host in hosts:
        assert fragments_made(host) == 0, host.name
        with open(host.daemon.log_path) as log:
            assert "one by one" not in log.read(), host.name


def test_a_host_removed_from_the_file_is_removed_from_the_mesh(lab, minions):
    hosts, secret = minions
    apply(hosts[0], mesh_file(lab, hosts), secret)
    smaller = apply(hosts[0], mesh_file(lab, hosts[:2], "smaller.json"), secret).stdout
    assert "minion-1 (198.18.0.1): 0 added, 1 deleted, 1 unchanged" in smaller
    assert "minion-2 (198.18.0.2): 0 added, 1 deleted, 1 unchanged" in smaller
    for host in hosts[:2]:
        assert not host.link_exists("m-minion-3")
        assert "192.168.3.0/24" not in host.routes()
    assert every_lan_reaches_every_other(hosts[:2])


def test_dry_run_says_what_it_would_do_and_does_nothing(lab, minions):
    hosts, secret = minions
    out = apply(hosts[0], mesh_file(lab, hosts), secret, "--dry-run").stdout
    assert "minion-3 (198.18.0.3): would add m-minion-1 10.0.0.6/30 -> 198.18.0.1," \
           " routes 192.168.1.0/24" in out
    assert "mesh: all 3 hosts planned" in out
    assert all(host.tunnels(secret=secret) == {} for host in hosts)


def test_a_host_that_fails_is_named_and_the_others_are_done(lab, minions):
    hosts, secret = minions
    hosts[1].stop_daemon()
    result = apply(hosts[0], mesh_file(lab, hosts), secret, "--timeout", "1", check=False)
    assert result.returncode == 1
    assert "minion-2 (198.18.0.2): FAILED: " in result.stdout
    assert "mesh: 1 of 3 hosts failed: minion-2 (" in result.stdout
    assert hosts[0].ping(hosts[2].lan, source=hosts[0].lan)


def test_a_bad_mesh_file_is_refused_before_anything_is_sent(lab, minions):
    hosts, secret = minions
    path = mesh_file(lab, hosts)
    with open(path) as f:
        mesh = json.load(f)
    mesh["hosts"][2]["lan"] = ["192.168.1.128/25"]
    with open(path, "w") as f:
        json.dump(mesh, f)
    result = apply(hosts[0], path, secret, check=False)
    assert result.returncode == 2
    assert "hosts[2] (minion-3) lan[0] 192.168.1.128/25 overlaps hosts[0] (minion-1) lan[0]" \
        in result.stderr
    assert all(host.tunnels(secret=secret) == {} for host in hosts)


def test_a_host_that_does_not_answer_keeps_every_tunnel_it_shares(lab):
    """minion-2 takes control requests from minion-1 only. The mesh of four, built from
    minion-1, is edited (minion-1 leaves it, minion-4 gets one more LAN) and applied from
    minion-3, which minion-2 does not answer: the pairs with minion-2 keep what they
    have on every host, the pair minion-3 - minion-4 is applied."""
    secret = write_secret(lab)
    hosts = [lab.host("minion-%d" % index, index) for index in range(1, 5)]
    one, two, three, four = hosts
    for host in hosts:
        host.start_daemon("--secret-file", secret, *(("--allow", one.address + "/32")
                                                      if host is two else ()))
    apply(one, mesh_file(lab, hosts), secret)
    for host in (three, four):
        assert host.ping(two.lan, source=host.lan) and host.ping(two.lan, source=host.lan)
    before = {host.name: host.tunnels(secret=secret) for host in hosts}

    edited = mesh_file(lab, hosts[1:], "edited.json", extra_lan="192.168.44.0/24")
    result = apply(three, edited, secret, "--timeout", "1", check=False)
    assert result.returncode == 1
    assert "minion-2 (198.18.0.2): FAILED: " in result.stdout
    assert "mesh: 1 of 3 hosts failed: minion-2 (" in result.stdout
    # Their ends of the pairs with minion-2: the same tunnels, their counts going on.
    for host in (three, four):
        tunnel, old = host.tunnels(secret=secret)["m-minion-2"], before[host.name]["m-minion-2"]
        assert (tunnel["tunnelIP"], tunnel["netmask"]) == (old["tunnelIP"], old["netmask"])
        assert tunnel["tx_packets"] >= old["tx_packets"] > 0
        assert host.ping(two.lan, source=host.lan)
    assert {name: t["tunnelIP"] for name, t in two.tunnels(secret=secret).items()} == \
        {name: t["tunnelIP"] for name, t in before["minion-2"].items()}

    assert "minion-3 (198.18.0.3): 0 added, 1 deleted, 1 changed, 0 unchanged, 1 left as is" \
           " (no answer from minion-2)" in result.stdout
    assert "minion-4 (198.18.0.4): 0 added, 1 deleted, 1 unchanged, 1 left as is" \
           " (no answer from minion-2)" in result.stdout
    for host in (three, four):
        assert not host.link_exists("m-minion-1")
    assert "192.168.44.0/24 dev m-minion-4" in three.routes()
    assert three.ping(four.lan, source=three.lan)


def test_down_takes_every_mesh_tunnel_away_and_leaves_the_others(lab, minions):
    hosts, secret = minions
    one = hosts[0]
    path = mesh_file(lab, hosts)
    apply(one, path, secret)
    # A tunnel of its own beside the mesh's, to a host the mesh does not know.
    one.control("127.0.0.1", "--secret-file", secret, "-o", "add", "-n", "udp9", "-t", "10.9.0.1",
                "-r", "198.18.0.9", "--route", "192.168.99.0/24")

    dry = apply(one, path, secret, "--down", "--dry-run").stdout
    assert "minion-1 (198.18.0.1): would delete m-minion-2" in dry
    assert "mesh: all 3 hosts planned" in dry
    assert sorted(one.tunnels(secret=secret)) == ["m-minion-2", "m-minion-3", "udp9"]

    down = apply(one, path, secret, "--down").stdout
    for host in hosts:
        assert "%s (%s): 0 added, 2 deleted, 0 unchanged" % (host.name, host.address) in down
    assert "mesh: all 3 hosts done" in down
    for host in hosts:
        assert not [name for name in host.tunnels(secret=secret) if name.startswith("m-")]
        assert " dev m-" not in host.routes()
        assert not any(host.link_exists(tunnel_name) for tunnel_name in
                       ("m-minion-1", "m-minion-2", "m-minion-3"))
    assert list(one.tunnels(secret=secret)) == ["udp9"]
    assert "192.168.99.0/24 dev udp9" in one.routes()
