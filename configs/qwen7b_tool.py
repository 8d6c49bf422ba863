"""Qwen2.5-Math-7B-Instruct with tool-integrated reasoning (TIR): the paper's math data and settings
(configs/qwen7b.py) as multi-turn episodes of the Python tool (reval_jax/env/python_tool.py, docs/multi_turn.md).

The model writes a ```python block and opens the ```output block; its turn stops there, the sandbox runs
the program and appends its stdout (or its error), and the model continues; a turn without a call is the
final answer, scored by the math reward on the policy's text alone. The losses see the policy's tokens only.

    python -m reval_jax.train --config=configs/qwen7b_tool.py --workdir=runs/tir
    python -m reval_jax.scale --config=configs/qwen7b_tool.py     # its programs' memory (docs/scale.md)
"""

from configs import qwen7b


def get_config():
    c = qwen7b.get_config()
    c.model.path = "checkpoints/Qwen2.5-Math-7B-Instruct"  # download it yourself; runs never download
    c.model.preset = "qwen2.5-math-7b"  # the Instruct model has the base model's shapes (4,096 positions)
    c.data.template = "qwen_math_tir"  # Qwen's TIR system prompt, qwen_math's user text (data/templates.py)

    c.env.name = "python"  # Qwen2.5-Math's ```python / ```output format, programs run in the sandbox
    # Qwen2.5-Math's evaluation makes at most 4 generation calls per problem (max_func_call = 4): at most 3
    # tool outputs are read, and a 4th turn that still calls the tool ends the episode truncated, reward 0
    c.env.max_turns = 4
    # Qwen's executor cuts an output to 400 characters; digits are one token each in Qwen's vocabulary, so an
    # observation costs at most ~400 tokens and 3 of them at most ~1,200 of the response budget below
    c.env.max_output_chars = 400
    # The response budget sampling.max_new_tokens holds the whole episode after the prompt (policy turns and
    # observations together; the environment ends an episode that would overrun it). It stays qwen7b's 3,072:
    # prompt bucket 1,024 + 3,072 = the model's 4,096 positions, so a longer episode has no room in the
    # context anyway. Worst case 3 outputs of ~400 tokens leave ~1,900 policy tokens, against ~600-token
    # answers on average in the paper's single-turn runs.
    c.sampling.max_new_tokens = 3072
    # TIR programs import sympy and numpy: the sandbox must see the interpreter's site-packages (memory and
    # processes stay limited; a fresh interpreter importing sympy took ~1 s per call on the 2-core CPU
    # machine): SandboxConfig.site_packages.
    c.env.sandbox_site_packages = True
    c.env.sandbox_timeout_s = 10.0  # wall clock per call (CPU time alike): ~1 s of imports + Qwen's executor's 5 s
    c.env.sandbox_memory_mb = 512  # address space per call: sympy and numpy imported and ran within 256 MB here
    # calls that run at once, one process each: at ~1 s a call, a round of 1,024 episodes with ~2 calls each
    # takes ~64 s of tool time at 32 workers (an 8-GPU host has far more cores than that), spread over the
    # round while the engine decodes the other rows
    c.env.sandbox_workers = 32

    # Rows waiting on the sandbox keep their KV pages (parked, their slots go to other rows): the pool holds
    # the 256 decoding rows and as many parked ones at ~1,536 tokens each (an estimate: prompt + turns +
    # outputs), twice qwen7b's 393,216 tokens; past that the engine evicts parked rows (they re-prefill).
    # 786,432 tokens x 28 layers x 4 kv heads x 128 x 2 (k, v) x 2 bytes = 45 GB of bfloat16, 5.6 GB per
    # device on TP4 x DP2 (docs/scale.md, "Multi-turn TIR recipe")
    c.rollout.cache_tokens = 2 * 256 * 1536
    return c
