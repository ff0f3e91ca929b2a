"""Evaluation of generated defects: the downstream detector benchmark (evaluate, with its
baselines, detector and metrics) and generation quality (genquality, with literature)."""
