"""Looking at runs and programs from outside.

    scale.py  `python -m reval_jax.scale`: compiles a config's programs on abstract shapes (memory, collectives, FLOPs)
    hlo.py    collective bytes of a compiled program, read from its HLO text with loop trip counts
    plot.py   `python -m reval_jax.plot`: curves of one or several runs as PNG files
"""
