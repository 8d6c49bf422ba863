"""Environments for multi-turn, tool-using rollouts, and the tools they run.

    sandbox.py     runs model-written code: each call in fresh processes with wall-clock, CPU, memory,
                   process, file and output limits, no network, a temporary working directory as the
                   only writable place (namespaces where the kernel allows it); a pool for a round's calls
    calculator.py  the tiny model's calculator tool: + - * / and parentheses over integers, by parsing
    base.py        the interface: EnvConfig, reset/step/step_many, Step (an observation's token ids, tokenized
                   once, or the end with a reward), Stops (per-format stop strings and ids), SingleTurn (the
                   one-turn math task), the registry (get_environment: a name or "module:Class")
    python_tool.py Python tool-integrated reasoning in the sandbox: Qwen2.5-Math ```python / ```output blocks
                   ("python") and Qwen/Hermes <tool_call> JSON with <tool_response> turns ("python_hermes")
    calculator_env.py  the tiny model's calculator calls, <<7-3>> answered with =4 ("calculator")
    rollout.py     EnvTurns: an environment's episodes driven by the rollout engine (its Turns), stepped
                   on a worker thread while the engine decodes
"""
