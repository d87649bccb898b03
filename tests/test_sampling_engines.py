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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
results = engine.generate(json.loads(sys.argv[3]), 4, 8, 1.0, 1.0)
print("RESULT " + json.dumps([[r.prompt_tokens, [c.__dict__ for c in r.completions]] for r in results]))
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


def test_vllm_engine_returns_exactly_n_and_is_seeded_by_the_engine(tiny_llama_dir, hf_engine):
    first, second = _vllm(tiny_llama_dir, 0), _vllm(tiny_llama_dir, 0)
    run_a, run_b = _result(first), _result(second)
    assert [len(completions) for _, completions in run_a] == [4, 4]  # Ray's own vLLM stage would keep 1
    expected_prompt_tokens = [len(hf_engine.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in PROMPTS]
    assert [prompt_tokens for prompt_tokens, _ in run_a] == expected_prompt_tokens
    for _, completions in run_a:
        for c in completions:
            assert 1 <= c["num_tokens"] <= 8 and c["finish_reason"] in ("stop", "length")
            assert c["finish_reason"] == "stop" or c["num_tokens"] == 8
    assert len({c["text"] for _, cs in run_a for c in cs}) > 1  # n distinct samples, not one copied
    assert run_a == run_b  # LLM(seed=0) alone fixes the samples of a fixed batch
