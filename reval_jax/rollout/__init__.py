"""Generation: the policy laid out for sampling, and the engine that turns prompts into rollouts.

    sampler.py  SamplingConfig, Rollout, the sampling rule, `generate` (the engine's front door) and
                the static reference sampler (`generate_static`) the engine is tested against
    engine.py   continuous batching over decode slots on a paged KV cache (host loop + compiled steps)
    pages.py    the paged KV pool and the ragged attention that reads each row's own pages
    layout.py   the rollout layout: the policy cast and moved from the FSDP master layout onto a
                tensor-parallel x data-replicated mesh, so the compiled decode loop gathers no weight
"""
