#!/usr/bin/env bash
# Runs the whole test suite: unit tests, the integration tests (which start their
# own redis-server processes on free loopback ports; never the one on 6379) and
# the doctests. Finds redis-server, or installs it with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

find_redis_server() {
    if [ -n "${REDIS_SERVER:-}" ] && [ -x "$REDIS_SERVER" ]; then
        echo "$REDIS_SERVER"; return 0
    fi
    for candidate in "$(command -v redis-server 2>/dev/null || true)" \
        /usr/bin/redis-server /usr/local/bin/redis-server /usr/sbin/redis-server; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"; return 0
        fi
    done
    return 1
}

if ! server=$(find_redis_server); then
    echo "scripts/test.sh: redis-server not found; installing it with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
    server=$(find_redis_server) || { echo "scripts/test.sh: redis-server still not found after apt-get" >&2; exit 1; }
fi
# Absolute (tests of other workspace members run in their own directories),
# but not resolved: redis-server is a symlink whose name selects what it runs.
case "$server" in /*) ;; *) server="$(pwd)/$server" ;; esac
export REDIS_SERVER="$server"
echo "scripts/test.sh: using $("$REDIS_SERVER" --version | head -n1)" >&2

cargo test --all-features --locked "$@"
