"""Opaque page tokens for List RPCs (AIP-158 style).

A token encodes the sort key of the last item returned; the next page starts
after it, so items created or deleted between calls never shift a page.
"""

from __future__ import annotations

import base64
import json
from typing import Callable, Sequence, TypeVar

from mlxtune.errors import InvalidArgument

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size_or_default(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgument.field("page_size", f"must be >= 0, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_token(key: Sequence) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode()


def decode_token(token: str) -> list:
    try:
        key = json.loads(base64.urlsafe_b64decode(token.encode()))
        if not isinstance(key, list):
            raise ValueError("not a list")
        return key
    except (ValueError, TypeError) as exc:
        raise InvalidArgument.field(
            "page_token", f"not a token this server issued ({exc})") from None


def paginate(items: list[T], key: Callable[[T], Sequence], page_size: int,
             page_token: str) -> tuple[list[T], str]:
    """One page of `items` sorted by `key` descending (newest first)."""
    size = page_size_or_default(page_size)
    ordered = sorted(items, key=lambda i: list(key(i)), reverse=True)
    if page_token:
        after = decode_token(page_token)
        ordered = [i for i in ordered if list(key(i)) < after]
    page = ordered[:size]
    next_token = encode_token(key(page[-1])) if len(ordered) > size else ""
    return page, next_token
