"""A run: Algorithm 1 and everything around it (commands, checkpoints, metrics, evaluation).

    train.py       `python -m reval_jax.train`: builds every part from the run config, then the trainer
    config.py      the run config validated once and turned into every part's typed config
    trainer.py     Algorithm 1's loop: take a round, buffer it, K updates with the reference reset
    hooks.py       what attaches to the loop: metrics, evaluation, checkpoints, progress, stop signals
    producer.py    one round: prompts -> rollout engine -> rewards (dynamic sampling) -> Trajectories
    pipeline.py    where a round's rollouts come from: generated in turn (sync) or ahead (async)
    record.py      the run's record of its configs: which starts may go on, config.start-<i>.json beside config.json
    checkpoint.py  Orbax checkpoints of the whole experiment, fingerprints, exact resume, quiet recovery
    metrics.py     one writer for stdout, metrics.jsonl and TensorBoard
    evaluate.py    `python -m reval_jax.evaluate`: avg@k on benchmarks
    export.py      `python -m reval_jax.export`: a checkpoint to a Hugging Face directory
    policy.py      loading a policy from HF weights or a training checkpoint, the run's mesh
    cli.py         what every entry point shares: quiet logging, one-line user errors
"""
