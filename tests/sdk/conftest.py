"""Fixtures for the SDK tests: a server, keys of two tenants, and clients of the unmodified
langsmith SDK pointed at it.

Against a running server (`ember serve`, say inside the nested harness):
    EMBER_SERVE_URL=http://127.0.0.1:8080     the server's root
    EMBER_SERVE_KEY=...                        a key of one tenant
    EMBER_SERVE_OTHER_KEY=...                  a key of another tenant
    EMBER_SERVE_QUOTA_KEY=...                  optional: a key of a tenant with max_boxes=1
    EMBER_SERVE_SNAPSHOT=...                   optional: what boxes are made from (a template)
Without EMBER_SERVE_URL the tests start the fake backend's server, EMBER_FAKE_SERVE (the
`fake_serve` example's binary), with keys of their own.
"""

import os
import secrets
import subprocess
import tempfile

import pytest
from langsmith.sandbox import AsyncSandboxClient, SandboxClient

FAKE = "EMBER_SERVE_URL" not in os.environ
CREATE_TIMEOUT = int(os.environ.get("EMBER_SERVE_CREATE_TIMEOUT", "120"))


class Server:
    def __init__(self, url, key, other_key, quota_key):
        self.url = url.rstrip("/")
        self.api = f"{self.url}/api/v2/sandboxes"
        self.key = key
        self.other_key = other_key
        self.quota_key = quota_key
        self.snapshot = os.environ.get("EMBER_SERVE_SNAPSHOT")

    def client(self, key=None):
        return SandboxClient(api_endpoint=self.api, api_key=key or self.key, max_retries=0, timeout=60)

    def async_client(self):
        return AsyncSandboxClient(api_endpoint=self.api, api_key=self.key, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def server():
    if not FAKE:
        yield Server(
            os.environ["EMBER_SERVE_URL"],
            os.environ["EMBER_SERVE_KEY"],
            os.environ["EMBER_SERVE_OTHER_KEY"],
            os.environ.get("EMBER_SERVE_QUOTA_KEY"),
        )
        return
    binary = os.environ.get("EMBER_FAKE_SERVE")
    if not binary:
        pytest.exit("set EMBER_SERVE_URL to a server, or EMBER_FAKE_SERVE to the fake_serve binary (tests/sdk/run does)", 2)
    keys = {name: secrets.token_hex(16) for name in ("alice", "bob", "carol")}
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(f"alice {keys['alice']}\nbob {keys['bob']}\ncarol {keys['carol']} max_boxes=1\n")
    proc = subprocess.Popen([binary, "--keys", f.name, "--pool", "default=1"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on "), f"fake_serve said {line!r}"
        yield Server(line.split()[-1], keys["alice"], keys["bob"], keys["carol"])
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        os.unlink(f.name)


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


@pytest.fixture
def sb(server, client):
    """A box for one test, deleted after it."""
    with client.sandbox(snapshot=server.snapshot, timeout=CREATE_TIMEOUT) as sandbox:
        yield sandbox
