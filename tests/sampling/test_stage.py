"""How later stages read the samples back: the train-split rows, checked, and the prompt they were written for."""

import numpy as np
import pytest

from recalign import io
from recalign.data.dataset import Dataset
from recalign.prompts import PromptConfig
from recalign.runs import RunSpec
from recalign.sampling.stage import knowledge_prompt, load_samples
from tests.helpers.reward import make_samples, write_samples


@pytest.fixture(scope="module")
def data(tiny_data_dir):
    return Dataset(tiny_data_dir)


def test_load_samples_keeps_one_split_sorted_and_checked(data, tmp_path):
    write_samples(make_samples(data, num_samples=2, users=np.array([3, 1])), str(tmp_path / "samples"))
    write_samples(make_samples(data, num_samples=2, users=np.array([5]), splits=("test",)), str(tmp_path / "samples"))
    train = load_samples(str(tmp_path / "samples"))
    assert set(train["split"].to_pylist()) == {"train"} and train.num_rows == 4
    assert list(zip(train["user_idx"].to_pylist(), train["sample_idx"].to_pylist())) == [(1, 0), (1, 1), (3, 0), (3, 1)]
    assert load_samples(str(tmp_path / "samples"), "test")["user_idx"].to_pylist() == [5, 5]
    with pytest.raises(FileNotFoundError, match="not finished for 'valid' prompts"):
        load_samples(str(tmp_path / "samples"), "valid")


def test_load_samples_refuses_unfinished_or_uneven_samples(data, tmp_path):
    with pytest.raises(FileNotFoundError, match="the sampling stage has not finished"):
        load_samples(str(tmp_path / "none"))
    uneven = make_samples(data, num_samples=2, users=np.array([0, 1]))
    uneven = uneven.filter(np.array([not (u == 1 and s == 1) for u, s in zip(uneven["user_idx"].to_pylist(),
                                                                            uneven["sample_idx"].to_pylist())]))
    write_samples(uneven, str(tmp_path / "uneven"))
    with pytest.raises(ValueError, match="different sample counts"):
        load_samples(str(tmp_path / "uneven"))


def test_knowledge_prompt_is_read_from_the_run(tmp_path):
    run = RunSpec(name="t", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="run the sample stage first"):
        knowledge_prompt(run)
    io.write_json({"key": {"prompt": {"max_history": 7, "show_ratings": False, "show_genres": True}}},
                  run.dir("samples", "train", "config.json"))
    assert knowledge_prompt(run) == PromptConfig(max_history=7, show_ratings=False, show_genres=True)
