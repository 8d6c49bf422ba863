"""`python -m reval_jax.scale` and `reval_jax.scale`: kept names of `reval_jax/tools/scale.py`."""

if __name__ == "__main__":
    import runpy

    runpy.run_module("reval_jax.tools.scale", run_name="__main__", alter_sys=True)
else:
    from reval_jax.tools.scale import *  # noqa: F403
