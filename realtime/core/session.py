"""One conversation: input audio -> turns -> transcript -> mind-paced reply -> speech out.

The session core speaks typed protocol events (`realtime.core.events`) and never sees JSON, base64 framing
or a socket: transports feed it client events and drain the events it emits. Model work happens in
the runtime's thread pools and engine thread; here we only route and keep per-session state.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from brains.history import Conversation, Item
from brains.pacer import MindPacer
from brains.prompts import ChatMessage
from common import audio as audio_codec
from common.config import LlmConfig
from common.errors import SessionError
from common.playback import PlaybackClock
from realtime.core import events as ev
from realtime.core.items import ItemHandlers
from realtime.core.limits import Throttled, TokenBucket
from realtime.core.options import ResponseOptions
from realtime.core.prefetch import Prefetch
from realtime.core.response import Response
from realtime.core.settings import SessionSettings
from realtime.runtime import Runtime, work_owner
from realtime.speech_in import barge_in
from realtime.speech_in.vad import SilenceStarted, SpeechResumed, SpeechStarted, SpeechStopped, TurnEvent, VadSegmenter

log = logging.getLogger(__name__)
_MERGE_CHUNKS = 4  # queued input chunks joined to one VAD job (with the one taken: ~100 ms of 20 ms chunks)

Emit = Callable[[ev.ServerEvent], None]
# Rounds of server tool results (MQTT tools) answered by a response that may call tools again.
MAX_SERVER_TOOL_ROUNDS = 3


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        # The session id is a record attribute too, merged with the call's own extras (response_id, event),
        # so the JSON log format (common/logs.py) emits it as a field; text logs keep it as the prefix.
        kwargs["extra"] = {**self.extra, **(kwargs.get("extra") or {})}  # type: ignore[dict-item]
        return f"[{self.extra['session_id']}] {msg}", kwargs  # type: ignore[index]


@dataclasses.dataclass
class _Cut:
    """A reply the barge-in guard cut, which goes on if the interrupting turn proves false."""

    response: Response
    turn_id: str  # the interrupting turn's user item


class Session:
    """Implements `realtime.core.context.SessionContext` for its responses and item handlers."""

    def __init__(self, runtime: Runtime, session_id: str, emit: Emit, beta: bool = False) -> None:
        self.rt = runtime
        self.id = session_id
        self.emit = runtime.observe(self, emit)  # the one place observers (the MQTT bus) see our events
        self.log = SessionLog(log, {"session_id": session_id})
        self.settings = SessionSettings.from_config(runtime.config, beta=beta)
        self.limits = runtime.config.limits
        self.history = Conversation(self.limits.max_items, on_evict=self._evicted)
        self._event_bucket = TokenBucket(self.limits.events_per_second, self.limits.event_burst)
        self._audio_bucket = TokenBucket(self.limits.input_audio_speed, self.limits.input_audio_burst_seconds)
        self._manual_samples = 0  # in _manual_audio
        self._throttled = Throttled(self.log)  # warnings of a client over its limits, at most one a second
        self.segmenter = VadSegmenter(runtime.vad, runtime.config.vad,
                                      max_turn_ms=int(runtime.config.server.max_turn_seconds * 1000),
                                      turn_model=runtime.smart_turn)
        self._resampler = audio_codec.Resampler(self.settings.input_format.sample_rate, audio_codec.SPEECH_RATE)
        self._odd_byte = b""
        self._audio_in: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._manual_audio: list[np.ndarray] = []  # input buffer when turn_detection is null
        self._speculative: asyncio.Future[str] | None = None
        self._prefetch: Prefetch | None = None
        self._unconfirmed: str | None = None  # a turn heard during the reply, not yet judged an interruption
        self._near: deque[tuple[float, int]] = deque(maxlen=25)  # (energy, samples) of recent input chunks
        self._pending_item: str | None = None  # item id of the turn in progress
        self._cut: _Cut | None = None  # the last barge-in, until its turn is judged real or false
        self.response: Response | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._input_task: asyncio.Task[None] | None = None
        self.items = ItemHandlers(self)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        # Model work from here on (this task and every task it spawns) queues in the shared pools as ours.
        work_owner.set(self.id)
        self.emit(ev.SessionCreated(session=self.settings.to_protocol(self.id)))
        self._input_task = asyncio.create_task(self._input_loop(), name=f"{self.id}-input")

    async def close(self) -> None:
        if self.response is not None:
            self.response.cancel("client_disconnected")
        self._drop_speculation()
        tasks = [t for t in (*self._tasks, self._input_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.rt.session_closed(self)

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=f"{self.id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self.log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)
            self.emit(ev.error_event(SessionError(f"internal error: {exc}", code="internal_error",
                                                  type="server_error")))

    # ---- client events ------------------------------------------------------------------------
    async def handle(self, event: ev.ClientEvent) -> None:
        if not self._event_bucket.take():
            self._throttled.warning("events", "over %s events/s: dropped a %s", self.limits.events_per_second,
                                    type(event).__name__)
            raise SessionError(f"more than {self.limits.events_per_second:g} events a second: this event was "
                               "dropped", code="rate_limit_exceeded", event_id=event.event_id)
        name = "_on_" + type(event).__name__
        handler = getattr(self, name, None) or getattr(self.items, name, None)
        if handler is None:
            raise SessionError(f"{type(event).__name__} is not supported yet", code="unsupported_event",
                               event_id=event.event_id)
        await handler(event)

    async def _on_SessionUpdate(self, e: ev.SessionUpdate) -> None:
        before_rate = self.settings.input_format.sample_rate
        self.settings.apply(e.session, e.event_id)
        if self.settings.input_format.sample_rate != before_rate:
            self._resampler = audio_codec.Resampler(self.settings.input_format.sample_rate, audio_codec.SPEECH_RATE)
        td = self.settings.turn_detection
        if td is not None:
            vad = td.to_vad(self.rt.config.vad)
            # On the VAD thread, in order with the audio already appended: it may be stepping this detector.
            await self.rt.vad_batcher.call(self.segmenter, lambda: self.segmenter.detector.configure(vad))
        self.emit(ev.SessionUpdated(session=self.settings.to_protocol(self.id)))

    async def _on_InputAudioBufferAppend(self, e: ev.InputAudioBufferAppend) -> None:
        data = e.audio
        if self.settings.input_format.encoding == "pcm16":
            data = self._odd_byte + data
            self._odd_byte = b""
            if len(data) % 2:
                # Keep the stray byte for the next append so the stream stays aligned and nothing is lost.
                self._odd_byte, data = data[-1:], data[:-1]
                self.emit(ev.error_event(SessionError(
                    "pcm16 audio must be a whole number of 16-bit samples; the odd trailing byte is held "
                    "for the next append", code="invalid_audio_length", param="audio", event_id=e.event_id)))
        if data:
            fmt = self.settings.input_format
            self.admit_audio(len(data) / ((2 if fmt.encoding == "pcm16" else 1) * fmt.sample_rate), e.event_id)
            self._audio_in.put_nowait(data)

    def admit_audio(self, seconds: float, event_id: str | None) -> None:
        """Input audio may come a little faster than real time (`[limits] input_audio_speed`, after a burst);
        past that it is refused here, before any of it is queued for the VAD or Whisper."""
        if not self._audio_bucket.take(seconds):
            self._throttled.warning("audio", "input audio over %.1fx real time: dropped %.2f s",
                                    self.limits.input_audio_speed, seconds)
            raise SessionError(f"input audio arrives faster than {self.limits.input_audio_speed:g}x real time; "
                               f"{seconds:.2f} s of it was dropped", code="input_audio_rate_exceeded",
                               event_id=event_id)

    def _evicted(self, item: Item) -> None:
        self.log.info("conversation at %d items: evicted the oldest, %s", self.limits.max_items, item.id)
        self.emit(ev.ItemDeleted(item_id=item.id))

    async def _on_InputAudioBufferCommit(self, e: ev.InputAudioBufferCommit) -> None:
        await self._audio_drained()
        if self.settings.turn_detection is not None:
            audio = await self.rt.vad_batcher.call(self.segmenter, self._take_turn_audio)
        else:
            audio = np.concatenate(self._manual_audio) if self._manual_audio else np.zeros(0, np.float32)
            self._manual_audio.clear()
            self._manual_samples = 0
        if len(audio) < audio_codec.WHISPER_MIN_SAMPLES:
            raise SessionError("buffer too small: commit needs at least 100 ms of audio",
                               code="input_audio_buffer_commit_empty", event_id=e.event_id)
        self._commit_turn(self._pending_item or ev.new_id("item"), audio, None)

    def _take_turn_audio(self) -> np.ndarray:
        audio = self.segmenter.current_turn_audio()
        self.segmenter.reset()
        return audio

    async def _on_InputAudioBufferClear(self, e: ev.InputAudioBufferClear) -> None:
        await self._audio_drained()
        await self.rt.vad_batcher.call(self.segmenter, self.segmenter.reset)
        self._manual_audio.clear()
        self._manual_samples = 0
        self._pending_item = None
        self.emit(ev.Cleared())

    async def _on_ResponseCreate(self, e: ev.ResponseCreate) -> None:
        options = ResponseOptions.parse(e.response or {}, self.settings, e.event_id)
        self.start_response(options)

    async def _on_ResponseCancel(self, e: ev.ResponseCancel) -> None:
        if self.response is None or self.response.done:
            raise SessionError("no response is in progress", code="response_cancel_not_active",
                               event_id=e.event_id)
        if e.response_id and e.response_id != self.response.id:
            raise SessionError(f"response {e.response_id} is not in progress", code="invalid_value",
                               param="response_id", event_id=e.event_id)
        self.response.cancel("client_cancelled")

    # ---- input audio --------------------------------------------------------------------------
    async def _audio_drained(self) -> None:
        """Wait until every appended chunk went through the VAD (commit/clear act on all of it)."""
        while not self._audio_in.empty():
            await asyncio.sleep(0.005)
        await self.rt.vad_batcher.call(self.segmenter, lambda: None)

    async def _input_loop(self) -> None:
        while True:
            data = await self._audio_in.get()
            if data is None:
                return
            # Chunks that queued while the last one was in the VAD go through it as one job: behind a busy
            # VAD thread a session catches up in a few round trips instead of one per chunk. At most a few, so
            # the barge-in guard's level window (`_near`, one entry per job) stays about half a second.
            for _ in range(_MERGE_CHUNKS):
                if self._audio_in.empty():
                    break
                more = self._audio_in.get_nowait()
                if more is None:  # the close sentinel: after this audio
                    self._audio_in.put_nowait(None)
                    break
                data += more
            samples = audio_codec.decode(data, self.settings.input_format)
            samples = self._resampler.process(samples)
            if self.settings.turn_detection is None:
                # Without turn detection nothing ends a turn but the client: hold at most a turn's length.
                limit_s = self.rt.config.server.max_turn_seconds
                if self._manual_samples + len(samples) > limit_s * audio_codec.SPEECH_RATE:
                    self._throttled.warning("buffer", "input buffer full (%.0f s): dropped audio", limit_s)
                    self.emit(ev.error_event(SessionError(
                        f"the input audio buffer holds at most {limit_s:g} s: commit or clear it; this audio "
                        "was dropped", code="input_audio_buffer_full")))
                    continue
                self._manual_audio.append(samples)
                self._manual_samples += len(samples)
                continue
            self._near.append((float(np.dot(samples, samples)), len(samples)))
            try:
                turn_events = await self.rt.vad_batcher.feed(self.segmenter, samples, list)
            except Exception as exc:  # a VAD failure loses this audio, never the session's input loop
                self.log.exception("VAD failed on %d samples", len(samples))
                self.emit(ev.error_event(SessionError(f"voice activity detection failed: {exc}; this audio was "
                                                      "dropped", code="vad_failed", type="server_error")))
                continue
            for event in turn_events:
                self._on_turn_event(event)

    def _on_turn_event(self, event: TurnEvent) -> None:
        if isinstance(event, SpeechStarted):
            item_id = self._pending_item = ev.new_id("item")
            self._cut = None  # the user spoke again after the interrupting turn: they have more to say
            self._drop_speculation()
            self._near.clear()
            if self.response is not None and self.response.audible():
                # Maybe an interruption, maybe the reply's own echo or a cough: announce it only once the
                # barge-in guard agrees (clients stop playback on speech_started).
                self._unconfirmed = item_id
                self.spawn(self._guard_barge_in(item_id, event, self.response, time.perf_counter()), "barge-in")
            else:
                self._speech_confirmed(item_id, event)
                td = self.settings.turn_detection
                if self.response is not None and not self.response.done and td is not None and td.interrupt_response:
                    self.response.cancel("turn_detected")  # nothing audible yet: the user simply went on
        elif self._unconfirmed is not None and self._unconfirmed == self._pending_item:
            if isinstance(event, SpeechStopped):
                self.log.info("ignored %d ms of speech during the reply (echo or noise)",
                              event.audio_end_ms - self.segmenter.detector.turn_audio_start_ms)
                self._unconfirmed = self._pending_item = None
        elif isinstance(event, SilenceStarted) and len(event.audio) >= audio_codec.WHISPER_MIN_SAMPLES \
                and self.rt.asr_has_room():
            # Transcribe while the silence window runs: if the user stays quiet, the transcript is
            # ready (or nearly) when the turn is confirmed, taking ASR off the critical path. Only when an ASR
            # thread is free: behind other sessions' turns a speculative pass gains nothing and costs a slot.
            fut = self.rt.transcribe(event.audio, "speculative")
            self._speculative = fut
            self.spawn(self._prefetch_when_transcribed(fut, self._window_closes(event)), "prefetch")
        elif isinstance(event, SpeechResumed):
            self._speculative = None
        elif isinstance(event, SpeechStopped):
            item_id = self._pending_item or ev.new_id("item")
            self._pending_item = None
            self.emit(ev.SpeechStopped(audio_end_ms=event.audio_end_ms, item_id=item_id))
            speculative, prefetch = self._speculative, self._prefetch
            self._speculative = self._prefetch = None
            # How long after the user's last voiced sample the turn was decided, in audio time (the detector's
            # clock at the decision: a merged chunk may have fed it further since).
            decided_ms = max(0, event.decided_ms - event.audio_end_ms)
            self._commit_turn(item_id, event.audio, speculative, prefetch, speech_end_ms=event.audio_end_ms,
                              turn_decision_ms=decided_ms)

    def _speech_confirmed(self, item_id: str, event: SpeechStarted) -> None:
        self.emit(ev.SpeechStarted(audio_start_ms=event.audio_start_ms, item_id=item_id))
        if self.settings.partial_transcripts_ms > 0:
            self.spawn(self._listen(item_id), "listen")

    async def _guard_barge_in(self, item_id: str, event: SpeechStarted, response: Response, t0: float) -> None:
        cfg = self.rt.config.barge_in
        already_ms = self.rt.config.vad.min_speech_ms  # the VAD reported speech only after this much of it
        while self._unconfirmed == item_id:
            now = time.perf_counter()
            since_audio = None if response.first_audio_at is None else (now - response.first_audio_at) * 1000
            audible = response.audible()
            verdict = barge_in.decide(cfg, (now - t0) * 1000 + already_ms, since_audio if audible else None,
                                      self._near_rms(), response.far_rms if audible else 0.0)
            if verdict == "interrupt":
                self._unconfirmed = None
                self._speech_confirmed(item_id, event)
                td = self.settings.turn_detection
                if audible and td is not None and td.interrupt_response:
                    self.log.info("barge-in: user speech interrupts %s", response.id)
                    if cfg.resume_false_interruption and response.item.audio:
                        # Before the cut: the turn may end (and be judged) while `interrupt` waits.
                        self._cut = _Cut(response, item_id)
                    await self.interrupt("turn_detected", item=response.item, clear=True)
                return
            await asyncio.sleep(0.04)

    def _near_rms(self) -> float:
        """Level of the user's last ~0.5 s of input (the near end)."""
        energy = sum(e for e, _ in self._near)
        count = sum(n for _, n in self._near)
        return float(np.sqrt(energy / count)) if count else 0.0

    async def interrupt(self, reason: str, *, item: Item | None = None, heard_ms: float | None = None,
                        clear: bool = False) -> None:
        """The one path that stops a reply the user stopped hearing and cuts it to what was heard.

        Callers: the barge-in guard and `output_audio_buffer.clear` (`clear=True`: tell the client to flush;
        what was heard is the server's playback clock), and `conversation.item.truncate` (`heard_ms` is the
        client's; the telephony bridge sends one from the platform's playback marks). `item` defaults to
        the current reply's. A reply still generating cuts itself to the clock when it is cancelled; one
        already generated but still playing is cut here, as is any item the client names."""
        live = self.response
        if live is not None and item is not None and live.item is not item:
            live = None  # the client cut an older item: the reply in progress (if any) goes on
        if live is not None:
            played, finished = live.playback.played_ms(), live.done
            item = live.item
            await live.stop(reason)
            if clear:
                self.emit(ev.OutputAudioBufferCleared(response_id=live.id))
            if heard_ms is None and finished and played < live.playback.queued_ms:
                heard_ms = played  # generated in full but not all played: cut to the clock
        elif clear:
            self.emit(ev.OutputAudioBufferCleared(response_id=self.response.id if self.response else ""))
        if item is not None and heard_ms is not None and item.audio and item.role == "assistant":
            item.cut_to(heard_ms)
            self.emit(ev.ItemTruncated(item_id=item.id, content_index=0, audio_end_ms=int(heard_ms)))
            self.log.info("truncated %s to %d ms (%s): %r", item.id, heard_ms, reason, item.text)

    async def stop_reply(self, item: Item, reason: str) -> None:
        """Stop the reply in progress if it is producing `item` (the client deleted it)."""
        if self.response is not None and self.response.item is item and not self.response.done:
            await self.response.stop(reason)

    def _drop_speculation(self) -> None:
        self._speculative = None
        if self._prefetch is not None:
            self._prefetch.cancel()
            self._prefetch = None

    async def _prefetch_when_transcribed(self, fut: asyncio.Future[str], window_closes: float) -> None:
        text = await fut
        if self._speculative is fut:  # else the user spoke again, or the turn already took the normal path
            self._prefetch_on(text)
            if self._prefetch is not None and self._prefetch.text == text and "audio" in self.settings.modalities:
                # Its first audio too: after the commit, the wait for the first audio is mostly that synthesis.
                self._prefetch.speak_first_chunk(self.rt, deadline=window_closes)

    def _window_closes(self, event: SilenceStarted) -> float:
        """When (time.perf_counter()) the turn may commit if the user stays quiet: the silence window `event`
        opened closes silence_duration_ms of audio later; semantic_vad may end the turn at its first pause."""
        detector = self.segmenter.detector
        cfg = detector.cfg
        window_ms = cfg.semantic_pause_ms if detector.semantic is not None else cfg.silence_duration_ms
        return time.perf_counter() + max(0, event.at_ms + window_ms - detector.now_ms) / 1000

    async def _listen(self, item_id: str) -> None:
        """Partial transcripts while the user speaks; with think_while_listening, brains start on them."""
        interval = self.settings.partial_transcripts_ms / 1000
        while True:
            await asyncio.sleep(interval)
            if self._pending_item != item_id:
                return
            if not self.rt.asr_has_room(0.5):
                continue  # under load a partial gives way: the final transcripts of ended turns go first
            audio = await self.rt.vad_batcher.call(self.segmenter, self.segmenter.current_turn_audio)
            if len(audio) < audio_codec.SPEECH_RATE // 2 or not self.rt.asr_has_room(0.5):
                continue  # (checked again: other sessions may have claimed ASR threads during that await)
            text = await self.rt.transcribe(audio, "partial")
            if self._pending_item != item_id:
                return
            if text.strip():
                self.emit(ev.PartialTranscript(item_id=item_id, transcript=text))
                if self.settings.think_while_listening:
                    self._prefetch_on(text)

    def _prefetch_on(self, text: str) -> None:
        """(Re)start the brains on a speculative transcript; an unchanged transcript keeps them running.
        A restart is cheap: the engine reuses the cached prefix (system prompt, history, shared words)."""
        td = self.settings.turn_detection
        if td is None or not td.create_response or not self.rt.config.mind.prefetch_reply or not text.strip():
            return
        if self._cut is not None and barge_in.is_false_interruption(self.rt.config.barge_in, text):
            return  # likely a false interruption: the reply will resume, nothing to think about
        messages = [*self.history.messages(), ChatMessage("user", text)]
        if self._prefetch is not None:
            if self._prefetch.matches(text, messages):
                return
            self._prefetch.cancel()
        options = ResponseOptions.parse({}, self.settings)
        playback = PlaybackClock()
        pacer = self.new_pacer(options, playback, self.rt.config.llm)
        conversation = self.conversation_ids(messages, options, pacer.thinking)
        self._prefetch = Prefetch(pacer, playback, text, messages, conversation)
        self.rt.prefetches_started += 1

    def transcribed(self, item: Item) -> None:
        # Whisper transcribes a whole turn at once: one delta with all of it, then completed.
        if item.text:
            self.emit(ev.TranscriptionDelta(item_id=item.id, delta=item.text))
        # The schema requires usage: Whisper runs here, so the honest measure is the audio it transcribed.
        self.emit(ev.TranscriptionCompleted(item_id=item.id, transcript=item.text,
                                            usage=ev.TranscriptionUsage(seconds=round(item.audio_ms / 1000, 3))))

    def rate_limits(self) -> ev.RateLimitsUpdated:
        """Capacity as it really is: session slots of this server and KV-cache slots of the shared engine.

        The protocol names only `requests` and `tokens`. What limits the requests a client can make here is
        the server's session slots (a new connection past them is refused), so they are `requests`; nothing
        limits tokens per minute, so there is no `tokens` entry. Both capacities, by Duet's names, go in the
        event's `duet` field."""
        cfg = self.rt.config
        sessions = ev.Capacity(limit=cfg.server.max_sessions,
                               remaining=max(0, cfg.server.max_sessions - len(self.rt.sessions)))
        live = self.rt.engine.live_sequences()
        kv_slots = ev.Capacity(limit=cfg.llm.max_slots, remaining=max(0, cfg.llm.max_slots - live))
        return ev.RateLimitsUpdated(
            rate_limits=[ev.RateLimit(name="requests", limit=sessions.limit, remaining=sessions.remaining,
                                      reset_seconds=0.0)],
            duet={"sessions": sessions, "kv_slots": kv_slots})

    # ---- brains -------------------------------------------------------------------------------
    def new_pacer(self, options: ResponseOptions, playback: PlaybackClock, llm: LlmConfig,
                  reply_prefix: str = "") -> MindPacer:
        return MindPacer(self.rt.engine, self.rt.prompts, self.rt.config.mind, llm, options.pacing, self.id,
                         audio_ahead_ms=playback.ahead_ms, tool_prefix=options.tool_prefix,
                         reply_prefix=reply_prefix)

    def conversation_ids(self, messages: list[ChatMessage], options: ResponseOptions, thinking: bool) -> list[int]:
        """The prompt, dropping the oldest messages until the turn fits the model's cache."""
        cfg = self.rt.config
        reserve = cfg.llm.max_reply_tokens + (cfg.mind.max_thought_tokens if thinking else 0) + 16
        # On the event loop, but cheap: `fit` tokenizes each message once and looks only at those that fit.
        return self.rt.prompts.fit(messages, cfg.llm.max_seq_len - reserve, options.instructions, thinking,
                                   options.offered_tools)

    def _commit_turn(self, item_id: str, audio: np.ndarray, transcript: asyncio.Future[str] | None,
                     prefetch: Prefetch | None = None, speech_end_ms: int | None = None,
                     turn_decision_ms: int | None = None) -> None:
        committed_at = time.perf_counter()
        item = Item(id=item_id, role="user", audio=True, status="in_progress",
                    audio_ms=len(audio) * 1000 / audio_codec.SPEECH_RATE)
        previous = self.history.add(item)
        self.emit(ev.Committed(previous_item_id=previous, item_id=item_id))
        self.emit(ev.ItemCreated(previous_item_id=previous, item=item.to_protocol(self.settings.beta)))
        self.spawn(self._transcribe_turn(item, audio, transcript, prefetch, committed_at, speech_end_ms,
                                         turn_decision_ms), "turn")

    async def _transcribe_turn(self, item: Item, audio: np.ndarray, speculative: asyncio.Future[str] | None,
                               prefetch: Prefetch | None, committed_at: float, speech_end_ms: int | None,
                               turn_decision_ms: int | None = None) -> None:
        try:
            await self._answer_turn(item, audio, speculative, prefetch, committed_at, speech_end_ms, turn_decision_ms)
        finally:
            # Not handed to a response (or the turn failed or the session closed on the way): the speculative
            # reply's generation holds KV slots and its first audio a TTS job until cancelled. Idempotent.
            if prefetch is not None and (self.response is None or self.response.prefetch is not prefetch):
                prefetch.cancel()

    async def _answer_turn(self, item: Item, audio: np.ndarray, speculative: asyncio.Future[str] | None,
                           prefetch: Prefetch | None, committed_at: float, speech_end_ms: int | None,
                           turn_decision_ms: int | None) -> None:
        history_before = self.history.messages()
        text = await (speculative if speculative is not None else self.rt.transcribe(audio))
        item.text, item.status = text, "completed"
        transcribed_at = time.perf_counter()
        self.transcribed(item)
        self.log.info("user said %r (%.0f ms after commit)", text, (transcribed_at - committed_at) * 1000)
        td = self.settings.turn_detection
        cut = self._cut if self._cut is not None and self._cut.turn_id == item.id else None
        if cut is not None:
            self._cut = None  # this turn is the barge-in's: judged now, whichever way
        if cut is not None and td is not None and td.create_response \
                and self._resumable(cut, text, (transcribed_at - committed_at) * 1000):
            if prefetch is not None:
                prefetch.cancel()
            options = dataclasses.replace(cut.response.options, turn_committed_at=committed_at,
                                          transcribed_at=transcribed_at, speech_end_ms=speech_end_ms,
                                          turn_decision_ms=turn_decision_ms)
            self._resume(cut, item, options)
        elif td is not None and td.create_response and text.strip():
            options = ResponseOptions.parse({}, self.settings)
            options = dataclasses.replace(options, turn_committed_at=committed_at,
                                          transcribed_at=transcribed_at, speech_end_ms=speech_end_ms,
                                          turn_decision_ms=turn_decision_ms)
            expected = [*history_before, ChatMessage("user", text)]
            if prefetch is not None and not prefetch.matches(text, expected):
                prefetch.cancel()
                prefetch = None
            self.start_response(options, prefetch)
        elif prefetch is not None:
            prefetch.cancel()

    # ---- false interruptions -------------------------------------------------------------------
    def _resumable(self, cut: _Cut, text: str, verdict_ms: float) -> bool:
        """Does the reply `cut` go on? Its interrupting turn said `text`, judged `verdict_ms` after it ended."""
        cfg = self.rt.config.barge_in
        item = cut.response.item
        if not barge_in.is_false_interruption(cfg, text):
            return False  # real words: a new turn, answered as usual
        if verdict_ms > cfg.false_interruption_timeout_ms:
            self.log.info("false interruption judged %.0f ms after the turn: too late to resume", verdict_ms)
            return False
        # Only the latest reply, still in the conversation (the client may have deleted it), and only
        # when something of it went unheard or was still to be written.
        in_history = cut.response.options.conversation == "none" or any(i is item for i in self.history.items)
        more = bool(item.unheard.strip()) or not cut.response.written
        return self.response is cut.response and cut.response.done and in_history and more

    def _resume(self, cut: _Cut, turn: Item, options: ResponseOptions) -> None:
        """A false interruption: forget its turn (the model must not answer "mm-hmm") and speak the rest
        of the cut reply in a new response, announced by `duet.response.resumed`."""
        cut_item = cut.response.item
        if any(i is turn for i in self.history.items):
            self.history.delete(turn.id)
            self.emit(ev.ItemDeleted(item_id=turn.id))
        options = dataclasses.replace(options, resume_text=cut_item.unheard, continues=cut_item.id,
                                      resume_writing=not cut.response.written)
        response = self.response = Response(self, options)
        self.emit(ev.ResponseResumed(response_id=response.id, item_id=response.item.id,
                                     cut_response_id=cut.response.id, cut_item_id=cut_item.id,
                                     interruption_item_id=turn.id, transcript=turn.text))
        self.log.info("false interruption %r: %s resumes %s with %r", turn.text, response.id, cut.response.id,
                      cut_item.unheard[:80])
        self.spawn(response.run(), "response")

    # ---- responses ----------------------------------------------------------------------------
    def start_response(self, options: ResponseOptions, prefetch: Prefetch | None = None) -> None:
        if self.response is not None and not self.response.done:
            if options.turn_committed_at is None:
                raise SessionError("a response is already in progress", code="conversation_already_has_active_response")
            self.response.cancel("turn_detected")
        self.response = Response(self, options, prefetch)
        self.spawn(self._respond(self.response), "response")

    async def _respond(self, response: Response) -> None:
        await response.run()
        calls = [c for c in response.function_calls if c.name in response.options.server_tools]
        if calls and response.status == "completed" and response.options.conversation == "auto":
            # In a task of its own: `Response.stop` waits for this task, and must not wait for a device.
            self.spawn(self._run_server_tools(response, calls), "server-tools")

    async def _run_server_tools(self, response: Response, calls: list[Item]) -> None:
        """Functions the server runs itself (`Runtime.server_tools`, e.g. MQTT tools) that the model called:
        run them, add each result as a function_call_output item and answer in a new response, as a client
        would with `function_call_output` items and `response.create`."""
        outputs = await asyncio.gather(*(self._server_tool(call) for call in calls))
        for call, output in zip(calls, outputs, strict=True):
            if self.history.find_call(call.call_id) is None:
                continue  # the client deleted the call meanwhile (or it was evicted): nothing to answer
            item = Item(id=ev.new_id("item"), role="user", type="function_call_output", call_id=call.call_id,
                        text=output)
            previous = self.history.add(item)
            self.emit(ev.ItemCreated(previous_item_id=previous, item=item.to_protocol(self.settings.beta)))
        if self.response is not response:
            return  # the user spoke meanwhile: the results are in the history that turn's reply reads
        rounds = response.options.server_tool_round + 1
        # A forced call has been made (forcing it again would loop), and small models call tools again and
        # again under "auto": after that many rounds the model must answer in words.
        forced = response.options.tool_choice != "auto"
        choice = "none" if forced or rounds >= MAX_SERVER_TOOL_ROUNDS else "auto"
        self.start_response(dataclasses.replace(response.options, tool_choice=choice, server_tool_round=rounds,
                                                turn_committed_at=None, transcribed_at=None, speech_end_ms=None))

    async def _server_tool(self, call: Item) -> str:
        executor = self.rt.server_tools
        if executor is None:
            return json.dumps({"error": f"no executor for the server tool {call.name}"})
        try:
            return await executor.call(self.id, call.call_id, call.name, call.arguments)
        except Exception as exc:  # the model hears that the tool failed; the session goes on
            self.log.exception("server tool %s failed", call.name)
            return json.dumps({"error": f"{type(exc).__name__}: {exc}"})

