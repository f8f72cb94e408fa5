"""Piper's HiFi-GAN decoder (latent frames -> waveform) in torch, read out of the voice's own ONNX file.

Why: the decoder is about 70% of Piper's work (measured on the joe medium voice: 100 of 140 ms for 1.7 s of speech
on one CPU thread), and it is a plain stack of convolutions, so it batches across sessions on a GPU. The rest of
the graph (text encoder, duration predictor, flow: thousands of small ops) stays in onnxruntime on the CPU
(tts/vocoder.py), and `split_piper` cuts the ONNX graph at the decoder's input.

Batches are exact: each item is padded with zeros to the longest, and every convolution's input is zeroed past
the item's own length at that layer's rate, which is what the convolution's own zero padding gives an item alone.
So an item decodes to the same samples alone or in any batch (up to float rounding).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from common.errors import EngineError
from common.torch_device import torch_device

# VITS's generator: LeakyReLU 0.1 inside, then PyTorch's default 0.01 before the last convolution (Piper's
# vits/models.py Generator; the equality test against the whole ONNX graph holds us to it).
_SLOPE = 0.1
_LAST_SLOPE = 0.01
_PREFIX = "dec."


@dataclass(frozen=True)
class _Conv:
    """One convolution of the decoder, as the ONNX graph runs it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: int
    padding: int
    dilation: int

    def __call__(self, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        if transpose:
            return F.conv_transpose1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)
        return F.conv1d(x, self.weight, self.bias, stride=self.stride, padding=self.padding, dilation=self.dilation)

    def to(self, device: torch.device) -> _Conv:
        bias = None if self.bias is None else self.bias.to(device)
        return _Conv(self.weight.to(device), bias, self.stride, self.padding, self.dilation)


@dataclass(frozen=True)
class PiperParts:
    """A Piper voice cut at the decoder: the ONNX graph up to the decoder's input, and the decoder."""

    front: bytes  # a serialized ONNX model: the voice's inputs -> latent frames [1, channels, frames]
    decoder: HifiGan


class HifiGan:
    """Latent frames [batch, channels, frames] with each item's frame count -> waveforms [batch, frames * hop].

    Holds the decoder's weights on one device; `__call__` is pure, so one thread may run it while others read it.
    """

    def __init__(self, convs: dict[str, _Conv], device: torch.device) -> None:
        self.device = device
        self._convs = {name: conv.to(device) for name, conv in convs.items()}
        self._ups = _count(convs, r"ups\.(\d+)$")
        if not self._ups or "conv_pre" not in convs or "conv_post" not in convs:
            raise EngineError("not a Piper HiFi-GAN decoder: no dec.conv_pre / dec.ups.N / dec.conv_post weights")
        if any(name.startswith("cond") for name in convs):
            raise EngineError("multi-speaker Piper voices (a speaker-conditioned decoder) need tts.decoder = \"onnx\"")
        blocks = _count(convs, r"resblocks\.(\d+)\.")
        if blocks % self._ups:
            raise EngineError(f"Piper decoder: {blocks} residual blocks over {self._ups} upsampling layers")
        self._kernels = blocks // self._ups  # residual blocks per upsampling layer, averaged
        # ResBlock2 (low/medium voices): convs.J; ResBlock1 (high): convs1.J, each followed by convs2.J.
        self._block_convs = [
            [(f"resblocks.{k}.convs1.{j}", f"resblocks.{k}.convs2.{j}") if f"resblocks.{k}.convs1.0" in convs
             else (f"resblocks.{k}.convs.{j}",) for j in range(_count(convs, rf"resblocks\.{k}\.convs1?\.(\d+)$"))]
            for k in range(blocks)]
        for i in range(self._ups):  # each upsampling gives exactly `stride` samples a frame: trimming relies on it
            up = convs[f"ups.{i}"]
            if up.weight.shape[-1] - 2 * up.padding != up.stride:
                raise EngineError(f"Piper decoder: ups.{i} (kernel {up.weight.shape[-1]}, stride {up.stride}, "
                                  f"padding {up.padding}) does not upsample by exactly its stride")
        self.hop = int(np.prod([convs[f"ups.{i}"].stride for i in range(self._ups)]))

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto, device: torch.device) -> HifiGan:
        """Read the decoder's weights and each convolution's stride, padding and dilation from Piper's graph."""
        weights = {init.name: init for init in model.graph.initializer if init.name.startswith(_PREFIX)}
        convs: dict[str, _Conv] = {}
        for node in model.graph.node:
            if node.op_type not in ("Conv", "ConvTranspose") or not node.input[1].startswith(_PREFIX):
                continue
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            pads = list(attrs.get("pads", [0, 0]))
            if len(pads) != 2 or pads[0] != pads[1] or int(attrs.get("group", 1)) != 1:
                raise EngineError(f"Piper decoder: {node.name} has padding {pads} / groups, not a VITS decoder's")
            name = node.input[1][len(_PREFIX):].removesuffix(".weight")
            bias = node.input[2] if len(node.input) > 2 else None
            if node.input[1] not in weights or (bias is not None and bias not in weights):
                # e.g. weight norm left in the export: the weight is computed in the graph, not stored
                raise EngineError(f"Piper decoder: {node.name}'s weights are not stored tensors of the graph")
            convs[name] = _Conv(
                weight=_tensor(weights[node.input[1]]),
                bias=None if bias is None else _tensor(weights[bias]),
                stride=int(attrs.get("strides", [1])[0]), padding=int(pads[0]),
                dilation=int(attrs.get("dilations", [1])[0]))
        return cls(convs, device)

    @torch.inference_mode()
    def __call__(self, latents: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """latents [B, C, T] (zero past each item's frames), frames [B] -> waveforms [B, T * hop] in [-1, 1]."""
        c = self._convs
        mask = _Mask(frames, latents.shape[-1])
        rate = 1  # output samples per latent frame at the current layer
        x = c["conv_pre"](latents)
        for i in range(self._ups):
            x = c[f"ups.{i}"](mask(F.leaky_relu(x, _SLOPE), rate), transpose=True)
            rate *= c[f"ups.{i}"].stride
            level = sum(self._block(k, x, mask, rate) for k in range(i * self._kernels, (i + 1) * self._kernels))
            x = level / self._kernels
        x = mask(F.leaky_relu(x, _LAST_SLOPE), rate)
        return torch.tanh(c["conv_post"](x))[:, 0, :]

    def _block(self, k: int, x: torch.Tensor, mask: _Mask, rate: int) -> torch.Tensor:
        for names in self._block_convs[k]:
            y = x
            for name in names:
                y = self._convs[name](mask(F.leaky_relu(y, _SLOPE), rate))
            x = x + y
        return x


class _Mask:
    """Zeroes each item of a batch past its own end, at a layer's rate (samples per latent frame)."""

    def __init__(self, frames: torch.Tensor, longest: int) -> None:
        self._frames = frames
        self._padded = bool((frames < longest).any())  # one item, or all of one length: nothing to zero
        self._keep: dict[int, torch.Tensor] = {}  # by rate: built once per call, each a few kernel launches

    def __call__(self, x: torch.Tensor, rate: int) -> torch.Tensor:
        if not self._padded:
            return x
        keep = self._keep.get(rate)
        if keep is None:
            keep = torch.arange(x.shape[-1], device=x.device)[None, :] < (self._frames * rate)[:, None]
            keep = self._keep[rate] = keep[:, None, :].to(x.dtype)
        return x * keep


def split_piper(model_path: str | Path, device: str) -> PiperParts:
    """Cut a Piper voice's ONNX graph at its decoder: the front as ONNX bytes, the decoder in torch on `device`."""
    model = onnx.load(str(model_path))
    pre = [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == f"{_PREFIX}conv_pre.weight"]
    if len(pre) != 1:
        raise EngineError(f"{model_path}: no Piper decoder input (dec.conv_pre) to cut the graph at")
    stored = {init.name for init in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in stored]
    # The decoder's input is the flow's output times the frame mask: zero past the last frame, as batching needs.
    front = onnx.utils.Extractor(model).extract_model(inputs, [pre[0].input[0]])
    decoder = HifiGan.from_onnx(model, torch_device("tts.device", device, 'tts.decoder = "torch"'))
    return PiperParts(front=front.SerializeToString(), decoder=decoder)


def _tensor(init: onnx.TensorProto) -> torch.Tensor:
    return torch.from_numpy(np.array(numpy_helper.to_array(init), dtype=np.float32))


def _count(convs: dict[str, _Conv], pattern: str) -> int:
    """1 + the largest index N that `pattern`'s group matches among the conv names (0 when none)."""
    found = [int(m.group(1)) for name in convs if (m := re.match(pattern, name))]
    return max(found) + 1 if found else 0
