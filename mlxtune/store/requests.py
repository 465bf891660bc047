"""Request-id idempotency: a retried create returns the first result.

Service meshes retry UNAVAILABLE calls; a create RPC that carries the same
request_id must not create a second resource. Each (scope, request_id) maps
to the name of the resource the first call created, in a small file written
atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from mlxtune.errors import InvalidArgument

MAX_REQUEST_ID = 128


def validate_request_id(request_id: str, field: str = "request_id") -> None:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise InvalidArgument.field(
            field, f"must be at most {MAX_REQUEST_ID} printable characters"
        )


class RequestLog:
    """Maps (scope, request_id) to the resource name the first request made."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, scope: str, request_id: str) -> Path:
        digest = hashlib.sha256(f"{scope}\0{request_id}".encode()).hexdigest()[:32]
        return self.root / f"{scope}-{digest}.json"

    def lookup(self, scope: str, request_id: str) -> str | None:
        if not request_id:
            return None
        try:
            return json.loads(self._path(scope, request_id).read_text())["resource"]
        except (OSError, ValueError, KeyError):
            return None

    def record(self, scope: str, request_id: str, resource: str) -> None:
        if not request_id:
            return
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-")
        with os.fdopen(fd, "w") as f:
            json.dump({"scope": scope, "request_id": request_id, "resource": resource}, f)
        os.replace(tmp, self._path(scope, request_id))
