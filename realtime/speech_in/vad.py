"""Voice activity detection: Silero VAD on onnxruntime, and server_vad / semantic_vad turn detection.

Three layers, so the turn logic can be tested without a model and the model shared between sessions:

* `SileroVad` owns the one ONNX session of the process; `SileroVad.new_stream()` hands out a
  `VadStream` per audio stream holding the recurrent state (onnxruntime's `run` is thread-safe).
* `TurnDetector` is sans-I/O: it turns (frame, speech probability) pairs into turn events with the
  OpenAI Realtime `server_vad` semantics (threshold, prefix_padding_ms, silence_duration_ms), or with
  `semantic_vad`: at a short pause it asks a turn model (Smart Turn, `smart_turn.py`, injected as a
  plain callable) whether the turn sounds complete, and ends it there if so, else only after a longer
  silence. The call is synchronous: the detector runs on the VAD thread, never on the event loop.
* `VadSegmenter` glues them together for arbitrary-length 16 kHz chunks.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from common.audio import SPEECH_RATE
from common.config import Eagerness, VadConfig
from realtime.speech_in.onnx_models import one_thread_session, package_file

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
# A turn's 16 kHz audio so far (ending in the pause) -> probability that the turn is complete.
TurnModel = Callable[[FloatArray], float]

FRAME_SAMPLES: Final = 512  # 32 ms: the window the 16 kHz Silero v5/v6 model is trained on
CONTEXT_SAMPLES: Final = 64  # tail of the previous window the model sees before each new one
# Speech, once started, continues until the probability drops this far below the threshold
# (the hysteresis of Silero's own VADIterator), so a word's soft ending does not split the turn.
HYSTERESIS: Final = 0.15
DEFAULT_MAX_TURN_MS: Final = 60000

_EXPECTED_INPUTS: Final = {"input", "state", "sr"}


@dataclass(frozen=True)
class SemanticTiming:
    """How semantic_vad ends a turn at one eagerness."""

    complete_threshold: float  # the turn ends at the pause when P(complete) is at least this...
    max_silence_ms: int  # ...else once the silence lasts this long, whatever the model said


# OpenAI's eagerness: `high` answers as soon as it can, `low` lets the user take their time, `auto` is
# `medium`. (OpenAI's own max timeouts are 8/4/2 s; ours are shorter because Silero, unlike a speech-to-
# speech model, ends the wait on any voiced frame, and a caller who pauses 2 s is rare.) Chosen on
# bench/turn_taking.py's material: docs/benchmarks.md, "Turn taking".
SEMANTIC_EAGERNESS: Final[dict[Eagerness, SemanticTiming]] = {
    "high": SemanticTiming(complete_threshold=0.5, max_silence_ms=800),
    "medium": SemanticTiming(complete_threshold=0.9, max_silence_ms=1200),
    "auto": SemanticTiming(complete_threshold=0.9, max_silence_ms=1200),
    "low": SemanticTiming(complete_threshold=0.95, max_silence_ms=2000),
}


def _ms(samples: int) -> int:
    return samples * 1000 // SPEECH_RATE


def _samples(ms: float) -> int:
    return round(ms * SPEECH_RATE / 1000)


# ---------------------------------------------------------------- model


def bundled_model_path() -> Path:
    """The ONNX file inside the installed `silero-vad` package, found without importing the package: its
    __init__ imports torch and calls torch.set_num_threads(1), which would slow the whole process's LLM."""
    return package_file("silero_vad", "data", "silero_vad.onnx")


class SileroVad:
    """The Silero VAD ONNX model; stateless, so one instance serves every stream of the process."""

    def __init__(self, session: ort.InferenceSession) -> None:
        inputs = {i.name: i for i in session.get_inputs()}
        if set(inputs) != _EXPECTED_INPUTS:
            raise ValueError(f"not a Silero v5/v6 VAD model: inputs {sorted(inputs)}, "
                             f"expected {sorted(_EXPECTED_INPUTS)}")
        self.session = session
        # State is [2, batch, 128] in v5/v6; read it from the model instead of hard-coding it.
        dims = inputs["state"].shape
        self.state_shape: tuple[int, int, int] = (_dim(dims[0], 2), 1, _dim(dims[2], 128))

    @classmethod
    def load(cls, path: str | Path | None = None) -> SileroVad:
        model = Path(path) if path is not None else bundled_model_path()  # well under 1 ms a 32 ms frame
        session = one_thread_session(model)
        logger.info("loaded Silero VAD from %s", model)
        return cls(session)

    def new_stream(self) -> VadStream:
        return VadStream(self)

    _SR: Final = np.array(SPEECH_RATE, dtype=np.int64)

    def probs(self, streams: Sequence[VadStream], frames: Sequence[FloatArray]) -> FloatArray:
        """Speech probabilities of one 512-sample frame for each stream, continuing each, in one ONNX call.

        The model takes a batch: a row per stream, its recurrent state a column of `state`. One call for many
        sessions costs far less than a call each (on a 2-core EPYC: 64 rows 2.6 ms, 64 single calls 7.6 ms),
        and is one wake-up of the VAD thread instead of 64 (`realtime/speech_in/vad_batch.py`)."""
        rows = len(streams)
        batch = np.empty((rows, CONTEXT_SAMPLES + FRAME_SAMPLES), dtype=np.float32)
        for i, (stream, frame) in enumerate(zip(streams, frames, strict=True)):
            if frame.shape != (FRAME_SAMPLES,):
                raise ValueError(f"VAD frames must be {FRAME_SAMPLES} samples, got shape {frame.shape}")
            batch[i, :CONTEXT_SAMPLES] = stream.context
            batch[i, CONTEXT_SAMPLES:] = frame
        state = np.concatenate([s.state for s in streams], axis=1)
        out, new_state = self.session.run(None, {"input": batch, "state": state, "sr": self._SR})
        for i, (stream, frame) in enumerate(zip(streams, frames, strict=True)):
            stream.state = np.ascontiguousarray(new_state[:, i:i + 1])
            stream.context = frame[-CONTEXT_SAMPLES:].copy()
        return np.asarray(out[:, 0], dtype=np.float32)


def _dim(value: object, default: int) -> int:
    return value if isinstance(value, int) else default


class VadStream:
    """Per-stream recurrent state + context of the Silero model (the numpy twin of OnnxWrapper)."""

    def __init__(self, vad: SileroVad) -> None:
        self.vad = vad
        self.state = np.zeros(vad.state_shape, dtype=np.float32)  # [2, 1, 128]: this stream's row
        self.context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)

    def prob(self, frame: npt.ArrayLike) -> float:
        """Speech probability of one 512-sample 16 kHz frame, continuing this stream."""
        return float(self.vad.probs([self], [np.asarray(frame, dtype=np.float32)])[0])

    def reset(self) -> None:
        self.state = np.zeros(self.vad.state_shape, dtype=np.float32)
        self.context = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)


# ---------------------------------------------------------------- turn events


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int  # where the voiced run began (without prefix padding)


@dataclass(frozen=True)
class SilenceStarted:
    at_ms: int  # first unvoiced frame after speech: the turn may be ending, transcription can start
    # The turn's audio at this moment, for a speculative transcript: taken here, not by the caller afterwards,
    # because one fed chunk may also end the turn (or start the next) after this event.
    audio: FloatArray = field(default_factory=lambda: np.zeros(0, dtype=np.float32), compare=False, repr=False)


@dataclass(frozen=True)
class SpeechResumed:
    at_ms: int  # speech came back before silence_duration_ms passed: the turn goes on


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int  # where speech ended (start of the closing silence), not where the window closed
    # The turn's 16 kHz audio: prefix_padding_ms before the start through the closing silence.
    audio: FloatArray = field(compare=False, repr=False)
    # True when max_turn_ms cut the turn short.
    forced: bool = False
    # The detector's clock (ms of audio fed) when it decided: the caller may have fed more since.
    decided_ms: int = field(default=0, compare=False)


TurnEvent = SpeechStarted | SilenceStarted | SpeechResumed | SpeechStopped


class _State(Enum):
    IDLE = "idle"  # no speech
    PENDING = "pending"  # a voiced run shorter than min_speech_ms: maybe a click
    SPEAKING = "speaking"  # in a turn, voiced
    TRAILING = "trailing"  # in a turn, silent for less than silence_duration_ms


class _Chunks:
    """Append-only list of audio chunks, concatenated on demand."""

    def __init__(self) -> None:
        self._chunks: list[FloatArray] = []

    def append(self, chunk: FloatArray) -> None:
        self._chunks.append(chunk)

    def array(self) -> FloatArray:
        if not self._chunks:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self._chunks)

    def tail(self, samples: int) -> FloatArray:
        """The last `samples` samples (all if fewer), without concatenating the whole turn."""
        picked: list[FloatArray] = []
        have = 0
        for chunk in reversed(self._chunks):
            if have >= samples:
                break
            picked.append(chunk)
            have += len(chunk)
        if not picked:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(picked[::-1])[-samples:]

    def clear(self) -> None:
        self._chunks.clear()


class TurnDetector:
    """OpenAI `server_vad` / `semantic_vad` turn detection over 16 kHz frames and their speech probabilities.

    Sans-I/O: no VAD model, no clock, no threads (semantic_vad calls `turn_model`, a plain function, in
    `feed`). Time is counted in samples fed since construction, so event timestamps line up with the
    audio the client sent; `reset()` keeps that clock. Without a `turn_model`, semantic_vad runs as
    server_vad (the runtime warns when the model is not installed).
    """

    # Smart Turn hears at most the last 8 s of a turn; more audio would only cost a bigger copy.
    TURN_MODEL_WINDOW: Final = 8 * SPEECH_RATE

    def __init__(self, cfg: VadConfig | None = None, *, max_turn_ms: int = DEFAULT_MAX_TURN_MS,
                 turn_model: TurnModel | None = None) -> None:
        self.turn_model = turn_model
        # P(complete) from the last time semantic_vad asked the turn model (None: not asked this turn).
        self.last_turn_probability: float | None = None
        self._asked = False  # has the turn model judged the current pause
        self._clock = 0  # samples fed so far
        self._state = _State.IDLE
        self._preroll: deque[tuple[int, FloatArray]] = deque()  # (start sample, frame) before a turn
        self._turn = _Chunks()
        self._turn_audio_start = 0  # sample where self._turn's audio begins
        self._run_start = 0  # sample where the current voiced run began
        self._silence_start = 0  # sample where the current trailing silence began
        self.configure(cfg or VadConfig(), max_turn_ms=max_turn_ms)

    def configure(self, cfg: VadConfig, *, max_turn_ms: int | None = None) -> None:
        """Apply new settings (session.update) without losing the clock or a turn in progress."""
        if not 0.0 <= cfg.threshold <= 1.0:
            raise ValueError(f"VAD threshold must be within [0, 1], not {cfg.threshold}")
        if cfg.semantic_pause_ms < 0:
            raise ValueError(f"semantic_pause_ms must not be negative, not {cfg.semantic_pause_ms}")
        self.cfg = cfg
        if max_turn_ms is not None:
            self.max_turn_ms = max_turn_ms
        self._prefix = _samples(cfg.prefix_padding_ms)
        self._min_speech = _samples(cfg.min_speech_ms)
        # The timings of the mode in force: server_vad ignores the semantic ones and semantic_vad
        # silence_duration_ms, as in OpenAI's protocol.
        self.semantic: SemanticTiming | None = None
        if cfg.turn_detection == "semantic_vad" and self.turn_model is not None:
            self.semantic = SEMANTIC_EAGERNESS[cfg.eagerness]
        self._pause = _samples(cfg.semantic_pause_ms)
        self._max_silence = _samples(self.semantic.max_silence_ms if self.semantic else cfg.silence_duration_ms)
        self._max_turn = _samples(self.max_turn_ms)
        self._off_threshold = max(cfg.threshold - HYSTERESIS, 0.0)

    @property
    def now_ms(self) -> int:
        return _ms(self._clock)

    @property
    def in_turn(self) -> bool:
        """True between SpeechStarted and SpeechStopped."""
        return self._state in (_State.SPEAKING, _State.TRAILING)

    @property
    def turn_audio_start_ms(self) -> int:
        """Where `current_turn_audio()` (and SpeechStopped.audio) begins: the start minus padding."""
        return _ms(self._turn_audio_start)

    def current_turn_audio(self) -> FloatArray:
        """The turn's audio so far (with prefix padding), for partial transcripts; empty outside one."""
        return self._turn.array() if self.in_turn else np.zeros(0, dtype=np.float32)

    def reset(self) -> None:
        """Forget any turn and pending speech (input_audio_buffer.clear); the clock keeps running."""
        self._state = _State.IDLE
        self.last_turn_probability = None
        self._preroll.clear()
        self._turn.clear()

    def feed(self, frame: npt.ArrayLike, prob: float) -> list[TurnEvent]:
        # Copy: frames are kept for the turn's audio, and the caller may reuse its buffer.
        samples = np.array(frame, dtype=np.float32)
        start = self._clock
        self._clock += len(samples)
        if not self.in_turn:
            return self._feed_outside_turn(start, samples, prob)
        self._turn.append(samples)
        events = self._feed_in_turn(start, prob)
        if self.in_turn and self._clock - self._run_start >= self._max_turn:
            # A client streaming speech (or noise the model takes for speech) forever must not grow
            # the buffer without bound; the next voiced frame starts a new turn.
            events.append(self._stop(forced=True))
        return events

    def _feed_outside_turn(self, start: int, samples: FloatArray, prob: float) -> list[TurnEvent]:
        if self._state is _State.IDLE and prob >= self.cfg.threshold:
            self._state = _State.PENDING
            self._run_start = start
        elif self._state is _State.PENDING and prob < self._off_threshold:
            # The voiced run ended before min_speech_ms: a click or a cough, not a turn.
            self._state = _State.IDLE
        self._remember(samples, start)
        if self._state is _State.PENDING and self._clock - self._run_start >= self._min_speech:
            return [self._start()]
        return []

    def _feed_in_turn(self, start: int, prob: float) -> list[TurnEvent]:
        events: list[TurnEvent] = []
        if self._state is _State.SPEAKING:
            if prob >= self._off_threshold:
                return events
            self._state = _State.TRAILING
            self._silence_start = start
            self._asked = False
            events.append(SilenceStarted(at_ms=_ms(start), audio=self._turn.array()))
        elif prob >= self.cfg.threshold:
            # Like VADIterator, only a frame back above the full threshold resumes the turn.
            self._state = _State.SPEAKING
            return [SpeechResumed(at_ms=_ms(start))]
        silent = self._clock - self._silence_start
        if self.semantic is not None and self.turn_model is not None and not self._asked and silent >= self._pause:
            # Asked once per pause: the words and intonation before it do not change while it lasts, and a
            # call costs ~60 ms of the VAD thread that every session shares.
            self._asked = True
            self.last_turn_probability = self.turn_model(self._turn.tail(self.TURN_MODEL_WINDOW))
            if self.last_turn_probability >= self.semantic.complete_threshold:
                events.append(self._stop(forced=False))
                return events
        if silent >= self._max_silence:
            events.append(self._stop(forced=False))
        return events

    def _remember(self, samples: FloatArray, start: int) -> None:
        """Keep just enough audio to prepend prefix padding to a voiced run that becomes a turn."""
        self._preroll.append((start, samples))
        # While idle, the earliest run that can still start is the next frame's (at the clock).
        keep_from = (self._run_start if self._state is _State.PENDING else self._clock) - self._prefix
        while self._preroll and self._preroll[0][0] + len(self._preroll[0][1]) <= keep_from:
            self._preroll.popleft()

    def _start(self) -> SpeechStarted:
        self._state = _State.SPEAKING
        self.last_turn_probability = None
        self._turn.clear()
        audio_start = max(self._run_start - self._prefix, 0)
        if self._preroll:
            audio_start = max(audio_start, self._preroll[0][0])
        self._turn_audio_start = audio_start
        for frame_start, frame in self._preroll:
            skip = max(audio_start - frame_start, 0)
            if skip < len(frame):
                self._turn.append(frame[skip:])
        self._preroll.clear()
        logger.debug("speech started at %d ms", _ms(self._run_start))
        return SpeechStarted(audio_start_ms=_ms(self._run_start))

    def _stop(self, *, forced: bool) -> SpeechStopped:
        end = self._silence_start if self._state is _State.TRAILING else self._clock
        audio = self._turn.array()
        self._turn.clear()
        self._state = _State.IDLE
        logger.debug("speech stopped at %d ms%s", _ms(end), " (max turn length)" if forced else "")
        return SpeechStopped(audio_end_ms=_ms(end), audio=audio, forced=forced, decided_ms=_ms(self._clock))


# ---------------------------------------------------------------- glue


class VadSegmenter:
    """VadStream + TurnDetector over arbitrary-length 16 kHz float32 chunks."""

    def __init__(self, vad: SileroVad, cfg: VadConfig | None = None, *,
                 max_turn_ms: int = DEFAULT_MAX_TURN_MS, turn_model: TurnModel | None = None) -> None:
        self.stream = vad.new_stream()
        self.detector = TurnDetector(cfg, max_turn_ms=max_turn_ms, turn_model=turn_model)
        self._pending = np.zeros(0, dtype=np.float32)
        self.last_prob = 0.0

    def feed(self, samples: npt.ArrayLike) -> list[TurnEvent]:
        """Run the chunk through the model one frame at a time (a `VadBatcher` does the same for many segmenters
        with one model call per round)."""
        events: list[TurnEvent] = []
        for frame in self.split(samples):
            events.extend(self.step(frame, self.stream.prob(frame)))
        return events

    def split(self, samples: npt.ArrayLike) -> list[FloatArray]:
        """The whole frames of what was fed so far; the < 32 ms rest waits for the next chunk."""
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"expected mono 1-D audio, got shape {audio.shape}")
        if len(self._pending):
            audio = np.concatenate([self._pending, audio])
        usable = len(audio) - len(audio) % FRAME_SAMPLES
        self._pending = audio[usable:].copy()
        return [audio[offset:offset + FRAME_SAMPLES] for offset in range(0, usable, FRAME_SAMPLES)]

    def step(self, frame: FloatArray, prob: float) -> list[TurnEvent]:
        """One frame and its speech probability through the turn detector."""
        self.last_prob = prob
        return self.detector.feed(frame, prob)

    def current_turn_audio(self) -> FloatArray:
        return self.detector.current_turn_audio()

    @property
    def in_turn(self) -> bool:
        return self.detector.in_turn

    def reset(self) -> None:
        """Drop the turn in progress and the model state.

        The < 32 ms not yet framed is kept, so the clock still counts every sample ever fed.
        """
        self.detector.reset()
        self.stream.reset()
