"""Request bodies: read within a size limit (413 before reading an oversized one), parsed as JSON,
validated against a model. Problems are named by field and rule, never by value: a body may hold
patient data or tokens."""

from __future__ import annotations

import json

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.core.errors import InvalidRequest, PayloadTooLarge


async def read_body(request: Request, limit: int, too_large: str) -> bytes:
    """The raw body; PayloadTooLarge(`too_large`) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(too_large)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(too_large)
    return bytes(body)


def parse_json(raw: bytes, what: str) -> object:
    try:
        return json.loads(raw)
    except RecursionError:  # nested deeper than the parser's recursion limit: a 400, not a 500
        raise InvalidRequest(f"the {what} is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest(f"the {what} is not valid JSON") from None


async def read_json(request: Request, limit: int) -> object:
    """A CDS Hooks request body as JSON."""
    return parse_json(await read_body(request, limit, f"request body over {limit} bytes"), "request body")


def validate(model: type[BaseModel], data: object, where: str) -> BaseModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = sorted({".".join([where, *map(str, e["loc"])]).rstrip(".") + ": " + e["msg"] for e in exc.errors()})
        raise InvalidRequest("; ".join(problems[:5])) from None
