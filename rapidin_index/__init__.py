"""rapidin-index: which training examples, and which of their tokens, made an LLM write this.

An implementation of RapidIn (Lin et al., ACL 2024) with a resumable on-disk index.
The package mirrors the pipeline: :mod:`~rapidin_index.data` (records and prompts),
:mod:`~rapidin_index.model` (loading), :mod:`~rapidin_index.gradients` (per-example
gradients), :mod:`~rapidin_index.sketch` (RapidGrad), :mod:`~rapidin_index.store` (the index),
:mod:`~rapidin_index.build` (caching), :mod:`~rapidin_index.scan` (retrieval kernels),
:mod:`~rapidin_index.query` (attribution) and :mod:`~rapidin_index.cli`.
"""

__version__ = "0.1.0"
