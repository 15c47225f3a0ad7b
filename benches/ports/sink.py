"""The ports benchmark's byte sink, run in a sandbox (benches/ports): `python3 sink.py PORT`
accepts connections that each send a byte count as a line and then that many bytes, and
answers `ok N` once they all came (the SDK's tunnel ends a connection at either side's end of
file, so the sink waits for none)."""

import socket
import sys
import threading


def sink(conn):
    with conn:
        reader = conn.makefile("rb")
        want = int(reader.readline())
        got = 0
        while got < want:
            chunk = reader.read1(1 << 16)
            if not chunk:
                break
            got += len(chunk)
        conn.sendall(f"ok {got}\n".encode())


s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
while True:
    c, _ = s.accept()
    threading.Thread(target=sink, args=(c,), daemon=True).start()
