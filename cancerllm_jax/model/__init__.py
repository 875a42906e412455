"""Model construction: random init, abstract (shape-only) models, and models filled from a parameter dict."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cancerllm_jax.config import LoRAConfig, ModelConfig
from cancerllm_jax.errors import UserError, suggest
from cancerllm_jax.model.mistral import Mistral

DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(name) -> jnp.dtype:
    """A dtype name of ``DTYPES`` (or one of their dtypes) as a ``jnp.dtype``; anything else is a UserError."""
    if isinstance(name, str) and name in DTYPES:
        return jnp.dtype(DTYPES[name])
    torch_name = str(name).removeprefix("torch.") if type(name).__module__ == "torch" else None
    if torch_name in DTYPES:  # a torch dtype (torch.bfloat16), as transformers users write it
        return jnp.dtype(DTYPES[torch_name])
    if not isinstance(name, str) and name is not None:
        try:
            if jnp.dtype(name) in {jnp.dtype(d) for d in DTYPES.values()}:
                return jnp.dtype(name)
        except TypeError:
            pass
    hint = ""
    if isinstance(name, str) and name.removeprefix("torch.") in DTYPES:
        hint = f" (write {name.removeprefix('torch.')!r})"
    elif isinstance(name, str):  # a name with other digits is no misspelling (float64 is not float16)
        digits = "".join(filter(str.isdigit, name))
        hint = suggest(name, [k for k in DTYPES if not digits or "".join(filter(str.isdigit, k)) == digits])
    raise UserError(f"dtype {name!r} is not supported{hint}; choose from {sorted(DTYPES)}")


FLOAT16_MAX = 65504.0


@jax.jit
def _device_finite_abs_max(a):
    return jnp.max(jnp.where(jnp.isfinite(a), jnp.abs(a), 0).astype(jnp.float32))  # one fused pass, no copies


def _finite_abs_max(arr) -> float:
    """The largest finite |value| of ``arr``: a device array in one fused reduction, a host array in slices of 4M
    values (a whole stacked 7B kernel in float32 would be gigabytes)."""
    if not isinstance(arr, np.ndarray):
        return float(_device_finite_abs_max(arr))
    flat, biggest = arr.reshape(-1), 0.0
    for i in range(0, flat.size, 1 << 22):
        part = np.abs(flat[i:i + (1 << 22)].astype(np.float32))
        part[~np.isfinite(part)] = 0.0
        biggest = max(biggest, float(part.max()))
    return biggest


def check_fits(where: str, arr, dtype) -> None:
    """Refuse casting ``arr`` to float16 when its finite values reach past float16's range (they would become inf
    and every logit NaN); other dtypes hold float32's range."""
    if jnp.dtype(dtype) != jnp.float16 or jnp.dtype(arr.dtype) == jnp.float16:
        return
    biggest = _finite_abs_max(arr) if arr.size else 0.0
    if biggest > FLOAT16_MAX:
        raise UserError(f"{where}: values up to {biggest:.4g} do not fit float16 (largest {FLOAT16_MAX:g}): they "
                        "would become inf; use bfloat16 or float32")


def create_model(cfg: ModelConfig, lora: LoRAConfig | None = None, dtype="float32", compute_dtype=None,
                 remat: str = "none", seed: int = 0, attention: str = "auto") -> Mistral:
    """A randomly initialised model (HF's N(0, 0.02) for weights; PEFT's init for LoRA)."""
    dt = resolve_dtype(dtype)
    cdt = resolve_dtype(compute_dtype or dt)

    def make():
        return Mistral(cfg, lora=lora, param_dtype=dt, compute_dtype=cdt, remat=remat, attention=attention,
                       rngs=nnx.Rngs(seed))

    # One compiled initialiser instead of one eager (separately compiled) op per weight.
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()
    return nnx.merge(graphdef, state)


def abstract_model(cfg: ModelConfig, lora: LoRAConfig | None = None, dtype="float32", compute_dtype=None,
                   remat: str = "none", attention: str = "auto"):
    """``(graphdef, abstract_state)``: shapes and dtypes only, no memory."""
    model = nnx.eval_shape(lambda: create_model(cfg, lora, dtype, compute_dtype, remat, attention=attention))
    return nnx.split(model)


def model_from_params(cfg: ModelConfig, params: dict, lora: LoRAConfig | None = None, dtype="float32",
                      compute_dtype=None, remat: str = "none", lora_params: dict | None = None,
                      lora_seed: int = 0, attention: str = "auto") -> Mistral:
    """A model whose base weights come from ``params`` (a pure dict, as saved) cast to ``dtype``.

    LoRA factors come from ``lora_params`` when given, else PEFT's fresh init (seeded).
    """
    graphdef, state = abstract_model(cfg, lora, dtype, compute_dtype, remat, attention)
    pure = nnx.to_pure_dict(state)

    def fill(node, src, path):
        out = {}
        for k, v in node.items():
            p = f"{path}.{k}" if path else k
            if isinstance(v, dict):
                out[k] = fill(v, (src or {}).get(k) if isinstance(src, dict) else None, p)
            elif k in ("lora_a", "lora_b"):
                out[k] = None
            else:
                if src is None or k not in src:
                    raise UserError(f"parameter {p} is missing from the checkpoint")
                arr = src[k]
                if tuple(arr.shape) != tuple(v.shape):
                    raise UserError(f"parameter {p}: shape {tuple(arr.shape)} != expected {tuple(v.shape)}")
                check_fits(f"parameter {p}", arr, v.dtype)
                out[k] = jnp.asarray(arr, dtype=v.dtype)
        return out

    filled = fill(pure, params, "")
    if lora is not None:
        lp = lora_params if lora_params is not None else _fresh_lora(cfg, lora, lora_seed)
        _put_lora(filled, lp)
    nnx.replace_by_pure_dict(state, filled)
    return nnx.merge(graphdef, state)


def _fresh_lora(cfg: ModelConfig, lora: LoRAConfig, seed: int) -> dict:
    from cancerllm_jax.model.mistral import proj_shapes

    key = jax.random.PRNGKey(seed)
    out = {}
    for i, (name, (d_in, d_out)) in enumerate(proj_shapes(cfg).items()):
        if name not in lora.targets:
            continue
        bound = 1.0 / (d_in ** 0.5)
        a = jax.random.uniform(jax.random.fold_in(key, i), (cfg.num_layers, d_in, lora.rank), jnp.float32,
                               -bound, bound)
        out[name] = {"lora_a": a, "lora_b": jnp.zeros((cfg.num_layers, lora.rank, d_out), jnp.float32)}
    return {"layers": out}


def _put_lora(filled: dict, lp: dict) -> None:
    layers = lp.get("layers", lp)
    for name, ab in layers.items():
        for k in ("lora_a", "lora_b"):
            filled["layers"][name][k] = jnp.asarray(ab[k], jnp.float32)


def base_params(model: Mistral) -> dict:
    """The frozen base weights as a pure dict (LoRA factors excluded)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.LoRAParam)))


def lora_params(model: Mistral) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))


def param_shapes(cfg: ModelConfig, lora: LoRAConfig | None = None) -> tuple[dict, dict]:
    """``(base, lora)`` pure dicts of the shapes ``cfg`` (and ``lora``) give, as ``jax.ShapeDtypeStruct`` leaves."""
    model = nnx.eval_shape(lambda: create_model(cfg, lora))
    return base_params(model), lora_params(model)
