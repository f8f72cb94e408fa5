"""`duet export-hf`: the bundled GGUF becomes a Hugging Face safetensors folder that loads the same model."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from brains.backends.loader import load_decoder
from common.config import LlmConfig
from duet.cli import main


@pytest.fixture
def out(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "smollm2"
    yield path
    shutil.rmtree(path, ignore_errors=True)  # half a GB of float32 weights


@pytest.mark.integration
def test_exported_folder_loads_and_predicts_like_the_gguf(out: Path) -> None:
    assert main(["export-hf", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").is_file()

    gguf, gguf_tok = load_decoder(LlmConfig(max_seq_len=64))
    folder, folder_tok = load_decoder(LlmConfig(model=str(out), max_seq_len=64))
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = gguf_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids2 = folder_tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids, ids2 = ids["input_ids"], ids2["input_ids"]
    assert list(ids) == list(ids2)  # same tokenizer and chat template
    assert folder_tok.eos_token_id == gguf_tok.eos_token_id

    tokens = torch.tensor([list(ids)])
    n = tokens.shape[1]
    logits = []
    for decoder in (gguf, folder):
        cache = decoder.new_cache(1)
        logits.append(decoder.forward(cache, tokens, torch.arange(n)[None], torch.tensor([0]), kv_len=n)[0])
    assert int(logits[0].argmax()) == int(logits[1].argmax())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)
