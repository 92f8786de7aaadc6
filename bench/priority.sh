#!/bin/bash
# Runs a benchmark with the CPU to itself on a shared machine: the command
# (and everything it starts: servers, pgbench, gateway processes) goes into a
# cgroup whose CPU weight is the highest the kernel allows, so other work on
# the machine gets the cores only when the benchmark leaves them idle. The
# comparison stays interleaved; this only keeps other tenants' bursts out of
# it. Root only; cgroup v1 (cpu.shares) or v2 (cpu.weight).
#
#   bash bench/priority.sh node bench/gateway.mjs
set -euo pipefail
if [ "$#" -eq 0 ]; then
  echo "usage: bash bench/priority.sh COMMAND [ARGS…]  (runs COMMAND in a high-CPU-weight cgroup; root only)" >&2
  exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "bench/priority.sh: needs root to create a cgroup; running the command without it" >&2
  exec "$@"
fi
if [ -d /sys/fs/cgroup/cpu ] && [ -f /sys/fs/cgroup/cpu/cpu.shares ]; then
  dir=/sys/fs/cgroup/cpu/sandboxd-bench
  mkdir -p "$dir"
  echo 262144 > "$dir/cpu.shares"
elif [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
  dir=/sys/fs/cgroup/sandboxd-bench
  grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control || echo +cpu > /sys/fs/cgroup/cgroup.subtree_control
  mkdir -p "$dir"
  echo 10000 > "$dir/cpu.weight"
else
  echo "bench/priority.sh: no cgroup cpu controller found; running the command without it" >&2
  exec "$@"
fi
echo $$ > "$dir/cgroup.procs"
echo "bench/priority.sh: running in $dir (highest CPU weight)" >&2
exec "$@"
