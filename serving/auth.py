"""Who is calling: API, admin, metrics and trusted keys, caller ids, per-key rate limits, start-up key checks."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import re
import time
from dataclasses import dataclass
from typing import Literal

from serving.exceptions import AuthError, InsecureConfig, RateLimited
from taoflow.settings import ServeSettings

Scope = Literal["user", "admin", "metrics"]

# values people leave in config files; a key equal to one (ignoring case and an `sk-` prefix), containing one of
# the phrases, or made only of x / * / . is refused at start
PLACEHOLDER_VALUES = frozenset({
    "example", "secret", "password", "test", "dummy", "todo", "key", "apikey", "api-key", "api_key", "admin",
    "changeit", "default", "token", "none", "null",
})  # fmt: skip
PLACEHOLDER_PHRASES = ("change-me", "changeme", "change_me", "replace-me", "replaceme", "replace_me", "placeholder",
                       "your-key", "your_key", "yourkey", "your-api-key", "<", ">")  # fmt: skip
_FILLER = re.compile(r"[x*.]+")
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def caller_id(key: str) -> str:
    """The caller id recorded on events: the first 32 hex digits of the key's sha256.

    >>> caller_id("sk-user")[:8], len(caller_id("sk-user"))
    ('24338abe', 32)
    """
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `caller` is None for admin keys and the no-auth mode (trusted producers)."""

    caller: str | None
    admin: bool = False
    trusted: bool = False
    key: bytes | None = None  # the key itself, to index rate limits (never logged)


OPEN = Principal(caller=None, trusted=True)


class Keyring:
    """The configured keys; checks a bearer token in constant time per key. Hashes are computed once, here."""

    def __init__(self, cfg: ServeSettings) -> None:
        api = [k.get_secret_value().encode() for k in cfg.api_keys]
        admin = [k.get_secret_value().encode() for k in cfg.admin_keys]
        metrics = [k.get_secret_value().encode() for k in cfg.metrics_keys]
        trusted = {k.get_secret_value().encode() for k in cfg.trusted_keys}
        self.open = not api and not admin
        self.principals: list[tuple[bytes, Principal, frozenset[Scope]]] = []
        every: frozenset[Scope] = frozenset(("user", "admin", "metrics"))
        for k in admin:
            self.principals.append((k, Principal(None, admin=True, trusted=True, key=k), every))
        for k in api:
            user = Principal(caller_id(k.decode()), trusted=k in trusted, key=k)
            self.principals.append((k, user, frozenset(("user",))))
        for k in metrics:
            self.principals.append((k, Principal(None, key=k), frozenset(("metrics",))))
        self.has_admin = bool(admin)

    def identify(self, authorization: bytes | None, scope: Scope) -> Principal:
        """The principal for an `Authorization: Bearer <key>` header value (raw bytes), or AuthError."""
        if self.open:
            if scope == "admin":
                raise AuthError("admin endpoints need TAOFLOW_SERVE_ADMIN_KEYS", status=403, code="admin_disabled")
            return OPEN
        token = _bearer(authorization)
        found: Principal | None = None
        scopes: frozenset[Scope] = frozenset()
        for k, principal, allowed in self.principals:
            # compare against every key (no early exit) so timing says nothing about which one matched
            if hmac.compare_digest(token, k) and found is None:
                found, scopes = principal, allowed
        if found is None:
            raise AuthError("invalid or missing API key (Authorization: Bearer <key>)")
        if scope not in scopes:
            what = {"admin": "an admin key", "metrics": "an admin or metrics key (TAOFLOW_SERVE_METRICS_KEYS)",
                    "user": "an API key"}[scope]  # fmt: skip
            raise AuthError(f"this endpoint needs {what}; this key is not one")  # 401, as before: wrong key here
        return found


def _bearer(authorization: bytes | None) -> bytes:
    """The token of a Bearer header; bytes that are not printable ASCII can never match a key (-> b'')."""
    raw = (authorization or b"").strip()
    if raw[:7].lower() == b"bearer ":
        raw = raw[7:].strip()
    if not raw or not all(33 <= c < 127 for c in raw):
        return b""
    return raw


class RateLimiter:
    """A token bucket per API key: `rate` tokens a second up to `burst`; keys are the configured ones (bounded)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, float(burst)
        self.buckets: dict[bytes, tuple[float, float]] = {}  # key -> (tokens, last refill, monotonic s)

    def take(self, key: bytes) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self.buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise RateLimited(
                f"rate limit of {self.rate:g} requests/s for this key exceeded; retry after {math.ceil(wait)} s "
                "(TAOFLOW_SERVE_RATE_LIMIT_PER_S)",
                retry_after=wait,
            )
        self.buckets[key] = (tokens - 1.0, now)


def is_placeholder(key: str) -> bool:
    """True for keys copied from an example config.

    >>> [is_placeholder(k) for k in ("change-me", "sk-xxxxxxxx", "CHANGEME-too", "secret", "q8Jf0vN3pL2m")]
    [True, True, True, True, False]
    """
    k = key.strip().lower()
    bare = k.removeprefix("sk-")
    return (
        not bare
        or bare in PLACEHOLDER_VALUES
        or any(p in k for p in PLACEHOLDER_PHRASES)
        or _FILLER.fullmatch(bare) is not None
    )


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(cfg: ServeSettings) -> None:
    """Refuse to start with placeholder keys, or with no keys on an address others can reach (unless allow_open)."""
    for field in ("api_keys", "admin_keys", "metrics_keys", "trusted_keys"):
        bad = [i for i, k in enumerate(getattr(cfg, field)) if is_placeholder(k.get_secret_value())]
        if bad:
            raise InsecureConfig(
                f"TAOFLOW_SERVE_{field.upper()} entry {bad[0]} is a placeholder value (like 'change-me'); "
                "set real random keys, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
            )
    if not cfg.api_keys and not cfg.admin_keys and not is_loopback(cfg.host) and not cfg.allow_open:
        raise InsecureConfig(
            f"the gateway would listen on {cfg.host} with no API keys, open to anyone who reaches it; set "
            "TAOFLOW_SERVE_API_KEYS (and TAOFLOW_SERVE_ADMIN_KEYS), bind TAOFLOW_SERVE_HOST=127.0.0.1, or set "
            "TAOFLOW_SERVE_ALLOW_OPEN=true if that is really intended"
        )
