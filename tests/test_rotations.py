"""The control secret and a host's key rotated on a running mesh, host by host, as the
operations guide (docs/operations.md) gives it: no flag day, no request refused, no restart."""

import json
import os
import signal

from lab import MESH_HOSTS, Pinger, Systemd, key_file, longest_gap, wait_until, write_secret


def reload(host, systemd):
    """systemctl reload: SIGHUP, done when the daemon says READY=1 again."""
    host.daemon.send_signal(signal.SIGHUP)
    systemd.wait_for("READY=1")


def write_lines(path, *lines):
    """A secret file, as an editor leaves it: rewritten in place, readable by root only."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write("".join(line + "\n" for line in lines))


def mesh(lab, hosts, **fields):
    path = os.path.join(lab.workdir, "mesh.json")
    with open(path, "w") as f:
        json.dump(dict(fields, tunnelNet="10.0.0.0/24", hosts=[
            {"name": h.name, "address": h.address, "lan": [h.lan.rsplit(".", 1)[0] + ".0/24"]}
            for h in hosts]), f)
    return path


def test_the_control_secret_is_rotated_host_by_host_with_no_request_refused(lab):
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    manager = lab.host("manager", 9)
    old, new = (open(write_secret(lab, name)).read().strip() for name in ("old", "new"))
    secrets = {host.name: os.path.join(lab.workdir, "%s.secret" % host.name) for host in hosts}
    systemd = {}
    for host in hosts:
        write_lines(secrets[host.name], old)
        systemd[host.name] = Systemd(lab, "%s.notify" % host.name)
        host.start_daemon("--secret-file", secrets[host.name], env=systemd[host.name].env())
    managers = os.path.join(lab.workdir, "manager.secret")
    write_lines(managers, old)
    path = mesh(lab, hosts)
    apply = ("--mesh", path, "--secret-file", managers)
    assert "2 added" in manager.control(*apply).stdout

    def each_host_applied(step):
        out = manager.control(*apply).stdout
        for host in hosts:
            assert "%s (%s): 0 added, 0 deleted, 2 unchanged" % (host.name, host.address) \
                in out, step
        assert manager.control(*apply, "--status").returncode == 0, step

    # 1. Every host takes both, the old one first, then each is reloaded: the manager,
    # still signing with the old one, is answered throughout.
    for host in hosts:
        write_lines(secrets[host.name], old, new)
        reload(host, systemd[host.name])
        each_host_applied("host %s takes both" % host.name)
    # 2. The manager signs with the new one (and keeps the old one second, unused).
    write_lines(managers, new, old)
    each_host_applied("the manager signs with the new secret")
    # 3. Every host drops the old one.
    for host in hosts:
        write_lines(secrets[host.name], new)
        reload(host, systemd[host.name])
        each_host_applied("host %s drops the old secret" % host.name)
    assert all(len(host.tunnels(secret=managers)) == 2 for host in hosts)

    for host in hosts:
        log = open(host.daemon.log_path).read()
        assert "re-read: 2 secrets" in log and "re-read: 1 secrets" in log
        assert "authentication failed" not in log
    # The old secret is refused now, by every host.
    write_lines(managers, old)
    refused = manager.control(*apply, check=False)
    assert refused.returncode == 1
    for host in hosts:
        assert "%s (%s): FAILED" % (host.name, host.address) in refused.stdout


def test_a_host_key_is_rotated_with_a_reload_and_the_mesh_applied_again(lab):
    """The service's way: state files, the new key moved in place, systemctl reload, the
    mesh applied from the management host; pings across the pair throughout."""
    hosts = [lab.host(name, index) for name, index in MESH_HOSTS]
    one, two, three = hosts
    manager = lab.host("manager", 9)
    systemd, keys = {}, {}
    for host in hosts:
        path, keys[host.name] = key_file(lab, host)
        systemd[host.name] = Systemd(lab, "%s.notify" % host.name)
        host.start_daemon("--key-file", path, "--state-file",
                          os.path.join(lab.workdir, "%s.json" % host.name),
                          env=systemd[host.name].env())
    path = mesh(lab, hosts, encrypt=True, persistentKeepalive=25)
    manager.control("--mesh", path)
    assert one.tunnels()["m-minion-2"]["persistentKeepalive"] == 25
    index = one.run("cat", "/sys/class/net/m-minion-2/ifindex").stdout
    ping = Pinger(lab, one, two.lan, "ROTATING", source=one.lan)
    wait_until(lambda: len(ping.replies()) > 10, "pings across the pair")

    # On minion-2: a new key, moved over the old one, and a reload.
    new_key, keys["minion-2"] = key_file(lab, two, "minion-2.new.key")
    os.replace(new_key, os.path.join(lab.workdir, "minion-2.key"))
    reload(two, systemd["minion-2"])
    assert two.tunnels()["m-minion-1"]["latestHandshake"]  # the session in use goes on
    listed = json.loads(two.control("127.0.0.1", "-o", "list", "--json").stdout)
    assert listed["publicKey"] == keys["minion-2"]
    rotated = manager.control("--mesh", path).stdout
    for host in (one, three):
        assert "%s (%s): 0 added, 0 deleted, 1 changed, 1 unchanged" % (
            host.name, host.address) in rotated
        assert host.tunnels()["m-minion-2"]["publicKey"] == keys["minion-2"]
    wait_until(lambda: manager.control("--mesh", path, "--status").returncode == 0,
               "every pair up with the new key")
    count = len(ping.replies())
    wait_until(lambda: len(ping.replies()) > count + 10, "pings across the pair again")
    replies = ping.stop()
    print("longest gap in the pings across the key rotation: %.3f s" % longest_gap(replies))
    # Remade on the device it had: its routes, and what routes through it, never went.
    assert one.run("cat", "/sys/class/net/m-minion-2/ifindex").stdout == index
    # And the state file keeps the new key, for the next start.
    with open(os.path.join(lab.workdir, "minion-1.json")) as f:
        saved = {t["name"]: t for t in json.load(f)["tunnels"]}
    assert saved["m-minion-2"]["publicKey"] == keys["minion-2"]
