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
    chunks = stream(SentenceChunker(first_chunk_min_words=3, first_chunk_max_words=0), text)
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
    # The word cut too.
    assert stream(chunker, "Paris is lovely in the spring. Sure.") == ["Paris is lovely", "in the spring.", "Sure."]
    assert stream(chunker, "Paris is lovely in the spring.") == ["Paris is lovely", "in the spring."]


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


# ---------------------------------------------------------------- the first chunk: a few words


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
@pytest.mark.parametrize(("text", "chunks"), [
    ("The capital of France is Paris. It is old.", ["The capital of France", "is Paris.", "It is old."]),
    ("Paris is the capital of France.", ["Paris is the capital", "of France."]),
    ("The largest planet in our solar system is Jupiter.", ["The largest planet", "in our solar system is Jupiter."]),
    ("There are seven days in a week.", ["There are seven days", "in a week."]),
    # A short sentence stays whole: any cut would leave one word ("legs.").
    ("A spider has eight legs. Yes.", ["A spider has eight legs.", "Yes."]),
    # Never after a function word, and never before a word that is not one (inside a phrase).
    ("The sky on a clear day is blue.", ["The sky on a clear day is blue."]),
    ("Jupiter is the largest planet in the sky.", ["Jupiter is the largest planet", "in the sky."]),
])
def test_first_chunk_is_its_first_words_at_a_phrase_boundary(text: str, chunks: list[str], step: int) -> None:
    assert stream(SentenceChunker(first_chunk_min_words=3, first_chunk_max_words=5), text, step) == chunks


def test_the_first_words_are_out_as_soon_as_the_word_after_the_next_begins() -> None:
    chunker = SentenceChunker(first_chunk_min_words=3, first_chunk_max_words=5)
    assert chunker.push("The capital of France is") == []  # "is" might still be "isn't" or the end
    assert chunker.push(" P") == ["The capital of France"]
    assert chunker.push("aris. It") == ["is Paris."]
    assert chunker.flush() == ["It"]


@pytest.mark.parametrize("text", [
    "The answer is: Paris. ",  # the colon guard: what follows a colon stays with it
    "The capital of France is Paris. ",  # "is Paris." two words, fine
    "France is beautiful indeed.",
    "My friend Bob is here.",
    "The capital of France\nis Paris.",
    "One two three four five six seven eight nine.",
    "The capital of France is.",
])
def test_a_word_cut_never_leaves_a_one_word_rest(text: str) -> None:
    for step in (1, 4, 1000):
        chunks = stream(SentenceChunker(first_chunk_min_words=1, first_chunk_max_words=8), text, step)
        assert "".join(chunks).replace(" ", "") == text.replace(" ", "").replace("\n", "").strip()
        if len(chunks) > 1 and len(chunks[0].split()) <= 8:
            assert len(chunks[1].split()) >= 2, chunks
    assert stream(SentenceChunker(first_chunk_min_words=3), "The answer is: Paris. ") == ["The answer is: Paris."]


def test_no_word_cut_past_max_words_or_when_off() -> None:
    text = "Big old red barn cats usually sleep in the hay."
    # "sleep" (word 7) is the first content word before a phrase start ("in").
    assert stream(SentenceChunker(first_chunk_max_words=5), text) == [text]
    assert stream(SentenceChunker(first_chunk_max_words=7), text) == [
        "Big old red barn cats usually sleep", "in the hay."]
    assert stream(SentenceChunker(first_chunk_max_words=0), "The capital of France is Paris.") == [
        "The capital of France is Paris."]


def test_only_the_first_chunk_is_cut_at_words() -> None:
    text = "Yes. The capital of France is Paris. The food is great."
    assert stream(SentenceChunker(first_chunk_min_words=3, first_chunk_max_words=5), text) == [
        "Yes.", "The capital of France is Paris.", "The food is great."]
