"""Stage 1 of RLRF4Rec: N preference analyses per user, sampled by vLLM (or transformers) under Ray Data.

- `config`: SampleConfig. `engines`: the vLLM and transformers engines. `actors`: the Ray Data callables
  and the samples' Parquet schema. `pipeline`: the Ray Data pipeline. `stage`: the pipeline stage.
Importing this package is cheap: vllm, transformers and ray are imported inside the functions that use them.
"""
