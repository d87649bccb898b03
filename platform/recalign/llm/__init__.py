"""LLM checkpoints: GGUF conversion and model-name resolution (heavy imports stay inside functions)."""

from recalign.llm.convert import DEFAULT_MODEL, ModelError, convert_gguf, default_gguf_path, resolve_model

__all__ = ["DEFAULT_MODEL", "ModelError", "convert_gguf", "default_gguf_path", "resolve_model"]
