"""One assistant response: brains -> text deltas -> sentence chunks -> speech -> audio deltas.

Text streams to the client as the articulation brain writes it; each complete sentence (or, for the
first, a clause) is synthesized at once, so the first audio leaves while the brain is still writing.
Cancelling (barge-in, response.cancel, disconnect) stops the brains and speech at once and truncates
the assistant's item to what the client had played by then.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from brains.history import Item
from brains.pacer import MindPacer, PacerDone, ReplyDelta, ThoughtDelta, ToolCall
from brains.tools import parse_tool_call
from common import audio as audio_codec
from common.errors import DuetError, SessionError
from common.playback import PlaybackClock
from realtime.core import events as ev
from realtime.runtime import TurnReport
from tts.chunker import SentenceChunker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from brains.pacer import PacerEvent
    from common.config import LlmConfig
    from realtime.core.context import SessionContext
    from realtime.core.options import ResponseOptions
    from realtime.core.prefetch import Prefetch

log = logging.getLogger(__name__)

AUDIO_DELTA_MS = 200  # audio delta size: small enough to start playback early, large enough to be cheap


class Response:
    def __init__(self, session: SessionContext, options: ResponseOptions, prefetch: Prefetch | None = None) -> None:
        self.session = session
        self.options = options
        self.prefetch = prefetch
        self.id = ev.new_id("resp")
        self.item = Item(id=ev.new_id("item"), role="assistant", audio="audio" in options.modalities,
                         status="in_progress", continues=options.continues)
        self.playback = prefetch.playback if prefetch is not None else PlaybackClock()
        self.done = False
        self.written = False  # the brain finished writing the reply (else it was stopped first)
        self.status = "in_progress"
        self.status_reason: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._cancelled_early: str | None = None
        self._pacer: MindPacer | None = None
        self.metrics: dict[str, Any] = {"pacing": options.pacing}
        self.first_audio_at: float | None = None
        self._output: list[Item] = []  # output items in order: the message and any function calls
        self._out_energy = 0.0
        self._out_samples = 0
        self._t0 = options.turn_committed_at or time.perf_counter()

    @property
    def beta(self) -> bool:
        return self.session.settings.beta

    def _mark(self, name: str) -> None:
        if name not in self.metrics:
            self.metrics[name] = round((time.perf_counter() - self._t0) * 1000, 1)

    def cancel(self, reason: str) -> None:
        if self.done:
            return
        if self._task is None:
            # Not started yet (response.cancel right after response.create): `run` announces the response,
            # then ends it at once, cancelled.
            self._cancelled_early = reason
            return
        self.status, self.status_reason = "cancelled", reason
        if self._pacer is not None:
            self._pacer.cancel()
        if self.prefetch is not None:
            self.prefetch.cancel()
        if self._task is not None:
            self._task.cancel()

    async def stop(self, reason: str) -> None:
        """Cancel and wait until the response has finished (its done events are out)."""
        self.cancel(reason)
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait([task])

    @property
    def far_rms(self) -> float:
        """Level of the reply audio sent so far (the far end, for the echo test of barge-in)."""
        return float(np.sqrt(self._out_energy / self._out_samples)) if self._out_samples else 0.0

    @property
    def function_calls(self) -> list[Item]:
        """The function calls this response made, in order."""
        return [item for item in self._output if item.type == "function_call"]

    def audible(self) -> bool:
        """Is reply audio (possibly) coming out of the client's speaker now?"""
        return self.first_audio_at is not None and (not self.done or self.playback.ahead_ms() > 0)

    async def run(self) -> None:
        self._task = asyncio.current_task()
        s = self.session
        emit = s.emit
        emit(ev.ResponseCreated(response=self._protocol([])))
        emit(s.rate_limits())
        speech = _Speech(self) if self.item.audio else None
        try:
            if self._cancelled_early is not None:
                self.status, self.status_reason = "cancelled", self._cancelled_early
                return
            await self._think_and_speak(speech)
            self.status = "completed"
        except asyncio.CancelledError:
            if self.status != "cancelled":
                raise
        except DuetError as exc:
            self.status, self.status_reason = "failed", str(exc)
            emit(ev.error_event(SessionError(f"response failed: {exc}", code="response_failed",
                                             type="server_error")))
        except Exception as exc:  # a bug or a library error in this response only (a prompt, a tokenizer)
            s.log.exception("response %s failed", self.id, extra={"response_id": self.id})
            self.status, self.status_reason = "failed", f"internal error: {type(exc).__name__}"
            emit(ev.error_event(SessionError(f"response failed: internal error ({type(exc).__name__})",
                                             code="response_failed", type="server_error")))
        finally:
            if speech is not None:
                speech.stop()
                self.item.unsent = speech.unsent()  # before _finish cuts the item: part of what went unheard
            if self.prefetch is not None:
                # The speculative first audio, if no speech took it (a text-only reply, one that failed or
                # was cancelled before its first chunk): a job still queued in the TTS pool is skipped. A reply
                # that did not complete also stops the prefetch's generation (it may never have been read).
                if self.status == "completed":
                    self.prefetch.drop_first_audio()
                else:
                    self.prefetch.cancel()
            self._finish()

    def _open_message(self) -> None:
        """Announce the assistant message when it has something to say (a forced tool call may not)."""
        if self.item in self._output:
            return
        if self.options.conversation == "auto":
            self.session.history.add(self.item)
        self._output.append(self.item)
        index = self._output.index(self.item)
        self.session.emit(ev.OutputItemAdded(response_id=self.id, output_index=index,
                                             item=self.item.to_protocol(self.beta)))
        self.session.emit(ev.ContentPartAdded(response_id=self.id, item_id=self.item.id, output_index=index,
                                              part=self._part()))

    def _function_call(self, text: str) -> None:
        name, arguments = parse_tool_call(text)
        item = Item(id=ev.new_id("item"), role="assistant", type="function_call", call_id=ev.new_id("call"),
                    name=name, arguments=arguments, status="completed")
        if self.options.conversation == "auto":
            self.session.history.add(item)
        index = len(self._output)
        self._output.append(item)
        emit = self.session.emit
        emit(ev.OutputItemAdded(response_id=self.id, output_index=index,
                                item={**item.to_protocol(self.beta), "arguments": "", "status": "in_progress"}))
        emit(ev.FunctionCallArgumentsDelta(response_id=self.id, item_id=item.id, output_index=index,
                                           call_id=item.call_id, delta=arguments))
        emit(ev.FunctionCallArgumentsDone(response_id=self.id, item_id=item.id, output_index=index,
                                          call_id=item.call_id, name=name, arguments=arguments))
        emit(ev.OutputItemDone(response_id=self.id, output_index=index, item=item.to_protocol(self.beta)))
        self.session.log.info("function call %s(%s)", name, arguments)

    async def _think_and_speak(self, speech: _Speech | None) -> None:
        s, rt, opts = self.session, self.session.rt, self.options
        llm = rt.config.llm
        if opts.max_output_tokens is not None:
            llm = dataclasses.replace(llm, max_reply_tokens=min(llm.max_reply_tokens, opts.max_output_tokens))
        if opts.resume_text is not None:
            resumed = self._resume(opts.resume_text, speech, llm)
            if resumed is None:  # nothing more to write
                if speech is not None:
                    await speech.finish()
                return
            source = resumed
        elif self.prefetch is not None:
            self._pacer = self.prefetch.pacer
            source = self.prefetch.events()
            self.metrics["prefetched"] = True
        else:
            self._pacer = self.session.new_pacer(opts, self.playback, llm)
            source = self._pacer.run(self._conversation_ids(self._pacer.thinking))
        async for event in source:
            if isinstance(event, ThoughtDelta):
                self._mark("fb_first_token_ms")
                s.emit(ev.ThoughtDelta(response_id=self.id, item_id=self.item.id, delta=event.text))
                self.item.thought += event.text
            elif isinstance(event, ToolCall):
                self._function_call(event.text)
            elif isinstance(event, ReplyDelta):
                self._mark("ab_first_token_ms")
                self._open_message()
                self.item.text += event.text
                cls = ev.AudioTranscriptDelta if self.item.audio else ev.TextDelta
                s.emit(cls(response_id=self.id, item_id=self.item.id, delta=event.text))
                if speech is not None:
                    speech.push(event.text)
            elif isinstance(event, PacerDone):
                self.written = True
                self.item.text = " ".join(t for t in (opts.resume_text, event.reply) if t)
                st = event.stats
                if st.fb_finished is not None:
                    self.metrics["fb_finished_ms"] = round((st.fb_finished - self._t0) * 1000, 1)
                if st.ab_first_token is not None:
                    self.metrics["ab_first_token_engine_ms"] = round((st.ab_first_token - self._t0) * 1000, 1)
                self.metrics.update(fb_tokens_before_reply=st.fb_tokens_before_reply, thought_tokens=st.thought_tokens,
                                    reply_tokens=st.reply_tokens, ab_segments=st.ab_segments,
                                    prefill_reused=st.prefill_reused)
        if speech is not None:
            await speech.finish()

    def _resume(self, text: str, speech: _Speech | None, llm: LlmConfig) -> AsyncIterator[PacerEvent] | None:
        """A reply cut by a false interruption goes on. First the words the user did not hear, as written (one
        transcript delta, as a brain that wrote them all at once would send); then, if the cut reply was still
        being written, the articulation brain writes on after all of it (the pacer's events, returned)."""
        self.metrics["resumed"] = True
        self._open_message()
        if text:
            self.item.text = text
            cls = ev.AudioTranscriptDelta if self.item.audio else ev.TextDelta
            self.session.emit(cls(response_id=self.id, item_id=self.item.id, delta=text))
            if speech is not None:
                speech.push(text)
        messages = self.session.history.messages()
        if not self.options.resume_writing or not messages or messages[-1].role != "assistant":
            self.written = True
            return None
        # This item continues the cut one, so the history's last message is the whole reply so far
        # (`Conversation.messages` joins them): the prefix the brain writes on from.
        prefix = messages[-1].content
        budget = llm.max_reply_tokens - len(self.session.rt.prompts.encode(prefix))
        if budget <= 0:  # the cut reply had already written as much as it could
            self.written = True
            return None
        nothink = dataclasses.replace(self.options, pacing="nothink", tools=())
        self._pacer = self.session.new_pacer(nothink, self.playback, dataclasses.replace(llm, max_reply_tokens=budget),
                                             reply_prefix=prefix)
        return self._pacer.run(self.session.conversation_ids(messages[:-1], nothink, thinking=False))

    def _conversation_ids(self, thinking: bool) -> list[int]:
        # This response's own item is already in the history, still empty, and messages() skips it.
        return self.session.conversation_ids(self.session.history.messages(), self.options, thinking)

    # ---- finishing ----------------------------------------------------------------------------
    def _part(self) -> dict[str, Any]:
        # `audio` / `text` in both dialects: the GA schema of content_part events has only these (GA items
        # name their content `output_audio` / `output_text`, content_part events do not).
        if self.item.audio:
            return {"type": "audio", "transcript": self.item.text}
        return {"type": "text", "text": self.item.text}


    def _finish(self) -> None:
        s, emit = self.session, self.session.emit
        self.done = True
        if self.status == "cancelled" and self.item.audio:
            # Barge-in or cancel: keep only what the server's playback clock says the user heard.
            self.item.cut_to(self.playback.played_ms())
        self.item.status = "completed" if self.status == "completed" else "incomplete"
        self.item.audio_ms = self.playback.queued_ms
        if not self._output:
            self._open_message()  # every response has an output item, even an empty one
        if self.item in self._output:
            index = self._output.index(self.item)
            done = dict(response_id=self.id, item_id=self.item.id, output_index=index)
            if self.item.audio:
                emit(ev.AudioDone(**done))
                emit(ev.AudioTranscriptDone(**done, transcript=self.item.text))
            else:
                emit(ev.TextDone(**done, text=self.item.text))
            emit(ev.ContentPartDone(**done, part=self._part()))
            emit(ev.OutputItemDone(response_id=self.id, output_index=index, item=self.item.to_protocol(self.beta)))
        self.metrics.update(underruns=self.playback.underruns, audio_ms=round(self.playback.queued_ms),
                            speech_end_ms=self.options.speech_end_ms, status=self.status)
        if self.options.turn_decision_ms is not None:
            self.metrics["turn_decision_ms"] = self.options.turn_decision_ms
        if self.options.transcribed_at is not None:
            self.metrics["transcript_ms"] = round((self.options.transcribed_at - self._t0) * 1000, 1)
        emit(ev.TurnMetrics(response_id=self.id, metrics=self.metrics))
        usage = {"output_tokens": self.metrics.get("reply_tokens", 0),
                 "output_token_details": {"reasoning_tokens": self.metrics.get("thought_tokens", 0)}}
        output = [item.to_protocol(self.beta) for item in self._output]
        emit(ev.ResponseDone(response=self._protocol(output, usage)))
        s.log.info("response %s %s: %r %s", self.id, self.status, self.item.text[:80], self.metrics,
                   extra={"response_id": self.id, "event": "response.done"})
        s.rt.turn_finished(self._report())

    def _report(self) -> TurnReport:
        """This turn for the runtime's observers (metrics, transcripts): the user item it answers is the
        last user message before this response's item (or the last one at all, out of band)."""
        items = self.session.history.items
        end = next((i for i, it in enumerate(items) if it is self.item), len(items))
        user = next((it for it in reversed(items[:end]) if it.role == "user" and it.type == "message"), None)
        now = time.time()
        return TurnReport(session_id=self.session.id, response_id=self.id, status=self.status,
                          user_item_id=user.id if user is not None else None,
                          user_text=user.text if user is not None else "", item_id=self.item.id,
                          assistant_text=self.item.text, started_at=now - (time.perf_counter() - self._t0),
                          finished_at=now, metrics=dict(self.metrics))

    def _protocol(self, output: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        details = ev.status_details(self.status, self.status_reason)
        return {"id": self.id, "object": "realtime.response", "status": self.status, "status_details": details,
                "output": output, "usage": usage, "modalities" if self.beta else "output_modalities":
                list(self.options.modalities), "conversation_id": self.session.id}


class _Speech:
    """Chunks the reply text, synthesizes each chunk in the TTS pool and sends it as audio deltas."""

    def __init__(self, response: Response) -> None:
        self.r = response
        rt = response.session.rt
        tts = rt.config.tts
        self.chunker = SentenceChunker(first_chunk_min_words=tts.first_chunk_min_words,
                                       first_chunk_max_words=tts.first_chunk_max_words)
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        # Chunks complete but not yet sent as audio (queued, or in synthesis), oldest first: part of what a
        # resumed reply says. A sentence the brain was still writing (the chunker's buffer) is not: a resumed
        # reply has the brain write it anew after these words.
        self.pending: list[str] = []
        self.task = asyncio.create_task(self._run())

    def push(self, text: str) -> None:
        for chunk in self.chunker.push(text):
            self.r.session.log.debug("chunk ready %r at %.0f ms", chunk, (time.perf_counter() - self.r._t0) * 1000)
            self._queue(chunk)

    def _queue(self, chunk: str) -> None:
        # When the first chunk's words were all written: first token -> this is the brain's pace, this -> the first
        # audio synthesized is the TTS pool's wait and synthesis.
        self.r._mark("first_chunk_text_ms")
        self.pending.append(chunk)
        self.queue.put_nowait(chunk)

    async def finish(self) -> None:
        for chunk in self.chunker.flush():
            self._queue(chunk)
        self.queue.put_nowait(None)
        await self.task

    def unsent(self) -> str:
        """Text written in whole chunks but never sent as audio (the reply was stopped first)."""
        return " ".join(self.pending)

    def stop(self) -> None:
        self.task.cancel()

    async def _run(self) -> None:
        r = self.r
        s = r.session
        synth = s.rt.synthesizer
        prefetch = r.prefetch
        while (chunk := await self.queue.get()) is not None:
            t0 = time.perf_counter()
            # The first chunk may have been synthesized (or be in synthesis) while the silence window was
            # open: the same text, so the same audio the listener would wait for.
            speculative = prefetch.first_audio(chunk) if prefetch is not None else None
            prefetch = None  # only the first chunk
            wav = await self._speculative(speculative) if speculative is not None else None
            if wav is not None:
                r.metrics["first_audio_prefetched"] = True
            else:
                # The TTS pool runs the chunk whose audio is due soonest first: a reply's first chunk is overdue
                # since the turn's commit (its listener waits in silence), a later one is due when the audio
                # already sent runs out.
                deadline = r._t0 if r.first_audio_at is None else t0 + r.playback.ahead_ms(t0) / 1000
                wav = await s.rt.run_in(s.rt.tts_pool, synth.synthesize, chunk, deadline=deadline)
            self.pending.pop(0)  # sent below, or silent: either way no longer owed to the listener
            s.log.debug("synthesized %r: %.0f ms of audio in %.0f ms (%.0f ms after commit)", chunk,
                        len(wav) * 1000 / synth.sample_rate, (time.perf_counter() - t0) * 1000,
                        (time.perf_counter() - r._t0) * 1000)
            if not len(wav):
                continue
            r._mark("first_audio_synthesized_ms")
            fmt = s.settings.output_format
            out = audio_codec.resample(wav, synth.sample_rate, fmt.sample_rate)
            start = r.playback.queued_ms
            self._send(out, fmt)
            r.item.spoken.append((start, r.playback.queued_ms, chunk))

    @staticmethod
    async def _speculative(audio: asyncio.Task[np.ndarray]) -> np.ndarray | None:
        """The speculative first audio once synthesized; None if its job was cancelled (then synthesize anew)."""
        try:
            # Waited for, not awaited: its cancellation must not read as this speech's own.
            await asyncio.wait([audio])
        except asyncio.CancelledError:
            audio.cancel()  # this speech is stopping: the job is nobody's now
            raise
        if audio.cancelled():
            return None
        return audio.result()  # a failed synthesis fails the speech, as one run here would

    def _send(self, samples: np.ndarray, fmt: audio_codec.AudioFormat) -> None:
        r = self.r
        step = fmt.sample_rate * AUDIO_DELTA_MS // 1000
        for i in range(0, len(samples), step):
            piece = samples[i:i + step]
            r._out_energy += float(np.dot(piece, piece))
            r._out_samples += len(piece)
            if r.first_audio_at is None:
                r.first_audio_at = time.perf_counter()
            r.session.emit(ev.AudioDelta(response_id=r.id, item_id=r.item.id, delta=piece))
            r._mark("first_audio_sent_ms")
            r.playback.add(len(piece) * 1000.0 / fmt.sample_rate)

