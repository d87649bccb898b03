"""recalign: align LLM recommenders with recommender-system feedback, on Ray.

Importing any module of this package is cheap: heavy libraries (vllm, trl, peft, ray.serve)
are imported inside the functions that use them.
"""

__version__ = "0.1.0"
