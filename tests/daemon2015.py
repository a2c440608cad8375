"""A stand-in for the 2015 daemon, written for the upgrade tests: it behaves as the
2015 udpProxyServer.py does, on the wire and on the control port, in Python 3.

- Control port (UDP, IPv4 only): each datagram is a JSON request, acted on at once;
  nothing is ever sent back. An entry without name, tunnelIP, netmask or
  remoteServer is skipped; any op but add and del is skipped too. A del ends the
  process: the 2015 daemon's handler calls a method its class does not define, and
  nothing catches the AttributeError. So does a device the kernel refuses (pytun's
  error ends its loop) and a datagram that is not JSON.
- Data port: each datagram is one packet behind the 4-byte packet information
  header, sent to the peer's data port (this daemon's own), taken from a peer by
  its source address alone. A read from the device takes at most mtu bytes, so the
  2015 daemon cut the last 4 bytes off every packet of exactly the MTU.
- Its TUN devices are not persistent: when the process ends, however it ends,
  the kernel deletes them and every route through them.

    daemon2015.py [-dp DATAPORT] [-cp CONTROLPORT]
"""

import argparse
import json
import select
import socket
import sys

import pytun


class Daemon2015:
    def __init__(self, data_port, control_port):
        self.data_port = data_port
        self.data = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.data.bind(("0.0.0.0", data_port))
        self.control = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.control.bind(("0.0.0.0", control_port))
        self.by_remote = {}  # remote address -> device
        print("Listening for control event on UDP Port %d, data on port %d"
              % (control_port, data_port), flush=True)

    def add(self, entry):
        fields = [entry.get(key) for key in ("tunnelIP", "name", "netmask", "remoteServer")]
        if None in fields:
            print("Invalid param %r" % (entry,), flush=True)
            return
        address, name, netmask, remote = fields
        device = pytun.TunTapDevice(name=name)  # IFF_TUN with the packet information header
        device.addr, device.netmask, device.mtu = address, netmask, entry.get("mtu", 1500)
        device.up()
        self.by_remote[remote] = device
        print("Adding tunnel %r" % (entry,), flush=True)

    def handle_control(self):
        request = json.loads(self.control.recv(65535))
        for entry in request.get("tunnel", []):
            if request.get("op") == "add":
                self.add(entry)
            elif request.get("op") == "del":
                sys.exit("AttributeError: 'UDPServer' object has no attribute 'delTunnel'")
            else:
                print("Invalid operation: %s" % request.get("op"), flush=True)

    def run(self):
        while True:
            ready, _, _ = select.select([self.data, self.control, *self.by_remote.values()],
                                        [], [])
            for source in ready:
                if source is self.control:
                    self.handle_control()
                elif source is self.data:
                    packet, (address, _) = self.data.recvfrom(65535)
                    if address in self.by_remote:
                        self.by_remote[address].write(packet)
                else:
                    remote = next(r for r, d in self.by_remote.items() if d is source)
                    self.data.sendto(source.read(source.mtu), (remote, self.data_port))


def main():
    parser = argparse.ArgumentParser(description="the 2015 daemon's stand-in")
    parser.add_argument("-dp", "--dataPort", type=int, default=5000)
    parser.add_argument("-cp", "--controlPort", type=int, default=5001)
    args = parser.parse_args()
    Daemon2015(args.dataPort, args.controlPort).run()


if __name__ == "__main__":
    main()
