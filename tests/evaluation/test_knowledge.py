"""Knowledge generation for evaluation: the sampling stage's prompts, every policy's answers in one Ray
Data pass (each row answered by the adapter it names, in order), one encoder pass for all policies."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from recalign.evaluation.knowledge import KnowledgeGenConfig, generate_analyses, knowledge_prompts, knowledge_vectors
from recalign.prompts import PromptConfig
from recalign.reward.encoder import EncoderConfig
from recalign.sampling.engines import EngineConfig
from tests.helpers import fakes


def test_prompts_are_the_sampling_stages_for_the_same_users(ml100k_dir, tiny_llama_dir):
    from recalign.data.dataset import Dataset
    from recalign.sampling.actors import PromptBuilder

    prompt = PromptConfig(max_history=5)
    users = np.array([40, 3, 17])
    got = knowledge_prompts(ml100k_dir, "test", users, str(tiny_llama_dir), prompt)
    examples = Dataset(ml100k_dir).examples("test").to_pylist()
    by_user = {e["user_idx"]: e for e in examples}
    builder = PromptBuilder(ml100k_dir, str(tiny_llama_dir), prompt)
    for user, text in zip(users, got):
        e = by_user[int(user)]
        one = builder({k: np.array([e[k]], dtype=object) for k in ("user_idx", "user_id", "split", "history",
                                                                   "history_ratings")})
        assert text == one["prompt"][0]
    assert len(set(got)) == 3
    with pytest.raises(ValueError, match="users \\[99999\\] have no test example"):
        knowledge_prompts(ml100k_dir, "test", np.array([99999]), str(tiny_llama_dir), prompt)


@pytest.mark.ray
def test_every_policy_answers_every_prompt_in_one_pass(ray_local, fakes_by_value, ml100k_dir, tmp_path):
    prompts = [f"prompt {i}" for i in range(7)]
    adapters = {"base": None, "dpo": "/runs/x/policy/knowledge/dpo", "sdpo": "/runs/x/policy/knowledge/sdpo"}
    logs = []
    answers = generate_analyses(prompts, adapters, "unused", EngineConfig(),
                                KnowledgeGenConfig(batch_size=4, num_actors=2), log=logs.append,
                                engine_factory=fakes.adapter_echo_engine)
    assert answers == {name: [fakes.answer(p, a) for p in prompts] for name, a in adapters.items()}
    assert logs and logs[-1].startswith("[knowledge] 21/21 analyses (base, dpo, sdpo)")

    users = np.array([5, 2, 9, 0, 7, 1, 3])
    vectors = knowledge_vectors(answers, users, 12, str(tmp_path / "knowledge"), EncoderConfig())
    assert set(vectors) == set(adapters)
    for name, (vec, present) in vectors.items():
        assert vec.shape == (7, 384) and present.all()
        assert np.allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-4)
        saved = pq.read_table(tmp_path / "knowledge" / f"{name}.parquet").to_pydict()
        assert saved == {"user_idx": users.tolist(), "response": answers[name]}
    assert not np.allclose(vectors["dpo"][0], vectors["sdpo"][0]), "each policy's own texts were embedded"


@pytest.mark.ray
@pytest.mark.slow
def test_merged_mode_answers_like_the_adapters(ray_local, ml100k_dir, tiny_llama_dir, tiny_adapters):
    """One pass per policy on merged weights (the CPU setting) gives the same greedy answers as one
    pass in which a single engine serves every adapter."""
    prompts = knowledge_prompts(ml100k_dir, "test", np.array([1, 2, 3]), str(tiny_llama_dir), PromptConfig(max_history=4))
    adapters = {"base": None, "a1": tiny_adapters["a1"], "a2": tiny_adapters["a2"]}
    engine = EngineConfig(engine="hf", threads=1)
    runs = {mode: generate_analyses(prompts, adapters, str(tiny_llama_dir), engine,
                                    KnowledgeGenConfig(max_new_tokens=5, batch_size=4, adapters=mode), log=lambda _: None)
            for mode in ("lora", "merged")}
    assert runs["lora"] == runs["merged"]
    assert runs["lora"]["a1"] != runs["lora"]["a2"] != runs["lora"]["base"]
    with pytest.raises(ValueError, match="adapters must be lora or merged"):
        generate_analyses(prompts, adapters, str(tiny_llama_dir), engine, KnowledgeGenConfig(adapters="both"))
