"""Looking at runs and programs from outside.

    scale.py           `python -m reval_jax.scale`: compiles a config's programs on abstract shapes and reports
                       per-device memory, what a device holds while each runs (with a fit verdict against a
                       named device), collectives and FLOPs
    scale_programs.py  the programs it compiles: the run's own jitted update / reference / prefill / decode,
                       built from the run config by reval_jax.run.config's builders, on abstract arguments, and
                       what the trainer keeps on the devices beside each (its resident state)
    scale_memory.py    resident state per device from the arrays' shardings (what is live and not an argument),
                       the named devices' memory (--device, --device_memory) and the fits / does-not-fit verdict
    buffers.py         the float32 copies of bfloat16 arrays a CPU compile keeps, from XLA's buffer assignment
    hlo.py             collective bytes of a compiled program, read from its HLO text with loop trip counts
    plot.py            `python -m reval_jax.plot`: curves of one or several runs as PNG files
    versions.py        `python -m reval_jax.tools.versions`: installed dependencies against pyproject.toml's ranges
"""
