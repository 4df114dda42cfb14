"""Evaluation of melo_fast: the demo, MELO's metrics (GRACE/MELO protocol) and baselines.

- ``data``: KnowEdit zsRE records (load, validate, split).
- ``metrics``: token-F1, exact match, accuracy, perplexity.
- ``classifier``: the demo's "deployed model" (all-MiniLM-L6-v2 + a linear answer head).
- ``tasks``: how to ask a model a question and score its answer (classifier or generative).
- ``baselines``: sequential plain LoRA fine-tuning with the same rank budget.
- ``harness``: the sequential editing loop and ``python -m melo_fast eval``.
- ``demo``: ``python -m melo_fast demo``.
"""
