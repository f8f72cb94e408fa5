"""realtime/transports/auth.py: the server's decisions about keys, secrets, Origins and telephony, without a server."""

from __future__ import annotations

import dataclasses

import pytest

from common.config import AuthConfig, ConfigError, load_config
from realtime.transports import auth
from realtime.transports.auth import UNAUTHORIZED, Authenticator, ClientSecrets, Refusal

KEY = "sk-duet-test-key-1"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def keyed(**changes: object) -> Authenticator:
    return Authenticator(dataclasses.replace(AuthConfig(api_keys=(KEY,)), **changes), environ={})  # type: ignore[arg-type]


def test_no_key_is_open_and_only_on_loopback() -> None:
    a = Authenticator(AuthConfig(), environ={})
    assert a.open and a.telephony_open
    assert a.authenticate(None) == ("open", None)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        a.check_bind(host)
    for host in ("0.0.0.0", "", "10.1.2.3", "duet.example.com", "::"):
        with pytest.raises(ConfigError, match="without an API key"):
            a.check_bind(host)
    Authenticator(AuthConfig(allow_unauthenticated_public=True), environ={}).check_bind("0.0.0.0")
    keyed().check_bind("0.0.0.0")  # with a key, any host


def test_keys_come_from_config_and_environment() -> None:
    a = Authenticator(AuthConfig(api_keys=("a1",)), environ={auth.ENV_API_KEYS: " e1, e2 ,,"})
    assert all(a.is_api_key(k) for k in ("a1", "e1", "e2"))
    assert not any(a.is_api_key(k) for k in ("", " e1", "a", "a1 ", None, "e1,e2"))
    assert Authenticator(AuthConfig(), environ={auth.ENV_API_KEYS: "x"}).open is False


def test_bearer_and_subprotocol_keys() -> None:
    a = keyed()
    assert a.authenticate(f"Bearer {KEY}") == ("api_key", None)
    assert a.authenticate(f"bearer   {KEY}  ") == ("api_key", None)
    assert a.authenticate(None, ["realtime", f"openai-insecure-api-key.{KEY}"]) == ("api_key", None)
    assert a.authenticate(None, auth.offered_subprotocols(f"realtime, openai-insecure-api-key.{KEY}")) == \
        ("api_key", None)
    for header, protocols in [(None, []), ("Bearer", []), ("Bearer garbage", []), (f"Basic {KEY}", []),
                              (KEY, []), (None, ["realtime"]), (None, ["openai-insecure-api-key."]),
                              (None, ["openai-insecure-api-key.nope"]), ("Bearer wrong", [f"x.{KEY}"])]:
        assert a.authenticate(header, protocols) is UNAUTHORIZED, (header, protocols)
    # A wrong header is not rescued by a right subprotocol key, or the other way round, only one is read.
    assert a.authenticate("Bearer wrong", [f"openai-insecure-api-key.{KEY}"]) is UNAUTHORIZED


def test_refusal_messages_never_echo_a_key() -> None:
    a = keyed()
    refusal = a.authenticate("Bearer sk-attacker-guess")
    assert isinstance(refusal, Refusal) and refusal.status == 401
    assert "sk-attacker-guess" not in refusal.message


def test_client_secrets_expire_and_are_stored_by_digest() -> None:
    clock = Clock()
    a = Authenticator(AuthConfig(api_keys=(KEY,)), environ={}, clock=clock)
    value, secret = a.client_secrets.mint(60, {"instructions": "Be brief."})
    assert value.startswith("ek_") and len(value) > 40
    assert secret.expires_at == clock.now + 60
    assert a.authenticate(f"Bearer {value}") == ("client_secret", secret)
    assert a.authenticate(None, ["realtime", f"openai-insecure-api-key.{value}"])[1].session == {  # type: ignore[index]
        "instructions": "Be brief."}
    assert value not in repr(a.client_secrets._by_digest)  # only digests are kept
    assert a.authenticate(f"Bearer {value}x") is UNAUTHORIZED
    clock.now += 59.9
    assert a.authenticate(f"Bearer {value}") != UNAUTHORIZED  # reusable until it expires
    clock.now += 0.1
    assert a.authenticate(f"Bearer {value}") is UNAUTHORIZED
    assert len(a.client_secrets) == 0


def test_only_a_real_key_makes_client_secrets() -> None:
    a = keyed()
    value, _ = a.client_secrets.mint(60)
    assert a.authenticate_minting(f"Bearer {KEY}") is None
    assert a.authenticate_minting(f"Bearer {value}") is UNAUTHORIZED
    assert a.authenticate_minting(None) is UNAUTHORIZED
    assert Authenticator(AuthConfig(), environ={}).authenticate_minting(None) is None  # open server


def test_client_secret_capacity_counts_only_live_ones() -> None:
    clock = Clock()
    store = ClientSecrets(capacity=2, clock=clock)
    store.mint(10)
    store.mint(20)
    with pytest.raises(OverflowError):
        store.mint(10)
    clock.now += 10
    store.mint(10)  # the first expired, its place is free
    assert len(store) == 2


def test_client_secret_lifetime_from_the_request() -> None:
    a = keyed()
    assert a.client_secret_seconds({}) == 600
    assert a.client_secret_seconds({"expires_after": {"anchor": "created_at", "seconds": 10}}) == 10
    assert a.client_secret_seconds({"expires_after": {"seconds": 7200}}) == 7200
    for bad in [{"seconds": 9}, {"seconds": 7201}, {"seconds": "60"}, {"seconds": True}, {"anchor": "now"},
                {"seconds": 60.5}]:
        with pytest.raises(ValueError):
            a.client_secret_seconds({"expires_after": bad})
    with pytest.raises(ValueError):
        a.client_secret_seconds({"expires_after": 60})


@pytest.mark.parametrize(("origin", "host", "allowed", "ok"), [
    (None, "duet.example.com", (), True),                                   # not a browser
    ("https://duet.example.com", "duet.example.com", (), True),             # the server's own page
    ("http://127.0.0.1:8765", "127.0.0.1:8765", (), True),
    ("https://evil.example", "duet.example.com", (), False),
    ("null", "duet.example.com", (), False),                                # sandboxed iframes, file://
    ("https://app.example", "duet.example.com", ("https://app.example/",), True),
    ("HTTPS://APP.EXAMPLE", "duet.example.com", ("https://app.example",), True),
    ("https://app.example:8443", "duet.example.com", ("https://app.example",), False),
    ("https://anything.example", "duet.example.com", ("*",), True),
])
def test_origin_allow_list(origin: str | None, host: str, allowed: tuple[str, ...], ok: bool) -> None:
    assert auth.origin_allowed(origin, host, allowed) is ok


def test_loopback_hosts() -> None:
    assert all(auth.is_loopback(h) for h in ("127.0.0.1:8765", "localhost", "LOCALHOST:1", "[::1]:8765", "a.localhost"))
    assert not any(auth.is_loopback(h) for h in ("evil.example:8765", "0.0.0.0", "10.0.0.1", "127.0.0.1.evil.example"))


@pytest.mark.parametrize(("caller", "expected"), [
    ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),  # the worked example in Twilio's security docs
    ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),  # the fixture twilio-node's own tests sign
])
def test_twilio_signature_matches_published_vectors(caller: str, expected: str) -> None:
    url, token = "https://mycompany.com/myapp.php?foo=1&bar=2", "12345"
    params = {"To": "+18005551212", "CallSid": "CA1234567890ABCDE", "Caller": caller, "Digits": "1234",
              "From": caller}
    assert auth.twilio_signature(token, url, params) == expected
    assert auth.twilio_signature(token, url) != expected
    assert auth.twilio_signature("12346", url, params) != expected


def test_telephony_secrets() -> None:
    tw = "twilio-auth-token"
    a = Authenticator(AuthConfig(api_keys=(KEY,), telephony_token="phone-tok"),
                      environ={auth.ENV_TWILIO_AUTH_TOKEN: tw})
    url = a.twilio_url("duet.example.com", "/twilio")
    assert url == "wss://duet.example.com/twilio"
    good = auth.twilio_signature(tw, url)

    def check(dialect: str = "twilio", **kw: object) -> object:
        args: dict[str, object] = {"url": url, "token": None, "signature": None, "authorization": None}
        return a.authenticate_telephony(dialect, **{**args, **kw})  # type: ignore[arg-type]

    assert check(signature=good) == "twilio_signature"
    assert isinstance(check(signature=good[:-2] + "x="), Refusal)
    assert isinstance(check(signature=good, url="wss://evil.example/twilio"), Refusal)
    assert isinstance(check("telnyx", signature=good), Refusal)  # Twilio's signature means nothing on /telnyx
    assert check("telnyx", token="phone-tok") == "telephony_token"
    assert isinstance(check("telnyx", token="phone-tok2"), Refusal)
    assert check("telnyx", authorization=f"Bearer {KEY}") == "api_key"
    assert isinstance(check(), Refusal)
    # The configured public URL wins over the Host header, which the client chooses.
    b = Authenticator(AuthConfig(twilio_auth_token=tw, twilio_public_url="wss://duet.example.com/"), environ={})
    assert b.twilio_url("evil.example", "/twilio?x=1") == "wss://duet.example.com/twilio?x=1"
    assert not b.telephony_open  # a configured telephony secret is enforced even without API keys


def test_auth_section_loads_from_toml(tmp_path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[auth]\napi_keys = ["k1", "k2"]\nallowed_origins = ["https://app.example"]\n'
                    'max_connections_per_client = 4\n[server]\ntls_cert_file = "c.pem"\ntls_key_file = "k.pem"\n')
    cfg = load_config(path)
    assert cfg.auth.api_keys == ("k1", "k2") and cfg.auth.max_connections_per_client == 4
    assert cfg.server.tls_cert_file == "c.pem"
    with pytest.raises(ConfigError):
        load_config(path, ["auth.api_keys=3"])
