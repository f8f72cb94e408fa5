"""Our slot-cache decoder computes what the transformers model definitions compute."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from brains.backends.decoder import ArchSpec, DecoderLM
from brains.backends.loader import load_decoder, load_hf_model, load_tokenizer
from common.config import LlmConfig


def _tiny_folder(tmp: Path, model_type: str) -> Path:
    """A random-weight model of a real architecture family, saved like a downloaded HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(LlmConfig())
    cfg = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        tie_word_embeddings=model_type == "qwen2")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    if model_type == "qwen2":  # give the q/k/v biases values, so a dropped bias would show
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                torch.nn.init.normal_(proj.bias, std=0.5)
    folder = tmp / model_type
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "llama"])
def test_local_model_folders_of_each_family_match_transformers(tmp_path: Path, model_type: str) -> None:
    folder = _tiny_folder(tmp_path, model_type)
    cfg = LlmConfig(model=str(folder), max_seq_len=64)
    decoder, _ = load_decoder(cfg)
    spec = decoder.spec
    assert spec.qk_norm == (model_type == "qwen3") and spec.qkv_bias == (model_type == "qwen2")
    hf = load_hf_model(cfg)
    tokens = torch.randint(0, spec.vocab_size, (1, 12))
    with torch.no_grad():
        ref = hf(tokens).logits[0]
    cache = decoder.new_cache(3)
    got = decoder.forward(cache, tokens, torch.arange(12)[None], torch.tensor([1]), kv_len=12, last_only=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_batched_decode_with_per_row_positions_equals_one_at_a_time(tmp_path: Path) -> None:
    decoder, _ = load_decoder(LlmConfig(model=str(_tiny_folder(tmp_path, "qwen3")), max_seq_len=64))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, decoder.spec.vocab_size, (n,), generator=g) for n in (5, 11, 8)]

    def prefill(cache, slot: int, p: torch.Tensor) -> None:
        decoder.forward(cache, p[None], torch.arange(len(p))[None], torch.tensor([slot]), kv_len=len(p))

    solo = decoder.new_cache(4)
    expected = []
    for i, p in enumerate(prompts):
        prefill(solo, i, p)
        expected.append(decoder.forward(solo, p[-1:][None], torch.tensor([[len(p)]]), torch.tensor([i]),
                                        kv_len=len(p) + 1)[0])
    batch = decoder.new_cache(4)
    for slot, p in zip((3, 0, 2), prompts, strict=True):
        prefill(batch, slot, p)
    got = decoder.forward(batch, torch.stack([p[-1:] for p in prompts]), torch.tensor([[len(p)] for p in prompts]),
                          torch.tensor([3, 0, 2]), kv_len=12)
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-4, atol=1e-4)


def test_copied_prefix_gives_the_same_logits_as_prefilling_it(tmp_path: Path) -> None:
    decoder, _ = load_decoder(LlmConfig(model=str(_tiny_folder(tmp_path, "llama")), max_seq_len=64))
    tokens = torch.randint(0, decoder.spec.vocab_size, (1, 10))
    cache = decoder.new_cache(2)
    fresh = decoder.forward(cache, tokens, torch.arange(10)[None], torch.tensor([0]), kv_len=10)
    cache.copy_prefix(0, 1, 7)
    reused = decoder.forward(cache, tokens[:, 7:], torch.arange(7, 10)[None], torch.tensor([1]), kv_len=10)
    torch.testing.assert_close(reused, fresh, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def smollm2() -> tuple[DecoderLM, Any]:
    return load_decoder(LlmConfig(max_seq_len=256))


@pytest.mark.integration
def test_bundled_smollm2_matches_transformers(smollm2: tuple[DecoderLM, Any]) -> None:
    decoder, tokenizer = smollm2
    hf = load_hf_model(LlmConfig())
    tokens = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    n = tokens.shape[1]
    with torch.no_grad():
        ref = hf(tokens).logits[0]
    got = decoder.forward(decoder.new_cache(1), tokens, torch.arange(n)[None], torch.tensor([0]), kv_len=n,
                          last_only=False)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)


# Plain prose, not in any prompt the engine builds. Teacher-forced, every position is scored.
_TEXT = ("The Eiffel Tower was built for the 1889 World's Fair in Paris. At first many artists disliked it, "
         "but it soon became the best known symbol of the city. Every year millions of visitors climb its "
         "stairs or take the lifts to the top, where they can see far across the river and the rooftops. "
         "Photosynthesis is the process by which green plants use sunlight to turn water and carbon dioxide "
         "into sugar and oxygen. It takes place mostly in the leaves, inside small structures called "
         "chloroplasts. To make a cup of tea, boil fresh water, pour it over the leaves or a tea bag, and let "
         "it steep for three to five minutes before adding milk or lemon if you like.")
_PROMPTS = ("The capital of France is", "Water boils at a temperature of", "Once upon a time, in a small village,")

# int8 is judged by what a listener would notice: does it pick the same next tokens, and does it find the
# text as likely, not by a cosine of one logit vector (that read 0.949 on one AMD EPYC and 0.979 on another
# machine for the same, correct code). Measured on an AMD EPYC with avx512_vnni, torch 2.13, each ISA path
# forced (FBGEMM_ENABLE_INSTRUCTIONS=AVX2|AVX512|AVX512_E1 picks fbgemm's int8 kernels; ATEN_CPU_CAPABILITY=
# default|avx2|avx512 the float ops around them). float32 perplexity 12.31 on _TEXT everywhere.
#
#   path (fbgemm / aten)             prefill: ppl ratio, top-1   decode: ppl ratio, top-1   greedy match
#   VNNI, AVX2, AVX512 / avx512      1.089, 0.896                1.055, 0.889               5, 9, 5
#   VNNI / avx2                      1.059, 0.882                1.036, 0.910               5, 9, 5
#   VNNI / default                   1.053, 0.889                1.053, 0.910               5, 9, 5
#   before the fix: VNNI / avx512    1.028, 0.889                -                          5, 3, 1
#   before the fix: AVX2 / avx512    1.153, 0.875                -                          5, 0, 2
#
# fbgemm's three int8 paths now agree to the bit (brains/backends/int8.py says why they did not). Bounds
# leave room for the float ops: perplexity within 15%, top-1 agreement 80%, the first 3 greedy tokens.
_MAX_PPL_RATIO = 1.15
_MIN_TOP1 = 0.80
_GREEDY_TOKENS = 3


def _greedy(decoder: DecoderLM, prompt: torch.Tensor, steps: int) -> list[int]:
    cache, n = decoder.new_cache(1), prompt.shape[1]
    logits = decoder.forward(cache, prompt, torch.arange(n)[None], torch.tensor([0]), kv_len=n)[0]
    out: list[int] = []
    for i in range(steps):
        out.append(int(logits.argmax()))
        logits = decoder.forward(cache, torch.tensor([[out[-1]]]), torch.tensor([[n + i]]), torch.tensor([0]),
                                 kv_len=n + i + 1)[0]
    return out


@pytest.mark.integration
def test_bundled_smollm2_int8_picks_the_same_tokens_and_finds_text_as_likely(
        smollm2: tuple[DecoderLM, Any]) -> None:
    decoder, tokenizer = smollm2
    q8, _ = load_decoder(LlmConfig(max_seq_len=256, quantize="int8"))
    tokens = tokenizer(_TEXT, return_tensors="pt")["input_ids"]
    n = tokens.shape[1]

    def prefill(model: DecoderLM) -> torch.Tensor:
        return model.forward(model.new_cache(1), tokens, torch.arange(n)[None], torch.tensor([0]), kv_len=n,
                             last_only=False)[0]

    def one_at_a_time(model: DecoderLM) -> torch.Tensor:  # decode steps take another int8 path (one row)
        cache = model.new_cache(1)
        return torch.stack([model.forward(cache, tokens[:, i:i + 1], torch.tensor([[i]]), torch.tensor([0]),
                                          kv_len=i + 1)[0] for i in range(n)])

    def perplexity(logits: torch.Tensor) -> float:
        return float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], tokens[0, 1:])))

    ref = prefill(decoder)
    for path, got in (("prefill", prefill(q8)), ("decode", one_at_a_time(q8))):
        ratio = perplexity(got) / perplexity(ref)
        top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
        assert ratio < _MAX_PPL_RATIO, f"{path}: int8 perplexity {ratio:.3f}x float32's"
        assert top1 > _MIN_TOP1, f"{path}: int8 picks float32's top token at {top1:.0%} of positions"
    for text in _PROMPTS:
        prompt = tokenizer(text, return_tensors="pt")["input_ids"]
        want = _greedy(decoder, prompt, _GREEDY_TOKENS)
        assert _greedy(q8, prompt, _GREEDY_TOKENS) == want, (text, tokenizer.decode(want))


def test_weight_bytes_counts_every_weight_once() -> None:
    spec = ArchSpec(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=16, vocab_size=10,
                    rms_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    model = DecoderLM.random(spec, max_len=8, device="cpu", dtype=torch.float32)
    params = sum(t.numel() for layer in model.layers for t in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    params += model.embed.numel()
    assert spec.weight_bytes(4) == params * 4
