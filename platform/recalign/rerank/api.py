"""The HTTP contract of the re-ranking endpoint, free of Ray and of the model: limits, the request and reply
models (pydantic, so FastAPI documents them at /docs), a JSON reader that turns every bad body into a 4xx
naming the field, and API keys.

    POST /v1/rerank {"history": ["50", "172"], "ratings": [5, 4], "candidates": ["1", "2", "3"], "top_n": 2}
    POST /v1/rerank {"user_id": "196", "candidates": ["1", "2", "3"]}     # history: the user's train items

A bad request is answered {"error": {"field": "candidates[1]", "message": "..."}}; a message quotes at most
PREFIX characters of any value the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recalign import prompts
from recalign.config import option
from recalign.errors import UserError

PREFIX = 32
MAX_RATING = 5.0
ItemId = Annotated[str, Field(min_length=1, max_length=64)]


@dataclass
class ApiLimits:
    """What one request may hold; over a limit is a 4xx, never a silent cut."""

    max_body_bytes: int = option(65536, "request bodies over this many bytes get a 413")
    max_history: int = option(200, "history items per request; more is a 422, not silently cut")
    max_candidates: int = option(len(prompts.LETTERS), f"candidates per request (at most {len(prompts.LETTERS)}, "
                                                       "one letter each)")

    def __post_init__(self):
        if not 1 <= self.max_candidates <= len(prompts.LETTERS):
            raise UserError(f"max_candidates: must be in 1..{len(prompts.LETTERS)}, got {self.max_candidates}")
        if self.max_body_bytes < 1024 or self.max_history < 1:
            raise UserError("max_body_bytes must be >= 1024 and max_history >= 1")


class ApiError(Exception):
    """A request the endpoint refuses: the HTTP status, the field it is about and a short message."""

    def __init__(self, status: int, field: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{field}: {message}")
        self.status, self.field, self.message, self.headers = status, field, message, headers or {}

    def body(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


def short(value: Any) -> str:
    """A client value as an error message may quote it: repr, cut to PREFIX characters."""
    text = repr(value)
    return text if len(text) <= PREFIX else text[:PREFIX] + f"... ({len(text)} chars)"


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    history: list[ItemId] | None = Field(None, description="item ids, oldest first; or give user_id")
    user_id: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="a user of the run's dataset: their train items are the history")
    ratings: list[Annotated[float, Field(ge=0.0, le=MAX_RATING, allow_inf_nan=False)]] | None = Field(
        None, description=f"one rating (0..{MAX_RATING:g}) per history item")
    candidates: list[ItemId] = Field(..., min_length=1, description="item ids to rank")
    top_n: Annotated[int, Field(ge=1, le=len(prompts.LETTERS))] | None = Field(
        None, description="return only the best top_n; default all")
    system: Annotated[str, Field(min_length=1, max_length=64)] | None = Field(
        None, description="which served system ranks (GET /v1/systems); default the deployment's best")
    explain: bool = Field(False, description="also decode the model's free-text answer (slower)")


class RankedItem(BaseModel):
    item_id: str
    title: str
    score: float


class RerankReply(BaseModel):
    request_id: str
    system: str
    model: str
    ranking: list[RankedItem]
    explanation: str | None = None


class OutOfRange:
    """A JSON number no float holds (1e400, a 400-digit integer, NaN, Infinity), kept as its text so that
    validation reports it at its field instead of the JSON reader failing on the whole body."""

    def __init__(self, text: str):
        self.text = text


def _bounded_int(text: str) -> int | OutOfRange:
    return OutOfRange(text) if len(text.lstrip("-")) > 18 else int(text)


def _finite_float(text: str) -> float | OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else OutOfRange(text)


def read_json(body: bytes, limits: ApiLimits) -> Any:
    """Bytes of a request body -> JSON value, or an ApiError: 413 over the size limit, 400 for what is not JSON
    or nests too deep. Numbers no float holds come back as OutOfRange, for parse_request to name their field."""
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, "body", f"{len(body)} bytes; at most {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, "body", f"not UTF-8 (byte {err.start})") from None
    try:
        return json.loads(text, parse_constant=OutOfRange, parse_int=_bounded_int, parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise ApiError(400, "body", f"not JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise ApiError(400, "body", "JSON nests too deep") from None


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def parse_request(value: Any, limits: ApiLimits) -> RerankRequest:
    """A JSON value -> RerankRequest, or a 422 naming the first bad field (values quoted short)."""
    if not isinstance(value, dict):
        raise ApiError(422, "body", f"expected a JSON object, got {type(value).__name__}")
    try:
        req = RerankRequest.model_validate(value)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        loc, message = tuple(first["loc"]), first["msg"]
        if isinstance(first.get("input"), OutOfRange):
            message = f"{short(first['input'].text)} is out of range: numbers must be finite"
        if first["type"] == "extra_forbidden":
            message = f"unknown field; expected one of {sorted(RerankRequest.model_fields)}"
            loc = (short(loc[-1]).strip("'\""),)
        raise ApiError(422, _loc(loc), message) from None
    if (req.history is None) == (req.user_id is None):
        raise ApiError(422, "history", "give exactly one of history and user_id")
    if req.history is not None and len(req.history) > limits.max_history:
        raise ApiError(422, "history", f"{len(req.history)} items; at most {limits.max_history}")
    if req.ratings is not None and (req.history is None or len(req.ratings) != len(req.history)):
        raise ApiError(422, "ratings", f"expected one rating per history item ({len(req.history or [])})")
    if len(req.candidates) > limits.max_candidates:
        raise ApiError(422, "candidates", f"{len(req.candidates)} items; at most {limits.max_candidates}")
    seen: set[str] = set()
    for i, item_id in enumerate(req.candidates):
        if item_id in seen:
            raise ApiError(422, f"candidates[{i}]", f"duplicate item id {short(item_id)}")
        seen.add(item_id)
    if req.top_n is not None and req.top_n > len(req.candidates):
        raise ApiError(422, "top_n", f"{req.top_n} is more than the {len(req.candidates)} candidates")
    return req


class ApiKeys:
    """Bearer keys, kept only as SHA-256 digests and compared in constant time; never logged."""

    ENV = "RECALIGN_API_KEYS"

    def __init__(self, digests: list[bytes]):
        if not digests:
            raise UserError("no API keys given: put keys (one per line) in a file, or comma-separated in "
                            f"${self.ENV}, or start with auth=none to serve without keys")
        self.digests = digests

    @classmethod
    def load(cls, auth: str, keys_file: str = "") -> "ApiKeys | None":
        """auth=none: no keys (say so at start); auth=keys: from keys_file if set, else from $RECALIGN_API_KEYS."""
        if auth == "none":
            return None
        if auth != "keys":
            raise UserError(f"auth: must be 'keys' or 'none', got {short(auth)}")
        if keys_file:
            if not os.path.isfile(keys_file):
                raise UserError(f"keys_file={keys_file}: no such file")
            with open(keys_file) as f:
                keys = [line.strip() for line in f if line.strip() and not line.startswith("#")]
        else:
            keys = [k.strip() for k in os.environ.get(cls.ENV, "").split(",") if k.strip()]
        return cls([hashlib.sha256(k.encode()).digest() for k in keys])

    def check(self, authorization: str | None) -> None:
        """401 without a bearer key, 403 with one that is not ours."""
        if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
            raise ApiError(401, "Authorization", "missing API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
        presented = hashlib.sha256(authorization[7:].strip().encode()).digest()
        match = False
        for digest in self.digests:  # every digest compared, so the time does not tell which one matched
            match |= hmac.compare_digest(presented, digest)
        if not match:
            raise ApiError(403, "Authorization", "API key not accepted")
