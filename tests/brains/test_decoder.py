"""Our slot-cache decoder computes what the transformers model definitions compute."""

from __future__ import annotations

import dataclasses
from pathlib import Path

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


@pytest.mark.integration
def test_bundled_smollm2_matches_transformers_and_int8_stays_close() -> None:
    cfg = LlmConfig(max_seq_len=64)
    decoder, tokenizer = load_decoder(cfg)
    hf = load_hf_model(cfg)
    tokens = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    n = tokens.shape[1]
    with torch.no_grad():
        ref = hf(tokens).logits[0, -1]
    got = decoder.forward(decoder.new_cache(1), tokens, torch.arange(n)[None], torch.tensor([0]), kv_len=n)[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3)
    q8, _ = load_decoder(dataclasses.replace(cfg, quantize="int8"))
    approx = q8.forward(q8.new_cache(1), tokens, torch.arange(n)[None], torch.tensor([0]), kv_len=n)[0]
    assert int(approx.argmax()) == int(ref.argmax())  # same greedy token: " Paris"
    assert float(torch.nn.functional.cosine_similarity(approx, ref, dim=0)) > 0.95  # measured 0.979


def test_weight_bytes_counts_every_weight_once() -> None:
    spec = ArchSpec(n_layers=2, d_model=8, n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=16, vocab_size=10,
                    rms_eps=1e-6, rope_theta=1e4, tie_embeddings=True)
    model = DecoderLM.random(spec, max_len=8, device="cpu", dtype=torch.float32)
    params = sum(t.numel() for layer in model.layers for t in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down))
    params += model.embed.numel()
    assert spec.weight_bytes(4) == params * 4
