"""configs.py — presets as plain dicts, the embedded default model (a tiny random Qwen3), and which
--model names a run may load (check_model: never a download).

The demo preset needs no downloads: `tiny_qwen3()` builds a 2-layer Qwen3 from a config in code and
a byte-level tokenizer (256 byte tokens + chat specials, no merges) with a Qwen-style chat template.

The replay presets (demo, phase2) hold only values the replay probes apply (no
KL term: the probe is REINFORCE on fixed rows); the online presets (organism, fast, full) belong to
--source=online, and each kind of preset is refused by the other source. The values, and why
each was chosen, are the comments of PRESETS below; online sampling at another temperature or top-p than
1 is refused.

Precision: phase2, fast and full run the model in bf16. The adapter's gradients (everything the probe measures
at a step) are unaffected, but a change of an activation below bf16's resolution (about 0.4%) is rounded
away, so over few steps at lr=7e-5 vanilla and projected models diverge less than in exact arithmetic.
--dtype=float32 removes that, at twice the memory.

Reproducibility: reproducible() (below), called by every entry point before torch loads, makes same-seed
runs byte-identical on one machine at one thread count, not across CPU types.
"""
import os


def reproducible():
    """MKL's default CPU kernels can give results that depend on buffer alignment (1e-8 noise between two
    runs in one process); conditional numerical reproducibility in strict mode makes same-seed runs
    byte-identical on one CPU whatever the alignment, on the CPU's fastest code path ("COMPATIBLE", the
    portable path, runs float32 matmuls at about a third of the speed). Only effective before torch
    loads (MKL reads the variables once): every entry point calls this before importing torch or any
    module that does. Variables already set are kept."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")     # a fixed thread count, as reproducible mode needs

# defaults of settings that no preset sets (each has its flag in train.py, which overrides it)
CLIP_EPS = 0.2                    # PPO clip range epsilon (--clip-eps; antipasto.policy_losses)
LORA_RANK, LORA_ALPHA = 16, 32.0  # --basis=lora: rank r and alpha; the update is (alpha / r) B A
PENALTY = 3.0                     # --intervention=penalty: the reward subtracted from a flagged rollout
MONITOR_ACC = 1.0                 # --intervention=penalty/screening: P(the monitor's flag is right)
# run.json config fields added over time -> the value a run that predates the field used (read by --resume,
# analyze.py's experiment grouping and the v_hack file check; pair_kind also for v_hack files' metadata)
OLD_RUN_DEFAULTS = dict(basis="svd", pair_kind="pool", loss_type="grpo", loss_mode="grpo", source="replay",
                        grad_checkpointing=False, extract_loss="nll")

PRESETS = {
    # the demo: tiny random Qwen3 on CPU, demo pools, Phase 2 probe shape (G = 4 + 4); token limits above the
    # demo pools' longest prompt (1232) and completion (585 + eos), so nothing is cut
    "demo": dict(model="tiny", group_size=8, steps=20, lr=1e-3, k=1, dtype="float32",
                 max_prompt_tokens=1280, max_completion_tokens=640, seed=0),
    # spec2 Phase 2 on the real model: replay of the 20x8 teacher/base pools, 4 + 4 per step
    "phase2": dict(model="Qwen/Qwen3-4B", group_size=8, steps=20, lr=7e-5, k=1,
                   dtype="bfloat16", max_prompt_tokens=1536, max_completion_tokens=1024, seed=0),
}

# Online (Phase 3) presets: `python train.py --source=online [--preset P]`. Sampling settings:
#   temperature 1.0, top_p 1.0: GRPO samples from the policy itself. The generation-time log-probs are
#   the policy's own (temperature 1, no top-p), so PPO's ratio starts at exactly 1; a temperature or
#   top-p would make the behaviour policy differ from the one the ratio assumes, and a lower temperature
#   would also hide rare behaviours (a first hack) that RL has to find. eval_samples: rollouts per
#   held-out problem per kind (hint on: hack rate; hint off: capability).
ONLINE = dict(temperature=1.0, top_p=1.0, clip_eps=CLIP_EPS, inner_epochs=1, mix=0, n_problems=None, eval_frac=0.2,
              problems=None, eval_problems=None, micro_batch=None, gen_batch=None, grad_checkpointing=False)
PRESETS.update({
    # the CPU model organism (organism.py): 4 prompts x G=8 per step, short prompts, 60 steps in about a minute.
    # It starts near 5-10% hacks and learns to hack in the LoRA basis (the default here; +0.32 to +0.43 held out
    # in 60 steps on seeds 0-2, compile rate held). lr is delta_S's: the SVD basis (768 knobs on this model)
    # learns little at any rate measured (3e-3: +0.04 held out in 60 steps, compile 0.65 -> 0.61; 1e-2: +0.08
    # but compile 0.65 -> 0.26), so its arms measure an organism that barely moves. lr_lora (B A's) is 1e-3:
    # at 2e-3 the compile rate falls to 0.15. eval_samples=16: 6 held-out problems x 16 = 96 rollouts per
    # kind, sd of a rate near 0.3 about 0.05, so a 0.1 change shows
    "organism": dict(ONLINE, model="organism", basis="lora", group_size=8, prompts_per_step=4, steps=60, lr=3e-3,
                     lr_lora=1e-3, k=1, beta=1e-3, dtype="float32", max_prompt_tokens=256, max_completion_tokens=192,
                     seed=0, eval_every=20, eval_samples=16, save_every=5),
    # the successor repo's quick regime: 60 steps, G=8, 4 prompts, 512 new tokens
    "fast": dict(ONLINE, model="Qwen/Qwen3-4B", group_size=8, prompts_per_step=4, steps=60, lr=7e-5, k=1,
                 beta=1e-3, dtype="bfloat16", max_prompt_tokens=1536, max_completion_tokens=512, seed=0,
                 eval_every=10, eval_samples=2, save_every=5, micro_batch=4, grad_checkpointing=True, eval_frac=0.0),
    # spec2 Phase 3 "full preset": Qwen3-4B, G=6, pp=43 prompts per step, 992 problems, beta=1e-3,
    # lr=7e-5, 200 steps. fast and full train on every problem of --problems (eval_frac 0) and evaluate on
    # --eval-problems (the public environment's 119-problem test split)
    "full": dict(ONLINE, model="Qwen/Qwen3-4B", group_size=6, prompts_per_step=43, steps=200, lr=7e-5, k=1,
                 beta=1e-3, dtype="bfloat16", max_prompt_tokens=1536, max_completion_tokens=1024, seed=0,
                 n_problems=992, eval_every=20, eval_samples=1, save_every=5,
                 gen_batch=64, micro_batch=4, grad_checkpointing=True, eval_frac=0.0),
    # memory (configs.memory_budget, `train.py --dry-run`): the KV cache of all 258 rollouts at once would
    # be 97 GB, so full decodes 64 at a time (24 GB) and trains 4 rows per micro-batch with checkpointing:
    # about 49 GB estimated in all, inside one 80 GB GPU
})
ONLINE_ONLY = ("organism", "fast", "full")     # presets of --source=online; the others are replay presets

# the Linears both adapters wrap by default: Qwen3's attention and MLP projections
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)

# Qwen/Qwen3-4B's config.json (the shape the full preset trains; bench.py builds it with random weights)
QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                rms_norm_eps=1e-6, tie_word_embeddings=True)

# per-sample capture works through the activations in slices of at most this many elements, so its
# float32 temporaries stay near 3 x 4 x CAPTURE_CHUNK bytes however long the batch (both adapters)
CAPTURE_CHUNK = 1 << 22


def target_shapes(shape):
    """(d_out, d_in) of the TARGETS Linears of one Qwen3 decoder layer, in TARGETS order."""
    H, I = shape["hidden_size"], shape["intermediate_size"]
    q, kv = shape["num_attention_heads"] * shape["head_dim"], shape["num_key_value_heads"] * shape["head_dim"]
    return [(q, H), (kv, H), (kv, H), (H, q), (I, H), (I, H), (H, I)]


def memory_budget(shape, run):
    """Computed GPU memory (GB = 1e9 bytes) of one online step, item by item, for a Qwen3 `shape`
    (QWEN3_4B's keys) and a `run` dict: group, prompts_per_step, max_prompt_tokens,
    max_completion_tokens, micro_batch, dtype_bytes, basis ("svd" | "lora"), lora_rank,
    grad_checkpointing, and optionally gen_batch (rows decoded at once; default all of them).
    Generation and training never hold their buffers at once, so
        total = resident + max(generation, training)
    resident:   weights, adapter_basis (SVD U and Vh in the model dtype, S in float32), knobs
                (float32), grads (the batch gradient and micro_batch per-sample rows, float32),
                optimizer (AdamW's two float32 moments)
    generation: merged_copy (the targeted weights merged into plain Linears), kv_cache
    training:   activations (saved for backward by one micro-batch: all layers without
                checkpointing, layer inputs + one recomputed layer with it), logits (the lm head's
                output, its float32 copy and float32 log-softmax), capture (per-sample hook temporaries)
    Activations saved per token and layer (elements): input and output of both RMSNorms (4H), q and k
    before and after their norms, v and the attention output (3 (n_heads + n_kv) head_dim), gate, up,
    silu(gate) and their product (4I), plus per adapter module the (B, T, r) input of the knob product."""
    H, I, L, V = (shape[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    hd, nh, nkv = shape["head_dim"], shape["num_attention_heads"], shape["num_key_value_heads"]
    b, mb, basis = run["dtype_bytes"], run["micro_batch"], run["basis"]
    T = run["max_prompt_tokens"] + run["max_completion_tokens"]
    gen_batch = run.get("gen_batch") or run["group"] * run["prompts_per_step"]
    lins = target_shapes(shape)
    n_lin = L * sum(o * i for o, i in lins)
    params = V * H * (1 if shape.get("tie_word_embeddings", True) else 2) + n_lin + L * (2 * H + 2 * hd) + H
    if basis == "svd":
        basis_bytes = L * sum(min(o, i) * (o + i) * b + min(o, i) * 4 for o, i in lins)
        widths = [min(o, i) for o, i in lins]                    # delta_S per module
        n_knob, saved_r = L * sum(widths), sum(widths)           # h = Vh x: (B, T, r) per module
        w_hook = max(widths)
    elif basis == "lora":
        r = run["lora_rank"]
        basis_bytes = 0
        n_knob, saved_r = L * sum(r * (o + i) for o, i in lins), len(lins) * r   # h = A x: (B, T, rank)
        w_hook = max(max(o, i) for o, i in lins)                 # the hooks read (B, T, d_out) and (B, T, d_in)
    else:
        raise ValueError(f"basis must be svd or lora, not {basis!r}")
    per_layer = 4 * H + 3 * (nh + nkv) * hd + 4 * I + saved_r    # elements per token
    tokens = mb * T
    chunk = min(tokens * w_hook, max(CAPTURE_CHUNK, mb * w_hook))
    GB = 1e9
    items = dict(
        weights=params * b / GB,
        adapter_basis=basis_bytes / GB,
        knobs=n_knob * 4 / GB,
        grads=n_knob * 4 * (1 + mb) / GB,
        optimizer=2 * n_knob * 4 / GB,
        merged_copy=n_lin * b / GB,
        kv_cache=gen_batch * T * L * 2 * nkv * hd * b / GB,
        activations_no_ckpt=tokens * L * per_layer * b / GB,
        activations_ckpt=tokens * (L * H + per_layer) * b / GB,
        logits=tokens * V * (b + 4 + 4) / GB,
        capture=3 * 4 * chunk / GB)
    resident = sum(items[k] for k in ("weights", "adapter_basis", "knobs", "grads", "optimizer"))
    generation = items["merged_copy"] + items["kv_cache"]
    training = items["activations_ckpt" if run["grad_checkpointing"] else "activations_no_ckpt"] + \
        items["logits"] + items["capture"]
    return dict(items, resident=resident, generation=generation, training=training,
                total=resident + max(generation, training))


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer built in code: every string round-trips, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = CHAT_TEMPLATE
    return t


def random_qwen3(shape, seed=0, dtype=None, device="cpu", **config):
    """A randomly initialised Qwen3 of `shape` (TINY_QWEN3's / QWEN3_4B's keys; `config` adds or
    overrides Qwen3Config fields), deterministic in `seed`, sdpa attention, in eval mode."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(**dict(shape, **config))
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen3ForCausalLM(cfg)
    return (model if dtype is None else model.to(dtype)).eval()


def tiny_qwen3(seed=0):
    """(model, tokenizer): a randomly initialised 2-layer Qwen3, deterministic in `seed`."""
    tok = byte_tokenizer()
    model = random_qwen3(TINY_QWEN3, seed, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=None)
    model.config.name_or_path = f"tiny-qwen3-seed{seed}"
    return model, tok


def check_model(name):
    """'tiny', 'organism', a local model directory, or a Hugging Face id already in the local cache. Runs
    and `rollout.py generate` never download: a missing model fails here at once, in one line, saying how to
    get it, and without any network attempt (the cache is looked up on disk only)."""
    if name in ("tiny", "organism"):
        return
    if os.path.exists(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise SystemExit(f"error: --model={name}: the directory holds no config.json (not a model directory)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise SystemExit(f"error: --model={name}: no such local path ('tiny', a model directory or a Hugging Face "
                         f"id like Qwen/Qwen3-4B)")
    from huggingface_hub import constants, try_to_load_from_cache
    if not isinstance(try_to_load_from_cache(name, "config.json"), str):
        raise SystemExit(f"error: --model={name}: not a local path and not in the Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}); runs never download: get it with `hf download {name}` "
                         f"(or pass a local model directory)")
