"""The README against the scripts it documents: its command reference against each
script's --help, both ways; its sizing table and 30-host example against the mesh's
own checks; the tests and headings it names; and, for real, its firewall rules and
sysctls on hosts in namespaces."""

import json
import os
import re
import subprocess
import sys

import pytest

import udpProxyServerControl as ctl
from lab import MESH_HOSTS, REPO, Host, mesh_file

README = os.path.join(REPO, "README.md")
DOCS = [README] + [os.path.join(REPO, "docs", name)
                   for name in sorted(os.listdir(os.path.join(REPO, "docs"))) if name.endswith(".md")]
# The reference section of each script, by its heading.
REFERENCES = {"udpProxyServer.py": "### The daemon: udpProxyServer.py",
              "udpProxyServerControl.py": "### The control script: udpProxyServerControl.py"}
FLAG = re.compile(r"(?:^|, )(--?[A-Za-z][\w-]*)")


def read(path):
    with open(path) as f:
        return f.read()


def section(heading):
    """The README's text under heading, up to the next heading of any level."""
    text = read(README)
    start = text.index("\n%s\n" % heading) + len(heading) + 2
    following = re.search(r"^#+ ", text[start:], re.M)
    return text[start:start + following.start()] if following else text[start:]


def table_rows(text):
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def code_block(text):
    return re.search(r"^```\w*\n(.*?)^```", text, re.M | re.S).group(1)


def help_options(script):
    """--help's options: (flags, their help text), as argparse prints them."""
    out = subprocess.run([sys.executable, os.path.join(REPO, script), "--help"],
                         capture_output=True, text=True, check=True).stdout
    body = out.split("options:\n", 1)[1].split("\n\n", 1)[0]
    options = []
    for line in body.splitlines():
        if re.match(r"  -", line):
            invocation, _, text = line.strip().partition("  ")
            options.append((FLAG.findall(invocation), text.strip()))
        else:
            options[-1] = (options[-1][0], options[-1][1] + " " + line.strip())
    return options


def reference(script):
    """The README's reference table of script: flags -> its default cell."""
    rows = table_rows(section(REFERENCES[script]))[1:]
    return {tuple(re.findall(r"`(-[^`]+)`", row[0])): row[1] for row in rows}


@pytest.mark.parametrize("script", sorted(REFERENCES))
def test_the_reference_tables_name_every_flag_of_help_and_no_other(script):
    documented = reference(script)
    helped = help_options(script)
    assert sorted(f for flags in documented for f in flags) == \
        sorted(f for flags, _ in helped for f in flags)
    for flags, text in helped:
        default = re.search(r"\(default:? ([^\s,;)]+)", text)
        if default:
            cell = next(cell for named, cell in documented.items() if flags[0] in named)
            assert default.group(1) in cell, (flags, default.group(1), cell)


def test_the_mesh_file_table_names_every_field_and_no_other():
    rows = table_rows(section("### The mesh file"))[1:]
    assert sorted(row[0].strip("`") for row in rows) == \
        sorted(set(ctl.MESH_FIELDS + ctl.MESH_HOST_FIELDS))  # persistentKeepalive is both


def test_the_sizing_table_holds():
    rows = table_rows(section("### Sizing `tunnelNet`"))[1:]
    assert rows
    for hosts, pairs, for_30, for_31 in rows:
        n = int(hosts)
        assert int(pairs) == n * (n - 1) // 2
        entries = [{"name": "h%d" % i, "address": "198.18.1.%d" % i} for i in range(1, n + 1)]
        for prefix, smallest in ((30, for_30), (31, for_31)):
            bits = int(smallest.lstrip("/"))
            mesh = {"tunnelNet": "10.0.0.0/%d" % bits, "tunnelPrefix": prefix, "hosts": entries}
            assert len(ctl.parse_mesh(mesh).hosts) == n
            with pytest.raises(ctl.MeshError, match="holds"):
                ctl.parse_mesh(dict(mesh, tunnelNet="10.0.0.0/%d" % (bits + 1)))


def test_the_30_host_example_is_a_valid_encrypted_mesh_of_435_pairs():
    mesh = ctl.parse_mesh(json.loads(read(os.path.join(REPO, "docs", "mesh-30-hosts.json"))))
    assert (len(mesh.hosts), mesh.encrypt, mesh.mtu) == (30, True, 1420)
    assert len(ctl.mesh_plan(mesh, {}, keys=dict.fromkeys((h.name for h in mesh.hosts), "k"))
               ["host-01"]) == 29


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_test_the_docs_name_exists(path):
    for module, test in re.findall(r"(test_\w+\.py)(?:::(test_\w+))?", read(path)):
        source = read(os.path.join(REPO, "tests", module))
        assert test == "" or "def %s(" % test in source, "%s::%s" % (module, test)


def slug(heading):
    """The anchor GitHub makes of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", DOCS, ids=os.path.basename)
def test_every_link_leads_somewhere(path):
    folder = os.path.dirname(path)
    for target in re.findall(r"\]\(([^)\s]+)\)", read(path)):
        if target.startswith("http"):
            continue
        file, _, anchor = target.partition("#")
        file = os.path.normpath(os.path.join(folder, file)) if file else path
        assert os.path.exists(file), target
        if anchor:
            headings = re.findall(r"^#+ (.*)$", read(file), re.M)
            assert anchor in [slug(h) for h in headings], target


# --- Running it for real, as the README says ---------------------------------------


@pytest.fixture
def mesh_of_two(lab):
    """minion-1 and minion-2 running daemons with the default flags, their plain mesh
    applied by a management host of its own."""
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS[:2]]
    for host in hosts:
        host.start_daemon()
    manager = lab.host("manager", 9)
    manager.control("--mesh", mesh_file(lab, hosts, mtu=None))
    return hosts, manager


def test_the_readme_firewall_keeps_the_mesh_and_shuts_out_others(lab, mesh_of_two):
    hosts, manager = mesh_of_two
    rules = code_block(section("### Firewall"))
    rules = re.sub(r"define mesh_hosts = \{.*?\}", "define mesh_hosts = { %s }"
                   % ", ".join(h.address for h in hosts), rules)
    rules = re.sub(r"define managers = \{.*?\}", "define managers = { %s }" % manager.address,
                   rules)
    for host in hosts:
        host.run("nft", "-f", "-", input=rules)
    one, two = hosts
    assert one.ping(two.lan, source=one.lan) and two.ping(one.lan, source=two.lan)

    def listed():
        return json.loads(manager.control("-s", one.address, "-o", "list", "--json").stdout)

    before = listed()["control"]["requests"]
    stranger = lab.host("stranger", 7)
    stranger.send_udp(one.address, 5000, [b"\0\0\x08\0" + bytes(60)] * 10)
    shut_out = stranger.control("-s", one.address, "-o", "list", "--timeout", "0.5", check=False)
    assert shut_out.returncode == 3
    after = listed()
    assert "unknown_source" not in after["drops"]
    assert after["control"]["requests"] == before + 2  # the manager's cookie and list alone


def lan_machine(lab, host, index):
    """A machine on host's LAN at .10, its default route through host."""
    prefix = host.lan.rsplit(".", 1)[0]
    machine = Host(lab, "pc%d" % index, lab.namespace("pc%d" % index), prefix + ".10")
    machine.ip("link", "add", "eth0", "type", "veth", "peer", "name", "pc", "netns", host.ns)
    host.ip("link", "set", "pc", "master", "lan0", "up")
    machine.ip("addr", "add", machine.address + "/24", "dev", "eth0")
    machine.ip("link", "set", "eth0", "up")
    machine.ip("route", "add", "default", "via", host.lan)
    return machine


def test_machines_behind_the_hosts_reach_each_other_with_forwarding_on(lab, mesh_of_two):
    (one, two), _ = mesh_of_two
    machines = [lan_machine(lab, host, index) for index, host in enumerate((one, two), 1)]
    for host in (one, two):
        host.run("sysctl", "-qw", "net.ipv4.ip_forward=0")  # as a fresh host has it
    assert not machines[0].ping(machines[1].address, count=1)

    settings = re.findall(r"^\s*(net\.[\w.]+) = (\S+)", section("### Sysctls"), re.M)
    assert ("net.ipv4.ip_forward", "1") in settings
    for host in (one, two):
        for key, value in settings:
            host.run("sysctl", "-qw", "%s=%s" % (key, value))
    assert machines[0].ping(machines[1].address) and machines[1].ping(machines[0].address)
