"""The stages of ``benchmarks/gpu_check.py``, one module per concept, and the sm_90 compile report it uses.

Kept out of ``melo_fast``: this is development tooling (``compile_report`` relies on Triton internals),
not something an edited model needs at run time. Importing the package imports none of its modules.
"""
