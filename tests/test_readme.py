"""The README and the docs against the scripts they document: the reference's flag tables
against each script's --help, both ways, and the man pages against the parsers; the
mesh file's table, the sizing table and the 30-host example against the mesh's own
checks; the tests and links they name; and, for real, the firewall rules and sysctls
of the operations guide on hosts in namespaces."""

import json
import os
import re
import subprocess
import sys

import pytest

import udpProxyServer as ups
import udpProxyServerControl as ctl
from lab import MESH_HOSTS, REPO, Host, mesh_file

README = os.path.join(REPO, "README.md")
REFERENCE = os.path.join(REPO, "docs", "reference.md")
OPERATIONS = os.path.join(REPO, "docs", "operations.md")
DOCS = [README] + [os.path.join(REPO, "docs", name)
                   for name in sorted(os.listdir(os.path.join(REPO, "docs"))) if name.endswith(".md")]
# The reference section of each script, by its heading.
REFERENCES = {"udpProxyServer.py": "## The daemon: udpProxyServer.py",
              "udpProxyServerControl.py": "## The control script: udpProxyServerControl.py"}
FLAG = re.compile(r"(?:^|, )(--?[A-Za-z][\w-]*)")


def read(path):
    with open(path) as f:
        return f.read()


def section(heading, path=README):
    """The text of the doc at path under heading, up to the next heading of any level."""
    text = read(path)
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
    rows = table_rows(section(REFERENCES[script], REFERENCE))[1:]
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


def test_the_help_names_every_mesh_field_and_no_other():
    out = subprocess.run([sys.executable, os.path.join(REPO, "udpProxyServerControl.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    listed = {where: re.search(r"^  %s: (.*?);?$" % where, out, re.M).group(1).split(", ")
              for where in ("mesh-wide", "each host")}
    assert sorted(listed["mesh-wide"] + ["hosts"]) == sorted(ctl.MESH_FIELDS)
    assert sorted(listed["each host"]) == sorted(ctl.MESH_HOST_FIELDS)


def test_the_sizing_table_holds():
    rows = table_rows(section("### Sizing `tunnelNet`", OPERATIONS))[1:]
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


@pytest.mark.parametrize("script", sorted(REFERENCES))
def test_the_man_pages_are_made_from_the_parsers(script, tmp_path):
    """man/*.8 as make man makes them from the scripts' parsers now (but for the date)."""
    command = script[:-len(".py")]
    page = os.path.join(REPO, "man", command + ".8")
    description = read(os.path.join(REPO, "man", command + ".description")).strip()
    made = tmp_path / (command + ".8")
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "argparse-manpage"),
                    "--pyfile", os.path.join(REPO, script), "--function", "build_parser",
                    "--prog", command, "--project-name", "udpProxyServer",
                    "--version", ups.__version__, "--manual-section", "8",
                    "--manual-title", "System Manager's Manual", "--description", description,
                    "--output", str(made)], check=True, capture_output=True)

    def undated(text):
        return re.sub(r'^(\.TH \S+ "8") "[^"]*"', r"\1", text, flags=re.M)
    assert undated(read(page)) == undated(read(made)), "man/%s.8 is stale: make man" % command


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


def firewall_rules(mesh_hosts, managers):
    """The operations guide's nftables rules, its IPv4 sets holding these addresses."""
    rules = code_block(section("### Firewall", OPERATIONS))
    for name, addresses in (("mesh_hosts", mesh_hosts), ("managers", managers)):
        rules, count = re.subn(r"(set %s \{ type ipv4_addr; elements = \{ )[^}]*\}" % name,
                               r"\g<1>%s }" % ", ".join(addresses), rules)
        assert count == 1, name
    return rules


def test_the_operations_firewall_keeps_the_mesh_shuts_out_others_and_lets_a_new_host_in(
        lab, mesh_of_two):
    hosts, manager = mesh_of_two
    for host in hosts:
        host.run("nft", "-f", "-", input=firewall_rules([h.address for h in hosts],
                                                        [manager.address]))
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

    # Adding a host, as the guide says: its own rules, then each other host lets it in.
    name, index = MESH_HOSTS[2]
    new = lab.host(name, index)
    new.start_daemon()
    everyone = hosts + [new]
    new.run("nft", "-f", "-", input=firewall_rules([h.address for h in everyone],
                                                   [manager.address]))
    letting_in = re.search(r"sudo (nft add element .*)", section("### Adding and removing a host",
                                                                 OPERATIONS)).group(1)
    for host in hosts:
        host.run("sh", "-c", letting_in.replace("172.100.2.4", new.address))
    manager.control("--mesh", mesh_file(lab, everyone, mtu=None))
    assert new.ping(one.lan, source=new.lan) and two.ping(new.lan, source=two.lan)


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

    settings = re.findall(r"^\s*(net\.[\w.]+) = (\S+)", section("### Sysctls", OPERATIONS), re.M)
    assert ("net.ipv4.ip_forward", "1") in settings
    for host in (one, two):
        for key, value in settings:
            host.run("sysctl", "-qw", "%s=%s" % (key, value))
    assert machines[0].ping(machines[1].address) and machines[1].ping(machines[0].address)
