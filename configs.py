"""configs.py — presets as plain dicts, every default, train.py's command line (get_args: the flags over
the preset, resolved into one config and checked), the embedded default model (a tiny random Qwen3), and
which --model names a run may load (check_model: never a download).

Every flag is checked before anything is created (--steps >= 1, --k >= 1, --lr > 0, --per-pool between 1
and the rows a pool replays, --extract-frac in [0, 1), existing --pairs and pool directories, a --model
that is tiny, a local directory or a cached Hugging Face id); a bad value stops with one line that names
the flag and what is allowed. --model without --preset says which learning rate and limits it takes.

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
import argparse, hashlib, json, math, os, sys

import interventions   # --intervention's values (standard library only)
import pools           # the demo pools' directories (standard library only)


def reproducible():
    """MKL's default CPU kernels can give results that depend on buffer alignment (1e-8 noise between two
    runs in one process); conditional numerical reproducibility in strict mode makes same-seed runs
    byte-identical on one CPU whatever the alignment, on the CPU's fastest code path ("COMPATIBLE", the
    portable path, runs float32 matmuls at about a third of the speed). Only effective before torch
    loads (MKL reads the variables once): every entry point calls this before importing torch or any
    module that does. Variables already set are kept."""
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")     # a fixed thread count, as reproducible mode needs

# --arm's values: what an arm does to the gradient is train.train_step's; everything else reads it here.
# role: "reference" measures only and is what every treatment is compared with (same seed and basis; the
# controls and interventions run on it), "treatment" changes the step. projects: the step removes the
# hack-ward component (train.apply_step; analyze's projection checks read these arms). marker, ls: the
# arm's curves in analyze --plot.
ARMS = {
    "vanilla": dict(role="reference", projects=False, help="measure cos_in/cos_out only", marker="o", ls="-"),
    "projected": dict(role="treatment", projects=True, help="remove the hack-ward gradient component",
                      marker="s", ls="--"),
}
REFERENCE = next(a for a, f in ARMS.items() if f["role"] == "reference")   # the one reference arm

# defaults of settings that no preset sets (each has its flag in train.py, which overrides it)
LOSS_TYPES = ("grpo", "dr_grpo", "bnpo")   # --loss-type: the token reduction (antipasto.token_denoms)
CLIP_EPS = 0.2                    # PPO clip range epsilon (--clip-eps; antipasto.policy_losses)
LORA_RANK, LORA_ALPHA = 16, 32.0  # --basis=lora: rank r and alpha; the update is (alpha / r) B A
PENALTY = 3.0                     # --intervention=penalty: the reward subtracted from a flagged rollout
MONITOR_ACC = 1.0                 # --intervention=penalty/screening: P(the monitor's flag is right)
# run.json config fields added over time -> the value a run that predates the field used (read by --resume,
# analyze.py's experiment grouping and the v_hack file check; pair_kind also for v_hack files' metadata)
OLD_RUN_DEFAULTS = dict(basis="svd", pair_kind="pool", loss_type="grpo", loss_mode="grpo", source="replay",
                        grad_checkpointing=False, extract_loss="nll")


def upgrade_run_config(config):
    """An old run.json's config in today's names, the one place old runs are read (--resume, analyze.py):
    a field added since takes the value the run used (OLD_RUN_DEFAULTS), and an online run from before
    group_size meant G everywhere (it stored G as `group` and the rows per step as group_size) is mapped."""
    c = dict(OLD_RUN_DEFAULTS, **config)
    if "group" in c:
        c["group_size"] = c.pop("group")
    return c

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
    # but compile 0.65 -> 0.26), so its arms measure an organism that barely moves. The collapse is AdamW's
    # drift, not the reward: with rewards shuffled within groups, 16 prompts a step and lr 1e-2, compile falls
    # 0.65 -> 0.06. Nor is it noise: a reward paying only for hacks moves it to 0.17 held out (LoRA: 0.55); the
    # basis cannot express the hack apart from everything else (README, "The CPU organism", lists every setting
    # tried; svd_diagnosis.py reproduces them). lr_lora (B A's) is 1e-3:
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

EMBEDDED = ("tiny", "organism")   # the models built in code; only they take v_hack and --mix rows from the demo pools
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



def model_shape(name):
    """The model's config dict (hidden size, layers, heads, vocab) without loading weights (--dry-run): the
    tiny and organism shapes from TINY_QWEN3, a local or cached config.json, or the known Qwen3-4B shape."""
    if name in EMBEDDED:
        return dict(TINY_QWEN3, vocab_size=1024 if name == "organism" else 259)
    path = os.path.join(name, "config.json") if os.path.isdir(name) else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")
        path = hit if isinstance(hit, str) else None
    if path:
        with open(path) as f:
            return json.load(f)
    if name == "Qwen/Qwen3-4B":
        return dict(QWEN3_4B)
    raise SystemExit(f"error: --model={name}: --dry-run needs its config.json (a local directory or the Hugging Face "
                     f"cache)")


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
    if name in EMBEDDED:
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


# ----------------------------------------------------------------------------- the command line
# train.py's flags over the presets: get_args gives the one resolved config, every flag checked first


ONLINE_KEYS = ("problems", "eval_problems", "eval_frac", "group_size", "prompts_per_step", "mix", "inner_epochs",
               "clip_eps", "beta", "temperature", "top_p", "eval_every", "eval_samples", "micro_batch", "gen_batch")


def flag_of(key):
    """The flag that sets a config key: each quantity has one name in flag, preset and run.json."""
    return "--" + key.replace("_", "-")


def get_args(argv=None, doc=None):
    """train.py's command line (its --help shows `doc`) as the resolved config: the flags over the preset (args, and args.cfg the preset's dict with the
    flags that override it), every flag checked (validate) before anything is read or created."""
    ap_ = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def one_line(message):                 # argparse's own errors (--steps=abc): one line, not the usage text
        raise SystemExit(f"error: {message} (python train.py --help lists the flags)")
    ap_.error = one_line
    a = ap_.add_argument
    experiment_flags(a)
    run_flags(a)
    online_flags(ap_.add_argument_group("online (Phase 3): --source=online").add_argument)
    a("--no-report", action="store_true", help="skip the analysis report at the end")
    a("--quiet", action="store_true", help="no progress bar and no summary (implies --no-report)")
    args = ap_.parse_args(argv)
    args.given = {k: v for k, v in vars(args).items() if v != ap_.get_default(k)}   # what names the run directory
    return resolve(args)


def experiment_flags(a):
    """The flags of the experiment: arm, loss, data, v_hack and its pairs, the adapter."""
    a("--arm", choices=tuple(ARMS), default=REFERENCE, help="; ".join(f"{k}: {f['help']}" for k, f in ARMS.items()))
    a("--loss-mode", choices=("grpo", "nll"), default="grpo",
      help="grpo: Dr.GRPO centred advantage, REINFORCE loss (Phase 2); nll: distillation probe (Phase 1)")
    a("--replay-dirs", default=None,
      help="comma-separated pool dirs mixed into each group (default: the demo pools, built if absent)")
    a("--per-pool", type=int, default=None, help="rows drawn from each pool per step (default: G / #pools)")
    a("--steps", type=int, default=None, help="optimizer steps (default: preset)")
    a("--seed", type=int, default=None, help="seed of the draw and of controls (default: preset)")
    a("--lr", type=float, default=None,
      help="AdamW learning rate on the adapter's knobs (default: preset; its lr_lora with --basis=lora when it has one)")
    a("--model", default=None, help="'tiny' (random Qwen3 built locally) or a Hugging Face id / local path")
    a("--preset", default=None, choices=sorted(PRESETS), help="defaults from configs.py (default: demo)")
    a("--v-hack", default=None, help="v_hack file; extracted from held-out pairs and saved there when missing")
    a("--extract-loss", choices=("nll", "grpo"), default="nll",
      help="v_hack extraction loss: mean completion NLL (spec default) or GRPO-style (spec R7)")
    a("--pairs", default=None,
      help="JSON Lines of {prompt, hack, clean[, r_hack, r_clean]} for extraction (default: held-out pool steps)")
    a("--pair-dirs", default=None,
      help="comma-separated pools to build extraction pairs from (default: --replay-dirs, or the demo pools)")
    a("--extract-frac", type=float, default=0.25,
      help="fraction of each pool's steps (the last ones) held out for v_hack pairs, never replayed")
    a("--k", type=int, default=None, help="hack axes kept per module (default: preset, 1)")
    a("--basis", choices=("svd", "lora"), default=None,
      help="adapter basis: svd (delta_S, antipasto.py) or lora (weight basis B A, lora_adapter.py; Arm 3 "
           "with --arm=projected, its matched control with --arm=vanilla) (default: the preset's, else svd)")
    a("--lora-rank", type=int, default=None, help=f"--basis=lora: rank r (default {LORA_RANK})")
    a("--lora-alpha", type=float, default=None,
      help=f"--basis=lora: alpha; the update is (alpha/r) B A (default {LORA_ALPHA:g})")
    a("--control", choices=("none", "random_v", "shuffled_v", "style_v"), default="none",
      help="replace v_hack by a random orthonormal V, a label-shuffled extraction, or style_v: a direction "
           "from pairs that differ in pool but not in hacking (teacher completions minus their test "
           "function vs base completions of the same problem)")
    a("--pair-kind", choices=("pool", "mechanism"), default="pool",
      help="v_hack pairs: pool = each hacked teacher completion vs a base completion of the same problem; "
           "mechanism = each hacked completion vs itself with its run_tests removed (the hack and nothing else)")
    a("--loss-type", choices=LOSS_TYPES, default="grpo",
      help="token reduction (TRL's names): grpo = per-sequence mean 1/|o_i| (the spec's loss), "
           "dr_grpo = sum / (G * max completion tokens), bnpo = sum / all completion tokens of the group")


def run_flags(a):
    """Token limits, the projection's variants, the run directory, device and dtype, checkpoints."""
    a("--max-prompt-tokens", type=int, default=None, help="prompt token limit, cut from the left (default: preset)")
    a("--max-completion-tokens", "--max-completion-length", dest="max_completion_tokens", type=int, default=None,
      help="completion token limit, cut from the right (TRL's max_completion_length) (default: preset); every "
           "cut is counted")
    a("--no-gate", action="store_true", help="remove the whole V-span component, not only the hack-ward part")
    a("--project-moments", action="store_true",
      help="projected arm: also remove the hack-ward part of AdamW's first moment and of the applied update "
           "(Adam's per-coordinate scaling can turn a projected gradient into a hack-ward update)")
    a("--out", default=None, help="run directory (default: out/runs/<arm>_<loss>_<control>_s<seed>, then "
                                  "_<flag>-<value> for every other flag given that changes the experiment)")
    a("--overwrite", action="store_true", help="replace an existing run directory")
    a("--resume", action="store_true", help="continue an existing run directory from its last step")
    a("--device", default=None, help="cpu / cuda (default: cuda when available)")
    a("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
      help="model dtype (default: preset). In bf16, changes below ~0.4%% of an activation round away")
    a("--save-every", type=int, default=None,
      help="write the checkpoint every N steps and after the last (default: preset; replay: every step)")


def online_flags(o):
    """The online (Phase 3) flags; the ones in ONLINE_KEYS override the preset's values."""
    o("--source", choices=("replay", "online"), default="replay",
      help="replay: train on graded pools (Phase 1/2); online: the student generates, is graded, trains")
    o("--problems", default=None,
      help="problems JSON Lines, the public environment's format (default: the fixture problems)")
    o("--eval-problems", default=None,
      help="held-out problems for --eval-every (default: the last --eval-frac of --problems by id hash)")
    o("--eval-frac", type=float, default=None, help="fraction of --problems held out for evaluation")
    o("--group-size", "--num-generations", "--group", dest="group_size", type=int, default=None,
      help="rollouts per prompt, G (TRL's num_generations; --group: the old spelling) (default: preset)")
    o("--prompts-per-step", type=int, default=None, help="problems per step (default: preset)")
    o("--mix", type=int, default=None,
      help="rows of each group replaced by teacher-pool rows of the same problem (src_pool tells them apart)")
    o("--teacher-dir", default=None, help="the pool --mix draws from (default: the demo teacher pool)")
    o("--inner-epochs", "--num-iterations", dest="inner_epochs", type=int, default=None,
      help="optimizer steps per batch of rollouts (PPO epochs; TRL's num_iterations)")
    o("--clip-eps", "--epsilon", dest="clip_eps", type=float, default=None,
      help=f"PPO clip range epsilon (TRL's epsilon) (default {CLIP_EPS})")
    o("--beta", type=float, default=None, help="weight of the K3 KL to the reference (knobs zeroed)")
    o("--temperature", type=float, default=None, help="sampling temperature (default: preset, 1.0)")
    o("--top-p", type=float, default=None, help="nucleus sampling threshold (default: preset, 1.0)")
    o("--eval-every", type=int, default=None, help="evaluate on held-out problems every N steps (0: never)")
    o("--eval-samples", type=int, default=None, help="rollouts per held-out problem and kind")
    o("--micro-batch", type=int, default=None,
      help="rows per forward/backward; gradients and per-sample contributions accumulate (default: all)")
    o("--gen-batch", type=int, default=None,
      help="rollouts decoded at once (the KV cache's size; default: preset, all of the step's rollouts)")
    o("--grad-checkpointing", action="store_true",
      help="recompute activations in the backward (less memory; the full preset turns it on)")
    o("--intervention", choices=interventions.INTERVENTIONS, default="none",
      help=interventions.HELP)
    o("--penalty", type=float, default=None,
      help=f"--intervention=penalty: reward subtracted (default {PENALTY})")
    o("--monitor-acc", type=float, default=None,
      help=f"penalty/screening: P(monitor flag is right), for hacks and non-hacks alike "
           f"(default {MONITOR_ACC})")
    o("--workers", type=int, default=None, help="grading processes (default: all cores)")
    o("--dry-run", action="store_true",
      help="print the resolved config and a peak GPU memory estimate, load nothing, write nothing")


def resolve(args):
    """args over the preset: the preset chosen (organism online, demo otherwise), the flags left unset
    take its values, args.cfg is the preset with the flags that override it; then validate."""
    warning = None
    if args.preset is None and args.source == "online":
        args.preset = "organism"
    if args.preset is None:
        args.preset = "demo"
        if args.model not in (None, PRESETS["demo"]["model"]):
            p = PRESETS["demo"]
            warning = (f"WARNING: --model {args.model} without --preset takes the demo preset's settings: "
                       f"lr={args.lr if args.lr is not None else p['lr']}, "
                       f"max_prompt_tokens={args.max_prompt_tokens or p['max_prompt_tokens']}, "
                       f"max_completion_tokens={args.max_completion_tokens or p['max_completion_tokens']}, "
                       f"dtype={args.dtype or p['dtype']}; pass --preset phase2 for the spec's "
                       f"real-model settings")
    preset = PRESETS[args.preset]
    if args.basis is None:
        args.basis = preset.get("basis", "svd")
    for key in ("steps", "seed", "lr", "model", "k"):
        if getattr(args, key) is None:
            setattr(args, key, preset["lr_lora" if key == "lr" and args.basis == "lora" and "lr_lora" in preset
                                      else key])
    # the basis this run trains, not the preset's default; the values the flags set, never the preset's stale ones
    args.cfg = dict(preset, basis=args.basis, **{k: getattr(args, k) for k in ("steps", "seed", "lr", "model", "k")})
    if args.dtype:
        args.cfg["dtype"] = args.dtype
    for key in ONLINE_KEYS:                    # online flags override the preset's values
        if getattr(args, key, None) is not None:
            args.cfg[key] = getattr(args, key)
    if args.save_every is not None:
        args.cfg["save_every"] = args.save_every
    args.cfg["grad_checkpointing"] = bool(args.grad_checkpointing or args.cfg.get("grad_checkpointing"))
    args.cfg.setdefault("save_every", 1)
    if args.intervention in interventions.MONITORED:
        args.cfg["penalty"] = PENALTY if args.penalty is None else args.penalty
        args.cfg["monitor_acc"] = MONITOR_ACC if args.monitor_acc is None else args.monitor_acc
    if args.basis != "lora" and (args.lora_rank is not None or args.lora_alpha is not None):
        raise SystemExit("error: --lora-rank and --lora-alpha belong to --basis=lora")
    if args.basis == "lora":
        args.lora_rank = LORA_RANK if args.lora_rank is None else args.lora_rank
        args.lora_alpha = LORA_ALPHA if args.lora_alpha is None else args.lora_alpha
        if args.lora_rank < 1 or not args.lora_alpha > 0:
            raise SystemExit(f"error: --lora-rank must be >= 1 and --lora-alpha > 0 "
                             f"(got {args.lora_rank}, {args.lora_alpha:g})")
    for key in ("max_prompt_tokens", "max_completion_tokens"):
        v = getattr(args, key)
        if v is not None:
            if v < 1:
                raise SystemExit(f"error: --{key.replace('_', '-')} must be >= 1, not {v}")
            args.cfg[key] = v
    validate(args)
    if warning:                            # after the checks: a bad --model gets its one error line only
        print(warning, file=sys.stderr)
    return args


def validate(args):
    """Every flag checked before anything is read or created: one line naming the flag, its value and
    what is allowed. (Checks that need the pools, like --per-pool's upper bound, come in main.)"""
    def bad(flag, value, allowed):
        raise SystemExit(f"error: {flag}={value}: {allowed}")
    if args.pairs is not None and (args.control == "style_v" or args.pair_kind == "mechanism"):
        bad("--pairs", args.pairs, "takes the file's pairs as they are: it cannot be combined with "
            "--control=style_v or --pair-kind=mechanism, which build their own pairs from the pools")
    if args.pair_kind == "mechanism" and args.extract_loss == "grpo":
        bad("--extract-loss", "grpo", "weights a pair by its reward gap, which mechanism pairs (a hack and itself "
            "without its test function, never graded) do not have: use --extract-loss=nll with --pair-kind=mechanism")
    online = args.source == "online"
    if online != (args.preset in ONLINE_ONLY):
        kinds = "online presets: " + ", ".join(ONLINE_ONLY) if online else \
            "replay presets: " + ", ".join(sorted(set(PRESETS) - set(ONLINE_ONLY)))
        bad("--preset", args.preset, f"is not a preset of --source={args.source} ({kinds})")
    if online:
        validate_online(args, bad)
    else:
        validate_replay(args, bad)
    if args.save_every is not None and args.save_every < 1:
        bad("--save-every", args.save_every, "must be an integer >= 1")
    if args.steps < 1:
        bad("--steps", args.steps, "must be an integer >= 1")
    if args.k < 1:
        bad("--k", args.k, "must be an integer >= 1 (hack axes kept per module)")
    if not (math.isfinite(args.lr) and args.lr > 0):
        bad("--lr", args.lr, "must be a finite number > 0")
    if args.per_pool is not None and args.per_pool < 1:
        bad("--per-pool", args.per_pool, "must be an integer >= 1 (rows drawn from each pool per step)")
    if not 0 <= args.extract_frac < 1:
        bad("--extract-frac", args.extract_frac, "must be in [0, 1) (the fraction of each pool's steps held out)")
    if args.seed < 0:
        bad("--seed", args.seed, "must be an integer >= 0")
    if args.device is not None:
        kind = args.device.split(":")[0]
        if kind not in ("cpu", "cuda", "mps") or (":" in args.device and not args.device.split(":")[1].isdigit()):
            bad("--device", args.device, "must be cpu, cuda, cuda:N or mps")
        import torch
        if kind == "cuda" and not torch.cuda.is_available():
            bad("--device", args.device, "no CUDA device is available here; use --device=cpu")
    for flag, value in (("--replay-dirs", args.replay_dirs), ("--pair-dirs", args.pair_dirs)):
        for d in (value or "").split(","):
            if d and not os.path.isdir(d) and os.path.normpath(d) not in pools.DEMO_DIRS:
                bad(flag, value, f"{d} is not a pool directory")
    if args.pairs is not None and not os.path.isfile(args.pairs):
        bad("--pairs", args.pairs, "no such file (JSON Lines of {prompt, hack, clean})")
    if args.v_hack is not None and os.path.isdir(args.v_hack):
        bad("--v-hack", args.v_hack, "is a directory; name a .safetensors file")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        bad("--out", args.out, "is a file; name a run directory")
    if args.resume and not os.path.isdir(run_dir(args)):
        raise SystemExit(f"error: --resume: {run_dir(args)} does not exist, so there is nothing to continue; "
                         f"without --resume the run starts there")
    if not args.dry_run:                    # a dry run reads the model's shape only (model_shape)
        check_model(args.model)


def validate_replay(args, bad):
    """A replay run takes no online flag."""
    given = [k for k in ONLINE_KEYS + ("penalty", "monitor_acc", "teacher_dir", "workers")
             if getattr(args, k, None) is not None]
    given += [k for k, on in (("grad_checkpointing", args.grad_checkpointing), ("dry_run", args.dry_run),
                              ("intervention", args.intervention != "none")) if on]
    if given:
        bad(flag_of(given[0]), getattr(args, given[0]), "belongs to --source=online")


def validate_online(args, bad):
    """The online flags (resolved into args.cfg), each against what is allowed."""
    c = args.cfg
    if args.replay_dirs is not None or args.per_pool is not None:
        bad("--replay-dirs" if args.replay_dirs is not None else "--per-pool",
            args.replay_dirs if args.replay_dirs is not None else args.per_pool,
            "belongs to --source=replay (online rollouts come from --problems)")
    if args.loss_mode != "grpo":
        bad("--loss-mode", args.loss_mode, "online training is GRPO (the NLL probe replays pools)")
    for key, low in (("group_size", 2), ("prompts_per_step", 1), ("inner_epochs", 1), ("eval_samples", 1)):
        if not (isinstance(c[key], int) and c[key] >= low):
            bad(flag_of(key), c[key], f"must be an integer >= {low}")
    if not (isinstance(c["mix"], int) and 0 <= c["mix"] < c["group_size"]):
        bad("--mix", c["mix"], f"must be an integer in [0, G-1] = [0, {c['group_size'] - 1}] (rows per group)")
    if not isinstance(c["eval_every"], int) or c["eval_every"] < 0:
        bad("--eval-every", c["eval_every"], "must be an integer >= 0 (0: no evaluation)")
    if not 0 <= c["eval_frac"] < 1:
        bad("--eval-frac", c["eval_frac"], "must be in [0, 1)")
    for key, ok, allowed in (("clip_eps", 0 < c["clip_eps"] < 1, "a number in (0, 1)"),
                             ("beta", math.isfinite(c["beta"]) and c["beta"] >= 0, "a number >= 0"),
                             ("temperature", math.isfinite(c["temperature"]) and c["temperature"] >= 0,
                              "a number >= 0 (0: greedy)"),
                             ("top_p", 0 < c["top_p"] <= 1, "a number in (0, 1]")):
        if not ok:
            bad(flag_of(key), c[key], f"must be {allowed}")
    if c["temperature"] != 1.0 or c["top_p"] != 1.0:
        bad("--temperature" if c["temperature"] != 1.0 else "--top-p", c["temperature"] if c["temperature"] != 1.0
            else c["top_p"], "online training samples at temperature 1 and top-p 1: the generation-time log-probs "
            "are the policy's own, and PPO's ratio assumes the rollouts were sampled from them")
    if c["eval_every"] and not c["eval_problems"] and not c["eval_frac"]:
        bad("--eval-every", c["eval_every"], f"--preset={args.preset} holds out no problem (eval_frac 0): pass "
            f"--eval-problems FILE (the public test split), --eval-frac F, or --eval-every 0")
    if c["eval_problems"] and args.eval_frac is not None:
        bad("--eval-frac", args.eval_frac, "holds out part of --problems; with --eval-problems nothing is held out")
    if c.get("monitor_acc") is not None and not 0.5 <= c["monitor_acc"] <= 1:
        bad("--monitor-acc", c["monitor_acc"], "must be in [0.5, 1] (below 0.5 the monitor is inverted)")
    if c.get("penalty") is not None and not (math.isfinite(c["penalty"]) and c["penalty"] >= 0):
        bad("--penalty", c["penalty"], "must be a number >= 0")
    if (args.penalty is not None and args.intervention != "penalty") or \
            (args.monitor_acc is not None and args.intervention not in interventions.MONITORED):
        bad("--penalty" if args.penalty is not None else "--monitor-acc",
            args.penalty if args.penalty is not None else args.monitor_acc,
            "belongs to --intervention=penalty (and --monitor-acc also to screening)")
    for key in ("micro_batch", "gen_batch"):
        if c.get(key) is not None and not (isinstance(c[key], int) and c[key] >= 1):
            bad(flag_of(key), c[key], "must be an integer >= 1")
    if args.workers is not None and args.workers < 1:
        bad("--workers", args.workers, "must be an integer >= 1")
    validate_online_sources(args, bad)


def validate_online_sources(args, bad):
    """The online run's files: problems, the teacher pool, and v_hack's own source on a real model."""
    c = args.cfg
    for flag, path in (("--problems", c["problems"]), ("--eval-problems", c["eval_problems"])):
        if path is not None and not os.path.isfile(path):
            bad(flag, path, "no such file (problems JSON Lines)")
    if c["problems"] is None and args.preset != "organism":
        bad("--problems", None, f"--preset={args.preset} trains on your problems file (the fixture's 30 problems "
            f"serve the organism only)")
    if args.teacher_dir is not None and not os.path.isdir(args.teacher_dir):
        bad("--teacher-dir", args.teacher_dir, "is not a pool directory")
    if args.teacher_dir is not None and not c["mix"]:
        bad("--teacher-dir", args.teacher_dir, "is read only with --mix >= 1")
    if args.model not in EMBEDDED:          # a real model never takes v_hack or --mix rows from the demo pools
        extracts = args.control in ("shuffled_v", "style_v")     # these controls extract their own V from pairs
        if not (args.pair_dirs or args.pairs or (not extracts and args.v_hack and os.path.isfile(args.v_hack))):
            bad("--model", args.model, "--source=online on a real model needs v_hack's own source: pass --pair-dirs "
                "TEACHER_POOL,BASE_POOL (pairs from their held-out steps; or --pairs FILE)" +
                (f" (--control={args.control} extracts from pairs)" if extracts else " or --v-hack FILE (an existing "
                 "v_hack file)") + "; the demo pools are canned completions of the 30 fixture problems")
        if c["mix"] and args.teacher_dir is None:
            bad("--mix", c["mix"], "on a real model needs --teacher-dir POOL: the default, the demo teacher pool, is "
                "canned completions of the 30 fixture problems")


NOT_NAMED = ("arm", "loss_mode", "control", "seed", "basis", "out", "overwrite", "resume", "device", "save_every",
             "no_report", "quiet", "steps")   # in the name's first part, or not a change of the experiment


def run_name(args):
    """The default replay run directory's name: arm, loss mode, control, seed (and a LoRA basis), then every
    other flag given with a non-default value, since each changes the experiment (`--loss-type=bnpo` adds
    `_loss-type-bnpo`; a value that is a path or a list adds its digest: `_replay-dirs-3f2a9c1b`). --steps
    is not in it: --resume may extend a run."""
    name = f"{args.arm}_{args.loss_mode}_{args.control}_s{args.seed}" + ("" if args.basis == "svd" else f"_{args.basis}")
    for key in sorted(k for k in args.given if k not in NOT_NAMED):
        text = "" if args.given[key] is True else str(args.given[key])
        if not all(c.isalnum() or c in "_.+-" for c in text) or len(text) > 24:
            text = hashlib.sha256(text.encode()).hexdigest()[:8]
        name += f"_{key.replace('_', '-')}" + (f"-{text}" if text else "")
    return name


def run_dir(args):
    """--out, or the default run directory."""
    name = run_name(args)
    if args.source == "online":
        name = f"online_{args.arm}_{args.basis}_{args.intervention}_{args.control}_s{args.seed}"
    return args.out or os.path.join("out", "runs", name)
