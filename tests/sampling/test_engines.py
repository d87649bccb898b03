"""Both generation engines for real on CPU with the tiny Llama: N completions, counts, seeds, resource checks.

vLLM runs in a subprocess: its CPU worker replaces `torch.set_num_threads` process-wide, which must not
leak into the other tests of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from recalign.sampling.engines import EngineConfig, EngineError, HFEngine, check_model_dir, check_resources
from tests.helpers import REPO

PROMPTS = [
    "<|im_start|>user\nThe user enjoys dramas<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nGenres: Action, Adventure, Animation, Comedy, Crime, Drama, Thriller<|im_end|>\n"
    "<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def hf_engine(tiny_llama_dir):
    return HFEngine(str(tiny_llama_dir), seed=3, cfg=EngineConfig(engine="hf", threads=1))


def test_hf_engine_returns_n_completions_with_counts(hf_engine):
    results = hf_engine.generate(PROMPTS, n=3, max_new_tokens=8, temperature=1.0, top_p=1.0)
    assert [len(r.completions) for r in results] == [3, 3]
    expected_prompt_tokens = [len(hf_engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert [r.prompt_tokens for r in results] == expected_prompt_tokens
    for result in results:
        for c in result.completions:
            assert 1 <= c.num_tokens <= 8 and c.finish_reason in ("stop", "length")
            assert c.finish_reason == "stop" or c.num_tokens == 8
    assert len({c.text for r in results for c in r.completions}) > 1


def test_hf_engine_left_padding_does_not_change_a_prompts_completion(hf_engine):
    # Near-greedy sampling: the short prompt's answer must not depend on being padded next to a long one.
    alone = hf_engine.generate(PROMPTS[:1], n=1, max_new_tokens=6, temperature=1e-4, top_p=1.0)
    batched = hf_engine.generate(PROMPTS, n=1, max_new_tokens=6, temperature=1e-4, top_p=1.0)
    assert batched[0].completions[0].text == alone[0].completions[0].text


def test_hf_engine_greedy_gives_n_identical_completions(hf_engine):
    results = hf_engine.generate(PROMPTS, n=2, max_new_tokens=5, temperature=0.0, top_p=1.0)
    near_greedy = hf_engine.generate(PROMPTS, n=1, max_new_tokens=5, temperature=1e-4, top_p=1.0)
    for result, reference in zip(results, near_greedy):
        assert [c.text for c in result.completions] == [reference.completions[0].text] * 2


def test_hf_engine_prefills_each_prompt_once_for_its_n_samples(hf_engine, monkeypatch):
    """The shared cache gives the last prompt token the same logits as a full forward, for every copy
    and under left padding; and the only multi-token forward is one prefill of the unpadded batch."""
    import torch

    token_ids = [hf_engine.tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    batch = hf_engine.tokenizer.pad({"input_ids": token_ids}, return_tensors="pt")
    with torch.inference_mode():
        cache = hf_engine._shared_prefill(batch, 3)
        ids, mask = (v.repeat_interleave(3, dim=0) for v in (batch["input_ids"], batch["attention_mask"]))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        step = hf_engine.model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                               past_key_values=cache).logits[:, -1]
        for i, prompt_ids in enumerate(token_ids):
            full = hf_engine.model(input_ids=torch.tensor([prompt_ids])).logits[0, -1]
            for copy in range(3):
                torch.testing.assert_close(step[3 * i + copy], full, rtol=1e-4, atol=1e-4)

    widths = []
    forward = type(hf_engine.model).forward

    def counting(self, *args, **kwargs):
        widths.append(kwargs["input_ids"].shape)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(hf_engine.model), "forward", counting)
    hf_engine.generate(PROMPTS, n=3, max_new_tokens=4, temperature=1.0, top_p=1.0)
    longest = max(len(t) for t in token_ids)
    assert widths[0] == (2, longest - 1), "one prefill of the 2 prompts, not of 2 x 3 rows"
    assert all(w == (6, 1) for w in widths[1:]), "then one token per row and step"
    widths.clear()
    monkeypatch.setattr(hf_engine, "share_prefill", False)  # engine.enable_prefix_caching=false
    hf_engine.generate(PROMPTS, n=3, max_new_tokens=4, temperature=1.0, top_p=1.0)
    assert widths[0] == (6, longest), "without sharing, every row prefills its prompt"


def test_hf_engine_is_seeded_once_at_construction(tiny_llama_dir):
    cfg = EngineConfig(engine="hf", threads=1)
    run = [HFEngine(str(tiny_llama_dir), seed=s, cfg=cfg).generate(PROMPTS, 2, 8, 1.0, 1.0) for s in (5, 5, 6)]
    texts = [[c.text for r in res for c in r.completions] for res in run]
    assert texts[0] == texts[1] and texts[0] != texts[2]


def test_hf_engine_finish_reason_and_token_count_stop_at_the_first_eos(hf_engine):
    eos = next(iter(hf_engine.eos_ids))
    stopped = hf_engine._completion([7, 8, eos, eos, eos], max_new_tokens=5)
    assert (stopped.num_tokens, stopped.finish_reason) == (3, "stop")
    assert stopped.text == hf_engine.tokenizer.decode([7, 8], clean_up_tokenization_spaces=False)
    cut = hf_engine._completion([7, 8, 9], max_new_tokens=3)
    assert (cut.num_tokens, cut.finish_reason) == (3, "length")


def test_hf_engine_serves_several_adapters_in_one_call(tiny_llama_dir, tiny_adapters, hf_engine):
    """Rows naming an adapter get the merged policy's greedy answer, rows naming none the base model's,
    in the order asked, within one generate call."""
    cfg = EngineConfig(engine="hf", threads=1)
    engine = HFEngine(str(tiny_llama_dir), seed=3, cfg=cfg, adapters=(tiny_adapters["a1"], tiny_adapters["a2"]))
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    adapters = [tiny_adapters["a1"], None, tiny_adapters["a2"], tiny_adapters["a1"]]
    got = [r.completions[0].text for r in engine.generate(prompts, 1, 6, 0.0, 1.0, adapters=adapters)]
    want = []
    for prompt, adapter in zip(prompts, adapters):
        ref = hf_engine if adapter is None else HFEngine(tiny_adapters["merged" + adapter[-1]], seed=3, cfg=cfg)
        want.append(ref.generate([prompt], 1, 6, 0.0, 1.0)[0].completions[0].text)
    assert got == want
    assert len({want[0], want[2]}) == 2, "the adapters change the answer, so the check has teeth"
    assert [r.completions[0].text for r in engine.generate(PROMPTS, 1, 6, 0.0, 1.0)] == \
        [r.completions[0].text for r in hf_engine.generate(PROMPTS, 1, 6, 0.0, 1.0)], "no adapter named: the base"
    with pytest.raises(EngineError, match="were not given to the engine"):
        engine.generate(PROMPTS[:1], 1, 4, 0.0, 1.0, adapters=["/elsewhere"])
    with pytest.raises(EngineError, match="not a LoRA adapter folder"):
        HFEngine(str(tiny_llama_dir), seed=3, cfg=cfg, adapters=(str(tiny_llama_dir),))


def test_resource_checks_fail_before_loading(tmp_path):
    with pytest.raises(EngineError, match="config.json missing"):
        check_model_dir(str(tmp_path))
    with pytest.raises(EngineError, match="GiB of RAM"):
        check_resources(0.5, EngineConfig(kv_cache_gb=100000.0), on_cpu=True)
    with pytest.raises(EngineError, match="needs GPUs"):
        check_resources(0.5, EngineConfig(tensor_parallel_size=2), on_cpu=True)
    with pytest.raises(EngineError, match="needs 4 GPU"):
        check_resources(0.5, EngineConfig(tensor_parallel_size=4), on_cpu=False)


VLLM_SCRIPT = """
import json, sys
from recalign.sampling.engines import EngineConfig, VLLMEngine
engine = VLLMEngine(sys.argv[1], int(sys.argv[2]), EngineConfig(engine="vllm", enforce_eager=True, kv_cache_gb=0.25,
                                                                 max_model_len=512, threads=1))
prompts = json.loads(sys.argv[3])
dump = lambda results: [[r.prompt_tokens, [c.__dict__ for c in r.completions]] for r in results]
first = dump(engine.generate(prompts, 4, 8, 1.0, 1.0))
engine.reseed(11)
reseeded = dump(engine.generate(prompts, 4, 8, 1.0, 1.0))
engine.generate(prompts[::-1] + ["another batch, which moves the stream on"], 2, 8, 1.0, 1.0)
engine.reseed(11)  # a later batch under the same seed: the stream and the prefix cache start afresh
again = dump(engine.generate(prompts, 4, 8, 1.0, 1.0))
print("RESULT " + json.dumps([first, reseeded, again]))
"""


def _vllm(model_dir, seed: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")}
    return subprocess.Popen([sys.executable, "-c", VLLM_SCRIPT, str(model_dir), str(seed), json.dumps(PROMPTS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc: subprocess.Popen):
    out, _ = proc.communicate(timeout=300)
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


VLLM_LORA_SCRIPT = """
import json, sys
from recalign.sampling.engines import EngineConfig, VLLMEngine
adapters = json.loads(sys.argv[3])
engine = VLLMEngine(sys.argv[1], 0, EngineConfig(engine="vllm", enforce_eager=True, kv_cache_gb=0.25, dtype="float32",
                                                 max_model_len=512, threads=1), adapters=tuple(a for a in adapters if a))
results = engine.generate(json.loads(sys.argv[2]), 1, 6, 0.0, 1.0, adapters=adapters)
print("RESULT " + json.dumps([[r.completions[0].text, r.completions[0].num_tokens] for r in results]))
"""


def test_vllm_engine_serves_several_lora_adapters_in_one_batch(tiny_llama_dir, tiny_adapters):
    """vLLM's multi-LoRA batching gives each row its adapter's greedy answer (the transformers engine
    with the same adapters is the reference) and the base model's where a row names none."""
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1]]
    adapters = [tiny_adapters["a1"], None, tiny_adapters["a2"], tiny_adapters["a1"]]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "platform")}
    proc = subprocess.Popen([sys.executable, "-c", VLLM_LORA_SCRIPT, str(tiny_llama_dir), json.dumps(prompts),
                             json.dumps(adapters)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    got = _result(proc)
    reference = HFEngine(str(tiny_llama_dir), seed=0, cfg=EngineConfig(engine="hf", threads=1, dtype="float32"),
                         adapters=(tiny_adapters["a1"], tiny_adapters["a2"]))
    want = [[r.completions[0].text, r.completions[0].num_tokens]
            for r in reference.generate(prompts, 1, 6, 0.0, 1.0, adapters=adapters)]
    # vLLM's detokenizer holds back a trailing partial UTF-8 character that transformers shows as U+FFFD.
    assert [[t.rstrip("\ufffd"), n] for t, n in got] == [[t.rstrip("\ufffd"), n] for t, n in want]
    assert got[0] != got[2] and got[1] != got[3], "each row got its own adapter, or none"


def test_vllm_engine_returns_exactly_n_and_is_seeded_by_the_engine(tiny_llama_dir, hf_engine):
    first, second = _vllm(tiny_llama_dir, 0), _vllm(tiny_llama_dir, 0)
    (run_a, reseeded, again), (run_b, _, _) = _result(first), _result(second)
    assert reseeded == again, "reseed() makes a batch independent of the batches before it"
    assert reseeded != run_a, "and another seed draws other samples"
    assert [len(completions) for _, completions in run_a] == [4, 4]  # Ray's own vLLM stage would keep 1
    expected_prompt_tokens = [len(hf_engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert [prompt_tokens for prompt_tokens, _ in run_a] == expected_prompt_tokens
    for _, completions in run_a:
        for c in completions:
            assert 1 <= c["num_tokens"] <= 8 and c["finish_reason"] in ("stop", "length")
            assert c["finish_reason"] == "stop" or c["num_tokens"] == 8
    assert len({c["text"] for _, cs in run_a for c in cs}) > 1  # n distinct samples, not one copied
    assert run_a == run_b  # LLM(seed=0) alone fixes the samples of a fixed batch
