#!/usr/bin/env bash
# Install everything vmikit needs on a fresh Debian/Ubuntu machine.
#   bash scripts/install.sh          the hypervisor, its CLI, gcc/binutils/QEMU
#   bash scripts/install.sh --test   the same plus the test tools (pytest, hypothesis)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

# gcc/binutils build the guests and the ROM; linux-libc-dev gives <linux/kvm.h> for the struct
# checks; QEMU is the bare machine that proves the same guest binary runs without vmikit; gdb is
# the client the --gdb stub is tested against (tests/test_gdb.py).
packages=(gcc binutils linux-libc-dev qemu-system-x86 gdb)
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [[ $(id -u) -ne 0 ]] && sudo="sudo"
  echo "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e ".${extras}"
command -v pyenv >/dev/null && pyenv rehash || true
command -v vmikit >/dev/null || { echo "vmikit was installed but is not on PATH; add $(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))') to PATH" >&2; exit 1; }
