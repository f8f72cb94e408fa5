"""The browser page in a real browser: headless Chromium with a fake microphone, against a real server.

For both transports (WebSocket, WebRTC): the page connects; the spoken question (a WAV played by Chromium's
fake mic) reaches the server and its transcript appears; a reply transcript appears and reply audio plays;
then a second voice barges in (the page's `duet.inject`, mixed into what the mic sends) while reply audio is
queued, and the reply's playback is flushed and truncated to what was played. Where the queue lives differs:
the WebSocket page flushes its own and sends `conversation.item.truncate` (here on a push-to-talk press, which
barges in at once); over WebRTC, open mic, the server judges the speech an interruption, drops its queued
audio and truncates (the page sees `output_audio_buffer.cleared` and `conversation.item.truncated`). The page's
own speech_started path is the same code as the press (`bargeIn` in clients/web/app.js).

Screenshots go to pytest's tmp dir; DUET_UPDATE_SCREENSHOTS=1 copies them to docs/ (README's picture).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration import browser as chromium

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(chromium.missing() is not None, reason=str(chromium.missing()))]

DOCS = Path(__file__).resolve().parents[2] / "docs"
# A question whose reply runs long enough to be interrupted while it plays (SmolLM2 answers it with ~30 s of
# speech, every time we tried).
QUESTION = "Explain how a car engine works."
INTERRUPTION = "Wait, stop please. Tell me about the ocean instead."
LEAD_S = 4.0  # the fake mic starts playing before the page has connected: lead in with silence


@pytest.fixture
async def browser(server: Any, speak: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """A browser per test, launched once the server is up: Chromium's fake mic plays its file on a clock
    that starts with the browser, so a browser launched during the models' loading would be past it."""
    from playwright.async_api import async_playwright

    wav = chromium.write_wav(tmp_path / "question.wav", speak(QUESTION), lead_s=LEAD_S, tail_s=1.0)
    async with async_playwright() as pw:
        b = await chromium.launch(pw, wav)
        yield b
        await b.close()


@pytest.fixture(scope="module")
def base_url(server: Any) -> str:
    return f"http://127.0.0.1:{server.port}"


async def until(page: Any, condition: str, timeout_s: float, what: str) -> None:
    """Wait for a JS condition on the page; on timeout, fail with the page's counters and turns."""
    deadline = time.monotonic() + timeout_s
    while not await page.evaluate(f"() => Boolean({condition})"):
        if time.monotonic() > deadline:
            state = await chromium.stats(page), await chromium.turns(page), page.errors
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s; page state {state}")
        await asyncio.sleep(0.1)


async def played_window(page: Any, seconds: float) -> float:
    """Reply audio played during the next `seconds`, in ms."""
    before = await page.evaluate("duet.playedMs()")
    await asyncio.sleep(seconds)
    return float(await page.evaluate("duet.playedMs()")) - float(before)


@pytest.mark.parametrize("transport", ["websocket", "webrtc"])
async def test_talk_and_barge_in(transport: str, browser: Any, base_url: str, server: Any, speak: Any,
                                 tmp_path: Path) -> None:
    # speak-first: the reply's audio comes fast and long, so a barge-in finds it playing with more queued.
    page = await chromium.open_page(browser, base_url, transport=transport, pacing="speak-first", autoconnect="1")
    try:
        await until(page, f"duet.stats.connected && duet.stats.transport === '{transport}'", 30, "connected")

        # The question, spoken by the fake mic, reaches the server.
        await until(page, "duet.stats.userTranscripts >= 1", 60, "the user's transcript")
        turns = await chromium.turns(page)
        assert "engine" in turns[0]["user"].lower(), turns[0]
        assert await page.locator(".bubble.user").first.inner_text() == turns[0]["user"]

        # A reply: its transcript in the page, and its audio playing.
        await until(page, "duet.turns[0].reply.length > 0 && duet.playedMs() > 300", 90, "reply audio playing")
        turn = (await chromium.turns(page))[0]
        assert turn["latencyMs"] is not None and 0 < turn["latencyMs"] < 30000, turn
        assert await page.locator(".bubble.assistant").first.inner_text()

        # Barge-in, while reply audio is queued: over the WebSocket in the page, over WebRTC at the server.
        # And the pacing selector, for the turn the barge-in starts: think-first, whose reasoning the page shows.
        interruption = chromium.pcm16_b64(speak(INTERRUPTION))
        await page.select_option("#pacing", "think-first")
        if transport == "websocket":
            # Push to talk: pressing barges in at once (the page flushes and truncates before the server's VAD
            # has heard a thing); the second voice speaks while the button is held.
            await until(page, "duet.queuedMs() > 500", 60, "reply audio queued in the page")
            await page.select_option("#mic-mode", "ptt")
            await page.locator("#talk").hover()
            await page.mouse.down()
            stats = await chromium.stats(page)
            assert stats["flushes"] == 1 and stats["flushedMs"] > 0 and stats["truncatesSent"] == 1, stats
            assert await page.evaluate("duet.queuedMs()") == 0
            seconds = await page.evaluate("b64 => duet.inject(b64)", interruption)
        else:
            # Open mic: the server hears the second voice, judges it a real interruption, drops its own queue.
            call = next(iter(server.webrtc.calls.values()))
            deadline = time.monotonic() + 60
            while call.track.queued_ms < 500:
                assert time.monotonic() < deadline, "reply audio queued at the server"
                await asyncio.sleep(0.05)
            seconds = await page.evaluate("b64 => duet.inject(b64)", interruption)
            await until(page, "duet.stats.cleared >= 1", 20, "the server clearing its reply audio")
            assert call.stats["barge_ins"] == 1 and call.track.queued_ms == 0, call.stats
            assert (await chromium.stats(page))["truncatesSent"] == 0  # the server truncates for WebRTC clients
        await until(page, "duet.stats.truncated >= 1", 20, "conversation.item.truncated")
        # The playback really stopped: after the jitter buffer's tail, nothing more of the cut reply plays
        # (the interruption is still being spoken, so no new reply can have started yet).
        started = (await chromium.stats(page))["events"].get("output_audio_buffer.started", 0)
        await asyncio.sleep(0.3)
        assert await played_window(page, 0.7) < 60
        assert (await chromium.stats(page))["events"].get("output_audio_buffer.started", 0) == started
        turn = (await chromium.turns(page))[0]
        assert turn["truncatedAtMs"] is not None and turn["truncatedAtMs"] > 0, turn
        assert "interrupted" in await page.locator(".bubble.assistant").first.inner_text()
        if transport == "websocket":
            await asyncio.sleep(max(0.0, seconds - 1.0))
            await page.mouse.up()

        # The interruption is a turn of its own: it reaches the server too, and is answered thinking first.
        await until(page, "duet.stats.userTranscripts >= 2", 60, "the interruption's transcript")
        assert "ocean" in (await chromium.turns(page))[1]["user"].lower()
        await until(page, "duet.turns.length >= 2 && duet.turns[1].metrics !== null", 90, "the second turn's metrics")
        second = (await chromium.turns(page))[1]
        assert second["metrics"]["pacing"] == "think-first", second
        assert second["thought"] and await page.locator("#reasoning").inner_text(), "think-first shows its reasoning"
        assert page.errors == []
        await screenshot(page, tmp_path, "browser-page.png" if transport == "websocket" else "browser-page-webrtc.png")
    finally:
        await page.evaluate("duet.disconnect()")
        await page.context.close()


async def test_page_with_a_keyed_server(browser: Any, runtime: Any) -> None:
    """With keys required the page trades the key for an `ek_` client secret, then connects over either
    transport with it; a wrong key is refused with a message in the page."""
    from realtime.transports.websocket import DuetServer
    from tests.integration.test_auth import KEY, keyed_config

    srv = DuetServer(runtime, keyed_config(runtime), environ={})
    await srv.start("127.0.0.1", 0)
    try:
        for transport in ("websocket", "webrtc"):
            page = await chromium.open_page(browser, f"http://127.0.0.1:{srv.port}", transport=transport)
            try:
                await page.fill("#key", "sk-wrong")
                await page.click("#connect")
                await until(page, "duet.stats.errors.length > 0", 10, "a refusal")
                assert "refused" in (await chromium.stats(page))["errors"][0]
                assert not (await chromium.stats(page))["connected"]
                await page.fill("#key", KEY)
                await page.click("#connect")
                await until(page, f"duet.stats.connected && duet.stats.sessionId && "
                                  f"duet.stats.transport === '{transport}'", 30, "connected with the key")
                await page.evaluate("duet.disconnect()")
            finally:
                await page.context.close()
        assert srv.refused["unauthorized"] == 2  # the wrong key, refused at client_secrets once per transport
    finally:
        await srv.close()


async def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    await page.screenshot(path=str(path))
    if os.environ.get("DUET_UPDATE_SCREENSHOTS") == "1":
        shutil.copy(path, DOCS / name)


def test_screenshots_are_current() -> None:
    """The README shows the page: the picture must exist (regenerate with DUET_UPDATE_SCREENSHOTS=1)."""
    assert (DOCS / "browser-page.png").stat().st_size > 10_000
