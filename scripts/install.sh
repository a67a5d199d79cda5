#!/usr/bin/env bash
# Install gossamer into ./.venv on a fresh Debian-like machine that has Python >= 3.11, pip and gcc.
#   scripts/install.sh         everything needed to run nodes, training and the demo
#   scripts/install.sh --dev   the same plus the test and lint tools (and the NAT-lab system tools)
set -euo pipefail
cd "$(dirname "$0")/.."

extras="train"
if [ "${1:-}" = "--dev" ]; then extras="train,dev"; fi

# System packages.  py-libp2p 0.8.1 pins fastecdsa 2.3.2, which has no wheel for
# Python 3.11 and compiles against the GMP headers.  The NAT-lab tests need ip and iptables.
need=()
dpkg -s libgmp-dev >/dev/null 2>&1 || need+=(libgmp-dev)
if [ "$extras" != "train" ]; then
  command -v ip >/dev/null 2>&1 || need+=(iproute2)
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
fi
if [ "${#need[@]}" -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  echo "installing system packages: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# CPU torch first, from the pinned wheel: an unpinned torch pulls a multi-GB CUDA build.
# (On a CUDA machine, install the torch build you want before running this script.)
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[${extras}]"
echo "gossamer installed in $(pwd)/.venv"
