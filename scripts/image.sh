#!/usr/bin/env bash
# Builds keyward's container image without Docker: an OCI image layout with one layer.
#
#   scripts/image.sh [--binary PATH] [--out DIR] [--tag TAG] [--docker-archive FILE]
#
# The root filesystem is the Dockerfile's final stage, assembled from this host:
#   /usr/local/bin/keyward   the binary (the release build unless --binary), stripped
#   the shared libraries     exactly those `ldd` names (libc, libm, libgcc_s, ld-linux, …),
#                            copied from the host to the same paths
#   /etc/passwd, /etc/group  root and nonroot (65532:65532)
#   /etc/nsswitch.conf       hosts from /etc/hosts, then DNS
#   /etc/ssl/certs/ca-certificates.crt   the host's CA roots (TLS to managed Redis/Postgres)
#   /data                    owned by 65532, the working directory (SQLite file, key file)
#   /home/nonroot            owned by 65532 (its home, as in distroless)
#   /tmp                     1777
# and nothing else: no shell, no package manager. The image config says what the
# Dockerfile says (user 65532:65532, entrypoint, cmd, working directory, ports, labels).
# The binary links glibc dynamically; the image carries the very libraries it was linked
# against on this host, so it does not depend on the node's.
#
# Defaults: --out target/image/oci, --tag the crate's version. The layout is replaced.
# --docker-archive FILE also writes a tarball `docker load` reads (needs skopeo).
# Push the layout to a registry with skopeo:
#   skopeo copy oci:target/image/oci:0.1.0 docker://ghcr.io/keyward-dev/keyward:0.1.0
# Needs: python3, ldd, strip (binutils); cargo without --binary.
set -euo pipefail
cd "$(dirname "$0")/.."

REPOSITORY=ghcr.io/keyward-dev/keyward
SOURCE=https://github.com/keyward-dev/keyward
LICENSE=Apache-2.0

die() { printf 'scripts/image.sh: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

binary=""
out="target/image/oci"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
tag="$version"
archive=""
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary="${2:?--binary needs a path}"; shift 2 ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a tag}"; shift 2 ;;
        --docker-archive) archive="${2:?--docker-archive needs a file}"; shift 2 ;;
        -h|--help) usage ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[ -n "$version" ] || die "cannot read the version from Cargo.toml"
for tool in python3 ldd strip; do
    command -v "$tool" >/dev/null || die "$tool is missing"
done
[ -z "$archive" ] || command -v skopeo >/dev/null || die "--docker-archive needs skopeo (apt-get install skopeo)"

if [ -z "$binary" ]; then
    printf '==> cargo build --release --locked\n' >&2
    cargo build --release --locked --bin keyward
    binary=target/release/keyward
fi
[ -f "$binary" ] && [ -x "$binary" ] || die "$binary is not an executable file"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{usr/local/bin,etc/ssl/certs,data,home/nonroot,tmp}

strip --strip-all -o "$rootfs/usr/local/bin/keyward" "$binary"
chmod 0755 "$rootfs/usr/local/bin/keyward"

# ldd's lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)", the loader as
# "/lib64/ld-linux-x86-64.so.2 (0x…)", the kernel's "linux-vdso.so.1 (0x…)" (no file).
ldd_out=$(ldd "$rootfs/usr/local/bin/keyward" 2>&1) || true
if grep -q 'not found' <<<"$ldd_out"; then
    die "a library of $binary is missing on this host: $ldd_out"
fi
libs=$(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$ldd_out" | sort -u)
if [ -z "$libs" ] && ! grep -q 'statically linked' <<<"$ldd_out"; then
    die "ldd named no library for $binary: $ldd_out"
fi
for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"   # the file itself, at the path the loader asks for
done

cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
echo 'hosts: files dns' >"$rootfs/etc/nsswitch.conf"
roots=/etc/ssl/certs/ca-certificates.crt
[ -f "$roots" ] || die "$roots is missing (apt-get install ca-certificates)"
cp -L "$roots" "$rootfs$roots"

python3 scripts/oci_image.py --rootfs "$rootfs" --out "$out" --tag "$tag" \
    --version "$version" --source "$SOURCE" --license "$LICENSE"

if [ -n "$archive" ]; then
    rm -f "$archive"
    skopeo copy --quiet "oci:$out:$tag" "docker-archive:$archive:$REPOSITORY:$tag"
    printf '%s: docker load -i %s gives %s:%s\n' "$archive" "$archive" "$REPOSITORY" "$tag"
fi
