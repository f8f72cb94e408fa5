"""Who may use the server: API keys, ephemeral client secrets, Origins, telephony secrets, TLS.

Pure: no sockets and no session. The server (realtime/transports/websocket.py) calls these at the HTTP
handshake, before any session or model work, and answers a refusal with its HTTP status. What is protected
and what is not is written down in docs/security.md.

Every secret comparison runs in constant time over SHA-256 digests, so neither the secret's bytes nor its
length leak through timing: `hmac.compare_digest` on equal-length digests, and every configured key is
compared (no early exit). Ephemeral keys are looked up by their digest, never by their value.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import secrets
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

from common.config import AuthConfig, ConfigError

log = logging.getLogger(__name__)

SUBPROTOCOL_KEY_PREFIX = "openai-insecure-api-key."  # how browsers pass a key (they cannot set headers)
CLIENT_SECRET_PREFIX = "ek_"
# The environment adds to the config's secrets (comma-separated keys), so secrets need not sit in files.
ENV_API_KEYS = "DUET_API_KEYS"
ENV_TELEPHONY_TOKEN = "DUET_TELEPHONY_TOKEN"
ENV_TWILIO_AUTH_TOKEN = "DUET_TWILIO_AUTH_TOKEN"

Credential = Literal["open", "api_key", "client_secret", "telephony_token", "twilio_signature"]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _matches_any(presented: str, digests: Iterable[bytes]) -> bool:
    """Constant time in the presented value: every digest is compared, with no early exit."""
    mine = _digest(presented)
    found = False
    for d in digests:
        found |= hmac.compare_digest(mine, d)
    return found


@dataclass
class ClientSecret:
    """An ephemeral key: valid for new sessions until `expires_at` (unix seconds); a session it opened goes
    on past that, as OpenAI's do. `session` is the session configuration every session opened with it
    starts from (already validated when the secret was made)."""

    expires_at: float
    session: dict[str, Any] = field(default_factory=dict)


class ClientSecrets:
    """Ephemeral `ek_` keys in memory, by the SHA-256 of their value (the value itself is not kept)."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity
        self._clock = clock
        self._by_digest: dict[bytes, ClientSecret] = {}

    def __len__(self) -> int:
        return len(self._by_digest)

    def mint(self, seconds: int, session: dict[str, Any] | None = None) -> tuple[str, ClientSecret]:
        """A new key valid for `seconds`; raises OverflowError when `capacity` keys are live."""
        self.prune()
        if len(self._by_digest) >= self.capacity:
            raise OverflowError(f"{self.capacity} client secrets are live; try again later")
        value = CLIENT_SECRET_PREFIX + secrets.token_urlsafe(32)
        # On a whole second, so the `expires_at` a client is told (an integer) is exactly when it stops working.
        entry = ClientSecret(expires_at=float(int(self._clock()) + seconds), session=dict(session or {}))
        self._by_digest[_digest(value)] = entry
        return value, entry

    def lookup(self, value: str) -> ClientSecret | None:
        """The live secret with this value, else None. A dict lookup by digest: the time it takes depends on
        the digest of what was presented, which tells an attacker nothing about any stored key."""
        entry = self._by_digest.get(_digest(value))
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            self._by_digest.pop(_digest(value), None)
            return None
        return entry

    def prune(self) -> None:
        now = self._clock()
        for digest in [d for d, e in self._by_digest.items() if e.expires_at <= now]:
            del self._by_digest[digest]


@dataclass(frozen=True)
class Refusal:
    """Why a handshake is refused: the HTTP status, a reason counted by the server, and a message that is
    safe to send back (it never echoes a secret)."""

    status: int
    reason: str
    message: str


UNAUTHORIZED = Refusal(401, "unauthorized", "missing or invalid API key: send Authorization: Bearer <key> "
                                            "(browsers: the openai-insecure-api-key.<key> subprotocol)")
BAD_TELEPHONY_SECRET = Refusal(401, "unauthorized", "missing or invalid telephony token or Twilio signature")


def bearer_token(authorization: str | None) -> str | None:
    """`Bearer <key>` (scheme case-insensitive) -> key."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def offered_subprotocols(header: str | None) -> list[str]:
    return [p.strip() for p in (header or "").split(",") if p.strip()]


def subprotocol_key(offered: Iterable[str]) -> str | None:
    for proto in offered:
        if proto.startswith(SUBPROTOCOL_KEY_PREFIX) and len(proto) > len(SUBPROTOCOL_KEY_PREFIX):
            return proto[len(SUBPROTOCOL_KEY_PREFIX):]
    return None


def host_name(host_header: str) -> str:
    """`Host` header (or a bind address) -> the name or IP without port and brackets, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:8765
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host


def is_loopback(host: str) -> bool:
    name = host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def origin_allowed(origin: str | None, host_header: str | None, allowed: Iterable[str]) -> bool:
    """Browsers always send Origin on a WebSocket handshake; other clients usually do not, and are not
    affected. A browser page may connect from the server's own origin or from an allowed one."""
    if origin is None:
        return True
    allowed = {a.strip().rstrip("/").lower() for a in allowed}
    origin_norm = origin.strip().rstrip("/").lower()
    if "*" in allowed or origin_norm in allowed:
        return True
    netloc = urlsplit(origin_norm).netloc
    return bool(netloc) and host_header is not None and netloc == host_header.strip().lower()


def twilio_signature(auth_token: str, url: str, params: Mapping[str, str] | None = None) -> str:
    """Twilio's request signature: base64(HMAC-SHA1(auth token, the full URL it called + each POST parameter
    name and value, sorted by name)). A Media Streams WebSocket handshake is a GET: the URL alone, `wss://`."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    mac = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """The server's TLS context from PEM files (`[server] tls_cert_file`, `tls_key_file`), or None for plain
    ws/http; a half-set pair or an unreadable file is a ConfigError, raised before anything listens."""
    if not cert_file and not key_file:
        return None
    if not cert_file or not key_file:
        raise ConfigError("server.tls_cert_file and server.tls_key_file must be set together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert_file!r} and key {key_file!r}: {exc}") from None
    return ctx


def _env_list(value: str | None) -> tuple[str, ...]:
    return tuple(k.strip() for k in (value or "").split(",") if k.strip())


class Authenticator:
    """The server's decisions about credentials, from one `[auth]` config and the environment."""

    def __init__(self, cfg: AuthConfig, environ: Mapping[str, str] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        env = environ or {}
        self.cfg = cfg
        keys = tuple(k for k in cfg.api_keys if k) + _env_list(env.get(ENV_API_KEYS))
        self._key_digests = tuple(_digest(k) for k in keys)
        self.telephony_token = cfg.telephony_token or env.get(ENV_TELEPHONY_TOKEN, "")
        self.twilio_auth_token = cfg.twilio_auth_token or env.get(ENV_TWILIO_AUTH_TOKEN, "")
        self.client_secrets = ClientSecrets(cfg.max_client_secrets, clock=clock)
        self._clock = clock

    @property
    def open(self) -> bool:
        """No API key configured: anyone who reaches the port is served (loopback only, see check_bind)."""
        return not self._key_digests

    @property
    def telephony_open(self) -> bool:
        return self.open and not self.telephony_token and not self.twilio_auth_token

    def check_bind(self, host: str) -> None:
        """Refuse to serve without keys where others can reach the port: a clear error beats an open server."""
        if self.open and not is_loopback(host) and not self.cfg.allow_unauthenticated_public:
            raise ConfigError(
                f"refusing to listen on {host!r} without an API key: anyone who reaches the port could use the "
                f"server. Set {ENV_API_KEYS} (or [auth] api_keys), listen on 127.0.0.1, or, behind a proxy "
                "that authenticates, set auth.allow_unauthenticated_public = true")

    # ---- keys -----------------------------------------------------------------------------------
    def is_api_key(self, presented: str | None) -> bool:
        return bool(presented) and _matches_any(presented or "", self._key_digests)

    def client_key(self, authorization: str | None, subprotocols: Iterable[str]) -> str | None:
        """The key a client presents: the Authorization header, else a browser's subprotocol."""
        return bearer_token(authorization) or subprotocol_key(subprotocols)

    def authenticate(self, authorization: str | None,
                     subprotocols: Iterable[str] = ()) -> tuple[Credential, ClientSecret | None] | Refusal:
        """A realtime client: an API key or a live client secret (or nothing, on an open server)."""
        if self.open:
            return "open", None
        key = self.client_key(authorization, subprotocols)
        if key is None:
            return UNAUTHORIZED
        if self.is_api_key(key):
            return "api_key", None
        if key.startswith(CLIENT_SECRET_PREFIX):
            secret = self.client_secrets.lookup(key)
            if secret is not None:
                return "client_secret", secret
        return UNAUTHORIZED

    def authenticate_minting(self, authorization: str | None) -> Refusal | None:
        """Only a real key may make client secrets (an `ek_` must not beget more of itself)."""
        if self.open or self.is_api_key(bearer_token(authorization)):
            return None
        return UNAUTHORIZED

    def client_secret_seconds(self, body: Mapping[str, Any]) -> int:
        """The lifetime a client_secrets request asks for (`expires_after: {anchor, seconds}`), within the
        configured bounds; raises ValueError with a message for the client."""
        cfg = self.cfg
        expires = body.get("expires_after")
        if expires is None:
            return cfg.client_secret_seconds
        if not isinstance(expires, dict):
            raise ValueError("expires_after must be an object {anchor, seconds}")
        anchor = expires.get("anchor", "created_at")
        if anchor != "created_at":
            raise ValueError(f"expires_after.anchor must be 'created_at', not {anchor!r}")
        seconds = expires.get("seconds", cfg.client_secret_seconds)
        if isinstance(seconds, bool) or not isinstance(seconds, int):
            raise ValueError("expires_after.seconds must be an integer")
        if not cfg.client_secret_min_seconds <= seconds <= cfg.client_secret_max_seconds:
            raise ValueError(f"expires_after.seconds must be between {cfg.client_secret_min_seconds} and "
                             f"{cfg.client_secret_max_seconds}")
        return seconds

    # ---- telephony ------------------------------------------------------------------------------
    def authenticate_telephony(self, dialect: str, *, url: str, token: str | None, signature: str | None,
                               authorization: str | None) -> Credential | Refusal:
        """A phone platform's stream: Twilio's signature over `url` (the URL as the platform called it), the
        telephony token from the stream URL, or an API key (for tests and tools). Phone platforms cannot send
        our API keys, so these endpoints have their own secret; none configured and no keys = open."""
        if self.telephony_open:
            return "open"
        if dialect == "twilio" and self.twilio_auth_token and signature:
            expected = twilio_signature(self.twilio_auth_token, url)
            if hmac.compare_digest(_digest(signature), _digest(expected)):
                return "twilio_signature"
        if self.telephony_token and token and _matches_any(token, (_digest(self.telephony_token),)):
            return "telephony_token"
        if self.is_api_key(bearer_token(authorization)):
            return "api_key"
        return BAD_TELEPHONY_SECRET

    def twilio_url(self, host_header: str | None, path_qs: str) -> str:
        """The URL Twilio signed: it only connects over wss, so behind a TLS proxy our plain request still
        was `wss://` on Twilio's side. A configured public URL wins over the (client-chosen) Host header."""
        base = self.cfg.twilio_public_url.rstrip("/") or f"wss://{host_header or ''}"
        return base + path_qs
