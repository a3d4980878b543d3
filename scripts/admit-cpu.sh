#!/usr/bin/env bash
# keyward's CPU per admission at saturation, optionally under perf: BENCHMARKS.md,
# "Where the sidecar's CPU goes".
#
#   scripts/admit-cpu.sh BINARY redis|embedded|hyper [SECONDS] [PERF_DATA]
#
# Starts BINARY (`keyward serve`, or for `hyper` the admit bench's binary as
# `bare-hyper PORT`) on a temporary SQLite database, with a Redis at 127.0.0.1:$REDIS_PORT
# (default 6390, one of its own: start `redis-server --port 6390 --save ''`) for `redis`;
# creates one key whose RPM and TPM are out of reach; warms up 2 s with wrk; then drives
# `POST /v1/admit` with `wrk -t1 -c32` for SECONDS (default 6) and prints the admissions
# per second and keyward's utime + stime (/proc/PID/stat) per admission. With PERF_DATA,
# `perf record -e cpu-clock -F 4999 --call-graph fp` samples the process meanwhile.
set -eu
BIN=$1 SHAPE=$2 SECS=${3:-6} PERF=${4:-}
REDIS_PORT=${REDIS_PORT:-6390}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
DATA=$((20000 + RANDOM % 10000)) ADMIN=$((DATA + 1 + RANDOM % 1000))
TOKEN=admit-cpu-admin-token-0123456789
SECRET=-
if [ "$SHAPE" = hyper ]; then
  "$BIN" bare-hyper "$DATA" &
  PID=$!
  sleep 0.5
else
  env=(KEYWARD_LISTEN=127.0.0.1:$DATA KEYWARD_ADMIN_LISTEN=127.0.0.1:$ADMIN
    KEYWARD_ADMIN_TOKEN=$TOKEN KEYWARD_DATABASE_URL=sqlite://$DIR/db RUST_LOG=warn
    KEYWARD_LEASE_TTL_S=5)
  if [ "$SHAPE" = redis ]; then
    env+=(KEYWARD_REDIS_URL=redis://127.0.0.1:$REDIS_PORT KEYWARD_REDIS_PREFIX=admit-cpu-$DATA)
  fi
  env "${env[@]}" "$BIN" serve >/dev/null &
  PID=$!
  for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$DATA/readyz" >/dev/null && break
    sleep 0.1
  done
  SECRET=$(curl -s -H "authorization: Bearer $TOKEN" -H 'content-type: application/json' \
    -d '{"rate_limit":1000000000000,"tpm_limit":1000000000000,"concurrent_limit":null}' \
    "http://127.0.0.1:$ADMIN/admin/keys" | python3 -c 'import sys,json;print(json.load(sys.stdin)["secret"])')
fi
cat >"$DIR/admit.lua" <<LUA
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.body = '{"key":"$SECRET","model":"gpt-4o","estimated_tokens":100}'
LUA
URL=http://127.0.0.1:$DATA/v1/admit
wrk -t1 -c32 -d2s -s "$DIR/admit.lua" "$URL" >/dev/null
read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$PID/stat")
if [ -n "$PERF" ]; then
  perf record -e cpu-clock -F 4999 --call-graph fp -p "$PID" -o "$PERF" -- sleep "$SECS" >/dev/null 2>&1 &
  PERF_PID=$!
fi
wrk -t1 -c32 -d"${SECS}s" -s "$DIR/admit.lua" "$URL" >"$DIR/wrk.out"
read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$PID/stat")
if [ -n "$PERF" ]; then wait "$PERF_PID"; fi
kill "$PID"
wait "$PID" 2>/dev/null || true
N=$(awk '/requests in/{print $1}' "$DIR/wrk.out")
python3 - "$SHAPE" "$N" "$SECS" "$u0" "$s0" "$u1" "$s1" "$(getconf CLK_TCK)" <<'PY'
import sys
shape, n, secs, u0, s0, u1, s1, tck = sys.argv[1:]
n, tck = int(n), int(tck)
user, sys_ = (int(u1) - int(u0)) / tck, (int(s1) - int(s0)) / tck
print(f"{shape}: {n / float(secs):.0f}/s, {(user + sys_) * 1e6 / n:.2f} µs per admission "
      f"(user {user * 1e6 / n:.2f}, sys {sys_ * 1e6 / n:.2f})")
PY
