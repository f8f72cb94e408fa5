"""Text -> phoneme ids ("speech tokens") for Piper voices, via espeak-ng.

Licensing: the espeak-ng bindings come from `piper-tts` (module `piper`), which is GPL-3.0-or-later.
Duet uses it ONLY here, ONLY for phonemization, and imports it lazily inside `PhonemeTokenizer`, so the
rest of `tts/` (vocoder, chunker, synthesizer) never imports GPL code. To drop the dependency, replace
`PhonemeTokenizer` with any callable `text -> list[list[int]]` (one phoneme-id sequence per sentence,
ids from the voice's `phoneme_id_map`) and pass it to `tts.synthesizer.Synthesizer(...)`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class _Phonemizer(Protocol):
    def phonemize(
        self, voice: str, text: str, vowel_clusters: set[tuple[str, ...]] | None = None
    ) -> list[list[str]]: ...


# espeak-ng keeps its voice and text state in process globals: one phonemizer per process, and one
# caller at a time, however many tokenizers or worker threads there are.
_ESPEAK_LOCK = threading.Lock()
_espeak: _Phonemizer | None = None


def _espeak_phonemizer() -> _Phonemizer:
    """The process-wide espeak-ng phonemizer; call with `_ESPEAK_LOCK` held."""
    global _espeak
    if _espeak is None:
        from piper.phonemize_espeak import EspeakPhonemizer  # GPL, see module docstring

        _espeak = EspeakPhonemizer()
    return _espeak


def _ids_for(phonemes: Sequence[str], id_map: Mapping[str, Sequence[int]]) -> list[int]:
    from piper.phoneme_ids import phonemes_to_ids  # GPL, see module docstring

    return phonemes_to_ids(list(phonemes), id_map)


class PhonemeTokenizer:
    """Callable: text -> one phoneme-id sequence per sentence, for one espeak-based Piper voice."""

    def __init__(
        self,
        espeak_voice: str,
        phoneme_id_map: Mapping[str, Sequence[int]],
        vowel_clusters: set[tuple[str, ...]] | None = None,
    ) -> None:
        self.espeak_voice = espeak_voice
        self.phoneme_id_map = phoneme_id_map
        self.vowel_clusters = vowel_clusters
        # Phonemes that produce sound. espeak turns "?!" or "..." into a sentence of bare punctuation,
        # which the vocoder would render as a short noise burst, so such sentences are dropped.
        self._voiced = {p for p in phoneme_id_map if any(ch.isalpha() for ch in p)}
        with _ESPEAK_LOCK:
            _espeak_phonemizer()  # fail at load time, not on the first request

    @classmethod
    def from_voice_config(cls, config: Mapping[str, Any]) -> PhonemeTokenizer:
        """Build from a Piper voice's parsed `.onnx.json`."""
        phoneme_type = config.get("phoneme_type", "espeak")
        if phoneme_type != "espeak":
            raise ValueError(f"unsupported Piper phoneme_type {phoneme_type!r} (only 'espeak')")
        clusters = config.get("vowel_clusters")
        return cls(
            espeak_voice=config["espeak"]["voice"],
            phoneme_id_map=config["phoneme_id_map"],
            vowel_clusters={tuple(c) for c in clusters} if clusters else None,
        )

    def phonemize(self, text: str) -> list[list[str]]:
        """Text -> phonemes (IPA codepoints and punctuation) grouped by sentence."""
        with _ESPEAK_LOCK:
            sentences = _espeak_phonemizer().phonemize(self.espeak_voice, text, self.vowel_clusters)
        return [s for s in sentences if any(p in self._voiced for p in s)]

    def __call__(self, text: str) -> list[list[int]]:
        """Text -> phoneme ids grouped by sentence (with BOS/EOS/padding); [] if nothing is speakable."""
        return [_ids_for(sentence, self.phoneme_id_map) for sentence in self.phonemize(text)]
