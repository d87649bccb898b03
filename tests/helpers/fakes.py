"""Scripted engines for sampling tests: deterministic text, and failures on demand.

Factories are module-level functions (used through functools.partial) so Ray can ship them to actors;
the tests register this module for pickling by value, so workers need not import it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from recalign.sampling.engines import Completion, PromptResult


class FakeEngine:
    """Completion j of a prompt is 'analysis j of <last history line>'; `drop` completions go missing.

    `noisy`: each completion also carries a draw from the engine's random stream, which runs on across
    calls until `reseed` restarts it, like a real sampler's generator."""

    name = "fake"

    def __init__(self, seed: int = 7, drop: int = 0, noisy: bool = False):
        self.drop = drop
        self.noisy = noisy
        self.calls = 0
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def generate(self, prompts, n, max_new_tokens, temperature, top_p):
        self.calls += 1
        results = []
        for prompt in prompts:
            tag = prompt.split("\n")[-4][:40] if prompt.count("\n") >= 4 else prompt[:40]
            noise = [f" #{self.rng.integers(10**6)}" if self.noisy else "" for _ in range(n)]
            completions = [Completion(f"analysis {j} of {tag}{noise[j]}", 3 + j, "stop" if j % 2 else "length")
                           for j in range(n - self.drop)]
            results.append(PromptResult(len(prompt.split()), completions))
        return results


def fake_engine(seed: int = 7, drop: int = 0, noisy: bool = False) -> FakeEngine:
    return FakeEngine(seed, drop, noisy)


class _Crashing(FakeEngine):
    def __init__(self, marker: str, mode: str, on_call: int):
        super().__init__()
        self.marker, self.mode, self.on_call = Path(marker), mode, on_call

    def generate(self, prompts, n, max_new_tokens, temperature, top_p):
        # The marker makes the failure happen once per test, across actor restarts.
        if self.calls + 1 >= self.on_call and not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            if self.mode == "exit":
                os._exit(1)  # the actor process dies: Ray restarts it and retries the batch
            raise RuntimeError("scripted engine failure")
        return super().generate(prompts, n, max_new_tokens, temperature, top_p)


def crashing_engine(marker: str, mode: str = "exit", on_call: int = 1) -> FakeEngine:
    """An engine that kills its process (mode=exit) or raises (mode=raise) once, at its `on_call`-th batch."""
    return _Crashing(marker, mode, on_call)


class AdapterEchoEngine(FakeEngine):
    """Greedy answers that name the adapter (or "base") and the prompt's position in the call."""

    def generate(self, prompts, n, max_new_tokens, temperature, top_p, adapters=None):
        adapters = adapters or [None] * len(prompts)
        return [PromptResult(1, [Completion(answer(p, a), 2, "stop")]) for p, a in zip(prompts, adapters)]


def answer(prompt: str, adapter: str | None) -> str:
    import hashlib

    return f"{os.path.basename(adapter) if adapter else 'base'} on {hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def adapter_echo_engine() -> AdapterEchoEngine:
    return AdapterEchoEngine()
