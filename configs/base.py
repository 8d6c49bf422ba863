"""Every field of a reval_jax run, documented in one comment each. Variants import this file and
override a handful of fields (see qwen7b.py, dpsk_r1_distill_1p5b.py, tiny.py); never copy it.

    python -m reval_jax.train --config=configs/qwen7b.py --config.beta=0.05 --workdir=runs/x
"""

import ml_collections
from ml_collections import config_dict

SHARED = "../shared/data/math"  # the project's math data, relative to the repository root


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # multi-turn, tool-using episodes (reval_jax/env, docs/multi_turn.md): the policy's turns and the environment's
    # observations share the response budget sampling.max_new_tokens; the losses see the policy's tokens only
    c.env = ml_collections.ConfigDict()
    c.env.name = "single_turn"  # single_turn (one answer, scored by reward.name) | calculator | python |
    #                             python_hermes | "module:Class" (reval_jax.env.base.ENVIRONMENTS)
    c.env.max_turns = 1  # policy turns per episode; a turn that still calls a tool at the last ends it, reward 0
    c.env.max_output_chars = 1024  # a tool's output is cut to this many characters in its observation
    c.env.sandbox_workers = 4  # Python tools: calls that run at once, each in its own sandboxed process
    c.env.sandbox_timeout_s = 10.0  # Python tools: wall clock per call (CPU time is limited alike)
    c.env.sandbox_memory_mb = 512  # Python tools: address space per call
    c.env.sandbox_site_packages = False  # Python tools: let the code import the interpreter's site-packages (sympy)

    c.seed = 0  # seeds data order, sampling and replay; same seed + same config = same run
    c.algorithm = "reval"  # reval | tbrm | regression | grpo | rloo | dapo (docs/algorithms.md): one flag apart
    c.algorithm_defaults = True  # apply what an algorithm implies (its record's defaults, objective/algorithms.py)
    c.num_iterations = 650  # generation rounds (Algorithm 1's outer loop)
    # a start on an existing workdir whose config differs from the run's recorded one (config.json, or the newest
    # config.start-<i>.json) in a field that can change results is refused, naming each field; True accepts it and
    # records this start's config beside the others as config.start-<first iteration>.json (config.json is never
    # rewritten). Free to change: num_iterations, progress, compile_cache, checkpoint.*, reward.num_workers
    c.allow_config_change = False

    c.model = ml_collections.ConfigDict()
    c.model.path = ""  # local Hugging Face directory (config.json, *.safetensors, tokenizer)
    c.model.preset = ""  # reval_jax.PRESETS name: shapes for `python -m reval_jax.scale` when model.path is absent
    c.model.param_dtype = "float32"  # master weights: float32 | bfloat16
    c.model.dtype = "bfloat16"  # compute dtype of forward passes (logits are always float32)
    c.model.remat = "full"  # none | full | dots | dots_no_batch: per-layer rematerialisation
    # one lax.scan over the layers (compile time independent of depth); False unrolls the loop: for a
    # few small layers on CPU the update is ~10 % faster (no stacked per-layer buffers), compile is longer
    c.model.scan_layers = True
    c.model.attention = "auto"  # auto (TPU splash, GPU cuDNN, else chunked) | chunked | cudnn | splash | xla | einsum
    c.model.ref_dtype = ""  # reference-policy storage dtype; "" = same as param_dtype

    # low-rank adapters (docs/lora.md): the base frozen, only A and B (rank r) trained; the reference policy is the
    # base with the adapter off (no copy, no optimizer state for the base) and a reference reset is a merge
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # adapter rank r; 0 = full fine-tuning (no adapters)
    c.lora.alpha = 0.0  # the adapter path is scaled by alpha / rank (PEFT's convention); 0 = 2 * rank (scale 2)
    c.lora.targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # which ones
    c.lora.base_dtype = ""  # storage dtype of the frozen base: "" = model.param_dtype; "bfloat16" halves it

    c.mesh = (1, -1, 1)  # (data, fsdp, tensor) device mesh; one -1 takes the remaining devices

    c.data = ml_collections.ConfigDict()
    c.data.train_files = (f"{SHARED}/math_train.jsonl",)  # JSONL or Parquet prompt files
    c.data.problem_key = "problem"  # column holding the problem text
    c.data.answer_key = "answer"  # column holding the ground-truth answer (a number is used as its string)
    c.data.strict = False  # True: a JSONL line that is not valid JSON is an error (else skipped and counted)
    c.data.template = "qwen_math"  # prompt template: r1_distill | qwen_math | qwen_math_tir | plain
    c.data.enable_thinking = config_dict.placeholder(bool)  # Qwen3 chat template: None = default, False = no thinking
    c.data.max_prompt_len = 1024  # prompts longer than this (in tokens) are dropped and counted
    c.data.prompts_per_iteration = 128  # prompts per generation round (global, all processes)

    c.sampling = ml_collections.ConfigDict()
    c.sampling.num_samples = 8  # rollouts per prompt (the GRPO group size)
    c.sampling.max_new_tokens = 8192  # response length limit; longer responses are truncated
    c.sampling.temperature = 1.0  # sampling temperature; the losses use logits / temperature too
    c.sampling.top_k = 0  # 0 = off
    c.sampling.top_p = 1.0  # 1.0 = off
    c.sampling.buckets = (128, 256, 512, 1024)  # prompt lengths compiled for (left padding)
    c.sampling.batch_size = 0  # rollouts generated per sampler call; 0 = the whole round at once

    # the sampler's copy of the policy (reval_jax/rollout/layout.py), rebuilt from the master weights every round:
    # cast to rollout.dtype and moved onto a (devices / tensor, 1, tensor) mesh of the same devices, whole on
    # every tensor-parallel group, so decoding gathers no weights
    c.rollout = ml_collections.ConfigDict()
    c.rollout.tensor = 1  # tensor-parallel size tp (divides devices, heads, kv heads); 1 = a whole model per device
    c.rollout.dtype = ""  # float32 | bfloat16 storage and compute dtype of the sampler's weights; "" = model.dtype
    c.rollout.chunk_mb = 256  # MiB of weights moved at a time from the training layout (bounds the transient)
    # the rollout engine (reval_jax/rollout/engine.py): continuous batching over decode slots, paged KV cache
    c.rollout.slots = 0  # rows decoded together; 0 = every sample of a sampler call at once
    c.rollout.page_size = 16  # tokens per KV-cache page
    c.rollout.cache_tokens = 0  # KV cache size in tokens (all slots together); 0 = slots × (prompt bucket + max_new)
    c.rollout.prefill_chunk = 512  # prompt tokens per prefill call and row
    c.rollout.decode_chunk = 0  # (row, page) pairs the decode attention reads per block; 0 = by platform

    # generation and training in turn (sync) or overlapped with bounded staleness (async): reval_jax/run/pipeline.py
    c.pipeline = ml_collections.ConfigDict()
    c.pipeline.mode = "sync"  # sync (generate, then train: the reproducible default) | async (generation runs ahead)
    c.pipeline.max_staleness = 0  # async: updates a round's weights may lag the trainer when it is trained
    c.pipeline.sync_every = 1  # async: push the trainer's weights to the rollout side every this many updates
    c.pipeline.rollout_devices = 0  # async: 0 = time-sliced on every device; n = the first n devices generate
    c.pipeline.pickup = "round"  # two groups: round (each round under one version, deterministic) | step
    c.pipeline.in_flight = "continue"  # step pickup: rows in flight continue under new weights | finish (old ones)
    c.pipeline.pickup_steps = 16  # step pickup: decode steps between checks for new weights

    c.reward = ml_collections.ConfigDict()
    c.reward.name = "math"  # reward function by name (reval_jax.data.rewards.REWARDS) or "module:fn"
    c.reward.transform = "centered"  # binary | centered (r − group mean) | plus_minus_one
    c.reward.num_workers = 4  # verifier processes
    c.reward.timeout_s = 10.0  # per-answer verifier time limit; a timeout scores 0 and is counted

    c.beta = 0.02  # reward scale β of ReVal / TBRM / regression (δ contains r/β)
    c.stop_grad_v = False  # ReVal: stop the gradient through V_θ(s_1)

    c.grpo = ml_collections.ConfigDict()
    c.grpo.aggregation = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum-norm
    c.grpo.clip_low = 0.2  # PPO clip ε_low
    c.grpo.clip_high = 0.28  # PPO clip ε_high (clip-higher)
    c.grpo.dual_clip = 3.0  # dual-clip constant c for negative advantages
    c.grpo.is_cap = 2.0  # cap C of the truncated importance correction π_old / π_sampler

    # DAPO (algorithm=dapo, docs/algorithms.md); its clip-higher bounds and loss aggregation are the grpo.* fields
    c.dapo = ml_collections.ConfigDict()
    c.dapo.overlong_cache = 0.2  # L_cache as a fraction of L_max = sampling.max_new_tokens (length penalty); 0 = off
    c.dapo.max_extra_generations = 8  # dynamic sampling: extra sampler calls per round to refill dropped groups

    c.replay = ml_collections.ConfigDict()
    c.replay.capacity = 5120  # FIFO buffer size M in trajectories
    c.replay.updates_per_iteration = 2  # K updates per generation round
    c.replay.schedule = "on_policy_first"  # on_policy_first (fresh batch, then K−1 buffer draws) | buffer_only
    c.replay.batch_size = 0  # trajectories per update; 0 = one round (prompts × samples)
    c.replay.prioritized = False  # prioritised replay by |δ| (the paper's named limitation)
    c.replay.alpha = 0.6  # priority exponent α
    c.replay.beta_is = 0.4  # importance-weight exponent β_IS
    # a new round's priority: max (the largest seen, as in Schaul et al.'s PER) | delta (its own |δ| from
    # the round's on-policy update, k = 0 of on_policy_first: the round is not drawn again for being new)
    c.replay.fresh_priority = "max"
    c.replay.on_reset = "recompute"  # recompute stale reference terms | flush the buffer on reset

    c.reference = ml_collections.ConfigDict()
    c.reference.reset_every = 200  # π_ref ← π_θ every R updates; 0 = never

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.learning_rate = 1e-6  # constant AdamW learning rate
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.01
    c.optimizer.max_grad_norm = 1.0  # global-norm clipping

    # Trajectories are packed end to end into rows of (prompt bucket + max_new_tokens) tokens, so padding
    # is not computed; the update, the reference pass and the stale-reference recompute run over
    # micro-batches of packed rows (gradients accumulated exactly).
    # tokens per device in one forward/backward: sets the micro-batch size. A call's last micro-batch may hold
    # fewer rows per device: at most tokens_per_device // row_tokens compiled shapes, each compiled once
    c.tokens_per_device = 16384
    c.row_tokens = 0  # tokens per packed row; 0 = one sequence (bucket + max_new_tokens); longer fit more short ones
    c.micro_batches = 0  # explicit micro-batches per update / reference pass (0 = budget); shapes follow the data
    c.max_segments_per_row = 16  # trajectories packed into one row at most
    c.chunk = 512  # positions of every row unembedded at a time when computing log-probs (memory vs speed)
    # both sides of δ (policy and reference) from one compiled forward in every update, so π_θ = π_ref gives
    # δ = −r/β exactly (paper Prop. 2); costs two forwards per micro-batch, saves the rollouts' reference pass
    c.exact_reference = True
    c.compile_cache = "jax_cache"  # persistent XLA compilation cache, relative to the workdir ("" = off)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = 10  # evaluate every E iterations (0 = never; also before the first round)
    c.eval.files = (  # benchmark files; each benchmark's name is its file stem
        f"{SHARED}/aime24.jsonl", f"{SHARED}/amc23.jsonl", f"{SHARED}/math500.jsonl",
        f"{SHARED}/minerva.jsonl", f"{SHARED}/olympiad.jsonl",
    )
    c.eval.limit = 100  # problems per benchmark (fixed-seed subset); 0 = all
    c.eval.k = 16  # samples per problem: avg@k
    c.eval.temperature = 1.0  # evaluation sampling temperature; 0 = greedy (argmax; `evaluate --greedy` also sets k 1)
    c.eval.max_new_tokens = 0  # 0 = sampling.max_new_tokens
    c.eval.stop_at = 0.0  # stop the run once the evaluation average avg@k reaches this (0 = never)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 10  # save the whole experiment state every C iterations (and at the end)
    c.checkpoint.keep = 3  # keep the last k checkpoints
    c.checkpoint.async_save = True  # write in the background, not stalling training
    c.max_skipped_in_a_row = 10  # stop the run after this many consecutive non-finite updates

    c.log_every = 1  # write metrics every N iterations
    c.wandb_project = ""  # log to Weights & Biases too when set and wandb is installed
    c.progress = True  # progress bars for generation and evaluation
    return c
