"""Parts (c) and (d) of the GPU engine benchmark (`gpu_engine.py`): simulated speak-first sessions, each with
a real-time playback clock, on the real `Engine` + `MindPacer` (turn end -> first reply token, underruns, step
times), and the same sessions served naively by one HF `generate()` per brain per turn."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from gpu_common import Args, pct

from brains.backends.cuda_graphs import DEFAULT_BUCKETS
from brains.backends.decoder import ArchSpec, DecoderLM
from brains.backends.torch_backend import TorchBackend
from brains.engine import Engine
from brains.pacer import MindPacer, ReplyDelta
from brains.prompts import PromptBuilder
from brains.scheduler import SchedulerConfig
from common.config import LlmConfig, MindConfig


class SimTokenizer:
    """Enough of a tokenizer for PromptBuilder: every token reads as one word ending a sentence."""

    eos_token_id = None
    unk_token_id = -1

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [(ord(c) * 31 + i) % 1000 + 10 for i, c in enumerate(text)]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return " w." * len(ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id

    def apply_chat_template(self, chat: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = True) -> Any:
        """ChatML, as SmolLM2 and Qwen render it: PromptBuilder measures and caches each message's tokens."""
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
        if add_generation_prompt:
            text += "<|im_start|>assistant\n"
        return self.encode(text) if tokenize else text


class PlaybackClock:
    """The client's audio queue: reply tokens add audio, playback drains it in real time."""

    def __init__(self, ms_per_token: float) -> None:
        self.ms = ms_per_token
        self.end: float | None = None
        self.underruns = 0
        self.gap_ms = 0.0

    def ahead_ms(self) -> float:
        return 0.0 if self.end is None else max(0.0, (self.end - time.perf_counter()) * 1e3)

    def push(self, n: int, now: float) -> None:
        if self.end is None:
            self.end = now
        elif now > self.end:  # the queue ran dry before this audio arrived: an audible gap
            self.underruns += 1
            self.gap_ms += (now - self.end) * 1e3
            self.end = now
        self.end += n * self.ms / 1e3


@dataclass
class SimResult:
    latencies_ms: list[float] = field(default_factory=list)
    underruns: int = 0
    gap_ms: float = 0.0
    turns: int = 0
    missed: int = 0  # turns whose first reply token never came before the run was stopped
    reply_tokens: int = 0


def _user_turn(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(1000, 30000) for _ in range(n)]


async def _session(i: int, a: Args, deadline: float, res: SimResult, reply: Any) -> None:
    """One simulated caller: speaks, waits for the reply to play out, speaks again, until the deadline."""
    rng = random.Random(1000 + i)
    system = _user_turn(random.Random(7), 96)  # one system prompt shared by all sessions
    conv = system + _user_turn(rng, rng.randrange(20, 60))
    await asyncio.sleep(rng.uniform(0.0, a.speech_s[1]) + rng.uniform(*a.speech_s))
    while time.perf_counter() < deadline:
        clock = PlaybackClock(a.ms_per_token)
        t_end = time.perf_counter()
        res.turns += 1
        res.missed += 1  # until the first token arrives
        first, n = await reply(i, conv, clock, t_end)
        if first is not None:
            res.missed -= 1
            res.latencies_ms.append((first - t_end) * 1e3)
        res.underruns += clock.underruns
        res.gap_ms += clock.gap_ms
        res.reply_tokens += n
        if time.perf_counter() >= deadline:
            break
        await asyncio.sleep(max(0.0, (clock.end or 0.0) - time.perf_counter()) + rng.uniform(*a.speech_s))
        conv = conv + _user_turn(rng, n) + _user_turn(rng, rng.randrange(20, 60))
        if len(conv) > a.max_len // 2:  # keep the system prompt and the recent history
            conv = system + conv[-(a.max_len // 2 - len(system)):]


async def _run_sessions(n: int, a: Args, reply: Any) -> SimResult:
    res = SimResult()
    deadline = time.perf_counter() + a.duration
    tasks = [asyncio.create_task(_session(i, a, deadline, res, reply)) for i in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=a.duration + a.grace)
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for t in tasks:
        if t.done() and not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return res


def _summary(n: int, res: SimResult, wall: float, extra: dict[str, Any]) -> dict[str, Any]:
    lat = res.latencies_ms
    return {"sessions": n, "turns": res.turns, "replies": len(lat), "missed": res.missed,
            "first_token_ms_p50": pct(lat, 50), "first_token_ms_p95": pct(lat, 95),
            "first_token_ms_max": max(lat) if lat else None, "underruns": res.underruns,
            "underrun_ms": res.gap_ms, "reply_tokens": res.reply_tokens, "wall_s": wall, **extra}


class TimedEngine(Engine):
    """The engine, recording each step's host time (including the decode's sync) and whether it prefilled."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.step_times: list[tuple[float, bool]] = []

    def _execute(self, plan: Any) -> None:
        t0 = time.perf_counter()
        super()._execute(plan)
        self.step_times.append(((time.perf_counter() - t0) * 1e3, bool(plan.prefill)))


def _step_stats(times: list[tuple[float, bool]]) -> dict[str, Any]:
    all_ms = [t for t, _ in times]
    pre = [t for t, p in times if p]
    return {"step_ms_p50": pct(all_ms, 50), "step_ms_p95": pct(all_ms, 95), "step_ms_max": max(all_ms, default=None),
            "prefill_steps": len(pre), "prefill_step_ms_p50": pct(pre, 50), "prefill_step_ms_p95": pct(pre, 95),
            "prefill_step_ms_max": max(pre, default=None)}


def engine_sessions(model: DecoderLM, a: Args, variant: str) -> dict[str, Any]:
    cuda = model.device.type == "cuda"
    slots = int(2.5 * max(a.sessions)) + 8
    max_batch = 2 * max(a.sessions)
    buckets = sorted({b for b in (*DEFAULT_BUCKETS, 192, 256) if b < max_batch} | {max_batch})
    t0 = time.perf_counter()
    backend = TorchBackend(model, slots, cuda_graphs=True, graph_buckets=buckets, logits_on_device=cuda,
                           attention="torch" if variant == "graph+sdpa" or not cuda else "triton",
                           compile=variant == "graph+compile")
    setup = time.perf_counter() - t0
    llm = LlmConfig(max_reply_tokens=a.reply_tokens, temperature=0.0, max_seq_len=a.max_len)
    mind = MindConfig(mode="speak-first", thought_segment_tokens=a.thought_segment,
                      reply_segment_tokens=100, max_thought_tokens=a.thought_tokens)
    prompts = PromptBuilder(SimTokenizer(), llm, mind)
    sched = SchedulerConfig(token_budget=max_batch + 128, max_batch=max_batch, prefill_chunk=128)
    rows = []
    for run, n in enumerate([1, *a.sessions]):  # run 0 warms up the eager prefill path and is dropped
        warmup = run == 0 and not a.quick
        engine = TimedEngine(backend, sched)
        engine.start()

        async def reply(i: int, conv: list[int], clock: PlaybackClock, t_end: float,
                        engine: Engine = engine) -> tuple[float | None, int]:
            pacer = MindPacer(engine, prompts, mind, llm, "speak-first", session_id=f"s{i}",
                              audio_ahead_ms=clock.ahead_ms)
            first, count = None, 0
            async for ev in pacer.run(conv):
                if isinstance(ev, ReplyDelta):
                    now = time.perf_counter()
                    first = first or now
                    k = ev.text.count("w")
                    clock.push(k, now)
                    count += k
            return first, count

        t0 = time.perf_counter()
        res = asyncio.run(_run_sessions(n, replace(a, duration=3.0, speech_s=(0.2, 0.5)) if warmup else a, reply))
        wall = time.perf_counter() - t0
        engine.close()
        st = engine.stats
        extra = {"engine_steps": st.steps, "step_ms_mean": st.busy_seconds / max(1, st.steps) * 1e3,
                 "decode_tok_s": st.decode_tokens / wall, "max_batch": st.max_batch,
                 "prefill_tokens": st.prefill_tokens, "prefill_saved": st.prefill_tokens_saved,
                 "busy_frac": st.busy_seconds / wall, **_step_stats(engine.step_times)}
        if not warmup:
            rows.append(_summary(n, res, wall, extra))
            print(f"  engine  {n:4d} sessions: {rows[-1]}", flush=True)
    del backend
    return {"variant": variant, "slots": slots, "buckets": buckets, "setup_s": setup,
            "scheduler": asdict(sched), "rows": rows}


def hf_model(spec: ArchSpec, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen3Config

    cls = Qwen3Config if spec.qk_norm else Qwen2Config
    kw = dict(vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.ffn_dim,
              num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
              num_key_value_heads=spec.n_kv_heads, rms_norm_eps=spec.rms_eps, max_position_embeddings=32768,
              tie_word_embeddings=spec.tie_embeddings)
    if spec.qk_norm:
        kw["head_dim"] = spec.head_dim
    try:
        cfg = cls(rope_theta=spec.rope_theta, **kw)
    except TypeError:
        cfg = cls(**kw)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def baseline_sessions(spec: ArchSpec, a: Args, device: torch.device) -> dict[str, Any]:
    """A naive server: per turn, one generate() per brain (FB thought, AB reply), each in its own thread."""
    hf = hf_model(spec, device, a.dtype if device.type == "cuda" else torch.float32)
    rows = []
    for run, n in enumerate([1, *a.sessions]):  # run 0 warms up and is dropped
        warmup = run == 0 and not a.quick
        t0 = time.perf_counter()
        res = _baseline_run(hf, n, replace(a, duration=3.0, speech_s=(0.2, 0.5)) if warmup else a, device)
        if not warmup:
            rows.append(_summary(n, res, time.perf_counter() - t0, {}))
            print(f"  hf      {n:4d} sessions: {rows[-1]}", flush=True)
    return {"kind": "hf-generate", "cache": "dynamic (generate's default)", "threads": "2 per session",
            "rows": rows}


class _HFStreamer:
    """transformers' streamer protocol: the first put() is the prompt, then one per new token."""

    def __init__(self, on_token: Any) -> None:
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.on_token(int(value.numel()))
        self.prompt_seen = True

    def end(self) -> None:
        pass


def _baseline_run(hf: Any, n: int, a: Args, device: torch.device) -> SimResult:
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    stop = threading.Event()
    prompts = PromptBuilder(SimTokenizer(), LlmConfig(), MindConfig())

    class Stop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kw: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    def generate(prompt: list[int], max_new: int, on_token: Any) -> None:
        ids = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, min_new_tokens=max_new,
                        do_sample=False, streamer=_HFStreamer(on_token), pad_token_id=0,
                        stopping_criteria=StoppingCriteriaList([Stop()]))

    pool = ThreadPoolExecutor(max_workers=2 * n)

    async def reply(i: int, conv: list[int], clock: PlaybackClock, t_end: float) -> tuple[float | None, int]:
        state: dict[str, Any] = {"first": None, "n": 0}

        def on_ab(k: int) -> None:
            now = time.perf_counter()
            state["first"] = state["first"] or now
            clock.push(k, now)
            state["n"] += k

        loop = asyncio.get_running_loop()
        fb = loop.run_in_executor(pool, generate, prompts.fb_prompt(conv), a.thought_tokens, lambda k: None)
        ab = loop.run_in_executor(pool, generate, prompts.ab_prompt(conv, [], []), a.reply_tokens, on_ab)
        await asyncio.gather(fb, ab)
        return state["first"], state["n"]

    try:
        return asyncio.run(_run_sessions(n, a, reply))
    finally:
        stop.set()  # generate() calls still running end at their next token
        pool.shutdown(wait=True)
