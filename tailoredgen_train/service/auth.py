"""The api_token header (compared in constant time, never logged), request rates (counted in the
database, so that replicas share them), signed URLs."""

from __future__ import annotations

import hashlib
import hmac
import math
import time

from sqlalchemy import case, select

from ..errors import RateLimitedError, UnauthorizedError
from .db import Database, TokenLimit


def token_id(token: str) -> str:
    """A stable, non-reversible name for a token: what logs and the database may hold."""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


class TokenAuth:
    def __init__(self, tokens: list[str], organizations: dict[str, str] | None = None):
        self._tokens = [t.encode() for t in tokens]
        # a token without an organization is one of its own, named after the token's id (never the token)
        self._organizations = {token_id(t): (organizations or {}).get(t) or f"token-{token_id(t)}" for t in tokens}

    def organization_of(self, token: str) -> str:
        """The organization of a token id that `check` returned."""
        return self._organizations[token]

    def check(self, given: str | None) -> str:
        """The caller's token id, or UnauthorizedError. Every configured token is compared, so the
        time taken does not depend on which one (if any) matches."""
        candidate = (given or "").encode("utf-8", "surrogateescape")
        matched = False
        for token in self._tokens:
            matched |= hmac.compare_digest(candidate, token)
        if not given or not matched:
            raise UnauthorizedError("Unauthorized: send a valid API token in the api_token header")
        return token_id(given)


class RateLimiter:
    """`per_minute` requests per token per minute, in bursts of up to `per_minute` (the generic cell
    rate algorithm: each request is due 60/per_minute s after the one before; one is admitted while
    the token is at most a minute minus one interval ahead of its schedule). One conditional upsert
    in the database admits it: exact across threads and replicas, and no window edge to double."""

    def __init__(self, db: Database, per_minute: int, clock=time.time):
        self.db = db
        self.per_minute = per_minute
        self._clock = clock

    def check(self, who: str, record: bool = True, per: str = "token") -> None:
        """RateLimitedError when `who` (a token, or what `per` names) has used its window; else counts
        this request, unless not `record`."""
        now = self._clock()
        interval = 60.0 / self.per_minute
        ahead = 60.0 - interval + 1e-3  # the burst allowance (+1 ms: float sums of the interval)
        key = _limit_key(who)
        start = case((TokenLimit.due > now, TokenLimit.due), else_=now)
        with self.db.transaction() as session:
            if record:
                admit = (self.db.insert(TokenLimit).values(token=key, due=now + interval)
                         .on_conflict_do_update(index_elements=[TokenLimit.token], set_={"due": start + interval},
                                                where=start - now <= ahead)
                         .returning(TokenLimit.due))
                admitted = session.scalar(admit) is not None
                due = None if admitted else session.scalar(select(TokenLimit.due).where(TokenLimit.token == key))
            else:  # only look: would a request be admitted now?
                due = session.scalar(select(TokenLimit.due).where(TokenLimit.token == key))
                admitted = due is None or max(due, now) - now <= ahead
        if not admitted:
            retry_after = max(1, math.ceil(due - now - ahead))
            raise RateLimitedError(
                f"Request limit exceeded: at most {self.per_minute} requests per minute per {per}. "
                f"Try again in {retry_after} s.", retry_after_s=retry_after)


def _limit_key(who: str) -> str:
    """The token_limits key: a token id as it is; anything else (a client address) hashed to the
    column's width, in a namespace of its own."""
    return who if len(who) <= 16 and ":" not in who else "k:" + hashlib.sha256(who.encode()).hexdigest()[:30]


class UrlSigner:
    """Pre-signed download URLs: the path, an expiry and the organization that owns the file, signed
    with the service's secret. The file route checks the signature against the owner it finds now, so
    a link stops working when its model is deleted."""

    def __init__(self, secret: str, clock=time.time):
        self._key = secret.encode()
        self._clock = clock

    def sign(self, path: str, ttl_s: int, owner: str) -> tuple[int, str]:
        expires = int(self._clock()) + ttl_s
        return expires, self._signature(path, expires, owner)

    def verify(self, path: str, expires: int, signature: str, owner: str | None) -> None:
        """`owner`: the organization that owns the file now; None when it is gone (the link fails)."""
        expected = self._signature(path, expires, owner or "")
        if not hmac.compare_digest(expected.encode(), signature.encode("utf-8", "surrogateescape")):
            raise UnauthorizedError("Unauthorized: the download link's signature does not match; request a new "
                                    "link from GET /tailored-gen/models/{model_id}/download")
        if expires < self._clock():
            raise UnauthorizedError("Unauthorized: the download link has expired; request a new one from "
                                    "GET /tailored-gen/models/{model_id}/download")

    def _signature(self, path: str, expires: int, owner: str) -> str:
        return self.digest(f"{owner}\n{path}\n{expires}")

    def digest(self, message: str) -> str:
        """HMAC-SHA256 of `message` with the service's secret (hex); callers prefix their own purpose."""
        return hmac.new(self._key, message.encode(), hashlib.sha256).hexdigest()
