"""cancerllm_jax: CancerLLM in JAX.

The front door::

    import cancerllm_jax as cj
    lm = cj.load("an/hf/folder/or/our/checkpoint/or/a/run", dtype="float32")   # mesh="1x1"
    lm = cj.load("base/folder", adapter="a/peft/adapter")   # + a PEFT LoRA adapter (merged unless merge_lora=False)
    logits = lm.logits(input_ids)                     # int [B, T] -> float32 numpy [B, T, V] ([T] -> [T, V])
    texts = lm.generate(["..."], max_new_tokens=50)   # strings in -> strings out; id lists -> id lists
    cj.eval.score(golds, preds, protocol="standard")  # the paper's EM / BLEU-2 / ROUGE-L scores

Every problem a user can fix raises ``cj.UserError``.
"""
import importlib as _importlib
import os as _os

# Never reach a model hub: everything this package loads is local.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# On the CPU backend, reuse freed host memory instead of page-faulting every step's buffers in again (hostmem.py)
from cancerllm_jax.hostmem import keep_freed_memory as _keep_freed_memory  # noqa: E402

from cancerllm_jax.errors import UserError  # noqa: E402

HOST_MEMORY_KEPT = _keep_freed_memory()
_SUBPACKAGES = ("api", "checkpoint", "config", "data", "decode", "eval", "model", "sharding", "train")

__version__ = "0.1.0"


def load(path: str, dtype: str = "float32", mesh: str = "1x1", **kwargs):
    """Load an HF folder, a converted checkpoint or a training run's latest checkpoint as an ``LM`` (``adapter=``: a
    PEFT LoRA adapter folder on top; see ``cancerllm_jax.api.load``)."""
    from cancerllm_jax.api import load as _load

    return _load(path, dtype=dtype, mesh=mesh, **kwargs)


def __getattr__(name: str):
    """``cj.eval``, ``cj.decode``, …: the subpackages, imported on first use (``import cancerllm_jax`` stays light)."""
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "UserError", "__version__"]
