"""The ports benchmark's host side (benches/ports/run): HTTP through service URLs and bytes
through tunnels, driven from this host through the harness's forwarded ports, printed beside
the CLI's exec and file-transfer figures from the same run (argv: the harness's BENCH lines)."""

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from langsmith.sandbox import SandboxClient

SERVE, TUNNEL_PORT, KEY = os.environ["SERVE_URL"], int(os.environ["TUNNEL_PORT"]), os.environ["BENCH_KEY"]
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CLIENTS = int(os.environ.get("BENCH_CLIENTS", "16"))
MIB = int(os.environ.get("BENCH_MIB", "100"))
TOKEN = "X-Langsmith-Sandbox-Service-Token"

# "cli-exec N MS", "cli-cp-in MIB MS", "cli-cp-out MIB MS", "expose {JSON}".
lines = dict(line.split(" ", 1) for line in sys.argv[1:])
execs, exec_ms = map(int, lines["cli-exec"].split())
cli_exec_ms = exec_ms / execs
cp_in_s = int(lines["cli-cp-in"].split()[1]) / 1000
cp_out_s = int(lines["cli-cp-out"].split()[1]) / 1000
exposed = json.loads(lines["expose"])


def here(url):
    """A URL the harness handed out (its own 127.0.0.1:8080) as this host reaches it."""
    parts = urlsplit(url)
    return SERVE + parts.path


def requests_per_second(url, token, clients):
    """GETs of `url` by `clients` threads (each its own keep-alive connection to the server)
    for SECONDS: (requests per second, failures)."""
    done, failed = [0] * clients, [0] * clients
    stop = time.monotonic() + SECONDS

    def client(i):
        with httpx.Client(headers={TOKEN: token}, timeout=30) as c:
            while time.monotonic() < stop:
                r = c.get(url)
                if r.status_code == 200 and "hello.txt" in r.text:
                    done[i] += 1
                else:
                    failed[i] += 1

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.monotonic() - t0), sum(failed)


def push(port):
    """MIB MiB to the sink behind local `port`: seconds until it said it had them all."""
    data = b"\0" * (1 << 20)
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=300) as c:
        c.sendall(f"{MIB << 20}\n".encode())
        for _ in range(MIB):
            c.sendall(data)
        answer = c.makefile("rb").readline()
    took = time.monotonic() - t0
    assert answer == f"ok {MIB << 20}\n".encode(), answer
    return took


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until_up(url, token):
    deadline = time.monotonic() + 60
    while httpx.get(url, headers={TOKEN: token}).status_code != 200:
        assert time.monotonic() < deadline, f"{url} never answered 200"
        time.sleep(0.5)


failures = 0
# The CLI sandbox through the URL `ember expose` printed.
cli_url = here(exposed["service_url"]) + "/"
until_up(cli_url, exposed["token"])
cli_rps1, f1 = requests_per_second(cli_url, exposed["token"], 1)
cli_rpsn, fn = requests_per_second(cli_url, exposed["token"], CLIENTS)
tunnel_cli_s = push(TUNNEL_PORT)
failures += f1 + fn

# An SDK box from the same template, with the same services.
client = SandboxClient(api_endpoint=f"{SERVE}/api/v2/sandboxes", api_key=KEY, max_retries=0, timeout=300)
with client.sandbox(snapshot="bench", name=f"ports-{uuid.uuid4().hex[:8]}", timeout=300) as sb:
    sb.write("/srv/www/hello.txt", "hello\n")
    sb.write("/srv/sink.py", (Path(__file__).parent / "sink.py").read_text())
    sb.run("cd /srv/www && setsid nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &")
    sb.run("setsid nohup python3 /srv/sink.py 9000 >/dev/null 2>&1 </dev/null &")
    svc = sb.service(port=8000, expires_in_seconds=3600)
    sdk_url = here(svc.service_url) + "/"
    until_up(sdk_url, svc.token)
    sdk_rps1, f1 = requests_per_second(sdk_url, svc.token, 1)
    failures += f1
    t0 = time.monotonic()
    for _ in range(execs):
        sb.run("true")
    sdk_exec_ms = (time.monotonic() - t0) * 1000 / execs
    t0 = time.monotonic()
    sb.write("/tmp/payload", b"\0" * (MIB << 20), timeout=600)
    sdk_write_s = time.monotonic() - t0
    with sb.tunnel(remote_port=9000, local_port=free_port()) as t:
        deadline = time.monotonic() + 30
        while True:
            try:
                sdk_tunnel_s = push(t.local_port)
                break
            except (ConnectionError, AssertionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

W = 52
print(f"{'':{W}} {'figure':>14}   compared")
print(f"{'exec round trip: ember exec true (in the harness)':{W}} {cli_exec_ms:>11.1f} ms   {1000 / cli_exec_ms:.0f}/s")
print(f"{'exec round trip: SDK run(true) over WebSocket':{W}} {sdk_exec_ms:>11.1f} ms   {1000 / sdk_exec_ms:.0f}/s")
print(f"{'HTTP GET, ember expose URL, 1 client':{W}} {cli_rps1:>9.0f} req/s   {cli_rps1 * cli_exec_ms / 1000:.2f}x ember exec's round trips/s")
print(f"{f'HTTP GET, ember expose URL, {CLIENTS} clients':{W}} {cli_rpsn:>9.0f} req/s   {cli_rpsn / cli_rps1:.2f}x one client")
print(f"{'HTTP GET, SDK service URL, 1 client':{W}} {sdk_rps1:>9.0f} req/s   {sdk_rps1 * sdk_exec_ms / 1000:.2f}x SDK run(true)/s")
print(f"{f'{MIB} MiB in: ember cp (in the harness)':{W}} {cp_in_s:>12.2f} s   {MIB / cp_in_s:.1f} MiB/s")
print(f"{f'{MIB} MiB out: ember cp (in the harness)':{W}} {cp_out_s:>12.2f} s   {MIB / cp_out_s:.1f} MiB/s")
print(f"{f'{MIB} MiB in: SDK write (through the server)':{W}} {sdk_write_s:>12.2f} s   {MIB / sdk_write_s:.1f} MiB/s")
print(f"{f'{MIB} MiB in: ember tunnel (forwarded port)':{W}} {tunnel_cli_s:>12.2f} s   {MIB / tunnel_cli_s:.1f} MiB/s, {cp_in_s / tunnel_cli_s:.2f}x ember cp (target >= 0.7)")
print(f"{f'{MIB} MiB in: SDK sb.tunnel() (through the server)':{W}} {sdk_tunnel_s:>12.2f} s   {MIB / sdk_tunnel_s:.1f} MiB/s, {cp_in_s / sdk_tunnel_s:.2f}x ember cp, {sdk_write_s / sdk_tunnel_s:.2f}x SDK write")
print(f"failed HTTP requests: {failures}")
sys.exit(1 if failures else 0)
