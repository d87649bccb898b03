"""One prompt per run: the pipeline and the standalone jobs build identical prompts, and every stage that
prompts an LLM (evaluation, the sweep, Serve) reads them from the run it works on."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from recalign.data.dataset import Dataset
from recalign.evaluation.knowledge import knowledge_prompts
from recalign.pairs.stage import rerank_prompt
from recalign.prompts import PromptConfig
from recalign.rerank.scorer import build_prompts
from recalign.runs import RunSpec
from recalign.sampling.actors import read_samples
from recalign.sampling.stage import knowledge_prompt
from tests.helpers.data import tiny_data_config

pytestmark = pytest.mark.ray

# The smoke preset's prompt settings, given to the standalone jobs by hand.
SAMPLE = ["sample.num_samples=4", "sample.num_users=3", "sample.max_new_tokens=4", "sample.batch_size=6",
          "sample.prompt.max_history=5", "sample.prompt.show_genres=false", "sample.engine.engine=hf"]
PAIRS = ["pairs.paths=[rerank]", "pairs.negatives=random", "pairs.num_negatives=3", "pairs.prompt.max_history=3"]


def _data_args(cfg) -> list[str]:
    return ["data.source=table", f"data.interactions={cfg.interactions}", f"data.items={cfg.items}", "data.name=tiny"]


@pytest.fixture(scope="module")
def runs(ray_local, tiny_llama_dir, tmp_path_factory):
    import pipeline
    import prepare
    import reward
    import sample

    root = tmp_path_factory.mktemp("prompts")
    data = _data_args(tiny_data_config(root))
    model = str(tiny_llama_dir)
    pipeline.main(["preset=smoke", f"run.root={root}", "run.name=pipe", f"model={model}", *data,
                   "stages=[data,sample,pairs]", "sample.num_users=3", "sample.max_new_tokens=4", *PAIRS[:3],
                   "sample.engine.engine=hf"])
    solo = [f"run.root={root}", "run.name=solo"]
    prepare.main([*solo, *data])
    sample.main([*solo, *data, f"sample.model={model}", *SAMPLE])
    reward.main([*solo, "stages=[pairs]", f"pairs.model={model}", *PAIRS])
    return RunSpec(name="pipe", root=str(root)), RunSpec(name="solo", root=str(root)), model


def test_the_pipeline_and_the_standalone_jobs_write_the_same_prompts(runs):
    pipe, solo, _ = runs
    for rel in ("pairs/rerank.parquet",):
        a, b = (pq.read_table(run.dir(rel)).to_pydict() for run in (pipe, solo))
        assert a["prompt"] == b["prompt"] and a["chosen"] == b["chosen"] and a["rejected"] == b["rejected"]
    a, b = (read_samples(run.dir("samples", "train")).to_pydict() for run in (pipe, solo))
    assert a["prompt"] == b["prompt"] and len(set(a["prompt"])) == 3
    assert knowledge_prompt(pipe) == knowledge_prompt(solo) == PromptConfig(max_history=5, show_genres=False)
    assert rerank_prompt(pipe) == rerank_prompt(solo) == PromptConfig(max_history=3, show_genres=False)


def test_evaluation_the_sweep_and_serve_prompt_as_the_run_was_trained(runs):
    import sweep
    from transformers import AutoTokenizer

    from recalign.rerank.service import ParsedRequest, RerankService
    from serve.app import run_prompt

    _, run, model = runs
    data = Dataset(run.dir("data"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    pairs = pq.read_table(run.dir("pairs", "rerank.parquet")).to_pydict()
    split = data.split("train")
    rows = np.array([list(split.user_idx).index(u) for u in pairs["user_idx"]])
    # Evaluation renders the re-ranker's prompts with the run's re-rank prompt: the training prompts, exactly.
    assert build_prompts(data, "train", rows, tokenizer, rerank_prompt(run)) == pairs["prompt"]
    # The sweep's validation prompts and Serve's requests use the same settings.
    prompts, target_index, _ = sweep.validation_inputs(sweep.SweepJob(run=run, model=model), model)
    valid = data.split("valid")  # 24 users, under the sweep's 64 validation users: every row is scored
    assert prompts == build_prompts(data, "valid", np.arange(len(valid)), tokenizer, rerank_prompt(run))
    assert np.array_equal(target_index, valid.target_index)
    assert run_prompt(run.dir()) == rerank_prompt(run)
    service = RerankService.__new__(RerankService)  # the prompt builder alone, no model
    service.items, service.tokenizer, service.prompt_cfg = data.items, tokenizer, run_prompt(run.dir())
    request = ParsedRequest(list(split.history[rows[0]][split.history[rows[0]] > 0]),
                            list(split.history_ratings[rows[0]][split.history[rows[0]] > 0]),
                            list(split.candidates[rows[0]]), [])
    assert service.prompt(request) == pairs["prompt"][0]
    # Evaluation's knowledge prompts are the sampling stage's, for the same users and split.
    samples = read_samples(run.dir("samples", "train")).to_pandas().drop_duplicates("user_idx")
    got = knowledge_prompts(run.dir("data"), "train", samples["user_idx"].to_numpy(), model, knowledge_prompt(run))
    assert got == samples["prompt"].tolist()
