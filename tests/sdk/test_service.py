"""Service URLs through the unmodified SDK: `sb.service(port=...)` to an HTTP server started in
the box; 401 without, with a wrong or with an expired token; the login URL's cookie; a port
nobody listens on (502 naming it); a streamed response; 50 requests at once; a WebSocket; a
stopped box (503 until it is started); another tenant's key; revocation; a snapshot's child
(none of its parent's tokens)."""

import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import CREATE_TIMEOUT
from langsmith.sandbox import ResourceNotFoundError
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

ROOT = "/tmp/ember-sdk-service"
# GET /stream sends five chunks 0.3 s apart; any other path is the directory listing.
SERVER = """
import http.server, os, sys, time
os.chdir(sys.argv[2])
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        if self.path != "/stream":
            return super().do_GET()
        self.send_response(200)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(5):
            data = f"piece {i}\\n".encode()
            self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(data), data))
            self.wfile.flush()
            time.sleep(0.3)
        self.wfile.write(b"0\\r\\n\\r\\n")
class S(http.server.ThreadingHTTPServer):
    # Room for the test of 50 requests at once (the default backlog is 5).
    request_queue_size = 64
s = S(("127.0.0.1", int(sys.argv[1])), H)
# A minute without a request ends it (on the fake backend it is a process of the host).
s.timeout = 60
s.handle_timeout = sys.exit
while True:
    s.handle_request()
"""
# A WebSocket echo service with the standard library only (the box may have no websockets
# package): RFC 6455's handshake, then each text frame back unmasked, a close answered with
# a close. A request without an upgrade is a 426.
WS_SERVER = """
import base64, hashlib, socket, struct, sys
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
s.settimeout(60)
def frames(f):
    while len(head := f.read(2)) == 2:
        n = head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", f.read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", f.read(8))[0]
        mask = f.read(4)
        yield head[0] & 0x0F, bytes(b ^ mask[i % 4] for i, b in enumerate(f.read(n)))
def frame(opcode, data):
    n = len(data)
    length = bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536 else bytes([127]) + struct.pack("!Q", n)
    return bytes([0x80 | opcode]) + length + data
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    with c, c.makefile("rb") as f:
        f.readline()
        headers = {}
        for line in iter(f.readline, b"\\r\\n"):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        key = headers.get("sec-websocket-key")
        if headers.get("upgrade", "").lower() != "websocket" or not key:
            c.sendall(b"HTTP/1.1 426 Upgrade Required\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n")
            continue
        accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest())
        c.sendall(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n"
                  b"Sec-WebSocket-Accept: %s\\r\\n\\r\\n" % accept)
        for opcode, data in frames(f):
            if opcode == 1:
                c.sendall(frame(1, data))
            elif opcode == 8:
                c.sendall(frame(8, data[:2]))
                break
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http_server(sb, port):
    """Starts SERVER on `port` of the box, serving a hello.txt (on the fake backend a second
    start on a port the first still holds ends at once, and the first serves on)."""
    sb.write(f"{ROOT}/files/hello.txt", "hi\n")
    sb.write(f"{ROOT}/server.py", SERVER)
    sb.run(f"nohup python3 .{ROOT}/server.py {port} .{ROOT}/files >/dev/null 2>&1 &", run_config={"work_dir": "/"})


@pytest.fixture
def http_port(sb):
    port = free_port()
    start_http_server(sb, port)
    return port


def until_up(svc):
    deadline = time.monotonic() + 30
    while True:
        r = svc.get("/")
        if r.status_code != 502 or time.monotonic() > deadline:
            return r
        time.sleep(0.2)


def test_the_service_url_serves_with_its_token_only(sb, http_port):
    svc = sb.service(port=http_port)
    r = until_up(svc)
    assert r.status_code == 200 and "hello.txt" in r.text, r.text
    assert httpx.get(svc.service_url + "/").status_code == 401
    wrong = svc.token[:-1] + ("0" if svc.token[-1] != "0" else "1")
    assert httpx.get(svc.service_url + "/", headers={"X-Langsmith-Sandbox-Service-Token": wrong}).status_code == 401
    assert httpx.get(svc.service_url + "/hello.txt", headers={"Authorization": f"Bearer {svc.token}"}).text == "hi\n"


def test_the_login_url_sets_a_cookie_that_serves(sb, http_port):
    svc = sb.service(port=http_port)
    until_up(svc)
    with httpx.Client(follow_redirects=True) as browser:
        r = browser.get(svc.browser_url)
        assert r.status_code == 200 and "hello.txt" in r.text, r.text
        assert browser.get(svc.service_url + "/hello.txt").text == "hi\n"


def test_an_expired_token_is_refused(sb, http_port):
    svc = sb.service(port=http_port, expires_in_seconds=1)
    token = svc._token
    time.sleep(1.5)
    r = httpx.get(svc._service_url + "/", headers={"X-Langsmith-Sandbox-Service-Token": token})
    assert r.status_code == 401 and "expired" in r.text


def test_a_streamed_response_arrives_in_pieces(sb, http_port):
    svc = sb.service(port=http_port)
    until_up(svc)
    arrivals = []
    with httpx.stream("GET", svc.service_url + "/stream", headers={"X-Langsmith-Sandbox-Service-Token": svc.token}) as r:
        for chunk in r.iter_raw():
            arrivals.append((time.monotonic(), chunk))
    assert b"".join(c for _, c in arrivals) == b"".join(f"piece {i}\n".encode() for i in range(5))
    assert arrivals[-1][0] - arrivals[0][0] > 0.6, "the pieces came as they were sent, not at the end"


def test_fifty_concurrent_requests_all_succeed(sb, http_port):
    svc = sb.service(port=http_port)
    until_up(svc)
    # One connection each (the SDK's helpers make one per request), all open at once.
    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(lambda i: svc.get(f"/hello.txt?n={i}", timeout=60), range(50)))
    assert [(r.status_code, r.text) for r in responses] == [(200, "hi\n")] * 50


def test_a_websocket_upgrade_passes_through_and_echoes(sb):
    port = free_port()
    sb.write(f"{ROOT}/ws.py", WS_SERVER)
    sb.run(f"nohup python3 .{ROOT}/ws.py {port} >/dev/null 2>&1 &", run_config={"work_dir": "/"})
    svc = sb.service(port=port)
    assert until_up(svc).status_code == 426, "a plain request reaches the service, which wants an upgrade"
    url = "ws" + svc.service_url.removeprefix("http") + "/echo"
    headers = {"X-Langsmith-Sandbox-Service-Token": svc.token}
    with connect(url, additional_headers=headers, proxy=None, open_timeout=30) as ws:
        ws.send("hello through the proxy")
        assert ws.recv(timeout=30) == "hello through the proxy"
        ws.send("and again")
        assert ws.recv(timeout=30) == "and again"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, proxy=None, open_timeout=30)
    assert refused.value.response.status_code == 401, "no token, no upgrade"


def test_a_stopped_box_is_a_503_until_started(client, sb, http_port):
    svc = sb.service(port=http_port)
    until_up(svc)
    sb.stop()
    r = svc.get("/hello.txt")
    assert r.status_code == 503 and "stopped" in r.text, r.text
    assert client.get_sandbox_status(sb.name).status == "stopped", "a service request starts no box"
    sb.start(timeout=CREATE_TIMEOUT)
    # A box stopped without its memory lost its processes (on the fake backend they run on).
    start_http_server(sb, http_port)
    r = until_up(svc)
    assert r.status_code == 200 and "hello.txt" in r.text, r.text
    assert sb.service(port=http_port).get("/hello.txt").text == "hi\n"


def test_a_port_nobody_listens_on_is_a_502_naming_it(sb):
    port = free_port()
    r = sb.service(port=port).get("/")
    assert r.status_code == 502 and str(port) in r.text, r.text


def test_another_tenants_key_mints_no_url(server, sb):
    with server.client(server.other_key) as other:
        with pytest.raises(ResourceNotFoundError):
            other.service(sb.name, 8000)


def test_revoked_tokens_stop_working(server, sb, http_port):
    svc = sb.service(port=http_port)
    until_up(svc)
    r = httpx.delete(f"{server.api}/boxes/{sb.name}/service-url", headers={"X-Api-Key": server.key})
    assert r.status_code == 200 and r.json()["revoked"] >= 1
    assert httpx.get(svc.service_url + "/", headers={"X-Langsmith-Sandbox-Service-Token": svc.token}).status_code == 401


def test_a_snapshots_child_has_none_of_its_parents_tokens(server, client, sb, http_port):
    parent = sb.service(port=http_port)
    until_up(parent)
    name = f"svc-{uuid.uuid4().hex[:8]}"
    snapshot = sb.capture_snapshot(name, timeout=CREATE_TIMEOUT)
    try:
        child = client.create_sandbox(snapshot=name, timeout=CREATE_TIMEOUT)
        try:
            r = httpx.delete(f"{server.api}/boxes/{child.name}/service-url", headers={"X-Api-Key": server.key})
            assert r.status_code == 200 and r.json() == {"revoked": 0}, r.text
            own = child.service(port=http_port)
            assert own.service_url != parent.service_url
            r = httpx.get(own.service_url + "/", headers={"X-Langsmith-Sandbox-Service-Token": parent.token})
            assert r.status_code == 401, r.text
            assert own.get("/").status_code != 401, "the child's own token opens its URL"
            assert parent.get("/hello.txt").text == "hi\n", "the parent's token still opens the parent's"
        finally:
            client.delete_sandbox(child.name)
    finally:
        client.delete_snapshot(snapshot.id)
