"""Generation: the policy laid out for sampling, and the engine that turns prompts into rollouts.

The files follow the data, requests -> scheduler -> page table -> compiled step -> rollouts:

    sampler.py         `generate`, the front door: prompts in, a Rollout out, through the engine
    sampling.py        what both samplers share: SamplingConfig, Rollout, prompt padding and
                       buckets, the sampling rule (`sample_logits`; on a mesh each data replica
                       draws its own rows, `sample_logits_on_mesh`) and the key rule
    engine.py          the engine's host loop: admit, prefill, decode, collect, preempt, repeat
                       (`Engine.run`); its EngineConfig comes from reval_jax.run.config
    scheduler.py       the host side as one object: the queue, the typed slot table and the page
                       allocator; admit / collect / preempt, and multi-turn rows parked between turns
    stops.py           stop strings as automata over token ids, advanced inside the decode loop
    page_table.py      EngineConfig, the cache geometry (slots, table width, replicas, pages), the
                       pages-needed rule, the capacity error, the per-replica free lists
    programs.py        the compiled prefill / decode steps, pure functions of (params, state), and
                       their abstract calls for the scale checker
    pages.py           the paged KV pool and the ragged attention that reads each row's own pages
    static_sampler.py  the static sampler (`generate_static`): the reference the engine is tested
                       against, one dense cache per row
    layout.py          the rollout layout: the policy cast and moved from the FSDP master layout onto a
                       tensor-parallel x data-replicated mesh, so the compiled decode loop gathers no weight

Imports go one way: sampling <- static_sampler, stops <- page_table <- programs <- scheduler <- engine <- sampler.
"""
