#!/usr/bin/env bash
# Installs the Debian packages the tests use as real peers, when missing:
# Prometheus (server + promtool) and the Go toolchain with grpc-go for the Go client.
set -euo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v go >/dev/null || need+=(golang-go)
command -v protoc >/dev/null || need+=(protobuf-compiler)
command -v npm >/dev/null || need+=(nodejs npm)
for pkg in golang-google-grpc-dev golang-google-protobuf-dev protoc-gen-go-1-3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root, or install them)" >&2
  exit 1
fi
echo "installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
