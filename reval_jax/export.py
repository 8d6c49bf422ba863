"""`python -m reval_jax.export` and `reval_jax.export`: kept names of `reval_jax/run/export.py`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("reval_jax.run.export", run_name="__main__", alter_sys=True)
else:
    from reval_jax.run.export import *  # noqa: F403
