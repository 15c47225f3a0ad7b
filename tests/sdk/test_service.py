"""Service URLs through the unmodified SDK: `sb.service(port=...)` to an HTTP server started in
the box; 401 without, with a wrong or with an expired token; the login URL's cookie; a port
nobody listens on (502 naming it); a streamed response; another tenant's key; revocation."""

import socket
import time

import httpx
import pytest
from langsmith.sandbox import ResourceNotFoundError

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
s = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
# A minute without a request ends it (on the fake backend it is a process of the host).
s.timeout = 60
s.handle_timeout = sys.exit
while True:
    s.handle_request()
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_port(sb):
    port = free_port()
    sb.write(f"{ROOT}/files/hello.txt", "hi\n")
    sb.write(f"{ROOT}/server.py", SERVER)
    sb.run(f"nohup python3 .{ROOT}/server.py {port} .{ROOT}/files >/dev/null 2>&1 &", run_config={"work_dir": "/"})
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
