"""`python -m reval_jax.plot` and `reval_jax.plot`: kept names of `reval_jax/tools/plot.py`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("reval_jax.tools.plot", run_name="__main__", alter_sys=True)
else:
    from reval_jax.tools.plot import *  # noqa: F403
