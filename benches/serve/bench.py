"""The serve benchmark's host side (benches/serve/run): the unmodified langsmith SDK against the
two servers in the harness, figures printed beside the CLI's from the same run."""

import concurrent.futures
import os
import statistics
import sys
import time
import uuid

import requests
from langsmith.sandbox import SandboxClient

POOLED, PLAIN, KEY = os.environ["POOLED_URL"], os.environ["PLAIN_URL"], os.environ["BENCH_KEY"]
N = int(os.environ.get("BENCH_N", "5"))
# The CLI's figures from the harness: "cli-create MS" lines and one "cli-exec-20 MS".
cli_lines = [line.split(" ", 1) for line in sys.argv[1:]]
cli_ms = statistics.median(int(v) for k, v in cli_lines if k == "cli-create")
cli_exec = next(int(v) for k, v in cli_lines if k == "cli-exec-20") / 20


def client(url):
    return SandboxClient(api_endpoint=f"{url}/api/v2/sandboxes", api_key=KEY, max_retries=0, timeout=300)


def pool_held(url):
    text = requests.get(f"{url}/metrics", headers={"X-Api-Key": KEY}).text
    return sum(int(l.split()[-1]) for l in text.splitlines() if l.startswith("ember_pool_sandboxes"))


def create_and_run(c):
    name = f"b-{uuid.uuid4().hex[:8]}"
    t0 = time.monotonic()
    sb = c.create_sandbox(name=name, snapshot="sdk", timeout=300)
    assert sb.run("true").exit_code == 0
    took = time.monotonic() - t0
    c.delete_sandbox(name)
    return took


def median_ms(xs):
    return statistics.median(xs) * 1000


pooled, plain = [], []
cp, cn = client(POOLED), client(PLAIN)
for _ in range(N):
    while pool_held(POOLED) < 2:
        time.sleep(0.5)
    pooled.append(create_and_run(cp))
    plain.append(create_and_run(cn))

with cn.sandbox(snapshot="sdk", timeout=300) as sb:
    t0 = time.monotonic()
    for _ in range(20):
        sb.run("true")
    ws20 = (time.monotonic() - t0) * 1000
    got = [0]
    t0 = time.monotonic()
    sb.run("head -c 104857600 /dev/zero | tr '\\0' a", on_stdout=lambda chunk: got.__setitem__(0, got[0] + len(chunk)))
    stream_s = time.monotonic() - t0
    assert got[0] == 100 << 20, got[0]

errors = []
t0 = time.monotonic()


def one(_):
    try:
        return create_and_run(cn)
    except Exception as e:  # every failure is counted and shown, none hidden
        errors.append(f"{type(e).__name__}: {e}")
        return None


with concurrent.futures.ThreadPoolExecutor(max_workers=50) as pool:
    done = [t for t in pool.map(one, range(50)) if t is not None]
fifty_s = time.monotonic() - t0

print(f"{'':44} {'median':>10}")
print(f"{'CLI: ember run --detach --template + exec':44} {cli_ms:>8.0f} ms")
print(f"{'SDK create + run(true), no pool':44} {median_ms(plain):>8.0f} ms   {median_ms(plain) / cli_ms:.2f}x CLI")
print(f"{'SDK create + run(true), warm pool':44} {median_ms(pooled):>8.0f} ms   {median_ms(plain) / median_ms(pooled):.2f}x faster than no pool")
print(f"{'exec round trip: ember exec true':44} {cli_exec:>8.0f} ms")
print(f"{'exec round trip: SDK run(true) over WebSocket':44} {ws20 / 20:>8.0f} ms   {ws20 / 20 / cli_exec:.2f}x ember exec")
print(f"{'100 MiB streamed out of a command (SDK)':44} {stream_s:>8.1f} s    {100 / stream_s:.1f} MiB/s")
print(f"{'50 concurrent create+run+delete (SDK)':44} {fifty_s:>8.1f} s    {len(done)} ok, {len(errors)} failed")
for e in errors[:5]:
    print(f"    {e}")
sys.exit(1 if errors else 0)
