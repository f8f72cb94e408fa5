"""Streaming segmentation of a reply's text into chunks worth synthesising on their own.

The LLM streams a reply in small deltas; speech can start as soon as one whole sentence (or, for the
first chunk, one clause or its first few words) is known, so time-to-first-audio is a few tokens and
one short chunk's synthesis, not a sentence's.
"""

from __future__ import annotations

import logging
import re
import unicodedata

logger = logging.getLogger(__name__)

# Lower-cased tokens that end in "." without ending a sentence. Words that often end sentences too
# ("no", "am") are left out: a missed split only delays audio, a wrong one breaks a sentence's prosody.
ABBREVIATIONS: frozenset[str] = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "mt", "ft", "vs", "etc", "approx", "dept",
    "est", "fig", "inc", "ltd", "co", "corp", "gen", "gov", "sen", "rep", "rev", "capt", "lt", "col",
    "sgt", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
})

# One candidate boundary: a newline, a run of sentence terminators (with closing quotes/brackets) or a
# clause mark. Terminators and clause marks count only once the next character is whitespace, so
# "3.5", "1,000" and "5:30" never split and a "." at the end of a delta waits for the next delta.
# A colon is no clause end: it announces what follows ("The answer is: Paris."), and speaking the part before
# it alone gives it final intonation and leaves a one-word sentence that listeners (and Whisper, ~30% of
# the time in our measurement) mishear.
_BOUNDARY = re.compile(r"(?P<newline>\n)|(?P<sentence>[.!?…]+[\"'”’)\]]*)(?=\s)|(?P<clause>[,;])(?=\s)")
# A word that ends a sentence (possibly inside quotes or brackets): no first-chunk cut may leave it alone.
_TERMINAL = re.compile(r"[.!?…]+[\"'”’)\]]*$")
_WORD = re.compile(r"\S+")
# "e.g", "i.e", "U.S", "a.m": dotted letters, checked without their final ".".
_DOTTED = re.compile(r"^(?:[^\W\d_]\.)+[^\W\d_]$")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_BULLET = re.compile(r"^\s*[-+•]\s+")
_SPACES = re.compile(r"\s+")
# Left behind when an emoji sat between a word and its punctuation: "France 😀." -> "France ."
_SPACE_BEFORE_MARK = re.compile(r"\s+(?=[.,!?;:…])")

# Words that open a phrase rather than finish one: a first chunk cut after them ("The answer is |",
# "the capital of |") strands them with a sentence's final intonation and a pause before what they govern.
FUNCTION_WORDS: frozenset[str] = frozenset({
    "a", "an", "the", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our", "their",
    "of", "to", "in", "on", "at", "by", "for", "with", "from", "into", "onto", "about", "over", "under",
    "between", "after", "before", "during", "through", "like", "than", "as", "per", "via",
    "and", "or", "but", "nor", "so", "yet", "if", "when", "while", "because", "although", "though", "since",
    "which", "who", "whom", "whose", "what", "where", "how", "why", "whether",
    "is", "are", "was", "were", "be", "been", "being", "am", "has", "have", "had", "do", "does", "did",
    "will", "would", "can", "could", "should", "may", "might", "must", "shall", "not", "no", "very",
    "i", "you", "he", "she", "it", "we", "they", "there", "here", "let", "some", "any", "each", "every",
    "it's", "that's", "there's", "here's", "what's", "i'm", "you're", "we're", "they're", "he's", "she's",
    "let's", "don't", "doesn't", "isn't", "aren't", "can't", "won't", "i'll", "you'll", "i've", "you've",
})

# Characters that would be read out literally ("asterisk", "hash") or as emoji names ("grinning face").
_MARKUP = frozenset("*#`~")
# Markup that separates words ("snake_case", table cells) becomes a space rather than vanishing.
_SEPARATORS = frozenset("_|")
_EMOJI_JOINERS = frozenset("\u200d\ufe0e\ufe0f\u20e3")
# Symbols (category So) that espeak speaks meaningfully and must survive the emoji filter.
_SPOKEN_SYMBOLS = frozenset("°©®™")


def _is_noise(ch: str) -> bool:
    if ch in _MARKUP or ch in _EMOJI_JOINERS:
        return True
    if ch in _SPOKEN_SYMBOLS:
        return False
    code = ord(ch)
    # Skin-tone modifiers and emoji tag characters are not category So.
    if 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F:
        return True
    return unicodedata.category(ch) == "So"


def strip_noise(text: str) -> str:
    """Drop markdown punctuation and emojis, character by character (so safe on partial deltas)."""
    return "".join(" " if ch in _SEPARATORS else ch for ch in text if not _is_noise(ch))


def clean_for_speech(text: str) -> str:
    """One chunk as it should be spoken: no markup, emojis, link targets or bullets; spaces collapsed."""
    text = _BULLET.sub("", _LINK.sub(r"\1", strip_noise(text)))
    return _SPACE_BEFORE_MARK.sub("", _SPACES.sub(" ", text)).strip()


def is_speakable(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _word_count(text: str) -> int:
    return sum(1 for word in text.split() if is_speakable(word))


def _token(word: str) -> str:
    """A word as FUNCTION_WORDS spells it: lower case, typographic apostrophes plain, outer punctuation off."""
    return word.replace("’", "'").strip("\"'“”‘([)],;:.!?…").lower()


def _is_abbreviation(text_before_dot: str) -> bool:
    words = text_before_dot.split()
    if not words:
        return False
    token = words[-1].lstrip("\"'“‘([")
    if len(token) == 1 and token.isupper():  # an initial, as in "J. R. R. Tolkien"
        return True
    return token.lower() in ABBREVIATIONS or bool(_DOTTED.match(token))


class SentenceChunker:
    """Incremental text -> speakable chunks for one reply at a time.

    `push` returns the chunks completed by a delta; `flush` returns the rest and starts a new reply,
    so one chunker can serve consecutive replies. Chunks end at sentence ends and newlines; any chunk
    may also end at a clause mark once it reaches `max_words`, so one run-on sentence does not hold
    back all audio. The first chunk of a reply ends sooner, so the first audio is ready sooner: at a
    clause mark (, ;) once it has `first_chunk_min_words` words, or after word k of its sentence
    (`first_chunk_min_words` <= k <= `first_chunk_max_words`, 0 = never) when word k is a content word
    without punctuation and the next word is known to be followed by another in the same sentence. So the
    rest of that sentence is always two words or more: a one-word chunk ("Paris.") loses its context and
    is misheard. The decision depends only on the text, never on how it was split into deltas.
    """

    def __init__(self, first_chunk_min_words: int = 3, max_words: int = 40, first_chunk_max_words: int = 5) -> None:
        self.first_chunk_min_words = first_chunk_min_words
        self.first_chunk_max_words = first_chunk_max_words
        self.max_words = max_words
        self._buffer = ""
        self._first = True

    def push(self, delta: str) -> list[str]:
        self._buffer += strip_noise(delta)
        chunks: list[str] = []
        start = 0
        for match in _BOUNDARY.finditer(self._buffer):
            end = match.end()
            # A word cut before this boundary comes first in the text, so it goes first whatever the deltas.
            start = self._cut_first(start, end, chunks)
            if start >= end or not self._ends_chunk(match, self._buffer[start:end],
                                                     self._buffer[start:match.start()]):
                continue
            self._emit(self._buffer[start:end], chunks)
            start = end
        start = self._cut_first(start, len(self._buffer), chunks)
        self._buffer = self._buffer[start:]
        return chunks

    def _cut_first(self, start: int, end: int, chunks: list[str]) -> int:
        """Emit the first chunk at a word cut inside buffer[start:end] if there is one; the new start."""
        if not self._first or self.first_chunk_max_words <= 0:
            return start
        cut = self._word_cut(self._buffer[start:end])
        if cut is None:
            return start
        self._emit(self._buffer[start:start + cut], chunks)
        return start + cut

    def _word_cut(self, text: str) -> int | None:
        """Where the first chunk may end after a content word in `text`, if that is already decided."""
        words = [m for m in _WORD.finditer(text) if is_speakable(m.group())]
        last = min(self.first_chunk_max_words, len(words) - 2)
        for k in range(max(self.first_chunk_min_words, 1), last + 1):
            word, nxt, after = words[k - 1], words[k], words[k + 1]
            # A phrase boundary: word k ends one (a content word without punctuation: a clause mark or a
            # colon is a boundary's business) and the next word opens one ("of", "is", "in"). Cutting inside
            # a phrase ("the largest | planet") gives "largest" a sentence's final fall and a pause.
            if not word.group()[-1].isalnum() or _token(word.group()) in FUNCTION_WORDS:
                continue
            if _token(nxt.group()) not in FUNCTION_WORDS:
                continue
            # The rest must be two words or more: the next word may not end the sentence, and one more must
            # follow it on the same line (a newline ends a chunk).
            if _TERMINAL.search(nxt.group()) or "\n" in text[word.end():after.start()]:
                continue
            return word.end()
        return None

    def flush(self) -> list[str]:
        chunks: list[str] = []
        self._emit(self._buffer, chunks)
        self._buffer = ""
        self._first = True
        return chunks

    def _ends_chunk(self, match: re.Match[str], chunk: str, before_mark: str) -> bool:
        if match.lastgroup == "newline":
            return True
        if match.lastgroup == "sentence":
            # Only a lone "." can be an abbreviation's; "?", "!" and "..." always end the sentence.
            if match.group().rstrip("\"'”’)]") != ".":
                return True
            # A chunk that is only a number before "." is a list marker ("1. Paris is..."), not a sentence.
            return not (_is_abbreviation(before_mark) or before_mark.strip().isdigit())
        words = _word_count(chunk)
        return (self._first and words >= self.first_chunk_min_words) or words >= self.max_words

    def _emit(self, raw: str, chunks: list[str]) -> None:
        text = clean_for_speech(raw)
        # Stray punctuation ("...", a closing quote) between boundaries has nothing to say.
        if not is_speakable(text):
            return
        chunks.append(text)
        self._first = False
