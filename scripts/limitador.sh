#!/usr/bin/env bash
# Builds the Limitador yardstick of `cargo bench --bench admit` and prints its path:
#
#   LIMITADOR_BIN=$(scripts/limitador.sh) cargo bench --bench admit
#   LIMITADOR_BIN=$(scripts/limitador.sh) KEYWARD_BENCH_ONLY=embedded,redis,limitador cargo bench --bench admit
#
# benches/limitador/ is a cargo project of its own (not in keyward's workspace): the
# `limitador` library 0.14 (the code limitador-server runs) behind a minimal HTTP/1.1
# server that takes limitador-server's command line and answers its `POST
# /check_and_report`. Built in release under target/limitador.
#
# limitador 0.14.0 as published compiles only with its `disk_storage` feature (RocksDB,
# a long C++ build): its key encoding (`storage::keys::bin`, `Counter::variables_for_key`)
# is gated on that feature though the Redis storage uses it too. So the crate's source is
# copied under target/limitador and those two gates widened to `redis_storage`, nothing
# else changed, and the build patched to that copy (`--config patch…`).
#
# Needs crates.io the first time (its dependencies are not keyward's), and takes a few
# minutes then. CI (scripts/test.sh) does not build it.
set -euo pipefail
cd "$(dirname "$0")/.."
manifest=benches/limitador/Cargo.toml
out=target/limitador
crate=limitador-0.14.0

cargo fetch --manifest-path "$manifest" --quiet >&2 || true
if [ ! -d "$out/$crate" ]; then
    src=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -mindepth 2 -maxdepth 2 -name "$crate" | head -n 1)
    [ -n "$src" ] || { echo "scripts/limitador.sh: $crate not in the cargo registry" >&2; exit 1; }
    mkdir -p "$out"
    cp -R "$src" "$out/$crate.tmp"
    gate='#\[cfg(feature = "disk_storage")\]'
    wide='#[cfg(any(feature = "disk_storage", feature = "redis_storage"))]'
    sed -i "/^$gate\$/{N;s/^$gate\(\npub mod bin\)/$wide\1/}" "$out/$crate.tmp/src/storage/keys.rs"
    sed -i "/^    $gate\$/{N;s/^    $gate\(\n    pub(crate) fn variables_for_key\)/    $wide\1/}" "$out/$crate.tmp/src/counter.rs"
    grep -q 'feature = "redis_storage"))\]' "$out/$crate.tmp/src/storage/keys.rs"
    grep -q 'feature = "redis_storage"))\]' "$out/$crate.tmp/src/counter.rs"
    mv "$out/$crate.tmp" "$out/$crate"
fi
cargo build --release --quiet --manifest-path "$manifest" --target-dir "$out" \
    --config "patch.crates-io.limitador.path='$PWD/$out/$crate'" >&2
echo "$PWD/$out/release/limitador-yardstick"
