# Ports benchmark, inside the nested harness (busybox sh), run by benches/ports/run: a sandbox
# `web` (template `bench`, the default image) serving `python3 -m http.server 8000` and the byte
# sink (sink.py) on 9000; the CLI's figures for the same sandbox (`ember exec true` round
# trips, 100 MiB with `ember cp` each way); then `ember serve` on 8080 with the URL
# `ember expose web 8000` printed, and `ember tunnel web 9000` on 9100, until the host ends the
# machine.
N=${BENCH_EXECS:-50}
MIB=${BENCH_MIB:-100}
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
fail() { echo "benches/ports: $*"; exit 1; }
ember template create bench >/dev/null || fail "ember template create failed"
ember run --detach --template bench --name web >/dev/null || fail "ember run failed"
ember exec web -- sh -c 'mkdir -p /srv/www && echo hello >/srv/www/hello.txt' </dev/null || fail "exec failed"
ember cp /opt/ember/extra/sink.py web:/srv/sink.py || fail "cp of sink.py failed"
ember exec web -- sh -c 'cd /srv/www && setsid nohup python3 -m http.server 8000 --bind 127.0.0.1 >/dev/null 2>&1 </dev/null &
  setsid nohup python3 /srv/sink.py 9000 >/dev/null 2>&1 </dev/null &' </dev/null || fail "the guest's services did not start"
up='import socket, sys, time
for port in (8000, 9000):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        sys.exit("port %d did not open" % port)'
ember exec web -- python3 -c "$up" </dev/null || fail "the guest's services did not come up"

t0=$(ms)
i=0
while [ $i -lt "$N" ]; do ember exec web -- true </dev/null; i=$((i + 1)); done
echo "BENCH cli-exec $N $(($(ms) - t0))"
head -c $((MIB << 20)) /dev/zero >/tmp/payload
t0=$(ms)
ember cp /tmp/payload web:/tmp/payload || fail "ember cp in failed"
echo "BENCH cli-cp-in $MIB $(($(ms) - t0))"
t0=$(ms)
ember cp web:/tmp/payload /tmp/back || fail "ember cp out failed"
echo "BENCH cli-cp-out $MIB $(($(ms) - t0))"
rm -f /tmp/payload /tmp/back
ember exec web -- rm -f /tmp/payload </dev/null

ember serve --listen 0.0.0.0:8080 --keys /opt/ember/extra/bench.keys >serve.log 2>&1 &
n=0
until wget -S -O /dev/null http://127.0.0.1:8080/metrics 2>&1 | grep -q "HTTP/"; do
  [ $n -lt 120 ] || { cat serve.log; fail "ember serve did not come up"; }
  sleep 1; n=$((n + 1))
done
url=$(ember expose web 8000 --ttl 3600 --json) || { cat serve.log; fail "ember expose failed"; }
echo "BENCH expose $url"
ember tunnel web 9000 --local 0.0.0.0:9100 >tunnel.out 2>tunnel.log &
n=0
until [ -s tunnel.out ]; do
  [ $n -lt 30 ] || { cat tunnel.log; fail "ember tunnel did not start"; }
  sleep 1; n=$((n + 1))
done
echo "EMBER-BENCH-PORTS-READY"
tail -f serve.log tunnel.log &
wait
