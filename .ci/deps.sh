#!/usr/bin/env bash
# Installs the Debian 12 packages bnorm builds and tests with. Run as root (or
# with sudo available); a machine that already has them is left as it is.
set -euo pipefail
packages=(cmake g++ make pkg-config libxsimd-dev libgtest-dev libgmock-dev libbenchmark-dev
          clang-14 libclang-rt-14-dev libomp-14-dev openmpi-bin libopenmpi-dev python3)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q
$sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
