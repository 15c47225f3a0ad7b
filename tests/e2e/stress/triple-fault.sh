# Stress loop for issue 21's guest triple faults: not one of the CI suites, run as
#   tests/e2e/run tests/e2e/stress/triple-fault.sh
# The first case boots STRESS_BOOTS (10) pairs of sandboxes cold, two at once; the second streams
# STRESS_CHURN (4) times 100 MiB out of one restored sandbox. Each prints how many guests
# triple-faulted, and each failure's VMM log line.
. /opt/ember/extra/lib.sh

STRESS_BOOTS=${STRESS_BOOTS:-10}
STRESS_CHURN=${STRESS_CHURN:-4}

echo "kvm_amd: $(cd /sys/module/kvm_amd/parameters && grep -H . * | tr '\n' ' ')"

faults() { grep -h "triple fault" "$@" 2>/dev/null | sed 's/^/    /'; }

case_cold_boots_two_at_once() {
  export EMBER_STATE="$PWD/st"
  i=0 bad=0
  while [ $i -lt "$STRESS_BOOTS" ]; do
    i=$((i + 1))
    ember run --detach --cold --name a$i >>out 2>err.a$i &
    ember run --detach --cold --name b$i >>out 2>err.b$i
    wait
    for sb in a$i b$i; do
      if grep -q "triple" err.$sb; then bad=$((bad + 1)); faults err.$sb; fi
    done
    command ember rm a$i b$i >/dev/null 2>&1
  done
  echo "    $bad of $((2 * STRESS_BOOTS)) cold boots triple-faulted"
  [ $bad = 0 ]
}

case_a_restored_sandbox_streams_100_mib_again_and_again() {
  export EMBER_STATE="$PWD/st"
  ember run --detach --mem-mib 512 --name c >>out 2>>err || { echo "    the sandbox did not start"; return 1; }
  i=0 ok=0
  while [ $i -lt "$STRESS_CHURN" ]; do
    i=$((i + 1))
    sum=$(ember exec c -- sh -c 'head -c 104857600 /dev/urandom | tee /tmp/blob' </dev/null 2>>err | md5sum | cut -d' ' -f1)
    guest=$(ember exec c -- md5sum /tmp/blob </dev/null 2>>err | cut -d' ' -f1)
    ember exec c -- rm -f /tmp/blob </dev/null 2>>err
    if [ -n "$guest" ] && [ "$sum" = "$guest" ]; then ok=$((ok + 1)); else
      echo "    round $i: md5 $sum on the host, '$guest' in the guest"; faults st/sandboxes/c/vmm.log
      break
    fi
  done
  command ember rm c >/dev/null 2>&1
  echo "    $ok of $STRESS_CHURN rounds of 100 MiB came through"
  [ $ok = "$STRESS_CHURN" ]
}

run_cases "$0"
