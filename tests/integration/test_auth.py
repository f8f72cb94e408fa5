"""Auth on a real server: keys, client secrets, Origins, the per-client cap, TLS and telephony secrets.

A keyed DuetServer of its own over the shared runtime (the session-wide `server` fixture stays open, on
loopback, for the other tests)."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import ipaddress
import json
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from common.config import AuthConfig, ConfigError, ServerConfig
from realtime.transports.auth import twilio_signature

pytestmark = pytest.mark.integration

KEY = "sk-duet-integration-key"
PHONE_TOKEN = "phone-token-123"
TWILIO_TOKEN = "twilio-auth-token-abc"
APP_ORIGIN = "https://app.example"


def keyed_config(runtime: Any, **server: Any) -> Any:
    auth = AuthConfig(api_keys=(KEY,), allowed_origins=(APP_ORIGIN,), max_connections_per_client=3,
                      client_secret_min_seconds=1, telephony_token=PHONE_TOKEN, twilio_auth_token=TWILIO_TOKEN)
    return dataclasses.replace(runtime.config, auth=auth,
                               server=dataclasses.replace(runtime.config.server, **server))


@pytest.fixture(scope="module")
async def keyed(runtime: Any) -> AsyncIterator[Any]:
    from realtime.transports.websocket import DuetServer

    srv = DuetServer(runtime, keyed_config(runtime), environ={})
    await srv.start("127.0.0.1", 0)
    yield srv
    await srv.close()


def ws_url(srv: Any, path: str = "/v1/realtime") -> str:
    return f"ws://127.0.0.1:{srv.port}{path}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def created(ws: ClientConnection) -> dict[str, Any]:
    event = json.loads(await asyncio.wait_for(ws.recv(), 30))
    assert event["type"] == "session.created", event
    return dict(event["session"])


async def refused_with(url: str, **kw: Any) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kw):
            pass
    return int(info.value.response.status_code)


async def wait_until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_keys_are_required_at_the_handshake(keyed: Any) -> None:
    sessions_before = set(keyed.sessions)
    unauthorized_before = keyed.refused["unauthorized"]
    assert await refused_with(ws_url(keyed)) == 401
    assert await refused_with(ws_url(keyed), additional_headers=bearer("garbage")) == 401
    assert await refused_with(ws_url(keyed), additional_headers={"Authorization": KEY}) == 401  # no scheme
    assert await refused_with(ws_url(keyed), subprotocols=["realtime", "openai-insecure-api-key.nope"]) == 401
    assert keyed.refused["unauthorized"] == unauthorized_before + 4
    assert set(keyed.sessions) == sessions_before  # refused before any session was made

    async with connect(ws_url(keyed), additional_headers=bearer(KEY)) as ws:
        await created(ws)
    # Browsers put the key in a subprotocol next to `realtime`; the server selects `realtime`.
    async with connect(ws_url(keyed), subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"]) as ws:
        await created(ws)
        assert ws.subprotocol == "realtime"


async def test_client_secrets_work_and_expire(keyed: Any) -> None:
    from openai import AsyncOpenAI
    from openai.types.realtime import ClientSecretCreateResponse

    base = f"http://127.0.0.1:{keyed.port}"
    # The official client against our endpoint: the response must parse as OpenAI's own model.
    client = AsyncOpenAI(api_key=KEY, base_url=f"{base}/v1", max_retries=0)
    made = await client.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 60},
        session={"type": "realtime", "instructions": "Answer in French.", "output_modalities": ["text"]})
    assert made.value.startswith("ek_")
    assert made.session.type == "realtime" and made.session.instructions == "Answer in French."
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/v1/realtime/client_secrets", headers=bearer(KEY),
                             json={"expires_after": {"anchor": "created_at", "seconds": 5}}) as resp:
            assert resp.status == 200
            raw = await resp.json()
        ClientSecretCreateResponse.model_validate(raw)
        short = raw["value"]
        now = datetime.datetime.now(datetime.UTC).timestamp()
        assert now + 3 < raw["expires_at"] <= now + 5
        async with connect(ws_url(keyed), additional_headers=bearer(short)) as ws:  # at once: it lives >= 4 s
            await created(ws)

        # Only a real key makes secrets; bad requests are 400 with OpenAI's error shape.
        for headers, body, status in [({}, {}, 401), (bearer("garbage"), {}, 401), (bearer(made.value), {}, 401),
                                      (bearer(KEY), {"expires_after": {"seconds": 99999}}, 400),
                                      (bearer(KEY), {"session": {"type": "transcription"}}, 400),
                                      (bearer(KEY), {"session": {"output_modalities": ["smell"]}}, 400)]:
            async with http.post(f"{base}/v1/realtime/client_secrets", headers=headers, json=body) as resp:
                assert resp.status == status, (headers, body)
                assert (await resp.json())["error"]["message"]

    # The browser holds only the ek_ key: as a subprotocol (or Bearer), its session starts configured.
    async with connect(ws_url(keyed), subprotocols=["realtime", f"openai-insecure-api-key.{made.value}"]) as ws:
        session = await created(ws)
        assert session["instructions"] == "Answer in French." and session["output_modalities"] == ["text"]
    async with connect(ws_url(keyed), additional_headers=bearer(made.value)) as ws:
        await created(ws)  # reusable until it expires
    await asyncio.sleep(max(0.0, raw["expires_at"] - datetime.datetime.now(datetime.UTC).timestamp()) + 0.05)
    assert await refused_with(ws_url(keyed), additional_headers=bearer(short)) == 401


async def test_browser_origins(keyed: Any) -> None:
    auth = bearer(KEY)
    assert await refused_with(ws_url(keyed), additional_headers=auth, origin="https://evil.example") == 403
    assert await refused_with(ws_url(keyed), additional_headers=auth, origin="null") == 403
    assert keyed.refused["origin"] >= 2
    async with connect(ws_url(keyed), additional_headers=auth, origin=APP_ORIGIN) as ws:
        await created(ws)
    async with connect(ws_url(keyed), additional_headers=auth, origin=f"http://127.0.0.1:{keyed.port}") as ws:
        await created(ws)  # the server's own page


async def test_per_client_connection_cap(keyed: Any) -> None:
    cap = keyed.auth.cfg.max_connections_per_client
    await wait_until(lambda: not keyed._per_client, "earlier connections to end")
    limited_before = keyed.refused["per_client_limit"]
    open_ws = [await connect(ws_url(keyed), additional_headers=bearer(KEY)) for _ in range(cap)]
    try:
        for ws in open_ws:
            await created(ws)
        assert await refused_with(ws_url(keyed), additional_headers=bearer(KEY)) == 429
        assert keyed.refused["per_client_limit"] == limited_before + 1
        await open_ws.pop().close()
        await wait_until(lambda: keyed._per_client["127.0.0.1"] < cap, "the closed connection to be counted off")
        async with connect(ws_url(keyed), additional_headers=bearer(KEY)) as ws:
            await created(ws)
    finally:
        for ws in open_ws:
            await ws.close()


async def test_telephony_secrets(keyed: Any) -> None:
    twilio = ws_url(keyed, "/twilio")
    signed = twilio_signature(TWILIO_TOKEN, f"wss://127.0.0.1:{keyed.port}/twilio")
    assert await refused_with(twilio) == 401
    assert await refused_with(twilio, additional_headers={"X-Twilio-Signature": signed[:-4] + "AAA="}) == 401
    assert await refused_with(twilio, additional_headers={"X-Twilio-Signature": twilio_signature("wrong", twilio)}) \
        == 401
    assert await refused_with(ws_url(keyed, "/telnyx?token=wrong")) == 401
    for url, headers in [(twilio, {"X-Twilio-Signature": signed}), (ws_url(keyed, f"/telnyx?token={PHONE_TOKEN}"), {}),
                         (ws_url(keyed, f"/twilio?token={PHONE_TOKEN}"), {})]:
        before = set(keyed.sessions)
        async with connect(url, additional_headers=headers) as ws:
            await wait_until(lambda: set(keyed.sessions) - before, f"a call session for {url}")  # noqa: B023
            await ws.send(json.dumps({"event": "stop"}))


async def test_open_server_refuses_other_hosts_and_public_binds(server: Any, runtime: Any) -> None:
    """Without keys: loopback only, and a page whose name resolves to 127.0.0.1 (DNS rebinding) is refused."""
    from realtime.transports.websocket import DuetServer

    rebinding = {"Host": "evil.example"}
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{server.port}/v1/realtime",
                                                         headers=rebinding) as resp:
        assert resp.status == 403
    open_public = DuetServer(runtime, dataclasses.replace(runtime.config, auth=AuthConfig()), environ={})
    with pytest.raises(ConfigError, match="without an API key"):
        await open_public.start("0.0.0.0", 0)
    with pytest.raises(ConfigError, match="together"):
        DuetServer(runtime, dataclasses.replace(runtime.config, server=ServerConfig(tls_cert_file="x.pem")),
                   environ={})


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA: with `cryptography` where installed, else `openssl`."""
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=duet-test",
                        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], check=True, capture_output=True)
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "duet-test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(private.public_key()), critical=False)
        .sign(private, hashes.SHA256()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return cert, key


async def test_tls(runtime: Any, tmp_path: Path) -> None:
    from realtime.transports.websocket import DuetServer

    cert, key = self_signed(tmp_path)
    srv = DuetServer(runtime, keyed_config(runtime, tls_cert_file=str(cert), tls_key_file=str(key)), environ={})
    await srv.start("127.0.0.1", 0)
    try:
        assert srv.scheme == "wss"
        trusting = ssl.create_default_context(cafile=str(cert))
        async with connect(f"wss://127.0.0.1:{srv.port}/v1/realtime", ssl=trusting,
                           additional_headers=bearer(KEY)) as ws:
            await created(ws)
        with pytest.raises(ssl.SSLCertVerificationError):  # a client that does not trust the test's CA
            async with connect(f"wss://127.0.0.1:{srv.port}/v1/realtime", ssl=ssl.create_default_context(),
                               additional_headers=bearer(KEY)):
                pass
        with pytest.raises(Exception):  # noqa: B017  plain WebSocket to the TLS port: no HTTP answer at all
            async with connect(f"ws://127.0.0.1:{srv.port}/v1/realtime", additional_headers=bearer(KEY),
                               open_timeout=5):
                pass
        # Plain HTTP routes are TLS too.
        async with aiohttp.ClientSession() as http, http.post(
                f"https://127.0.0.1:{srv.port}/v1/realtime/client_secrets", headers=bearer(KEY), json={},
                ssl=trusting) as resp:
            assert resp.status == 200 and (await resp.json())["value"].startswith("ek_")
    finally:
        await srv.close()
