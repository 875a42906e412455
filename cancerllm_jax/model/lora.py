"""Hand-written LoRA with PEFT's semantics: ``y = W x + B(A(dropout(x))) · α/r``.

The factors live in the model as ``nnx.LoRAParam`` (``Proj.lora_a [layers, in, r]``, ``Proj.lora_b
[layers, r, out]``), so filters split them from the frozen base. PEFT stores ``lora_A.weight [r, in]`` and
``lora_B.weight [out, r]`` per layer; see ``checkpoint/peft.py`` for the key names.
"""
from __future__ import annotations

import numpy as np

from cancerllm_jax.config import LoRAConfig
from cancerllm_jax.model import check_fits, resolve_dtype


def merge_lora_params(params: dict, lora_params: dict, lora: LoRAConfig, dtype=None, in_place: bool = False) -> dict:
    """Base params with ``W + A·B·α/r`` folded into every target kernel, computed in fp32, then cast to ``dtype``
    (default: the kernel's own; a bf16 base loaded as fp32 keeps the fp32 sum). ``in_place``: each merged kernel
    replaces its base kernel in ``params`` as soon as it is made (conversions: the base is never held twice)."""
    layers = params["layers"] if in_place else dict(params["layers"])
    src = lora_params.get("layers", lora_params)
    for name, ab in src.items():
        if "lora_a" not in ab:
            continue
        kernel = np.asarray(layers[name]["kernel"])
        a = np.asarray(ab["lora_a"], np.float32)
        b = np.asarray(ab["lora_b"], np.float32)
        merged = kernel.astype(np.float32) + np.einsum("lir,lro->lio", a, b) * np.float32(lora.scaling)
        target = kernel.dtype if dtype is None else resolve_dtype(dtype)
        check_fits(f"layers.{name}.kernel with its LoRA merged in", merged, target)
        del kernel
        merged = merged.astype(target)
        if in_place:
            layers[name]["kernel"] = merged
        else:
            layers[name] = {**layers[name], "kernel": merged}
    return params if in_place else {**params, "layers": layers}


def count_params(tree) -> int:
    import jax

    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
