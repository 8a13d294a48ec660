#!/usr/bin/env bash
# Engine shards through NBD: two fio jobs at once, one per volume (4 KiB,
# QD 32 each, randwrite then randread), against a `sluice serve` on a fresh
# pool file of SHARDS shards. The two volumes are vol0 and vol1, which land
# on different shards of a 2-shard pool (xxh3 of the name mod 2).
#
#   scripts/shards-nbd.sh SHARDS [PIN] [RUNTIME_S] [DIR]
#     SHARDS   engine shards (sluice init --shards)
#     PIN      true (default) or false: the pin_shards serve setting
#     RUNTIME  seconds per fio run (default 10)
#     DIR      where the 4 GiB sparse pool file goes (default: a temp dir)
#
# Needs fio with the nbd engine and a release build (cargo build --release).
set -euo pipefail

die() { echo "shards-nbd.sh: $*" >&2; exit 1; }
shards=${1:-}; pin=${2:-true}; runtime=${3:-10}; dir=${4:-}
[ -n "$shards" ] || die "usage: $0 SHARDS [PIN] [RUNTIME_S] [DIR]"
command -v fio >/dev/null || die "fio not found"
bin="$(cd "$(dirname "$0")/.." && pwd)/target/release/sluice"
[ -x "$bin" ] || die "$bin missing: cargo build --release first"
[ -n "$dir" ] || dir=$(mktemp -d)
pool="$dir/shards-nbd.img"
rm -f "$pool"
"$bin" init "$pool" --size 4G --shards "$shards" >/dev/null
printf 'pin_shards = %s\n' "$pin" > "$dir/shards-nbd.toml"
"$bin" serve --data "$pool" --listen 127.0.0.1:0 --nbd 127.0.0.1:0 \
  --config "$dir/shards-nbd.toml" > "$dir/ready" 2> "$dir/serve.log" &
pid=$!
trap 'kill -TERM $pid 2>/dev/null; wait $pid 2>/dev/null; rm -f "$pool"' EXIT
for _ in $(seq 100); do grep -q '^ready' "$dir/ready" 2>/dev/null && break; sleep 0.1; done
control=$(sed -n 's/.*control=\([^ ]*\).*/\1/p' "$dir/ready")
nbd=$(sed -n 's/.*nbd=\([^ ]*\).*/\1/p' "$dir/ready")
[ -n "$nbd" ] || die "the daemon did not start: $(cat "$dir/serve.log")"
for v in vol0 vol1; do "$bin" --node "$control" vol create $v --size 1G >/dev/null; done
for rw in randwrite randread; do
  job() {
    echo "--name=$1 --ioengine=nbd --uri=nbd://$nbd/$1 --rw=$rw --bs=4k --iodepth=32"
    echo "--size=512M --runtime=$runtime --time_based"
  }
  # shellcheck disable=SC2046
  fio --output-format=json $(job vol0) $(job vol1) --group_reporting \
    2>/dev/null | sed -n '/^{/,$p' > "$dir/fio.json"
  python3 - "$shards" "$pin" "$rw" "$dir/fio.json" <<'PY'
import json, sys
shards, pin, rw, path = sys.argv[1:]
b = json.load(open(path))["jobs"][0]["write" if rw == "randwrite" else "read"]
p = b["clat_ns"]["percentile"]
print(f"shards={shards} pin={pin} {rw:9} IOPS {b['iops']:8.0f}  p50 {p['50.000000']/1000:6.0f} us  p99 {p['99.000000']/1000:6.0f} us")
PY
done
