"""Devices: the mesh, sharding as data, and JAX's own multi-host runtime.

    sharding.py     logical axis names, one rules table onto the (data, fsdp, tensor) mesh, make_mesh
    distributed.py  jax.distributed start-up, host <-> global array moves, each process's share of rows
"""
