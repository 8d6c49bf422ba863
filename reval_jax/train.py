"""`python -m reval_jax.train` and `reval_jax.train`: kept names of `reval_jax/run/train.py`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("reval_jax.run.train", run_name="__main__", alter_sys=True)
else:
    from reval_jax.run.train import *  # noqa: F403
