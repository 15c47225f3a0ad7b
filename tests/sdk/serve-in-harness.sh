# Run by tests/sdk/in-harness inside the nested harness (busybox sh): `ember serve` on port
# 8080 with the keys file the host made (sdk.keys), over template `sdk`, one sandbox of it kept
# in a warm pool; prints the line the host waits for once the server answers, then serves until
# the host ends the middle machine.
ember template create sdk >/dev/null || { echo "ember template create failed"; exit 1; }
# An image for create_snapshot(docker_image=127.0.0.1:5000/sdk-app:1); the server puts the
# static agent into the images it builds.
. /opt/ember/extra/oci.sh
mkdir -p oci && (cd oci && make_layout sdk && registry && push_layout 127.0.0.1:5000/sdk-app:1) ||
  { echo "the test image was not pushed"; exit 1; }
export EMBER_AGENT=/opt/ember/extra/ember-agent
export SSL_CERT_FILE=/opt/ember/extra/ca-certificates.crt
ember serve --listen 0.0.0.0:8080 --keys /opt/ember/extra/sdk.keys --pool sdk=1 >serve.log 2>&1 &
pid=$!
n=0
# Any HTTP answer (a 401: no key) says it serves.
until wget -S -O /dev/null http://127.0.0.1:8080/metrics 2>&1 | grep -q "HTTP/"; do
  kill -0 $pid 2>/dev/null && [ $n -lt 120 ] || { echo "ember serve did not come up:"; cat serve.log; exit 1; }
  sleep 1; n=$((n + 1))
done
echo "EMBER-SDK-SERVER-READY"
# The server's log, live, for the host's report.
tail -f serve.log &
wait $pid
