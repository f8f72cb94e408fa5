"""Export a model Duet can load into a plain Hugging Face folder (config, safetensors, tokenizer).

vLLM cannot read the bundled SmolLM2 GGUF (Q4_1, with transformers' own GGUF naming); transformers can,
dequantizing it. `duet export-hf --out DIR` writes what transformers loaded as a safetensors folder that
vLLM (configs/vllm.toml) and the torch engine (`llm.model = DIR`) both load.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from pathlib import Path

from brains.backends.loader import load_hf_model, load_tokenizer
from common.config import LlmConfig

log = logging.getLogger(__name__)


def export_hf(out: str | Path, cfg: LlmConfig | None = None) -> Path:
    """Write `cfg.model` (default: the bundled SmolLM2 GGUF) to `out` as a Hugging Face safetensors folder."""
    cfg = cfg or LlmConfig()
    cfg = dataclasses.replace(cfg, device="cpu")  # exporting never needs an accelerator
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg)
    model = load_hf_model(cfg)
    _forget_gguf(model)
    # transformers 4 defaults to safetensors but takes the flag; transformers 5 only writes safetensors.
    kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(
        model.save_pretrained).parameters else {}
    model.save_pretrained(out, **kwargs)
    tokenizer.save_pretrained(out)
    if not any(out.glob("*.safetensors")):
        raise RuntimeError(f"export wrote no safetensors file to {out}")
    log.info("exported %s (%s) to %s", cfg.model, cfg.dtype, out)
    return out


def _forget_gguf(model: object) -> None:
    """A GGUF loads dequantized (plain float tensors) but keeps its GGUF "quantizer", which refuses to save
    and would tell loaders to expect GGUF weights: drop it, so the folder is an ordinary float checkpoint."""
    if getattr(model, "quantization_method", None) is None and getattr(model, "hf_quantizer", None) is None:
        return
    model.hf_quantizer = None  # type: ignore[attr-defined]
    model.is_quantized = False  # type: ignore[attr-defined]
    model.quantization_method = None  # type: ignore[attr-defined]
    config = model.config  # type: ignore[attr-defined]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
