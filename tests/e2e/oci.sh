# OCI images built with busybox, for the suites that import, pull or serve them (sourced inside
# the nested harness: tests/e2e/images.sh, tests/sdk/serve-in-harness.sh). The layout's two
# layers hold a whiteout, an opaque directory, a hard link, a setuid file and a user's files;
# its config a user, a working directory and variables.

# put_blob FILE: copies FILE into the layout's blobs; prints '"digest": ..., "size": ...'.
put_blob() {
  d=$(sha256sum "$1" | cut -d' ' -f1)
  mkdir -p layout/blobs/sha256
  cp "$1" "layout/blobs/sha256/$d"
  printf '"digest": "sha256:%s", "size": %s' "$d" "$(wc -c <"$1")"
}

# make_layers [TEXT]: base.tar (busybox as /bin/sh and its applets, users, files to hide) and
# top.tar (the whiteout, the opaque directory, a hard link, the user's file, and TEXT in
# /etc/variant, which makes another image of the same layout).
make_layers() {
  mkdir -p base/bin base/etc base/opt/old base/usr/bin base/home/app top/etc top/opt top/home/app top/bin
  cp /bin/busybox base/bin/busybox
  for a in $(/bin/busybox --list); do [ -e "base/bin/$a" ] || ln -s busybox "base/bin/$a"; done
  printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n' >base/etc/passwd
  printf 'root:x:0:\napp:x:1001:\n' >base/etc/group
  echo secret >base/etc/secret
  echo old >base/opt/old/file
  echo su >base/usr/bin/su && chmod 4755 base/usr/bin/su
  chown 1000:1001 base/home/app && chmod 750 base/home/app
  : >top/etc/.wh.secret
  : >top/opt/.wh..wh..opq
  echo new >top/opt/new
  echo data >top/home/app/data && chown -R 1000:1001 top/home/app && chmod 640 top/home/app/data
  cp base/bin/busybox top/bin/tool && ln top/bin/tool top/bin/tool-again
  chmod 750 top/home/app
  echo "${1:-}" >top/etc/variant
  (cd base && tar -cf ../base.tar .) && (cd top && tar -cf ../top.tar .) || return 1
}

config_json() {
  printf '{"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin", "GREETING=hello there"], "WorkingDir": "/home/app", "User": "app", "Cmd": ["sh"]}, "rootfs": {"type": "layers", "diff_ids": ["sha256:%s", "sha256:%s"]}}' \
    "$(sha256sum base.tar | cut -d' ' -f1)" "$(sha256sum top.tar | cut -d' ' -f1)"
}

make_layout() {
  make_layers "$@" || return 1
  gzip -c base.tar >base.tar.gz
  config_json >config.json
  printf '{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": {"mediaType": "application/vnd.oci.image.config.v1+json", %s}, "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", %s}, {"mediaType": "application/vnd.oci.image.layer.v1.tar", %s}]}' \
    "$(put_blob config.json)" "$(put_blob base.tar.gz)" "$(put_blob top.tar)" >manifest.json
  printf '{"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", %s, "platform": {"architecture": "amd64", "os": "linux"}, "annotations": {"org.opencontainers.image.ref.name": "1"}}]}' \
    "$(put_blob manifest.json)" >layout/index.json
  echo '{"imageLayoutVersion": "1.0.0"}' >layout/oci-layout
}

# registry: Debian's docker-registry on 127.0.0.1:5000, storing under ./reg, logging to reg.log;
# its pid in REGISTRY_PID.
registry() {
  printf 'version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: %s/reg\nhttp:\n  addr: 127.0.0.1:5000\n' "$PWD" >reg.yml
  docker-registry serve reg.yml >reg.log 2>&1 &
  REGISTRY_PID=$!
  for _ in $(seq 100); do wget -q -O /dev/null http://127.0.0.1:5000/v2/ 2>/dev/null && return 0; sleep 0.2; done
  echo "    the registry did not answer:"; sed 's/^/    | /' reg.log; return 1
}

# push_layout REF: the layout's image "1" to the registry as REF (skopeo, any signature accepted).
push_layout() {
  echo '{"default": [{"type": "insecureAcceptAnything"}]}' >policy.json
  skopeo --policy policy.json copy --quiet --dest-tls-verify=false oci:layout:1 "docker://$1" 2>push.err ||
    { echo "    skopeo copy to $1 failed:"; sed 's/^/    | /' push.err; return 1; }
}
