"""Put this checkout's ``cancerllm_jax`` first on ``sys.path``: importable without ``pip install``, and not shadowed by
another installed copy."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's package, even where another copy is installed
