"""Looking at runs and programs from outside.

    scale.py           `python -m reval_jax.scale`: compiles a config's programs on abstract shapes and reports
                       per-device memory, collectives and FLOPs
    scale_programs.py  the programs it compiles: the run's own jitted update / reference / prefill / decode,
                       built from the run config by reval_jax.run.config's builders, on abstract arguments
    hlo.py             collective bytes of a compiled program, read from its HLO text with loop trip counts
    plot.py            `python -m reval_jax.plot`: curves of one or several runs as PNG files
"""
