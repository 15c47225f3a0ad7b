"""TCP tunnels through the unmodified SDK: `sb.tunnel()` (a WebSocket to the data plane's
`/tunnel`, yamux streams, a connect header and a status byte) to a TCP echo service started
in the box; a port nobody listens on; another tenant's key."""

import logging
import socket
import threading
import time

import pytest
from langsmith.sandbox._tunnel import Tunnel

ROOT = "/tmp/ember-sdk-tunnel"
# Echoes each connection until its end of file, then closes it; ends after a minute unused
# (on the fake backend it is a process of the host).
ECHO = """
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(64)
s.settimeout(60)
def echo(c):
    with c:
        while True:
            data = c.recv(65536)
            if not data:
                break
            c.sendall(data)
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    threading.Thread(target=echo, args=(c,), daemon=True).start()
"""


def free_port():
    """A free port here (the fake backend's boxes share this host's loopback; a tunnel's
    local_port=0 means the remote port in the SDK, so tests always name one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def round_trip(port, data):
    """Sends `data` and reads as much back (or until the tunnel closes the connection). No
    half-close: the SDK's bridge ends a connection at either side's end of file."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
        sender = threading.Thread(target=c.sendall, args=(data,))
        sender.start()
        got = bytearray()
        try:
            while len(got) < len(data) and (chunk := c.recv(65536)):
                got += chunk
        except ConnectionResetError:
            pass
        sender.join()
        return bytes(got)


@pytest.fixture
def echo_port(sb):
    port = free_port()
    sb.write(f"{ROOT}/echo.py", ECHO)
    sb.run(f"nohup python3 .{ROOT}/echo.py {port} >/dev/null 2>&1 &", run_config={"work_dir": "/"})
    return port


def until_served(t, data=b"ping"):
    """The echo service may still be starting: retry until it answers."""
    deadline = time.monotonic() + 30
    while True:
        got = round_trip(t.local_port, data)
        if got == data or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_bytes_through_a_tunnel_come_back(sb, echo_port):
    with sb.tunnel(remote_port=echo_port, local_port=free_port()) as t:
        assert until_served(t) == b"ping"
        blob = bytes(range(256)) * 4096  # 1 MiB: more than yamux's initial window
        assert round_trip(t.local_port, blob) == blob


def test_many_connections_at_once(sb, echo_port):
    with sb.tunnel(remote_port=echo_port, local_port=free_port()) as t:
        until_served(t)
        results = [None] * 20

        def one(i):
            results[i] = round_trip(t.local_port, f"stream {i} ".encode() * 1000)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert results == [f"stream {i} ".encode() * 1000 for i in range(20)]


def test_a_port_nobody_listens_on_is_dial_failed(sb, caplog):
    port = free_port()
    with caplog.at_level(logging.WARNING, logger="langsmith.sandbox._tunnel"):
        with sb.tunnel(remote_port=port, local_port=free_port()) as t:
            assert round_trip(t.local_port, b"anyone?") == b"", "the connection is closed"
            deadline = time.monotonic() + 10
            while f"nothing listening on port {port}" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
    assert f"nothing listening on port {port}" in caplog.text, "the SDK was told STATUS_DIAL_FAILED"


def test_another_tenants_key_opens_no_tunnel(server, sb):
    t = Tunnel(sb.dataplane_url, server.other_key, 8000, local_port=free_port(), max_reconnects=0)
    with pytest.raises(Exception, match="404"):
        t._start()


def test_the_status_byte_for_a_bad_version_and_port_zero(server, sb):
    """The connect-header protocol below the SDK's Tunnel, with its own yamux and adapter."""
    from websockets.sync.client import connect

    from langsmith.sandbox._tunnel import STATUS_PORT_NOT_ALLOWED, STATUS_UNSUPPORTED_VERSION, _WSAdapter
    from langsmith.sandbox._yamux import YamuxSession

    url = sb.dataplane_url.replace("http://", "ws://") + "/tunnel"
    with connect(url, additional_headers={"X-Api-Key": server.key}, ping_interval=None) as ws:
        session = YamuxSession(_WSAdapter(ws))
        try:
            stream = session.open_stream()
            stream.write(bytes([9, 0x1F, 0x40]))
            assert stream.read(1) == bytes([STATUS_UNSUPPORTED_VERSION])
            stream = session.open_stream()
            stream.write(bytes([1, 0, 0]))
            assert stream.read(1) == bytes([STATUS_PORT_NOT_ALLOWED])
        finally:
            session.close()
