"""What flows into and out of an update: prompts, rewards, the trajectory batch and the replay buffer.

    prompts.py    problem files (JSONL / Parquet) -> tokenised prompts, shuffled and batched with grain
    templates.py  how a problem becomes the prompt text (plain, qwen_math, r1_distill, ...) and stop tokens
    rewards.py    verifiable rewards (math-verify) in worker processes with a per-answer timeout
    batch.py      Trajectories: B prompt+response rows with masks, rewards, versions, reference terms
    replay.py     the host-side FIFO replay buffer (uniform or prioritized draws, checkpointable)
"""
