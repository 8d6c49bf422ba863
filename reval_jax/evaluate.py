"""`python -m reval_jax.evaluate` and `reval_jax.evaluate`: kept names of `reval_jax/run/evaluate.py`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("reval_jax.run.evaluate", run_name="__main__", alter_sys=True)
else:
    from reval_jax.run.evaluate import *  # noqa: F403
