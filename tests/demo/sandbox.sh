# The demo's sandbox (POSIX sh: runs under busybox in the nested harness, or any sh on a host
# with hardware KVM): boots the Debian image from a fresh overlay with a vsock device, waits for
# the guest agent, runs a Python snippet in the sandbox through `ember exec`, then stops it.
# Needs `ember` on PATH and EMBER_HOME holding vmlinux and images/default.ext4.
work=$(mktemp -d)
cd "$work" || exit 1
ember disk create --base "$EMBER_HOME/images/default.ext4" sandbox.qcow2 >/dev/null || exit 1
# The image's init runs this job; it keeps the sandbox up until asked to stop.
dd if=/dev/zero of=job.img bs=4096 count=1 2>/dev/null
printf '%s\n' 'while [ ! -e /tmp/stop ]; do sleep 0.2; done' | dd of=job.img conv=notrunc 2>/dev/null
started=$(date +%s)
ember run --mem-mib 512 --drive path=sandbox.qcow2,root=on --drive path=job.img,ro=on \
  --vsock "cid=3,uds=$work/v.sock" --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >vm.log 2>&1 &
vm=$!
tries=0
until ember exec --uds "$work/v.sock" -- true 2>/dev/null; do
  tries=$((tries + 1))
  [ $tries -lt 120 ] || { echo "demo: the sandbox did not come up:"; cat vm.log; exit 1; }
  sleep 0.5
done
echo "demo: sandbox up in $(($(date +%s) - started)) s; running Python in it:"
ember exec --uds "$work/v.sock" -- python3 -c '
import platform, sys
print(f"hello from {platform.node()}: Python {sys.version.split()[0]} on Linux {platform.release()}")
print("2**64 =", 2**64)'
status=$?
ember exec --uds "$work/v.sock" -- touch /tmp/stop
wait $vm
cd / && rm -rf "$work"
exit $status
