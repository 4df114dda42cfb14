"""EVALUATION.md's sections, one module per subject, for ``evaluation/report.py`` (the command that writes it).

- ``runs.py``: the runs the document reads (one ``python -m melo_fast`` command each) and their reports;
- ``formatting.py``: the Markdown helpers every section uses;
- ``llm.py``: editing a chat LLM (SmolLM2-135M-Instruct);
- ``minilm.py``: the question classifier (all-MiniLM-L6-v2): results, targets, the sweep, the demo's choices;
- ``general.py``: the introduction, the commands and wall times, issue 22, the presets, the CI.
"""
