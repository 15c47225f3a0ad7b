# End-to-end tests of virtio-vsock and the guest agent, run inside the nested harness by
# tests/e2e/run (busybox sh): `ember exec` reaches the agent in a running Debian sandbox through
# the VM's vsock socket.
. /opt/ember/extra/lib.sh

# start_vm: boots the Debian image with a vsock device at ./v.sock; the job keeps the VM up
# until /tmp/stop exists in the guest. Waits until the agent answers.
start_vm() {
  ember disk create --base $IMAGES/default.ext4 top.qcow2 >>out 2>>err || return 1
  mkjob job.img "while [ ! -e /tmp/stop ]; do sleep 0.2; done"
  command ember run --mem-mib 512 --drive path=top.qcow2,root=on --drive path=job.img,ro=on \
    --vsock "cid=3,uds=$PWD/v.sock" --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >vm.out 2>&1 &
  vm=$!
  n=0
  until command ember exec --uds "$PWD/v.sock" -- true 2>/dev/null; do
    n=$((n + 1))
    [ $n -lt 60 ] || { echo "    the agent never answered"; tail -5 vm.out; return 1; }
    sleep 1
  done
}

# stop_vm: lets the job end; the guest powers off and ember exits 0.
stop_vm() {
  command ember exec --uds "$PWD/v.sock" -- touch /tmp/stop >/dev/null 2>&1
  wait $vm
}

case_exec_streams_output_and_reports_exit_status() {
  start_vm || return 1
  ember exec --uds "$PWD/v.sock" -- python3 -c \
    'import sys; print(2**64); print("to-stderr", file=sys.stderr); sys.exit(3)' >eout 2>eerr
  expect_status 3 && expect_in eout 18446744073709551616 && expect_in eerr to-stderr &&
    ! grep -q to-stderr eout || { stop_vm; return 1; }
  ember exec --uds "$PWD/v.sock" -- sh -c 'kill -9 $$' >/dev/null 2>&1
  expect_status 137 || { stop_vm; return 1; }
  ember exec --uds "$PWD/v.sock" -- no-such-command >/dev/null 2>&1
  expect_status 127 || { stop_vm; return 1; }
  ember exec --uds "$PWD/v.sock" --timeout 1 -- sleep 30 >/dev/null 2>&1
  expect_status 124 || { stop_vm; return 1; }
  ember exec --uds "$PWD/v.sock" --env GREETING=hi --cwd /tmp -- sh -c 'echo $GREETING from $(pwd)' >eout 2>&1
  expect_in eout "hi from /tmp" || { stop_vm; return 1; }
  stop_vm
  [ $? = 0 ] || { echo "    the VM did not power off cleanly"; return 1; }
}

case_a_large_output_stream_arrives_intact() {
  start_vm || return 1
  # Linux sends large vsock payloads as several descriptors: this crosses that path many times.
  ember exec --uds "$PWD/v.sock" -- sh -c 'head -c 2097152 /dev/urandom | tee /tmp/blob' >blob 2>err
  expect_status 0 || { stop_vm; return 1; }
  guest=$(command ember exec --uds "$PWD/v.sock" -- md5sum /tmp/blob | cut -d' ' -f1)
  host=$(md5sum blob | cut -d' ' -f1)
  stop_vm
  [ "$(wc -c <blob)" = 2097152 ] && [ -n "$guest" ] && [ "$guest" = "$host" ] ||
    { echo "    $(wc -c <blob) bytes, md5 $host on the host, $guest in the guest"; return 1; }
}

case_exec_without_an_agent_port_is_an_ember_error() {
  start_vm || return 1
  ember exec --uds "$PWD/v.sock" --port 4444 -- true >/dev/null 2>eerr
  expect_status 125 && expect_in eerr "no listener on vsock port 4444"
  r=$?
  stop_vm
  return $r
}

run_cases "$0"
