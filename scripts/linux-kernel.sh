#!/usr/bin/env bash
# Times `avex analyze` on a stock Debian kernel against `objdump -d`, side by side.
#
# Gets the stock kernel through scripts/linux-fetch.sh (the current
# linux-image-*-amd64 package by apt-get download, its ELF vmlinux taken out of the
# bzImage as the kernel's extract-vmlinux does; cached), then times
# `avex analyze` (clusters included) and `objdump -d vmlinux > /dev/null` and prints
# the ratio. Also runs both on a few .ko modules (ET_REL, .ko.xz in the package).
#
# Usage: scripts/linux-kernel.sh [WORKDIR]     (default: target/linux-kernel)
# Env:   AVEX=path/to/avex (default: build the release binary with cargo)
#        KERNEL_PKG=linux-image-...-amd64 (default: what linux-image-amd64 depends on)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$root/target/linux-kernel}
mkdir -p "$work"
cd "$work"

die() { echo "linux-kernel.sh: $*" >&2; exit 1; }
for t in objdump; do
    command -v "$t" >/dev/null || die "needs $t"
done

# --- the kernel (fetched and extracted by linux-fetch.sh, cached) --------------------
fetched=$("$root/scripts/linux-fetch.sh" "$work")
pkg=$(echo "$fetched" | sed -n 's/^kernel_pkg=//p')

# --- avex -------------------------------------------------------------------------------
if [ -z "${AVEX:-}" ]; then
    (cd "$root" && cargo build --release --bin avex >&2)
    AVEX=$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
        sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/avex
fi
[ -x "$AVEX" ] || die "no avex binary at $AVEX"

now() { date +%s.%N; }
# Best of $1 runs of the rest of the command line, in seconds.
best_of() {
    local n=$1 best="" t0 t1 el; shift
    for _ in $(seq "$n"); do
        t0=$(now); "$@" > /dev/null; t1=$(now)
        el=$(echo "$t1 - $t0" | bc -l)
        if [ -z "$best" ] || [ "$(echo "$el < $best" | bc -l)" = 1 ]; then best=$el; fi
    done
    printf '%.3f' "$best"
}

echo "kernel: $pkg ($(du -h vmlinux | cut -f1) vmlinux, $(nproc) cores)"
"$AVEX" analyze vmlinux
"$AVEX" analyze --json vmlinux > vmlinux.json
t_avex=$(best_of 3 "$AVEX" analyze --json vmlinux)
t_objdump=$(best_of 1 objdump -d vmlinux)
printf '%-28s %10s %12s %8s\n' file "avex (s)" "objdump (s)" ratio
printf '%-28s %10s %12s %7.1fx\n' vmlinux "$t_avex" "$t_objdump" "$(echo "$t_objdump / $t_avex" | bc -l)"

# --- modules (ET_REL) ----------------------------------------------------------------
mkdir -p modules
for m in 8250 kvm-intel kvm e1000e i915 snd-hda-intel; do
    f=$(find pkg/lib/modules -name "$m.ko*" | head -n1)
    [ -n "$f" ] || continue
    out=modules/$m.ko
    case "$f" in
        *.xz) [ -s "$out" ] || xz -dc "$f" > "$out" ;;
        *.zst) [ -s "$out" ] || zstd -dcq "$f" > "$out" ;;
        *.gz) [ -s "$out" ] || gzip -dc "$f" > "$out" ;;
        *) cp "$f" "$out" ;;
    esac
    ta=$(best_of 3 "$AVEX" analyze --json "$out")
    to=$(best_of 1 objdump -d "$out")
    printf '%-28s %10s %12s %7.1fx\n' "$m.ko" "$ta" "$to" "$(echo "$to / $ta" | bc -l)"
done
"$AVEX" analyze --json modules > modules.json
echo "reports: $work/vmlinux.json $work/modules.json"
