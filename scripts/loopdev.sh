#!/usr/bin/env bash
# Create or destroy a loop device over a file, for benchmarks and manual tests.
#
#   scripts/loopdev.sh create FILE SIZE   # e.g. /work/bench.img 4G; prints /dev/loopN
#   scripts/loopdev.sh destroy /dev/loopN [--rm]   # detach; --rm also deletes the backing file
#   scripts/loopdev.sh list
#
# The loop device uses direct I/O on its backing file (--direct-io=on), so
# O_DIRECT requests reach the disk without the page cache of the file.
# Needs root.
set -euo pipefail

die() { echo "loopdev.sh: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (losetup)"
command -v losetup >/dev/null || die "losetup not found (util-linux)"

cmd=${1:-}
case "$cmd" in
  create)
    file=${2:-}; size=${3:-}
    [ -n "$file" ] && [ -n "$size" ] || die "usage: $0 create FILE SIZE"
    [ -e "$file" ] && die "$file exists; refusing to overwrite it"
    truncate -s "$size" "$file"
    losetup --direct-io=on -f --show "$file"
    ;;
  destroy)
    dev=${2:-}
    [ -n "$dev" ] || die "usage: $0 destroy /dev/loopN [--rm]"
    backing=$(losetup -n -O BACK-FILE "$dev" 2>/dev/null | sed 's/[[:space:]]*$//') || die "$dev is not a loop device in use"
    losetup -d "$dev"
    if [ "${3:-}" = "--rm" ] && [ -n "$backing" ]; then
      rm -f -- "$backing"
      echo "detached $dev, removed $backing"
    else
      echo "detached $dev (backing file $backing kept)"
    fi
    ;;
  list)
    losetup -a
    ;;
  *)
    die "usage: $0 create FILE SIZE | destroy /dev/loopN [--rm] | list"
    ;;
esac
