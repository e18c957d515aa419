"""Shared pieces of the Wikitext-2 language-modelling package.

The model files at the top level (`lstm_solution.py`, `gpt1_solution_template.py`, or the
starter's `gpt1_solution.py`) import from here; `run_exp.py` and the `python -m utils.NAME` tools build on the same modules.
"""
