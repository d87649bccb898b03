"""Stage 1 of RLRF4Rec: N preference analyses per user, sampled by vLLM (or transformers) under Ray Data.

Importing this package is cheap: vllm, transformers and ray are imported inside the functions that use them.
"""

from recalign.sampling.engines import EngineConfig, EngineError, HFEngine, VLLMEngine, make_engine
from recalign.sampling.pipeline import SampleConfig, run_sampling, select_users
from recalign.sampling.actors import SAMPLES_SCHEMA, PromptBuilder, SamplerStage, check_samples, read_samples

__all__ = ["SAMPLES_SCHEMA", "EngineConfig", "EngineError", "HFEngine", "PromptBuilder", "SampleConfig",
           "SamplerStage", "VLLMEngine", "check_samples", "make_engine", "read_samples", "run_sampling",
           "select_users"]
