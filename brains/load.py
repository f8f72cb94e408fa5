"""The engine a configuration names (`llm.backend`), and the prompt builder on its tokenizer: what `duet serve`
gives its sessions, and what `duet engine` serves to other processes."""

from __future__ import annotations

from brains.backends.loader import load_decoder, load_tokenizer
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine, GenerationEngine
from brains.prompts import PromptBuilder
from brains.scheduler import SchedulerConfig
from common.config import DuetConfig


def load_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """Not started: the caller starts it once the rest of its process is loaded."""
    if config.llm.backend == "vllm":
        return _vllm_engine(config)
    if config.llm.backend == "remote":
        return _remote_engine(config)
    decoder, tokenizer = load_decoder(config.llm)
    prompts = PromptBuilder(tokenizer, config.llm, config.mind)
    gpu = decoder.device.type == "cuda"
    backend = TorchBackend(decoder, config.llm.max_slots, cuda_graphs=gpu and config.llm.cuda_graphs,
                           compile=gpu and config.llm.compile, logits_on_device=gpu)
    engine = Engine(backend, SchedulerConfig(
        token_budget=config.llm.step_token_budget, max_batch=config.llm.max_slots,
        prefill_chunk=config.llm.prefill_chunk, urgent_audio_ms=config.mind.urgent_audio_ms),
        eos_ids=prompts.stop_ids)
    return engine, prompts


def _vllm_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """llm.backend = "vllm": vLLM's engine on llm.model (a Hugging Face folder), the prompts from its tokenizer.
    vLLM is imported only here, so the torch stack never needs it installed."""
    from brains.backends.vllm_engine import VllmEngine

    prompts = PromptBuilder(load_tokenizer(config.llm), config.llm, config.mind)
    engine = VllmEngine(config.llm, urgent_audio_ms=config.mind.urgent_audio_ms, eos_ids=prompts.stop_ids)
    return engine, prompts


def _remote_engine(config: DuetConfig) -> tuple[GenerationEngine, PromptBuilder]:
    """llm.backend = "remote": an OpenAI-compatible completions server at llm.remote_url (vLLM, SGLang or
    `duet engine`). Only the tokenizer is loaded here (llm.model: the served model's, so our prompt ids are the
    server's and detokenization stays ours)."""
    from brains.backends.remote import RemoteEngine

    prompts = PromptBuilder(load_tokenizer(config.llm), config.llm, config.mind)
    engine = RemoteEngine(config.llm, urgent_audio_ms=config.mind.urgent_audio_ms, eos_ids=prompts.stop_ids)
    return engine, prompts
