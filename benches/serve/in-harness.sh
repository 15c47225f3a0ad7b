# Serve benchmark, inside the nested harness (busybox sh), run by benches/serve/run: first the
# CLI's own figures for the same work (a sandbox restored from template `sdk` answering
# `true`; `ember exec true` round trips), then two servers over template `sdk` — port 8080
# with a warm pool of 2, port 8081 without (its own state) — until the host ends the machine.
N=${BENCH_N:-5}
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
ember template create sdk >/dev/null || { echo "ember template create failed"; exit 1; }
i=0
while [ $i -lt "$N" ]; do
  t0=$(ms)
  ember run --detach --template sdk --name cli-$i >/dev/null && ember exec cli-$i -- true </dev/null
  echo "BENCH cli-create $(($(ms) - t0))"
  i=$((i + 1))
done
t0=$(ms)
i=0
while [ $i -lt 20 ]; do ember exec cli-0 -- true </dev/null; i=$((i + 1)); done
echo "BENCH cli-exec-20 $(($(ms) - t0))"
i=0
while [ $i -lt "$N" ]; do ember rm cli-$i >/dev/null; i=$((i + 1)); done
ember serve --listen 0.0.0.0:8080 --keys /opt/ember/extra/bench.keys --pool sdk=2 >serve.log 2>&1 &
mkdir -p /tmp/nopool
EMBER_STATE=/tmp/nopool/state ember template create sdk >/dev/null || { echo "second template failed"; exit 1; }
EMBER_STATE=/tmp/nopool/state ember serve --listen 0.0.0.0:8081 --keys /opt/ember/extra/bench.keys >serve2.log 2>&1 &
for port in 8080 8081; do
  n=0
  until wget -S -O /dev/null http://127.0.0.1:$port/metrics 2>&1 | grep -q "HTTP/"; do
    [ $n -lt 120 ] || { echo "ember serve on $port did not come up:"; cat serve.log serve2.log; exit 1; }
    sleep 1; n=$((n + 1))
  done
done
echo "EMBER-BENCH-SERVERS-READY"
tail -f serve.log serve2.log &
wait
