#!/usr/bin/env bash
# Make sure a Docker engine is reachable, and (as root on an apt system) that
# debootstrap is installed: no registry is reachable from CI, so the sandbox
# base image is built offline with debootstrap (see src/runtime/image.ts);
# and conntrack (conntrack-tools), ip (iproute2) and iptables, with which the
# daemon records connections refused inside a sandbox (src/runtime/netns.ts).
#
# Idempotent and silent when nothing needs doing. Exit 1 with advice when the
# engine cannot be reached and this script cannot fix that itself.
set -euo pipefail

DOCKERD_LOG=${SANDBOXD_DOCKERD_LOG:-/var/log/sandboxd-dockerd.log}
WAIT_SECONDS=60

say() { echo "ensure-docker: $*" >&2; }

is_root() { [ "$(id -u)" -eq 0 ]; }
has_apt() { command -v apt-get >/dev/null 2>&1 && command -v dpkg-query >/dev/null 2>&1; }
engine_up() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }
pkg_installed() {
  [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" = "installed" ]
}

apt_updated=0
# Install whichever of the given packages are missing; run `apt-get update` at most once.
apt_install_missing() {
  local missing=() pkg
  for pkg in "$@"; do
    pkg_installed "$pkg" || missing+=("$pkg")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  if [ "$apt_updated" -eq 0 ]; then
    say "apt-get update"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    apt_updated=1
  fi
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

if engine_up; then
  # Engine already running; still make sure the host tools are present.
  if is_root && has_apt; then
    apt_install_missing debootstrap conntrack iproute2 iptables docker-compose
  fi
  exit 0
fi

if ! is_root || ! has_apt; then
  if command -v docker >/dev/null 2>&1 && [ -S /var/run/docker.sock ] && ! is_root; then
    say "a Docker engine socket exists but 'docker info' fails for user $(id -un)."
    say "add the user to the docker group (sudo usermod -aG docker $(id -un), then log in again) or run as root."
  else
    say "no Docker engine is reachable and this script can only install one as root on an apt-based system."
    say "install Docker (e.g. 'apt-get install docker.io'), start it ('dockerd' or 'systemctl start docker'),"
    say "and make sure the current user may use it (member of the docker group), then retry."
  fi
  exit 1
fi

apt_install_missing docker.io debootstrap conntrack iproute2 iptables docker-compose

if ! engine_up; then
  if pgrep -x dockerd >/dev/null 2>&1; then
    say "dockerd is already running; waiting for it to answer"
  else
    say "starting dockerd (log: $DOCKERD_LOG)"
    # setsid + nohup: the engine must outlive this script and its terminal.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  waited=0
  until engine_up; do
    if [ "$waited" -ge "$WAIT_SECONDS" ]; then
      say "dockerd did not answer within ${WAIT_SECONDS}s; last lines of $DOCKERD_LOG:"
      tail -n 20 "$DOCKERD_LOG" >&2 || true
      exit 1
    fi
    if [ $((waited % 5)) -eq 0 ] && [ "$waited" -gt 0 ]; then
      say "waiting for the Docker engine (${waited}s)"
    fi
    sleep 1
    waited=$((waited + 1))
  done
  say "Docker engine is up ($(docker info --format '{{.ServerVersion}}' 2>/dev/null || echo unknown version))"
fi
