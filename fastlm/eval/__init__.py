"""Evaluation: perplexity, bits per byte and task scores (core.py, `python -m fastlm.eval`), masked-LM
metrics (mlm.py), task files (tasks.py), scores such as BLEU and F1 (scores.py), the
lm-evaluation-harness adapter (lm_eval_adapter.py) and the demo task generator (demo_tasks.py).
"""
