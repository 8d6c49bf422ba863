"""The update: what is minimised and the compiled programs that minimise it.

    algorithms.py  the registry: each algorithm's loss, implied defaults, checks, advantages, reference need
    losses.py      ReVal's trajectory residual and the baselines' losses (pure, jittable), reward and advantage math
    logprobs.py    per-token log pi and V = logsumexp of packed rows, without the [R, L, V] logits
    packing.py     trajectories -> token-budget rows (segments), and the layout that unpacks results
    train_step.py  the train state, optimizer, reference statistics and the sharded, jitted update
"""
