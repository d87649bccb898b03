"""The Ray Data callables of the sampling stage, and the samples' Parquet schema.

- `PromptBuilder`: a batch of users' histories -> chat-rendered knowledge prompts.
- `SamplerStage`: a batch of prompts -> N completions each, written as one Parquet file per batch.

A batch's file name is a hash of its user ids and every write is atomic (temp + rename), so a batch
that is retried after its actor died rewrites the same file instead of adding a second copy, and a
reader never sees half a batch. `read_samples` still deduplicates on (user_idx, sample_idx).
Both classes take plain arguments and are called with a dict batch, so tests need no cluster.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from recalign import io
from recalign.prompts import PromptConfig, knowledge_messages, render
from recalign.sampling.engines import Engine, EngineError, batch_seed

SAMPLES_SCHEMA = pa.schema([
    ("user_idx", pa.int32()),
    ("user_id", pa.string()),
    ("split", pa.string()),
    ("sample_idx", pa.int32()),
    ("prompt", pa.string()),  # chat-rendered, ends with the assistant header
    ("response", pa.string()),  # completion text, no EOS
    ("prompt_tokens", pa.int32()),
    ("response_tokens", pa.int32()),  # generated tokens, the stop token included
    ("finish_reason", pa.string()),  # stop | length
    ("engine", pa.string()),  # vllm | hf
    ("model", pa.string()),
    ("seed", pa.int64()),  # the batch's seed: batch_seed(sample.seed, the batch's user ids, split)
])
PART_PREFIX = "part-"


class PromptBuilder:
    """Users' histories -> knowledge prompts rendered with the model's chat template.

    In: user_idx, user_id, split, history (list of item_idx), history_ratings (list of float).
    Out: user_idx, user_id, split, prompt.
    """

    def __init__(self, data_dir: str, tokenizer_path: str, prompt: PromptConfig):
        from transformers import AutoTokenizer

        from recalign.data.dataset import Dataset
        from recalign.llm.store import local_model

        self.items = Dataset(data_dir).items
        self.tokenizer = AutoTokenizer.from_pretrained(local_model(tokenizer_path))
        if not self.tokenizer.chat_template:
            raise ValueError(f"{tokenizer_path}: tokenizer has no chat template; prompts need one")
        self.prompt = prompt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = []
        for history, ratings in zip(batch["history"], batch["history_ratings"]):
            messages = knowledge_messages(self.items, list(history), list(ratings), self.prompt)
            prompts.append(render(self.tokenizer, messages))
        return {"user_idx": batch["user_idx"], "user_id": batch["user_id"], "split": batch["split"],
                "prompt": np.array(prompts, dtype=object)}


class SamplerStage:
    """Prompts -> N completions per user, written to `<out_dir>/part-<hash of user ids>.parquet`.

    In: user_idx, user_id, split, prompt. Out: one summary row per batch (file, users, rows, tokens, seconds).
    The engine comes from `engine_factory()`, called once per actor, so tests can inject one. Before each
    batch the engine is reseeded from `seed` and the batch's users, so what a batch gets does not depend on
    the actor or on the batches before it.
    """

    def __init__(self, engine_factory: Callable[[], Engine], out_dir: str, num_samples: int, max_new_tokens: int,
                 temperature: float, top_p: float, model_name: str, seed: int = 0):
        self.engine = engine_factory()
        self.seed = seed
        self.out_dir = out_dir
        self.num_samples = num_samples
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.model_name = model_name

    def sample(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The batch's rows in SAMPLES_SCHEMA: users in batch order, sample_idx 0..N-1 within each."""
        prompts = [str(p) for p in batch["prompt"]]
        seed = batch_seed(self.seed, batch["user_idx"], str(batch["split"][0]) if len(batch["split"]) else "")
        self.engine.reseed(seed)
        results = self.engine.generate(prompts, self.num_samples, self.max_new_tokens, self.temperature, self.top_p)
        if len(results) != len(prompts):
            raise EngineError(f"{self.engine.name} engine returned {len(results)} results for {len(prompts)} prompts")
        n = self.num_samples
        columns: dict[str, list] = {field.name: [] for field in SAMPLES_SCHEMA}
        for row, result in enumerate(results):
            if len(result.completions) != n:  # a custom engine may not check this itself
                raise EngineError(f"{self.engine.name} engine returned {len(result.completions)} completions for "
                                  f"user_idx {int(batch['user_idx'][row])}, expected {n}")
            for sample_idx, completion in enumerate(result.completions):
                columns["user_idx"].append(int(batch["user_idx"][row]))
                columns["user_id"].append(str(batch["user_id"][row]))
                columns["split"].append(str(batch["split"][row]))
                columns["sample_idx"].append(sample_idx)
                columns["prompt"].append(prompts[row])
                columns["response"].append(completion.text)
                columns["prompt_tokens"].append(result.prompt_tokens)
                columns["response_tokens"].append(completion.num_tokens)
                columns["finish_reason"].append(completion.finish_reason)
                columns["engine"].append(self.engine.name)
                columns["model"].append(self.model_name)
                columns["seed"].append(seed)
        return pa.table(columns, schema=SAMPLES_SCHEMA)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.perf_counter()
        table = self.sample(batch)
        path = io.join(self.out_dir, part_name(batch["user_idx"]))
        io.write_parquet(table, path)
        return {
            "file": np.array([path], dtype=object),
            "num_users": np.array([len(batch["user_idx"])], dtype=np.int64),
            "num_rows": np.array([table.num_rows], dtype=np.int64),
            "response_tokens": np.array([pc.sum(table["response_tokens"]).as_py() or 0], dtype=np.int64),
            "seconds": np.array([time.perf_counter() - start], dtype=np.float64),
        }


def part_name(user_idx: Any) -> str:
    """Deterministic file name of a batch: the same users always map to the same file."""
    ids = ",".join(str(int(u)) for u in sorted(int(u) for u in user_idx))
    return f"{PART_PREFIX}{hashlib.sha256(ids.encode()).hexdigest()[:16]}.parquet"


def part_files(out_dir: str) -> list[str]:
    """The committed batch files under out_dir (temporary files of unfinished writes are skipped)."""
    fs, path = io.resolve(out_dir)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [io.join(out_dir, n) for n in names if n.startswith(PART_PREFIX) and n.endswith(".parquet")]


def read_samples(out_dir: str) -> pa.Table:
    """All samples under out_dir, one row per (user_idx, sample_idx), sorted by both."""
    files = part_files(out_dir)
    if not files:
        return SAMPLES_SCHEMA.empty_table()
    tables = []
    for uri in files:
        fs, path = io.resolve(uri)
        table = pq.read_table(path, filesystem=fs)
        if not table.schema.equals(SAMPLES_SCHEMA):
            raise ValueError(f"{uri}: schema {table.schema} does not match the samples schema {SAMPLES_SCHEMA}")
        tables.append(table)
    table = pa.concat_tables(tables)
    # A batch retried under other boundaries could repeat users: keep the first row of each key.
    table = table.append_column("_row", pa.array(np.arange(table.num_rows), pa.int64()))
    first = table.group_by(["user_idx", "sample_idx"], use_threads=False).aggregate([("_row", "min")])
    table = table.take(first["_row_min"]).drop_columns(["_row"])
    return table.sort_by([("user_idx", "ascending"), ("sample_idx", "ascending")])


def samples_per_user(table: pa.Table) -> dict[int, int]:
    """user_idx -> number of distinct sample_idx."""
    counts = table.select(["user_idx", "sample_idx"]).group_by("user_idx").aggregate(
        [("sample_idx", "count_distinct")])
    return dict(zip(counts["user_idx"].to_pylist(), counts["sample_idx_count_distinct"].to_pylist()))


def check_samples(table: pa.Table, user_idx: Any, num_samples: int) -> None:
    """Every listed user has exactly sample_idx 0..N-1; an error names the first users that do not."""
    counts = samples_per_user(table)
    wrong = [int(u) for u in user_idx if counts.get(int(u), 0) != num_samples]
    if wrong:
        shown = ", ".join(f"user_idx {u}: {counts.get(u, 0)}" for u in wrong[:5])
        raise ValueError(f"samples: {len(wrong)} user(s) without exactly {num_samples} samples ({shown})")
    bad = pc.sum(pc.or_(pc.less(table["sample_idx"], 0), pc.greater_equal(table["sample_idx"], num_samples)))
    if (bad.as_py() or 0) > 0:
        raise ValueError(f"samples: sample_idx outside 0..{num_samples - 1}")
