#!/usr/bin/env bash
# `make image-test`: build the Dockerfile as written with the CPU build of torch, run the
# image, and call /health and one generation in it. Needs root, Debian's buildah, podman,
# runc and debootstrap (the Makefile installs them), and no image registry: the base image
# (debian:bookworm-slim) is made here from Debian's packages with debootstrap.
#
# Where this differs from a plain `docker build`, and why:
# - The CPU torch wheel comes from TORCH_INDEX_URL; unset, from a local index of what this
#   machine's pip resolves for torch==$TORCH_VERSION+cpu (it has no route to PyTorch's).
# - The base carries this machine's pip CA bundle, when pip here has one (PIP_CERT).
# - --format docker: buildah's default, OCI, has no HEALTHCHECK; Docker's own builds are
#   in this format.
# - --network host: the build reaches that index on loopback, and the container needs no
#   bridge. runc, not crun: crun refuses this kernel's hybrid cgroups. The ulimits are
#   lowered because podman's defaults are above what root may raise them to here.
set -euo pipefail

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
IMAGE=${IMAGE:-localhost/fluxstream:cpu-test}
BASE=docker.io/library/debian:bookworm-slim
WORK=${IMAGE_TEST_DIR:-/var/tmp/fluxstream-image-test}
PORT=${IMAGE_TEST_PORT:-18000}
# Fixed, so that the build argument naming it, and so the build's cached layers, stay put.
INDEX_PORT=${IMAGE_TEST_INDEX_PORT:-18001}
NAME=fluxstream-image-test
RUN_OPTIONS=(--runtime runc --network host --ulimit nofile=4096:4096 --ulimit nproc=4096:4096)
PYTHON=${PYTHON:-python3}
PIP=${PIP:-.venv/bin/pip}

log() { echo "image-test: $*" >&2; }
mkdir -p "$WORK"

cleanup() {
    podman rm --force --time 5 "$NAME" >/dev/null 2>&1 || true
    if [[ -n ${INDEX_PID:-} ]]; then kill "$INDEX_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if ! podman image exists "$BASE"; then
    log "making $BASE with debootstrap"
    rm -rf "$WORK/rootfs"
    debootstrap --variant=minbase bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    # The official image's configuration: its PATH and its command.
    changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
        --change 'CMD ["bash"]')
    if [[ -n ${PIP_CERT:-} ]]; then
        # This machine's pip trusts its own CA bundle (PyPI through a TLS-inspecting proxy):
        # pip in the build must trust the same.
        cp "$PIP_CERT" "$WORK/rootfs/etc/image-test-ca.crt"
        changes+=(--change 'ENV PIP_CERT=/etc/image-test-ca.crt')
    fi
    tar -C "$WORK/rootfs" -c . | podman import "${changes[@]}" - "$BASE" >/dev/null
    rm -rf "$WORK/rootfs"
fi

if [[ -z ${TORCH_INDEX_URL:-} ]]; then
    log "serving torch==$TORCH_VERSION+cpu and its dependencies as a local package index"
    rm -rf "$WORK/wheels" "$WORK/index"
    "$PIP" download --quiet --dest "$WORK/wheels" "torch==$TORCH_VERSION+cpu"
    for wheel in "$WORK"/wheels/*; do
        # The project's normalised name (PEP 503) is the folder pip asks the index for.
        project=$(basename "$wheel" | cut -d- -f1 | tr 'A-Z_.' 'a-z--')
        mkdir -p "$WORK/index/$project"
        mv "$wheel" "$WORK/index/$project/"
    done
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/index" "$INDEX_PORT" >/dev/null 2>&1 &
    INDEX_PID=$!
    TORCH_INDEX_URL=http://127.0.0.1:$INDEX_PORT/
fi

log "building $IMAGE"
started=$(date +%s)
buildah bud --format docker --runtime runc --network host --pull=never --layers \
    --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL" --build-arg "TORCH_VERSION=$TORCH_VERSION" \
    --tag "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -30 "$WORK/build.log"; exit 1; }
build_s=$(($(date +%s) - started))
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
log "built in ${build_s}s, $((size / 1000000)) MB (log: $WORK/build.log)"

log "running it on port $PORT with the embedded model"
podman rm --force "$NAME" >/dev/null 2>&1 || true
# Without systemd podman cannot schedule the health checks and says so on stderr; they are
# run below with `podman healthcheck run`, which runs the image's HEALTHCHECK command.
podman run --detach --name "$NAME" "${RUN_OPTIONS[@]}" -e "FLUXSTREAM_PORT=$PORT" "$IMAGE" \
    >/dev/null 2>"$WORK/run.log" || { cat "$WORK/run.log"; exit 1; }
started=$(date +%s)
until podman healthcheck run "$NAME" >/dev/null 2>&1; do
    if [[ $(podman inspect --format '{{.State.Running}}' "$NAME") != true ]] \
        || (($(date +%s) - started > 300)); then
        podman logs "$NAME" | tail -30
        log "the container never became healthy"
        exit 1
    fi
    sleep 2
done
log "healthy after $(($(date +%s) - started))s: $(curl --silent "http://127.0.0.1:$PORT/health")"
[[ $(podman exec "$NAME" id -u) == 1000 ]] || { log "the server does not run as uid 1000"; exit 1; }

# A url result: the server writes it into the /cache volume, as uid 1000.
curl --silent --fail-with-body "http://127.0.0.1:$PORT/v1/images/generations" \
    -H 'Content-Type: application/json' \
    -d '{"prompt": "a lighthouse at dusk", "size": "256x256", "num_inference_steps": 8}' \
    | "$PYTHON" -c '
import json, sys, urllib.request
url = json.load(sys.stdin)["data"][0]["url"]
image = urllib.request.urlopen(url, timeout=30).read()
assert image.startswith(b"\x89PNG"), image[:16]
print(f"image-test: one generation: {url}, a {len(image)}-byte PNG", file=sys.stderr)'
log "passed: built in ${build_s}s, $((size / 1000000)) MB"
