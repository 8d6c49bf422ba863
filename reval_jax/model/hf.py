"""Hugging Face checkpoints in and out: `load_hf(path)` and `save_hf(model, tokenizer, path)`.

The conversion is one declarative table, `TABLE`, shared by every family (Qwen2, Qwen3 and Llama
name their tensors alike): HF tensor name -> our parameter, transpose and reshape. A config uses the
rows of the parameters its family has (`decoder.layer_param_names`: Qwen2's q/k/v biases, Qwen3's
q_norm / k_norm). Loading reads it forwards, saving reads it backwards. Tensors are read lazily from
memory-mapped safetensors files (bfloat16 included, no torch) and placed straight into their target
sharding with `jax.make_array_from_callback`: each device asks only for its own slice, one layer
tensor at a time, so a 7B model is never whole on one device nor twice in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from reval_jax.errors import UserError
from reval_jax.model.config import ModelConfig, from_hf_config, to_hf_config
from reval_jax.model.decoder import LAYER_PARAMS, Decoder, dims, layer_param_names
from reval_jax.parallel.sharding import state_shardings


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF tensor name; `{i}` stands for the layer index
    ours: str  # our parameter name (stacked over layers when `hf` has `{i}`)
    transpose: tuple[int, ...] | None = None  # applied to the HF tensor first
    shape: str | None = None  # then reshaped to these dims of our alphabet (per layer)


TABLE: tuple[Rule, ...] = (
    Rule("model.embed_tokens.weight", "embed"),  # [V, D]
    Rule("model.layers.{i}.input_layernorm.weight", "attn_norm"),  # [D]
    Rule("model.layers.{i}.self_attn.q_proj.weight", "q_proj", (1, 0), "DNH"),  # [N*H, D]
    Rule("model.layers.{i}.self_attn.q_proj.bias", "q_bias", None, "NH"),  # [N*H]
    Rule("model.layers.{i}.self_attn.q_norm.weight", "q_norm"),  # [H]
    Rule("model.layers.{i}.self_attn.k_proj.weight", "k_proj", (1, 0), "DKH"),  # [K*H, D]
    Rule("model.layers.{i}.self_attn.k_proj.bias", "k_bias", None, "KH"),
    Rule("model.layers.{i}.self_attn.k_norm.weight", "k_norm"),  # [H]
    Rule("model.layers.{i}.self_attn.v_proj.weight", "v_proj", (1, 0), "DKH"),
    Rule("model.layers.{i}.self_attn.v_proj.bias", "v_bias", None, "KH"),
    Rule("model.layers.{i}.self_attn.o_proj.weight", "o_proj", (1, 0), "NHD"),  # [D, N*H]
    Rule("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm"),
    Rule("model.layers.{i}.mlp.gate_proj.weight", "gate_proj", (1, 0)),  # [F, D]
    Rule("model.layers.{i}.mlp.up_proj.weight", "up_proj", (1, 0)),
    Rule("model.layers.{i}.mlp.down_proj.weight", "down_proj", (1, 0)),  # [D, F]
    Rule("model.norm.weight", "final_norm"),
    Rule("lm_head.weight", "lm_head", (1, 0)),  # [V, D]; absent when embeddings are tied
)
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # buffers that old checkpoints saved

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def _rules(cfg: ModelConfig) -> Iterator[tuple[Rule, str, int | None]]:
    """(rule, HF name, layer) for every tensor of a checkpoint with this config."""
    present = layer_param_names(cfg)
    for rule in TABLE:
        if rule.ours == "lm_head" and cfg.tie_word_embeddings:
            continue
        if rule.ours in LAYER_PARAMS and rule.ours not in present:
            continue
        if "{i}" in rule.hf:
            for i in range(cfg.num_layers):
                yield rule, rule.hf.format(i=i), i
        else:
            yield rule, rule.hf, None


def _to_ours(x: np.ndarray, rule: Rule, d: dict[str, int]) -> np.ndarray:
    if rule.transpose:
        x = x.transpose(rule.transpose)
    return x.reshape([d[c] for c in rule.shape]) if rule.shape else x


def _to_hf(y: np.ndarray, rule: Rule, hf_shape: tuple[int, ...]) -> np.ndarray:
    perm = rule.transpose or tuple(range(len(hf_shape)))
    y = y.reshape([hf_shape[p] for p in perm])
    return y.transpose(np.argsort(perm)) if rule.transpose else y


def _hf_shape(rule: Rule, d: dict[str, int], ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the HF tensor of one layer (our shape without the layer axis, flattened back)."""
    per_layer = ours_shape[1:] if "{i}" in rule.hf else ours_shape
    if rule.shape:  # e.g. DNH -> [D, N*H] before the transpose
        flat = {"DNH": ("D", "NH"), "DKH": ("D", "KH"), "NHD": ("NH", "D"), "NH": ("NH",),
                "KH": ("KH",)}[rule.shape]
        per_layer = tuple(math.prod(d[c] for c in group) for group in flat)
    if rule.transpose:
        per_layer = tuple(per_layer[p] for p in np.argsort(rule.transpose))
    return tuple(per_layer)


# ----------------------------------------------------------------------------- safetensors


class SafetensorsDir:
    """Lazy, memory-mapped reader of every `*.safetensors` file of a directory (one or sharded)."""

    def __init__(self, path: Path):
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (and no index) found")
        self.entries: dict[str, tuple[Path, dict]] = {}
        for name in files:
            file = path / name
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in {index.name} but missing")
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for tensor, info in header.items():
                self.entries[tensor] = (file, {**info, "offset": 8 + n})

    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name][1]["shape"])

    def read(self, name: str) -> np.ndarray:
        file, info = self.entries[name]
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]])
        mm = np.memmap(file, dtype=np.uint8, mode="r", offset=info["offset"] + start,
                       shape=(end - start,))
        return mm.view(dtype).reshape(info["shape"])


def write_safetensors(file: Path, tensors: dict[str, np.ndarray]) -> None:
    header, offset = {}, 0
    for name, x in tensors.items():
        header[name] = {"dtype": _NAMES[x.dtype], "shape": list(x.shape),
                        "data_offsets": [offset, offset + x.nbytes]}
        offset += x.nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for x in tensors.values():
            f.write(np.ascontiguousarray(x).tobytes())


# ----------------------------------------------------------------------------- load


def _check_tensors(cfg: ModelConfig, st: SafetensorsDir, expected: dict[str, tuple], path: Path):
    found = {n for n in st.names() if not IGNORED.match(n)}
    if cfg.tie_word_embeddings:
        found.discard("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    missing, unexpected = sorted(set(expected) - found), sorted(found - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{path}: checkpoint tensors do not match a {cfg.num_layers}-layer {cfg.family} config: "
            f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} ({len(missing)}), "
            f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
            f"({len(unexpected)}). Is config.json the one of these weights?"
        )
    for name, shape in expected.items():
        if st.shape(name) != shape:
            raise UserError(
                f"{path}: shape mismatch for tensor {name}: config.json implies {shape}, "
                f"the checkpoint has {st.shape(name)}"
            )


def load_hf(
    path: str | os.PathLike, *, mesh: Mesh | None = None, param_dtype: str | None = None,
    dtype: str | None = None, remat: str | None = None, attention: str | None = None,
    scan_layers: bool | None = None, load_tokenizer: bool = True,
):
    """Loads a local Hugging Face directory of a supported family (`config.FAMILIES`: Qwen2, Qwen3,
    Llama). Returns `(model, tokenizer)`.

    `param_dtype` / `dtype` / `remat` / `attention` / `scan_layers` override the ModelConfig fields
    (defaults: float32, attention "auto", scanned layers). With a
    `mesh`, every parameter is created directly in its sharded layout."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such Hugging Face model directory")
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{config_file}: missing; a Hugging Face model directory needs one")
    overrides = dict(param_dtype=param_dtype, dtype=dtype, remat=remat, attention=attention)
    overrides = {k: v for k, v in overrides.items() if v}
    if scan_layers is not None:
        overrides["scan_layers"] = scan_layers
    cfg = from_hf_config(json.loads(config_file.read_text()), source=str(config_file), **overrides)
    st = SafetensorsDir(path)
    d = dims(cfg)

    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0), mesh=mesh))
    graphdef, state = nnx.split(abstract)
    shapes = {name: v.get_value().shape for name, v in state.items()}
    expected = {hf: _hf_shape(rule, d, shapes[rule.ours]) for rule, hf, _ in _rules(cfg)}
    _check_tensors(cfg, st, expected, path)

    by_param: dict[str, tuple[Rule, list[str]]] = {}
    for rule, hf, _ in _rules(cfg):
        by_param.setdefault(rule.ours, (rule, []))[1].append(hf)
    pdt = np.dtype(jnp.dtype(cfg.param_dtype))
    shardings = state_shardings(state, mesh) if mesh is not None else None

    def build(name: str, sharding) -> jax.Array:
        rule, hf_names = by_param[name]
        shape = shapes[name]

        def piece(index: tuple[slice, ...]) -> np.ndarray:
            if "{i}" not in rule.hf:
                return np.asarray(_to_ours(st.read(hf_names[0]), rule, d)[index], pdt)
            layers = range(cfg.num_layers)[index[0]]
            return np.stack(
                [np.asarray(_to_ours(st.read(hf_names[i]), rule, d)[index[1:]], pdt) for i in layers]
            )

        if sharding is None:
            return jnp.asarray(piece(tuple(slice(None) for _ in shape)))
        return jax.make_array_from_callback(shape, sharding, piece)

    for name, var in state.items():
        var.set_value(build(name, None if shardings is None else shardings[name].get_value()))
    model = nnx.merge(graphdef, state)
    tokenizer = load_tokenizer_dir(path) if load_tokenizer else None
    return model, tokenizer


def load_tokenizer_dir(path: str | os.PathLike):
    import transformers

    path = Path(path)
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise FileNotFoundError(
            f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json); copy them from "
            "the original checkpoint or pass load_tokenizer=False"
        )
    config_file = path / "tokenizer_config.json"
    tokenizer_class = json.loads(config_file.read_text()).get("tokenizer_class") if config_file.exists() else None
    if tokenizer_class in ("PreTrainedTokenizerFast", "TokenizersBackend"):
        # A plain `tokenizers` tokenizer (e.g. the project's char tokenizer): AutoTokenizer would
        # pick the class of config.json's model_type (Qwen2Tokenizer) and rebuild its pre-tokenizer.
        # Needed for directories saved before `save_tokenizer` (the embedded tiny_arith model);
        # newer exports load the same either way.
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)
    return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ----------------------------------------------------------------------------- save


def save_tokenizer(tokenizer, path: Path) -> None:
    """The tokenizer files, loadable by `AutoTokenizer.from_pretrained(path)` anywhere: the
    project's character tokenizer is written in its byte-level spelling (same ids; see
    `tokenizer.byte_level_char_tokenizer`), and load-time options (`local_files_only`, `is_local`)
    are not saved as if they were the tokenizer's."""
    from reval_jax.model.tokenizer import byte_level_char_tokenizer, is_char_tokenizer

    if is_char_tokenizer(tokenizer):
        tokenizer = byte_level_char_tokenizer(tokenizer)
    tokenizer.save_pretrained(str(path))
    config_file = path / "tokenizer_config.json"
    if config_file.exists():
        tokenizer_config = json.loads(config_file.read_text())
        for key in ("local_files_only", "is_local"):
            tokenizer_config.pop(key, None)
        config_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _host_slices(model: Decoder) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple[int, ...], Rule]]:
    """(HF name, thunk giving the HF tensor on host, HF shape, rule) — one layer at a time."""
    cfg, d = model.cfg, dims(model.cfg)
    layer = jax.jit(lambda x, i: jax.lax.dynamic_index_in_dim(x, i, keepdims=False))

    def fetch(x):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    for rule, hf, i in _rules(cfg):
        param = getattr(model, rule.ours)[...]
        shape = _hf_shape(rule, d, param.shape)
        if i is None:
            yield hf, (lambda p=param, r=rule, s=shape: _to_hf(fetch(p), r, s)), shape, rule
        else:
            yield hf, (lambda p=param, i=i, r=rule, s=shape: _to_hf(fetch(layer(p, i)), r, s)), shape, rule


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", size.upper())
    if not m:
        raise UserError(f"max_shard_size={size!r}: expected bytes or a string like '5GB', '200MB'")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def save_hf(
    model: Decoder, tokenizer, path: str | os.PathLike, *, max_shard_size: int | str = "5GB",
    dtype: str | None = None, sampling: dict[str, Any] | None = None,
) -> Path:
    """Writes `model` (and `tokenizer`, if given) as a Hugging Face directory of its family
    (`config.to_hf_config`): config.json,
    safetensors shards of at most `max_shard_size` (with model.safetensors.index.json when there is
    more than one), and the tokenizer files. `dtype` defaults to the model's parameter dtype.

    With a tokenizer, `eos_token_id` (config.json and generation_config.json) is the list of the
    ids the project's sampler stops at (`templates.stop_token_ids`: <|im_end|>, <|endoftext|>, ...),
    so `transformers` `generate()` stops where reval_jax's sampler stops; `sampling`
    ({temperature, top_p, top_k}, e.g. the run's config.sampling) sets generate()'s defaults.
    A model with LoRA adapters is refused: export `peft.merged_model(model)` (and `peft.save_peft`)."""
    if getattr(model, "adapters", None) is not None:
        raise UserError("save_hf: the model has LoRA adapters: export merged_model(model) (and save_peft for "
                        "the adapter); see reval_jax.model.peft")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    out_dtype = np.dtype(jnp.dtype(dtype or model.cfg.param_dtype))
    writer = jax.process_index() == 0
    files, total = _write_parts(model, path, limit, out_dtype, writer)
    if writer:
        _name_shards(path, files, total)
        cfg_json = to_hf_config(model.cfg, torch_dtype=str(jnp.dtype(out_dtype)))
        if tokenizer is not None:
            special = generation_config(tokenizer, sampling)
            cfg_json.update({k: special[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in special})
            (path / "generation_config.json").write_text(json.dumps(special, indent=2))
            save_tokenizer(tokenizer, path)
        (path / "config.json").write_text(json.dumps(cfg_json, indent=2))
    return path


def _write_parts(model: Decoder, path: Path, limit: int, out_dtype: np.dtype,
                 writer: bool) -> tuple[list[tuple[str, list[str]]], int]:
    """The model's tensors in `out_dtype`, as temporary safetensors parts of at most `limit` bytes
    (written by the `writer` process only; every process fetches its slices alike). Returns the
    parts [(file, tensor names)] and the total bytes."""
    current: dict[str, np.ndarray] = {}
    size = 0
    files: list[tuple[str, list[str]]] = []
    total = 0

    def flush():
        nonlocal current, size
        if current:
            tmp = f"part-{len(files):05d}.tmp"
            if writer:
                write_safetensors(path / tmp, current)
            files.append((tmp, list(current)))
            current, size = {}, 0

    for hf, thunk, shape, _ in _host_slices(model):
        nbytes = math.prod(shape) * out_dtype.itemsize
        if current and size + nbytes > limit:
            flush()
        current[hf] = thunk().astype(out_dtype)
        size += nbytes
        total += nbytes
    flush()
    return files, total


def _name_shards(path: Path, files: list[tuple[str, list[str]]], total: int) -> None:
    """Replaces the directory's old weights by the parts: model.safetensors when there is one,
    else model-0000i-of-0000n.safetensors and model.safetensors.index.json."""
    for stale in list(path.glob("model*.safetensors")) + list(path.glob("model.safetensors.index.json")):
        stale.unlink()
    weight_map = {}
    for n, (tmp, names) in enumerate(files):
        final = "model.safetensors" if len(files) == 1 else f"model-{n + 1:05d}-of-{len(files):05d}.safetensors"
        (path / tmp).rename(path / final)
        weight_map.update({name: final for name in names})
    if len(files) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def generation_config(tokenizer, sampling: dict[str, Any] | None = None) -> dict[str, Any]:
    """generation_config.json of an export: the sampler's stop ids as `eos_token_id` (one id, or
    the list), pad and bos ids, and sampling defaults (greedy when temperature is 0)."""
    from reval_jax.data.templates import stop_token_ids

    stops = stop_token_ids(tokenizer)
    out: dict[str, Any] = {"eos_token_id": stops[0] if len(stops) == 1 else stops}
    for name in ("bos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            out[name] = int(getattr(tokenizer, name))
    if sampling is not None:
        temperature = float(sampling.get("temperature", 1.0))
        out["do_sample"] = temperature > 0
        if temperature > 0:
            out.update(temperature=temperature, top_p=float(sampling.get("top_p", 1.0)),
                       top_k=int(sampling.get("top_k", 0)))
    return out
