#!/usr/bin/env bash
# Regenerates the checked-in Python code of registry.proto (run from anywhere).
#
# The generator must not be newer than the protobuf runtime that flwr pins (<7): grpcio-tools
# 1.80.1 bundles protoc 31.1, whose code runs on protobuf >= 6.31.1 and grpcio >= 1.80.1.
#   .venv/bin/pip install grpcio-tools==1.80.1
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
cd "$root"
"$python" -m grpc_tools.protoc -I. \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  common/registry_proto/registry.proto
for generated in common/registry_proto/registry_pb2.py common/registry_proto/registry_pb2.pyi \
  common/registry_proto/registry_pb2_grpc.py; do
  # common/ installs as fedct.common (pyproject.toml): the generated imports say so.
  sed -i -e 's/from common\.registry_proto import/from fedct.common.registry_proto import/' \
    -e "s/'common\.registry_proto\.registry_pb2'/'fedct.common.registry_proto.registry_pb2'/" "$generated"
  {
    echo "# Generated from registry.proto by common/registry_proto/generate.sh (grpcio-tools 1.80.1)."
    cat "$generated"
  } >"$generated.tmp"
  mv "$generated.tmp" "$generated"
done
