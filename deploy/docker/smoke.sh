#!/usr/bin/env bash
# Builds the Docker image and checks it as a user would run it, on a machine without a registry:
#   - the image builds (with local stand-ins for python:3.12-slim and the uv image, made from
#     Debian packages and PyPI, when the registry can't be reached);
#   - `docker run` with MODEL_ID=tiny on a non-default PORT turns /ready 200, answers a
#     text2image request with a PNG of the asked size, and its HEALTHCHECK turns "healthy";
#   - `docker stop` while a job runs lets the job finish (the client gets its 200) and the
#     container exits 0.
# It uses host networking only (dockerd with no bridge and no iptables changes), and stops the
# daemon it started. .ci/run calls it; SKIP_DOCKER_SMOKE=1 skips it, and it skips by itself
# where it can't install or start Docker (not root, no apt-get).
#
#   sudo deploy/docker/smoke.sh          # about 4 minutes cold; faster with cached layers
set -euo pipefail
cd "$(dirname "$0")/../.."

say() { printf 'docker smoke: %s\n' "$*"; }
if [ "${SKIP_DOCKER_SMOKE:-0}" = 1 ]; then say "skipped (SKIP_DOCKER_SMOKE=1)"; exit 0; fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  say "skipped: needs root and apt-get to install and start Docker"; exit 0
fi

PORT=${SMOKE_PORT:-18765}
IMAGE=hunyuan-service:smoke
BASE_IMAGE=hunyuan-standin-base:bookworm
UV_IMAGE=hunyuan-standin-uv:latest
WORK=$(mktemp -d)
DOCKER=/usr/bin/docker  # Debian's client: BuildKit built in (see FACTS.md)
DAEMON_PID=""
CONTAINER=""

cleanup() {
  set +e
  [ -n "$CONTAINER" ] && "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1
  if [ -n "$DAEMON_PID" ]; then
    kill "$DAEMON_PID" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.5; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ ! -x /usr/sbin/dockerd ] || [ ! -x "$DOCKER" ] || ! command -v debootstrap >/dev/null; then
  say "installing docker.io and debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    docker.io debootstrap >/dev/null
fi

export DOCKER_BUILDKIT=1
if ! "$DOCKER" info >/dev/null 2>&1; then
  say "starting dockerd (no bridge, no iptables changes)"
  /usr/sbin/dockerd --bridge=none --iptables=false --ip6tables=false >"$WORK/dockerd.log" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 1 120); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.5; done
  "$DOCKER" info >/dev/null 2>&1 || { cat "$WORK/dockerd.log"; say "dockerd did not start"; exit 1; }
fi

# -- stand-ins for the registry images ---------------------------------------------------------
if ! "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "making the stand-in base image from Debian packages (python3, ca-certificates)"
  root="$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,ca-certificates \
    bookworm "$root" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  # Trust what this host trusts (a proxy's CA, if any); the image is local and never pushed.
  cp /etc/ssl/certs/ca-certificates.crt "$root/usr/local/share/ca-certificates/host-bundle.crt"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
  rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | "$DOCKER" import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
fi
if ! "$DOCKER" image inspect "$UV_IMAGE" >/dev/null 2>&1; then
  say "making the stand-in uv image from the uv wheel on PyPI"
  version=$(sed -n 's|^ARG UV_IMAGE=ghcr.io/astral-sh/uv:\(.*\)|\1|p' Dockerfile)
  python3 -m pip download -q --no-deps --only-binary=:all: --dest "$WORK/uv" "uv==${version}.*"
  mkdir -p "$WORK/uvroot"
  python3 - "$WORK/uv" "$WORK/uvroot" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("uv-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    for member in archive.namelist():
        name = member.rsplit("/", 1)[-1]
        if ".data/scripts/" in member and name in ("uv", "uvx"):
            target = pathlib.Path(sys.argv[2]) / name
            target.write_bytes(archive.read(member))
            target.chmod(0o755)
PY
  tar -C "$WORK/uvroot" -c uv uvx | "$DOCKER" import - "$UV_IMAGE" >/dev/null
fi

# -- build ------------------------------------------------------------------------------------
say "building $IMAGE"
started=$(date +%s)
"$DOCKER" build --network host --build-arg "BASE=$BASE_IMAGE" --build-arg "UV_IMAGE=$UV_IMAGE" \
  --build-arg UV_SYSTEM_CERTS=1 -t "$IMAGE" . >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
say "built in $(( $(date +%s) - started )) s; $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.1f GB", $1/1e9}')"

# -- run --------------------------------------------------------------------------------------
# The image's HEALTHCHECK probes every 30 s after a 600 s grace for model downloads; here the
# probe runs every 2 s so that "healthy" comes within seconds.
url="http://127.0.0.1:$PORT"
start_container() {  # SHUTDOWN_TIMEOUT_S, --stop-timeout, extra -e options...
  local drain=$1 stop=$2
  shift 2
  CONTAINER=$("$DOCKER" run -d --network host -e PORT="$PORT" -e MODEL_ID=tiny -e DEVICE=cpu \
    -e SHUTDOWN_TIMEOUT_S="$drain" "$@" --stop-timeout "$stop" --health-interval 2s \
    --health-start-period 300s "$IMAGE")
  local ready=0
  for _ in $(seq 1 600); do
    if curl -fs "$url/ready" >/dev/null 2>&1; then ready=1; break; fi
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER")" = true ] || break
    sleep 0.5
  done
  [ "$ready" = 1 ] || { "$DOCKER" logs "$CONTAINER" | tail -30; say "FAIL: /ready never turned 200"; exit 1; }
}
# Starts a job in the background (its status code goes to $WORK/$1.code, its body to
# $WORK/$1.body) and returns once it runs (hunyuan_busy 1), not after a fixed time.
start_job() {  # name, body
  ( curl -s -o "$WORK/$1.body" -w '%{http_code}' --max-time 300 "$url/infer" -d "$2" \
      >"$WORK/$1.code" ) &
  client=$!
  local busy=0
  for _ in $(seq 1 600); do
    if curl -fs "$url/metrics" | grep -q '^hunyuan_busy 1'; then busy=1; break; fi
    sleep 0.1
  done
  [ "$busy" = 1 ] || { say "FAIL: the job $1 never started"; exit 1; }
}
start_container 60 70
say "/ready is 200 on PORT=$PORT"

curl -fs "$url/infer" -H 'Accept: image/png' -o "$WORK/out.png" \
  -d '{"prompt": "a red fox", "width": 96, "height": 64, "seed": 1}'
size=$(python3 -c "import struct,sys; d=open(sys.argv[1],'rb').read(24); print(*struct.unpack('>II', d[16:24]))" "$WORK/out.png")
[ "$size" = "96 64" ] || { say "FAIL: the PNG is $size, not 96 64"; exit 1; }
say "text2image answered a 96x64 PNG"

health=""
for _ in $(seq 1 120); do
  health=$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER")
  [ "$health" = healthy ] && break
  sleep 0.5
done
[ "$health" = healthy ] || { say "FAIL: health is '$health'"; exit 1; }
say "the HEALTHCHECK says healthy on the non-default port"

# Stops the container while job $1 runs; sets code (the job's HTTP status) and exit_code, and
# fails unless the container exited 0.
stop_during() {
  say "$2; docker stop"
  "$DOCKER" stop "$CONTAINER" >/dev/null
  wait "$client" || true
  code=$(cat "$WORK/$1.code")
  exit_code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
  [ "$exit_code" = 0 ] || { "$DOCKER" logs "$CONTAINER" | tail -20; say "FAIL: exit code $exit_code"; exit 1; }
}

# -- docker stop with a job in flight ---------------------------------------------------------
# A job long enough to be running when the stop comes, short enough to finish within the 60 s
# drain: 1024x1024 with 100 steps on the tiny model.
start_job inflight '{"prompt": "a long job", "width": 1024, "height": 1024, "num_inference_steps": 100}'
stop_during inflight "a job is running"
[ "$code" = 200 ] || { "$DOCKER" logs "$CONTAINER" | tail -20; say "FAIL: the in-flight request got $code"; exit 1; }
say "the in-flight job finished with 200 and the container exited 0"
"$DOCKER" rm "$CONTAINER" >/dev/null

# -- docker stop with a job longer than the drain ---------------------------------------------
# 2048x2048 with 1000 steps outlives a 2 s drain on any machine: the service ends it with its
# own 503 (code shutdown, Retry-After) before uvicorn would cut the connection, and exits 0.
start_container 2 15 -e MAX_INFERENCE_STEPS=1000
start_job outlived '{"prompt": "a longer job", "width": 2048, "height": 2048, "num_inference_steps": 1000}'
stop_during outlived "a job longer than the 2 s drain is running"
error_code=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['error']['code'])" "$WORK/outlived.body" 2>/dev/null || echo none)
[ "$code/$error_code" = 503/shutdown ] || { "$DOCKER" logs "$CONTAINER" | tail -20; say "FAIL: the outlived job got $code ($error_code)"; exit 1; }
if "$DOCKER" logs "$CONTAINER" 2>&1 | grep -q Traceback; then
  "$DOCKER" logs "$CONTAINER" | tail -30; say "FAIL: a traceback in the log"; exit 1
fi
say "the job longer than the drain got a 503 shutdown, no traceback, and the container exited 0"
say "passed"
