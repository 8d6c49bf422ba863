"""Export a training checkpoint to a Hugging Face directory.

    python -m reval_jax.export --checkpoint=runs/x[/checkpoints[/<iteration>]] --out=DIR [--dtype=bfloat16]

The run's `config.json` (in the workdir above `checkpoints/`) supplies the model architecture and
tokenizer (`model.path`); `--config` overrides it. `generation_config.json` carries the run's stop
tokens and sampling settings, so `generate()` in transformers stops where the run's sampler stops. The result loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and with `reval_jax.load_hf(DIR)`.

A LoRA run (config.lora.rank > 0; docs/lora.md) exports the policy twice: DIR is the merged model
(W + (α/r)·A·B, a plain HF model as above) and DIR/adapter a PEFT adapter (adapter_config.json,
adapter_model.safetensors) for the base it belongs on: the run's `model.path` while no reference
reset has merged into it, else DIR/base, the merged base, written too (HF, without the adapter).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import ml_collections

from reval_jax.errors import UserError


def workdir_config(checkpoint: str) -> ml_collections.ConfigDict:
    """The config.json of the run that wrote `checkpoint` (a checkpoints/ or step directory)."""
    path = Path(checkpoint).absolute()
    for parent in [path, *path.parents][:3]:
        if (parent / "config.json").exists() and (parent / "checkpoints").exists():
            return ml_collections.ConfigDict(json.loads((parent / "config.json").read_text()))
    raise FileNotFoundError(
        f"{checkpoint}: no run config.json found next to its checkpoints/ directory; pass --config"
    )


def export(checkpoint: str, out: str, *, config=None, dtype: str | None = None,
           max_shard_size: str = "5GB") -> Path:
    from reval_jax.model.hf import save_hf
    from reval_jax.model.lora import lora_config
    from reval_jax.model.peft import base_model, merged_model, save_peft
    from reval_jax.run.policy import load_checkpoint_policy, make_run_mesh

    config = config or workdir_config(checkpoint)
    info: dict = {}
    model, tokenizer = load_checkpoint_policy(checkpoint, config, make_run_mesh(config), info=info)
    sampling = {k: config.sampling[k] for k in ("temperature", "top_p", "top_k") if k in config.sampling}
    save = functools.partial(save_hf, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size,
                             sampling=sampling)
    if lora_config(model) is None:
        return save(model, path=out)
    path = save(merged_model(model), path=out)
    base = str(Path(config.model.path).absolute())
    if info["ref_version"] > 0:  # merges changed the base: the adapter goes on the merged one
        base = str(save(base_model(model), path=path / "base").absolute())
    save_peft(model, path / "adapter", base_model_name_or_path=base, dtype=dtype)
    return path


def main(argv):
    from absl import flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    config = FLAGS.config if FLAGS["config"].value else None
    path = export(FLAGS.checkpoint, FLAGS.out, config=config, dtype=FLAGS.dtype or None,
                  max_shard_size=FLAGS.max_shard_size)
    print(f"wrote {path}")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from reval_jax.run import cli

    config_flags.DEFINE_config_file("config", None, "Run config (default: the run's config.json).")
    flags.DEFINE_string("checkpoint", None, "A workdir, its checkpoints/ directory (the newest usable "
                        "step) or one step directory in it.")
    flags.DEFINE_string("out", None, "Output Hugging Face directory.")
    flags.DEFINE_string("dtype", "", "Saved dtype (default: the parameter dtype).")
    flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file.")
    flags.mark_flags_as_required(["checkpoint", "out"])
    cli.run_absl(main)
