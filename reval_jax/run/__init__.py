"""A run: Algorithm 1 and everything around it (commands, checkpoints, metrics, evaluation).

    train.py       `python -m reval_jax.train`: the training run (paper Algorithm 1)
    pipeline.py    where a round's rollouts come from: generated in turn (sync) or ahead (async)
    checkpoint.py  Orbax checkpoints of the whole experiment, fingerprints, exact resume
    metrics.py     one writer for stdout, metrics.jsonl and TensorBoard
    evaluate.py    `python -m reval_jax.evaluate`: avg@k on benchmarks
    export.py      `python -m reval_jax.export`: a checkpoint to a Hugging Face directory
    policy.py      loading a policy from HF weights or a training checkpoint, the run's mesh
    cli.py         what every entry point shares: quiet logging, one-line user errors
"""
