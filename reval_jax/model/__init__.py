"""The policy network: what a model is, how it computes, and how it comes in from Hugging Face.

    config.py     ModelConfig (one frozen dataclass for every family), named presets, HF config.json
    decoder.py    Decoder: the Qwen2 / Qwen3 / Llama 3 decoder in Flax NNX (stacked layers, KV cache)
    attention.py  causal grouped-query attention over segment ids, one function over several kernels
    lora.py       low-rank adapters on the stacked projections: add_adapters, the adapter scale (0 = the base), merge
    hf.py         load_hf / save_hf: the declarative HF tensor table, read forwards and backwards
    peft.py       LoRA export: merged_model (W + s·A·B, adapters gone) and save_peft (a Hugging Face PEFT adapter)
    tokenizer.py  the tiny local character tokenizer of the test and toy models
"""
