"""Make ``cancerllm_jax`` importable when a launcher runs from a clone without ``pip install``."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import cancerllm_jax  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
