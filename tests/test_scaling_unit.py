"""The kernel behaviour docs/scaling.md builds on: a UDP socket connected to a peer, bound
to the port an unconnected one holds, gets that peer's datagrams and no other's."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))

import scaling  # noqa: E402  (bench/scaling.py, the experiment docs/scaling.md gives)


def test_each_peer_s_datagrams_reach_its_connected_socket_only():
    seen = scaling.demultiplexed(count=50)
    assert seen == {"unconnected": {"127.0.0.9": 50},
                    "connected to 127.0.0.2": {"127.0.0.2": 50},
                    "connected to 127.0.0.3": {"127.0.0.3": 50}}
