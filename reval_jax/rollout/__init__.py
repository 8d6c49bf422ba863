"""The rollout engine: how the policy is laid out for sampling and how rollouts are generated.

`layout` owns the inference layout: the policy cast to the rollout dtype and moved from the
trainer's FSDP master layout onto a tensor-parallel × data-replicated mesh before each generation
round (`layout.to_rollout`), so the compiled decode loop never gathers a weight.
"""
