#!/usr/bin/env bash
# Make sure the services the tests need answer on loopback: PostgreSQL on 5432 and Redis on 6379.
# Starts whichever is down with the same commands the machine image uses, then waits for it.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; }
redis_up() { [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = "PONG" ]; }

wait_for() {  # name, check function
    for _ in $(seq 1 60); do "$2" && { echo "$1: up"; return 0; }; sleep 0.5; done
    echo "$1: did not come up within 30 s" >&2; return 1
}

if pg_up; then
    echo "postgresql: up"
else
    echo "postgresql: down, starting it"
    if command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n 1)" main start
    else
        echo "postgresql: no pg_ctlcluster here; start PostgreSQL on 127.0.0.1:5432 yourself" >&2; exit 1
    fi
    wait_for postgresql pg_up
fi
for db in test root; do
    psql -h 127.0.0.1 -U "${PGUSER:-postgres}" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" 2>/dev/null \
        | grep -q 1 || psql -h 127.0.0.1 -U "${PGUSER:-postgres}" -d postgres -qc "CREATE DATABASE \"$db\"" 2>/dev/null || true
done

if redis_up; then
    echo "redis: up"
else
    echo "redis: down, starting it"
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for redis redis_up
fi
