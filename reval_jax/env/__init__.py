"""Environments for multi-turn, tool-using rollouts, and the tools they run.

    sandbox.py     runs model-written code: each call in fresh processes with wall-clock, CPU, memory,
                   process, file and output limits, no network, a temporary working directory as the
                   only writable place (namespaces where the kernel allows it); a pool for a round's calls
    calculator.py  the tiny model's calculator tool: + - * / and parentheses over integers, by parsing
"""
