"""Headless Chromium for the browser tests and bench/browser_latency.py: Debian's `chromium` driven by
Playwright (never `playwright install`: that downloads browsers), with a fake microphone fed from a WAV.

Chromium's fake capture device plays `--use-file-for-fake-audio-capture` from the moment the page opens the
mic (`%noloop`: once, then silence); it expects 16-bit PCM, 48 kHz is its native rate.
"""

from __future__ import annotations

import base64
import importlib.util
import shutil
import wave
from pathlib import Path
from typing import Any

import numpy as np
import soxr

CHROMIUM = "/usr/bin/chromium"
WAV_RATE = 48000


def missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM} (Debian: apt-get install --no-install-recommends chromium)"
    return None


def write_wav(path: Path, audio_24k: np.ndarray, lead_s: float = 0.0, tail_s: float = 0.0) -> Path:
    """24 kHz float audio -> a mono 16-bit 48 kHz WAV with `lead_s`/`tail_s` of digital silence around it."""
    x = soxr.resample(np.asarray(audio_24k, np.float32), 24000, WAV_RATE)
    x = np.concatenate([np.zeros(int(lead_s * WAV_RATE)), x, np.zeros(int(tail_s * WAV_RATE))])
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(WAV_RATE)
        w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def pcm16_b64(audio_24k: np.ndarray) -> str:
    """24 kHz float audio as the page's `duet.inject` takes it."""
    return base64.b64encode((np.clip(audio_24k, -1, 1) * 32767).astype("<i2").tobytes()).decode()


def launch_args(wav: Path | None) -> list[str]:
    args = [
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--use-fake-ui-for-media-stream",  # grant the mic without a prompt
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
    ]
    if wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={wav}%noloop")
    return args


async def launch(playwright: Any, wav: Path | None) -> Any:
    return await playwright.chromium.launch(executable_path=CHROMIUM, args=launch_args(wav))


async def open_page(browser: Any, base_url: str, **params: str) -> Any:
    """A fresh page (its own context, so its own mic stream: the WAV starts again) on the Duet page."""
    context = await browser.new_context(viewport={"width": 1280, "height": 760})
    page = await context.new_page()
    page.errors = []  # uncaught page errors, for the tests to assert on
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    query = "&".join(f"{k}={v}" for k, v in params.items())
    await page.goto(f"{base_url}/?{query}")
    return page


async def stats(page: Any) -> dict[str, Any]:
    return dict(await page.evaluate("() => JSON.parse(JSON.stringify(window.duet.stats))"))


async def turns(page: Any) -> list[dict[str, Any]]:
    """The page's turns, without their DOM elements."""
    return list(await page.evaluate(
        "() => window.duet.turns.map(({userEl, assistantEl, thoughtEl, ...t}) => JSON.parse(JSON.stringify(t)))"))
