# The demo's sandbox (POSIX sh: runs under busybox in the nested harness, or any sh on a host
# with hardware KVM): starts a Debian sandbox in the background, runs a Python snippet in it
# through `ember exec`, then removes it. Needs `ember` on PATH and EMBER_HOME holding vmlinux
# and images/default.ext4.
started=$(date +%s)
name=$(ember run --detach --mem-mib 512) || exit 1
echo "demo: sandbox $name up in $(($(date +%s) - started)) s; running Python in it:"
ember exec "$name" -- python3 -c '
import platform, sys
print(f"hello from {platform.node()}: Python {sys.version.split()[0]} on Linux {platform.release()}")
print("2**64 =", 2**64)' </dev/null
status=$?
ember rm "$name"
exit $status
