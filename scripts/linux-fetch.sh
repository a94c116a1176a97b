#!/usr/bin/env bash
# Fetches what avex boots Linux with, cached in WORKDIR: Debian's stock kernel
# (linux-image-*-amd64, with apt-get download) with its ELF vmlinux taken out of
# the bzImage, and Debian's busybox-static. A second run downloads nothing.
#
# Prints the paths, one `name=path` a line: vmlinux=..., busybox=..., kernel_pkg=...
#
# Usage: scripts/linux-fetch.sh [WORKDIR]     (default: target/linux-kernel)
# Env:   KERNEL_PKG=linux-image-...-amd64 (default: what linux-image-amd64 depends on)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$root/target/linux-kernel}
mkdir -p "$work"
cd "$work"

die() { echo "linux-fetch.sh: $*" >&2; exit 1; }
# One fetch at a time per WORKDIR: tests start several at once, and two
# extractions into the same pkg.tmp break each other on an empty cache.
if command -v flock >/dev/null; then
    exec 9>"$work/.fetch.lock"
    flock 9
fi
for t in apt-get apt-cache dpkg-deb od xz; do
    command -v "$t" >/dev/null || die "needs $t"
done

# --- the package ---------------------------------------------------------------
pkg=${KERNEL_PKG:-}
if [ -z "$pkg" ]; then
    pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    if [ -z "$pkg" ]; then
        apt-get update -qq || die "apt-get update failed (run as root?)"
        pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    fi
fi
[ -n "$pkg" ] || die "no linux-image-*-amd64 package found with apt-cache"
deb=$(ls "$pkg"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    echo "downloading $pkg ..." >&2
    apt-get download "$pkg" >&2 2>/dev/null || apt-get download "$pkg" >&2
    deb=$(ls "$pkg"_*.deb | head -n1)
fi
if [ ! -d pkg ]; then
    dpkg-deb -x "$deb" pkg.tmp && mv pkg.tmp pkg
fi
vmlinuz=$(ls pkg/boot/vmlinuz-* | head -n1)
[ -f "$vmlinuz" ] || die "no vmlinuz in $deb"

# --- vmlinux out of the bzImage ----------------------------------------------------
u8() { od -An -tu1 -j "$2" -N1 "$1" | tr -d ' '; }
u32() { od -An -tu4 -j "$2" -N4 "$1" | tr -d ' '; }

# Decompresses what starts at byte offset $2 of $1 to stdout, by its magic.
decompress_at() {
    local f=$1 off=$2 magic
    magic=$(od -An -tx1 -j "$off" -N6 "$f" | tr -d ' \n')
    case "$magic" in
        1f8b08*)       tail -c +$((off + 1)) "$f" | gzip -dc 2>/dev/null ;;
        fd377a585a00)  tail -c +$((off + 1)) "$f" | xz -dc --single-stream 2>/dev/null ;;
        28b52ffd*)     tail -c +$((off + 1)) "$f" | zstd -dcq 2>/dev/null ;;
        02214c18*)     tail -c +$((off + 1)) "$f" | lz4 -dc 2>/dev/null ;;
        425a68*)       tail -c +$((off + 1)) "$f" | bzip2 -dc 2>/dev/null ;;
        5d0000*)       tail -c +$((off + 1)) "$f" | xz -dc --format=lzma 2>/dev/null ;;
        894c5a*)       tail -c +$((off + 1)) "$f" | lzop -dc 2>/dev/null ;;
        *) return 1 ;;
    esac
    return 0
}

is_elf() { [ "$(od -An -tx1 -N4 "$1" | tr -d ' \n')" = 7f454c46 ]; }

extract_vmlinux() {
    local img=$1 out=$2
    # Boot protocol >= 2.08: payload_offset (0x248) is relative to the protected-mode
    # code, which starts after (setup_sects + 1) * 512 bytes.
    if [ "$(od -An -c -j 0x202 -N4 "$img" | tr -d ' ')" = HdrS ]; then
        local setup_sects pm off
        setup_sects=$(u8 "$img" $((0x1f1)))
        [ "$setup_sects" -eq 0 ] && setup_sects=4
        pm=$(((setup_sects + 1) * 512))
        off=$((pm + $(u32 "$img" $((0x248)))))
        if decompress_at "$img" "$off" > "$out" && is_elf "$out"; then
            echo "payload at offset $off (boot header)" >&2
            return 0
        fi
    fi
    # Otherwise: every offset where a known compression magic occurs.
    local pat off
    for pat in '\x1f\x8b\x08' '\xfd\x37\x7a\x58\x5a\x00' '\x28\xb5\x2f\xfd' '\x02\x21\x4c\x18' 'BZh' '\x5d\x00\x00\x00' '\x89\x4c\x5a'; do
        for off in $(LC_ALL=C grep -obaP "$pat" "$img" 2>/dev/null | cut -d: -f1 | head -n 20); do
            if decompress_at "$img" "$off" > "$out" && is_elf "$out"; then
                echo "payload at offset $off (magic search)" >&2
                return 0
            fi
        done
    done
    return 1
}

if [ ! -s vmlinux ] || ! is_elf vmlinux; then
    extract_vmlinux "$vmlinuz" vmlinux.tmp || die "no compressed ELF payload found in $vmlinuz"
    mv vmlinux.tmp vmlinux
fi

# --- busybox-static -------------------------------------------------------------------
bbdeb=$(ls busybox-static_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$bbdeb" ]; then
    echo "downloading busybox-static ..." >&2
    apt-get download busybox-static >&2 2>/dev/null || apt-get download busybox-static >&2
    bbdeb=$(ls busybox-static_*.deb | head -n1)
fi
if [ ! -x busybox/bin/busybox ]; then
    rm -rf busybox.tmp && dpkg-deb -x "$bbdeb" busybox.tmp && rm -rf busybox && mv busybox.tmp busybox
fi
[ -x busybox/bin/busybox ] || die "no bin/busybox in $bbdeb"

echo "kernel_pkg=$pkg"
echo "vmlinux=$work/vmlinux"
echo "busybox=$work/busybox/bin/busybox"
