#!/usr/bin/env bash
# Generates the Go code of the API from protos/ and builds the example client
# into bin/mlxtune-example. GOPATH mode against Debian's Go packages (grpc-go
# 1.33, golang/protobuf 1.3): no module downloads, nothing generated is committed.
#
#   clients/go/build.sh            # needs: go, protoc, protoc-gen-go-1-3, golang-google-grpc-dev
#   PROTOC_GEN_GO=/path/to/protoc-gen-go clients/go/build.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
protos="$(cd "$here/../../protos" && pwd)"
gen="$here/.gen"

# The v1.3 generator, the one that matches Debian's grpc-go 1.33 and its
# golang/protobuf 1.3 runtime. Named explicitly so a newer protoc-gen-go on PATH
# (which emits APIv2 code that runtime cannot marshal) is never picked up.
plugin="${PROTOC_GEN_GO:-$(dpkg -L protoc-gen-go-1-3 2>/dev/null | grep '/bin/protoc-gen-go$' | head -n1 || true)}"
if [ -z "$plugin" ] || [ ! -x "$plugin" ]; then
  echo "protoc-gen-go v1.3 not found: install Debian's protoc-gen-go-1-3 or set PROTOC_GEN_GO" >&2
  exit 1
fi

rm -rf "$gen/protos" "$gen/go"
mkdir -p "$gen/protos" "$gen/go/src" "$here/bin"

# The v1.3 generator predates proto3 `optional` and protoc refuses to run it on
# such files. `optional T x = N;` is, on the wire and in the descriptor, a
# one-member oneof named `_x`; writing it that way keeps field presence (the
# Go field is X<Name>, e.g. AdapterConfig.XRank = &AdapterConfig_Rank{Rank: 8}).
(cd "$protos" && find . -name '*.proto') | while read -r file; do
  mkdir -p "$gen/protos/$(dirname "$file")"
  sed -E 's/^([[:space:]]*)optional ([A-Za-z0-9_.]+) ([A-Za-z0-9_]+) = ([0-9]+);/\1oneof _\3 { \2 \3 = \4; }/' \
    "$protos/$file" > "$gen/protos/$file"
done
# A form the rewrite misses (field options, a line break) must stop the build
# here, not as protoc's confusing plugin error.
if grep -rnE '^[[:space:]]*optional ' "$gen/protos"; then
  echo "build.sh cannot rewrite the optional fields above; extend its sed pattern" >&2
  exit 1
fi

# One protoc run per proto package: the v1.3 generator refuses to mix Go
# packages in one run. Timestamp maps to the v1.3 well-known type (the APIv2
# timestamppb the protoc include names would not marshal with this runtime).
(cd "$gen/protos" && find . -name '*.proto' -printf '%h\n' | sort -u) | while read -r dir; do
  protoc -I "$gen/protos" --plugin=protoc-gen-go="$plugin" \
    --go_out=plugins=grpc,Mgoogle/protobuf/timestamp.proto=github.com/golang/protobuf/ptypes/timestamp:"$gen/go/src" \
    "$gen/protos/$dir"/*.proto
done

# The generated packages land under their go_package import paths
# (mlxtune/gen/go/mlxtune/...), this folder's src/ holds the client and the
# example, /usr/share/gocode holds Debian's grpc-go and golang/protobuf.
export GOPATH="$gen/go:$here:/usr/share/gocode"
export GO111MODULE=off GOPROXY=off GOFLAGS=
export GOCACHE="$gen/cache"
go build -o "$here/bin/mlxtune-example" mlxtune-example
echo "built $here/bin/mlxtune-example"
