"""Datasets: indexed `.bin/.idx` token files, GPT/BERT/T5 sample builders, blending, samplers.

Importing this package loads only `indexed_dataset` (numpy, no torch), so that data tools
start fast. The compiled index builders are reached through `_helpers.get_helpers()`.
"""

from . import indexed_dataset  # noqa: F401
