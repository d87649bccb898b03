"""Sampled analyses as dense per-user arrays, and their per-user mean."""

import numpy as np
import pyarrow as pa
import pytest

from recalign.recsys.knowledge import knowledge_table


def test_knowledge_table_dense_view_and_mean():
    table = pa.table({"user_idx": pa.array([0, 0, 2], pa.int32()), "sample_idx": pa.array([0, 1, 1], pa.int32()),
                      "embedding": pa.array([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]], pa.list_(pa.float32()))})
    k = knowledge_table(table, num_users=3)
    assert k.vectors.shape == (3, 2, 2) and k.dim == 2
    assert k.present.tolist() == [[True, True], [False, False], [False, True]]
    s = 2 ** -0.5
    assert np.allclose(k.mean(), [[s, s], [0.0, 0.0], [0.0, 1.0]], atol=1e-6)
    with pytest.raises(ValueError, match="duplicate"):
        knowledge_table(pa.concat_tables([table, table.slice(0, 1)]), num_users=3)
    with pytest.raises(ValueError, match="user_idx outside"):
        knowledge_table(table, num_users=2)
