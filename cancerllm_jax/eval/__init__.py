"""Evaluation: the paper's EM / BLEU-2 / ROUGE-L scoring protocol (importing this package does not import jax)."""
from cancerllm_jax.eval.protocol import KEYS, PROTOCOLS, score, score_file

__all__ = ["KEYS", "PROTOCOLS", "score", "score_file"]
