#!/usr/bin/env bash
# `make image-smoke` (opt-in, root, no registry): build the image with buildah from a Debian
# base made here with debootstrap, offline from a wheelhouse, then run `discovery serve` in it
# against an etcd on 127.0.0.1 and register and resolve through it from outside.
#
# Needs: root, buildah and debootstrap (apt-get install buildah debootstrap), a Debian mirror
# (DEBIAN_MIRROR), an index for `pip download` (the host's pip configuration), and the
# project's venv (make install) for etcd and the client. Work files in SMOKE_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "image-smoke: run as root (buildah, debootstrap)" >&2; exit 2; }
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || { echo "image-smoke: $tool missing: apt-get install -y buildah debootstrap" >&2; exit 2; }
done
venv=${VENV:-.venv}
work=${SMOKE_DIR:-/tmp/discovery-image-smoke}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
base=localhost/debian-python:bookworm
image=localhost/discovery:smoke
mkdir -p "$work"
start=$(date +%s)

# 1. A base image with Python, from Debian packages (no registry pull)
if ! buildah inspect --type image "$base" >/dev/null 2>&1; then
    rm -rf "$work/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
        bookworm "$work/rootfs" "$mirror"
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/rootfs.tar" /
    buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
    buildah commit --rm "$ctr" "$base"
fi

# 2. The wheels for the base's Python (3.11), then the image, offline
python=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
[ "$python" = 311 ] || echo "image-smoke: the host's Python is not 3.11: downloading for 3.11 anyway" >&2
"$venv/bin/python" -m pip download --quiet --dest deploy/wheelhouse setuptools wheel
"$venv/bin/python" -m pip download --quiet --dest deploy/wheelhouse --python-version 3.11 \
    --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_28_x86_64 --platform linux_x86_64 --platform any \
    -r <("$venv/bin/python" - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
client = tomllib.load(open("clients/python/pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps + client if not d.startswith("discovery-client")))
PY
)
built=$(date +%s)
buildah bud --isolation chroot --layers=false --build-arg PYTHON_IMAGE="$base" \
    --build-arg PIP_NO_INDEX=1 -t "$image" .
done_build=$(date +%s)
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"

# 3. etcd on the host, the server in the image, register and resolve from outside
etcd_port=$("$venv/bin/python" -c 'from discovery.devtools.process import free_port; print(free_port())')
grpc_port=$("$venv/bin/python" -c 'from discovery.devtools.process import free_port; print(free_port())')
rm -rf "$work/etcd"
"$venv/bin/etcd" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls http://127.0.0.1:0 \
    --grpc-keepalive-min-time 500ms >"$work/etcd.log" 2>&1 &
etcd_pid=$!
ctr=$(buildah from "$image")
cleanup() {
    kill "${server_pid:-}" 2>/dev/null || true
    kill "$etcd_pid" 2>/dev/null || true
    buildah rm "$ctr" >/dev/null 2>&1 || true
}
trap cleanup EXIT
# the OpenTelemetry proto fix held (tests/xds/test_packaging.py's check), as the image's user
buildah run --isolation chroot --user 10001:0 "$ctr" -- python -c '
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope'
buildah run --isolation chroot --network host --user 10001:0 "$ctr" -- \
    discovery serve --region us-east --listen "127.0.0.1:$grpc_port" --etcd "127.0.0.1:$etcd_port" --insecure \
    >"$work/server.log" 2>&1 &
server_pid=$!
export DISCOVERY_INSECURE=1
for _ in $(seq 1 60); do
    "$venv/bin/discovery" status --server "127.0.0.1:$grpc_port" --timeout 1 >/dev/null 2>&1 && break
    sleep 1
done
"$venv/bin/discovery" register smoke 10.9.9.9:8080 --no-session --server "127.0.0.1:$grpc_port"
"$venv/bin/discovery" resolve smoke --server "127.0.0.1:$grpc_port" | tee "$work/resolve.txt"
grep -q 10.9.9.9:8080 "$work/resolve.txt"
echo "image-smoke: passed; wheels $((built - start)) s (with the base), build $((done_build - built)) s"
