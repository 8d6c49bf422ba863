"""Experiments that use the library end to end.

    toy.py         tiny_arith: the embedded default model (pre-trained on arithmetic chains) and its task
    one_prompt.py  the paper's one-prompt experiment (Figure 3), with reval_jax's own training run
    evidence.py    issue #29's evidence: prioritized vs uniform replay, reuse vs K and reset, baselines at equal budgets
    evidence_report.py  its tables, intervals and plots (evidence.py --report_only writes them from the run records)
    toy_tool.py    tiny_tool: tiny_arith taught to call the calculator sometimes (the multi-turn demo's model)
"""
