#!/usr/bin/env bash
# Install what the Bochs backend (the bare-metal VT-x hypervisor under Bochs) needs:
# Bochs with its BIOS and VGA BIOS, and the tools `avex image` uses to make a GRUB
# ISO (grub-mkrescue with the BIOS GRUB modules, xorriso, mtools).
# Idempotent: installs only what is missing. Needs root (or sudo) for apt-get.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

pkgs=(bochs bochsbios vgabios grub-pc-bin grub-common xorriso mtools)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "install-bochs: all present (${pkgs[*]})"
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "install-bochs: installing ${missing[*]}"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# What the runner relies on.
for tool in bochs grub-mkrescue xorriso mformat; do
  command -v "$tool" >/dev/null || { echo "install-bochs: $tool still missing" >&2; exit 1; }
done
for f in /usr/share/bochs/BIOS-bochs-latest /usr/share/bochs/VGABIOS-lgpl-latest /usr/lib/grub/i386-pc/multiboot.mod; do
  [ -f "$f" ] || { echo "install-bochs: $f missing" >&2; exit 1; }
done
echo "install-bochs: ok (bochs $(dpkg-query -W -f='${Version}' bochs))"
