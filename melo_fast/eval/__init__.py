"""Evaluation of melo_fast: the demo, MELO's metrics (GRACE/MELO protocol) and baselines.

Dependencies point one way, from the commands down to the protocol:

- ``data``: KnowEdit-format records (load, validate, split).
- ``metrics``: token-F1, exact match, accuracy, perplexity, teacher-forced accuracy, target mentions.
- ``tasks``: how to ask a model a question and score its answer (classifier or generative; raw text or
  the chat template; greedy generations and teacher-forced readings).
- ``probes``: the probe sets and a model's answers to them (MELO's routed fast path).
- ``baselines``: sequential plain LoRA fine-tuning with the same rank budget.
- ``harness``: the sequential editing protocol (``SequentialEval``); no CLI, no plotting.
- ``scoring``: the protocol's metrics from a model's answers (``final_metrics``; a mixin of ``SequentialEval``).
- ``report``: console tables, the JSON report, plots (matplotlib optional).
- ``classifier``: the MiniLM demo's "deployed model" (all-MiniLM-L6-v2 + a linear answer head).
- ``local_model``: loading a local Hugging Face folder or GGUF file; SmolLM2 cached as a folder.
- ``arguments``: command-line arguments shared by ``demo`` and ``eval``, the paper's presets.
- ``demo``: ``python -m melo_fast demo``.
- ``evaluate``: ``python -m melo_fast eval`` (falls back to the demo without ``--model``).
- ``paraphrase_facts``: KnowEdit records as the facts a key projection trains on.
- ``projection_command``: ``python -m melo_fast projection`` (trains a key projection on a KnowEdit file).
"""
