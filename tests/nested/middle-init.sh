#!/bin/busybox sh
# /init of the nested harness's middle machine (built into its initramfs by tests/nested/run).
#
# Channels: ttyS0 is the kernel console (the host keeps it in a log file); ttyS1 carries the
# harness protocol and the test script's output to the host's stdout. Protocol lines:
#   @@EMBER-NESTED-START@@ <nonce>            the script is about to start
#   @@EMBER-NESTED-EXIT@@ <nonce> <status>    the script ended with <status>
#   @@EMBER-NESTED-FAIL@@ <nonce> <reason>    the middle machine could not be set up
# (<nonce> is random per run, so no script output can pass for a marker.)
# Everything else on ttyS1 is the script's stdout+stderr, passed through as is.
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs shm /dev/shm
# ember puts each VMM in a cgroup of its own (memory.max, cpu.max, pids.max).
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null || true
ln -sf /proc/self/fd /dev/fd 2>/dev/null

OUT=/dev/ttyS1
stty -F $OUT raw -echo 2>/dev/null
exec 3>$OUT
N=$(cat /nested/nonce)

fail() {
  echo "@@EMBER-NESTED-FAIL@@ $N $*" >&3
  sync
  poweroff -f
  sleep 60
}

# Load modules in the dependency order the host computed (modprobe --show-depends).
load() { # $1 = file listing module basenames
  while read -r m; do
    [ -n "$m" ] || continue
    # A module an earlier list loaded already (the virtio core, for the NIC).
    name=${m%.ko}
    [ ! -d "/sys/module/$(echo "$name" | tr - _)" ] || continue
    params=
    [ "$name" != kvm-amd ] || params=$(cat /nested/kvm_amd.params 2>/dev/null)
    # shellcheck disable=SC2086 # the parameters are words
    insmod "/nested/modules/$m" $params 2>&3 || return 1
  done <"$1"
}

if ! load /nested/kvm.order || [ ! -c /dev/kvm ]; then
  dmesg | grep -iE 'kvm|svm|irqbypass' | sed 's/^/nested: middle dmesg: /' >&3
  [ -c /dev/kvm ] || fail "/dev/kvm absent in the middle machine (kvm modules failed to load)"
  fail "kvm modules failed to load"
fi

mkdir -p /opt/ember/images /opt/ember/extra /root
if [ -f /nested/disk.order ]; then
  load /nested/disk.order || fail "virtio modules failed to load"
  # virtio_blk probes asynchronously; wait a little for /dev/vda.
  i=0
  while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  [ -b /dev/vda ] || fail "images disk /dev/vda did not appear"
  mount -t ext4 /dev/vda /opt/ember/images 2>&3 || fail "cannot mount the images disk"
fi

# Loopback always (scripts may serve on it, e.g. `ember serve`); with NESTED_FORWARD, the NIC
# of QEMU's user network too, at its usual guest address.
ip link set lo up
if [ -f /nested/net.order ]; then
  load /nested/net.order || fail "virtio-net modules failed to load"
  i=0
  while ! ip link show eth0 >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
  ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 2>&3 || fail "cannot bring up eth0"
fi

cd /opt/ember/extra
echo "@@EMBER-NESTED-START@@ $N" >&3
env -i PATH=/opt/ember/bin:/bin:/sbin:/usr/bin:/usr/sbin EMBER_HOME=/opt/ember HOME=/root \
  TERM=dumb sh /nested/run/"$(cat /nested/script-name)" </dev/null >&3 2>&3
status=$?
cd /
sync
echo "@@EMBER-NESTED-EXIT@@ $N $status" >&3
poweroff -f
sleep 60
