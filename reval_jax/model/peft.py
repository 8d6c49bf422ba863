"""Export of a model with low-rank adapters: the merged model, and the adapter as Hugging Face PEFT writes it.

    merged_model(model)                 a new Decoder without adapters, target weights W + s·A·B (s = α/r)
    base_model(model)                   a new Decoder without adapters, the base W (what the adapter goes on)
    save_hf(merged_model(model), ...)   a plain HF model (hf.save_hf refuses a model that still has adapters)
    save_peft(model, path, base_model_name_or_path=...)
        adapter_config.json            peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...
        adapter_model.safetensors      base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...

Conventions (docs/lora.md): we compute x·W + s·(x·A)·B with A [L, in..., r], B [L, r, out...]; PEFT
computes W x + s·B (A x) with lora_A.weight [r, in] and lora_B.weight [out, r]. So per layer
lora_A.weight = Aᵀ and lora_B.weight = Bᵀ, with the head axes flattened as hf.py flattens the base
weight of that projection (row-major (N, H) -> N·H, no permutation): q_proj's B [r, N, H] becomes
[N·H, r], o_proj's A [N, H, r] becomes [r, N·H]. PEFT then applies the same scale, lora_alpha / r.

The adapter belongs on the model's *current* base: after a reference reset (a merge) that is no
longer the pretrained checkpoint, so export `base_model(model)` with it (save_hf) and name that
directory as `base_model_name_or_path`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from reval_jax.errors import UserError
from reval_jax.model.decoder import Decoder
from reval_jax.model.hf import TABLE, write_safetensors
from reval_jax.model.lora import LoraConfig, lora_config, merge_weight
from reval_jax.parallel.sharding import constrain

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM wraps the LoRA model, which wraps the HF model


def base_model(model: Decoder) -> Decoder:
    """A new model without adapters holding `model`'s base parameters (the same arrays, not copied):
    the model the PEFT adapter of `save_peft` goes on. `model` is left unchanged; a model without
    adapters is returned as is."""
    if lora_config(model) is None:
        return model
    out = nnx.clone(model)  # new Variables holding the same (immutable) arrays
    del out.adapters
    return out


def merged_model(model: Decoder) -> Decoder:
    """A new model without adapters whose target weights are W + (α/r)·A·B (computed in float32 as
    `lora.merge_weight`, stored in W's dtype and sharding); every other parameter is shared with
    `model`, which is left unchanged. s is α/r from the adapters' LoraConfig (the policy), whatever
    the model's current adapter scale. A model without adapters is returned as is."""
    lora = lora_config(model)
    if lora is None:
        return model
    out = base_model(model)
    scale = jnp.asarray(lora.scale, jnp.float32)
    for name in lora.targets:
        w = getattr(out, name)
        a, b = getattr(model.adapters, f"{name}_a")[...], getattr(model.adapters, f"{name}_b")[...]
        new, _, _ = merge_weight(w[...], a, b, scale)
        w.set_value(constrain(new, out.mesh, w.get_metadata()["axes"]))
    return out


def hf_module(target: str) -> str:
    """The HF module path of a target projection, `{i}` standing for the layer (from hf.TABLE),
    e.g. "model.layers.{i}.self_attn.q_proj"."""
    (hf,) = [rule.hf for rule in TABLE if rule.ours == target]
    return hf.removesuffix(".weight")


def adapter_config(lora: LoraConfig, base_model_name_or_path: str) -> dict:
    """adapter_config.json of PEFT 0.21 for these adapters: plain LoRA (no rsLoRA, DoRA, bias or
    dropout), scale lora_alpha / r, on the HF modules of the targets."""
    alpha = float(lora.alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "revision": None, "inference_mode": True, "r": lora.rank,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "target_modules": [hf_module(t).rsplit(".", 1)[1] for t in lora.targets],
        "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False,
    }


def _host(x: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array whole on this host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def peft_tensors(model: Decoder, dtype: np.dtype) -> dict[str, np.ndarray]:
    """The adapter tensors under PEFT's names, one layer at a time: lora_A.weight = Aᵀ [r, in],
    lora_B.weight = Bᵀ [out, r], head axes flattened row-major (as hf.py flattens the base)."""
    lora = lora_config(model)
    layer = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))
    out: dict[str, np.ndarray] = {}
    for name in lora.targets:
        a, b = getattr(model.adapters, f"{name}_a")[...], getattr(model.adapters, f"{name}_b")[...]
        module = PEFT_PREFIX + hf_module(name)
        for i in range(a.shape[0]):
            a_i, b_i = _host(layer(a, i)), _host(layer(b, i))  # [in..., r], [r, out...]
            a_i = a_i.reshape(math.prod(a_i.shape[:-1]), lora.rank).T
            b_i = b_i.reshape(lora.rank, math.prod(b_i.shape[1:])).T
            out[f"{module.format(i=i)}.lora_A.weight"] = np.ascontiguousarray(a_i).astype(dtype)
            out[f"{module.format(i=i)}.lora_B.weight"] = np.ascontiguousarray(b_i).astype(dtype)
    return out


def save_peft(model: Decoder, path: str | os.PathLike, *, base_model_name_or_path: str,
              dtype: str | None = None) -> Path:
    """Writes the adapters of `model` as a PEFT LoRA adapter directory (adapter_config.json and
    adapter_model.safetensors) that `peft.PeftModel.from_pretrained(base, path)` loads onto the
    base model `base_model_name_or_path`: the HF export of the model's current base weights,
    `save_hf(base_model(model), ...)` (the pretrained checkpoint only while no merge changed W).
    `dtype` defaults to the adapters' dtype. Every process fetches the arrays; process 0 writes."""
    lora = lora_config(model)
    if lora is None:
        raise UserError("save_peft: the model has no adapters (lora.add_adapters); save_hf exports it whole")
    path = Path(path)
    first = getattr(model.adapters, f"{lora.targets[0]}_a")[...]
    tensors = peft_tensors(model, np.dtype(jnp.dtype(dtype or first.dtype)))
    if jax.process_index() == 0:
        path.mkdir(parents=True, exist_ok=True)
        write_safetensors(path / ADAPTER_WEIGHTS, tensors)
        config = adapter_config(lora, base_model_name_or_path)
        (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path
