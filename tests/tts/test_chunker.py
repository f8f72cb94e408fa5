from __future__ import annotations

import pytest

from tts.chunker import SentenceChunker, clean_for_speech


def stream(chunker: SentenceChunker, text: str, step: int = 1) -> list[str]:
    """Feed `text` in deltas of `step` characters, as an LLM would, then flush."""
    chunks: list[str] = []
    for i in range(0, len(text), step):
        chunks += chunker.push(text[i : i + step])
    return chunks + chunker.flush()


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_splits_at_sentence_ends_whatever_the_delta_size(step: int) -> None:
    text = "Paris is lovely. Is it big? Yes! It is."
    assert stream(SentenceChunker(), text, step) == ["Paris is lovely.", "Is it big?", "Yes!", "It is."]


def test_chunk_is_returned_as_soon_as_the_next_character_confirms_it() -> None:
    chunker = SentenceChunker()
    assert chunker.push("It is sunny.") == []  # "." might still be "sunny.com" or "3.5"
    assert chunker.push(" Take") == ["It is sunny."]
    assert chunker.flush() == ["Take"]


def test_abbreviations_do_not_end_sentences() -> None:
    text = "Mr. Smith met Dr. Jones, e.g. at noon. They talked, i.e. a lot. J. R. R. Tolkien agreed."
    assert stream(SentenceChunker(first_chunk_min_words=99), text) == [
        "Mr. Smith met Dr. Jones, e.g. at noon.",
        "They talked, i.e. a lot.",
        "J. R. R. Tolkien agreed.",
    ]


def test_decimals_and_thousands_do_not_split() -> None:
    text = "It costs 3.5 dollars, or 1,000 cents at 5:30. Fine."
    assert stream(SentenceChunker(first_chunk_min_words=99), text) == [
        "It costs 3.5 dollars, or 1,000 cents at 5:30.",
        "Fine.",
    ]


def test_ellipsis_and_closing_quote_stay_with_their_sentence() -> None:
    text = 'Well... She said "go!" Then left.'
    assert stream(SentenceChunker(), text) == ["Well...", 'She said "go!"', "Then left."]


def test_first_chunk_may_end_at_a_clause_once_it_has_enough_words() -> None:
    text = (
        "Yes, the capital of France is Paris, which is lovely, and the food is great. "
        "Also, it is old, and big."
    )
    chunks = stream(SentenceChunker(first_chunk_min_words=3), text)
    # "Yes," is too short to stand alone; later clauses of the reply are not split.
    assert chunks == [
        "Yes, the capital of France is Paris,",
        "which is lovely, and the food is great.",
        "Also, it is old, and big.",
    ]


def test_first_chunk_rule_applies_again_after_flush() -> None:
    chunker = SentenceChunker(first_chunk_min_words=2)
    first_reply = stream(chunker, "Hello there, friend. Good day, sir.")
    assert first_reply == ["Hello there,", "friend.", "Good day, sir."]
    assert stream(chunker, "Hello there, friend.") == ["Hello there,", "friend."]


def test_run_on_sentence_is_split_at_a_clause_past_max_words() -> None:
    text = "One two three four five six, seven eight, nine ten."
    chunks = stream(SentenceChunker(first_chunk_min_words=99, max_words=5), text)
    assert chunks == ["One two three four five six,", "seven eight, nine ten."]


def test_newlines_end_chunks_and_blank_lines_vanish() -> None:
    text = "Here is the list\n\n- first item\n- second item\n1. Third thing\nDone"
    assert stream(SentenceChunker(), text) == [
        "Here is the list", "first item", "second item", "1. Third thing", "Done",
    ]


def test_markdown_and_emojis_are_stripped() -> None:
    text = "## Answer\n**Paris** is the `capital` of France 🇫🇷😀. I ❤️ it 👍🏽! See [docs](http://x.org/a)."
    assert stream(SentenceChunker(), text) == [
        "Answer", "Paris is the capital of France.", "I it!", "See docs.",
    ]


def test_never_emits_empty_or_punctuation_only_chunks() -> None:
    chunker = SentenceChunker()
    assert stream(chunker, "   \n\n ... ?! 😀 ** \n") == []
    assert stream(chunker, "Ok. ... Fine.") == ["Ok.", "Fine."]


def test_flush_returns_unterminated_rest_once() -> None:
    chunker = SentenceChunker()
    assert chunker.push("No full stop here") == []
    assert chunker.flush() == ["No full stop here"]
    assert chunker.flush() == []


def test_clean_for_speech_keeps_meaningful_symbols() -> None:
    assert clean_for_speech("It is 25°C  in  snake_case land ™") == "It is 25°C in snake case land ™"


def test_a_colon_does_not_end_the_first_chunk() -> None:
    """What follows a colon belongs with it: "Paris." alone is often misheard (measured with Whisper)."""
    chunker = SentenceChunker(first_chunk_min_words=3)
    assert stream(chunker, "The answer is: Paris. ") == ["The answer is: Paris."]
    # A comma still ends a first chunk of enough words, so first audio comes early.
    assert stream(SentenceChunker(first_chunk_min_words=3), "Sure thing, my friend, it is Paris. ") == [
        "Sure thing, my friend,", "it is Paris."]
