# End-to-end tests of `ember tunnel` (the agent's Dial, through the VMM's vsock), run inside the
# nested harness by tests/e2e/run (busybox sh): `python3 -m http.server` and a TCP echo service
# in a sandbox, reached from the host through a tunnel; a port nobody listens on; the same
# http.server through the URL `ember expose` prints, served by `ember serve`. The cases
# share one sandbox, started by the first and removed by the last.
. /opt/ember/extra/lib.sh
SB=e2e-tunnel
STATE=$HOME/.local/state/ember/sandboxes
EXTRA_LOGS="$STATE/$SB/vmm.log $STATE/$SB/console.log"

# A TCP echo service on 127.0.0.1:7000 in the guest: echoes until the client's end of file,
# then says how many bytes it read and closes (so the host sees the half-close arrive).
ECHO='import socket, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 7000))
s.listen(64)
def serve(c):
    n = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        n += len(d)
        c.sendall(d)
    c.sendall(b"read %d\n" % n)
    c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()'

# tunnel LOCAL_PORT REMOTE_PORT: starts `ember tunnel` in the background (its pid in $tunnel),
# its printed address in tunnel.addr and its messages in tunnel.err; waits for the address.
tunnel() {
  command ember tunnel $SB "$2" --local "127.0.0.1:$1" >tunnel.addr 2>tunnel.err &
  tunnel=$!
  for _ in $(seq 50); do
    [ -s tunnel.addr ] && return 0
    sleep 0.1
  done
  echo "    the tunnel printed no address:"; cat tunnel.err
  return 1
}

# until_listening PORT: waits for a listener on PORT in the guest.
until_listening() {
  in_sb $SB python3 -c "
import socket, time
for _ in range(100):
    try:
        socket.create_connection(('127.0.0.1', $1)).close()
        break
    except OSError:
        time.sleep(0.1)
else:
    raise SystemExit('nothing listens on $1')"
}

case_http_server_in_the_sandbox_through_a_tunnel() {
  ember run --detach --name $SB --mem-mib 512 >/dev/null 2>err
  expect_status 0 || return 1
  in_sb $SB sh -c 'mkdir -p /srv/www && echo tunnelled >/srv/www/marker.txt' || return 1
  in_sb $SB sh -c 'cd /srv/www && setsid nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &' || return 1
  until_listening 8000 || return 1
  tunnel 18000 8000 || return 1
  expect_in tunnel.addr 127.0.0.1:18000 || { kill $tunnel; return 1; }
  busybox wget -q -O listing http://127.0.0.1:18000/ && busybox wget -q -O marker http://127.0.0.1:18000/marker.txt
  ok=$?
  # 50 requests at once, each its own stream through the agent.
  pids=
  for i in $(seq 50); do
    busybox wget -q -O "many.$i" http://127.0.0.1:18000/marker.txt &
    pids="$pids $!"
  done
  for p in $pids; do wait "$p"; done
  kill $tunnel
  [ $ok = 0 ] && expect_in listing marker.txt && expect_in marker tunnelled || return 1
  for i in $(seq 50); do
    grep -q tunnelled "many.$i" 2>/dev/null || { echo "    request $i of 50 failed"; return 1; }
  done
}

case_a_tcp_echo_through_a_tunnel_sees_the_half_close() {
  in_sb $SB sh -c 'setsid nohup python3 -c "$1" >/dev/null 2>&1 </dev/null &' sh "$ECHO" || return 1
  until_listening 7000 || return 1
  tunnel 17000 7000 || return 1
  head -c 1048576 /dev/urandom >blob
  # busybox nc shuts its write side at its input's end (-q 0 / default) and prints until the
  # service closes: the echo, then the service's count, which it sends only after end of file.
  busybox nc 127.0.0.1 17000 <blob >back
  kill $tunnel
  head -c 1048576 back | cmp -s - blob || { echo "    the echo differs ($(wc -c <back) bytes back)"; return 1; }
  tail -c 13 back | grep -q "read 1048576" || { echo "    the service did not see end of file after all the bytes"; return 1; }
}

case_a_port_nobody_listens_on_gives_the_clear_error() {
  tunnel 17009 9 || return 1
  busybox wget -q -O /dev/null http://127.0.0.1:17009/ 2>/dev/null
  got=$?
  sleep 0.5
  kill $tunnel
  [ $got != 0 ] || { echo "    a request through the tunnel succeeded"; return 1; }
  expect_in tunnel.err "cannot reach port 9 in the sandbox"
}

# field NAME FILE: the string NAME of the one-line JSON object in FILE.
field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$2"; }

case_ember_expose_prints_a_url_that_serves_with_its_token_until_unexpose() {
  command ember serve --listen 127.0.0.1:18080 >serve.out 2>serve.err &
  serve=$!
  for _ in $(seq 100); do
    [ -s "$HOME/.local/state/ember/server/local.json" ] && break
    sleep 0.1
  done
  ember expose $SB 8000 --ttl 60 --json >exposed 2>err
  expect_status 0 || { kill $serve; cat serve.err; return 1; }
  url=$(field service_url exposed) token=$(field token exposed)
  busybox wget -q -O listing --header "X-Langsmith-Sandbox-Service-Token: $token" "$url/"
  with=$?
  busybox wget -q -O /dev/null "$url/" 2>/dev/null
  without=$?
  ember unexpose $SB 8000 2>unexposed
  busybox wget -q -O /dev/null --header "X-Langsmith-Sandbox-Service-Token: $token" "$url/" 2>/dev/null
  revoked=$?
  ember expose no-such-sandbox 8000 2>nothing
  none=$?
  kill $serve
  [ $with = 0 ] && expect_in listing marker.txt || { echo "    the URL with its token did not serve ($url)"; return 1; }
  [ $without != 0 ] || { echo "    the URL served without a token"; return 1; }
  expect_in unexposed "1 service URL" || return 1
  [ $revoked != 0 ] || { echo "    the URL served after unexpose"; return 1; }
  [ $none != 0 ] && expect_in nothing "no sandbox 'no-such-sandbox'"
}

case_a_tunnel_to_no_sandbox_fails_at_once() {
  ember tunnel no-such-sandbox 80 >/dev/null 2>err
  expect_status 1 && expect_in err "no sandbox named no-such-sandbox" || return 1
  rm_sb $SB
}

run_cases "$0"
