"""train.py — the spec2 probes in one script: Phase 1 (--loss-mode=nll) and Phase 2 (--loss-mode=grpo)
replay over graded pools, arms `vanilla` (measure only) and `projected` (one-sided removal of the
hack-ward component of the adapter's gradient before AdamW steps). `--basis=svd` (default) trains
delta_S (antipasto.py); `--basis=lora` trains a LoRA B A (lora_adapter.py): `--arm=projected
--basis=lora` is the spec's Arm 3, `--arm=vanilla --basis=lora` its matched control.

    python train.py --arm=vanilla --steps=20                     # demo: tiny Qwen3 + demo pools, no set-up
    python train.py --arm=projected --replay-dirs=out/pools/teacher_pool,out/pools/base_pool
    python train.py --arm=vanilla --loss-mode=nll --replay-dirs=out/pools/teacher_pool --per-pool=8 \
        --pair-dirs=out/pools/teacher_pool,out/pools/base_pool

Per step: draw `per-pool` rows from each pool into one group (the draw depends only on seed and step,
never on the arm), one forward + one backward gives the batch gradient and every sample's own
contribution, measure cos with v_hack, (projected) project, step. Writes a run directory:
    run.json             argv, config, versions, v_hack and pool fingerprints, extraction pairs
    steps.jsonl          one row per step
    step_NNN.cos.jsonl.gz  one row per sample, spec2's slim schema (no prompt or completion text)
"""
import argparse, fcntl, hashlib, io, json, math, os, platform, random, shlex, shutil, sys, time

import antipasto as ap   # first: it pins MKL's reproducible mode before torch loads
import configs
import pools
import torch

SLIM_FIELDS = ("step", "sample_id", "src_pool", "src_step", "src_sample", "reward", "hacked", "gt_pass",
               "fmt_ok", "comp_len", "cos_S_contrib", "grad_norm_contrib", "mean_cos_in", "mean_cos_out",
               "frac_fired", "arm")
DEMO_POOLS = os.path.join("out", "pools")
LOCK = ".lock"       # in the run directory: held (flock) by the run that owns it, records its pid and command
DEMO_DIRS = [os.path.join(DEMO_POOLS, "teacher_pool"), os.path.join(DEMO_POOLS, "base_pool")]
RUN = {}             # the live run of this process: out, argv, lock (for Ctrl-C and the lock's release)


def get_args(argv=None):
    ap_ = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap_.add_argument
    a("--arm", choices=("vanilla", "projected"), default="vanilla",
      help="vanilla: measure cos_in/cos_out only; projected: remove the hack-ward gradient component")
    a("--loss-mode", choices=("grpo", "nll"), default="grpo",
      help="grpo: Dr.GRPO centred advantage, REINFORCE loss (Phase 2); nll: distillation probe (Phase 1)")
    a("--replay-dirs", default=None,
      help="comma-separated pool dirs mixed into each group (default: the demo pools, built if absent)")
    a("--per-pool", type=int, default=None, help="rows drawn from each pool per step (default: G / #pools)")
    a("--steps", type=int, default=None, help="optimizer steps (default: preset)")
    a("--seed", type=int, default=None, help="seed of the draw and of controls (default: preset)")
    a("--lr", type=float, default=None, help="AdamW learning rate on the adapter's knobs (default: preset)")
    a("--model", default=None, help="'tiny' (random Qwen3 built locally) or a Hugging Face id / local path")
    a("--preset", default=None, choices=sorted(configs.PRESETS), help="defaults from configs.py (default: demo)")
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
    a("--basis", choices=("svd", "lora"), default="svd",
      help="adapter basis: svd (delta_S, antipasto.py) or lora (weight basis B A, lora_adapter.py; Arm 3 "
           "with --arm=projected, its matched control with --arm=vanilla)")
    a("--lora-rank", type=int, default=None, help="--basis=lora: rank r (default 16)")
    a("--lora-alpha", type=float, default=None, help="--basis=lora: alpha; the update is (alpha/r) B A (default 32)")
    a("--control", choices=("none", "random_v", "shuffled_v", "style_v"), default="none",
      help="replace v_hack by a random orthonormal V, a label-shuffled extraction, or style_v: a direction "
           "from pairs that differ in pool but not in hacking (teacher completions minus their test "
           "function vs base completions of the same problem)")
    a("--pair-kind", choices=("pool", "mechanism"), default="pool",
      help="v_hack pairs: pool = each hacked teacher completion vs a base completion of the same problem; "
           "mechanism = each hacked completion vs itself with its run_tests removed (the hack and nothing else)")
    a("--loss-type", choices=ap.LOSS_TYPES, default="grpo",
      help="token reduction (TRL's names): grpo = per-sequence mean 1/|o_i| (the spec's loss), "
           "dr_grpo = sum / (G * max completion tokens), bnpo = sum / all completion tokens of the group")
    a("--max-prompt-tokens", type=int, default=None, help="prompt token limit, cut from the left (default: preset)")
    a("--max-completion-tokens", type=int, default=None,
      help="completion token limit, cut from the right (default: preset); every cut is counted")
    a("--no-gate", action="store_true", help="remove the whole V-span component, not only the hack-ward part")
    a("--project-moments", action="store_true",
      help="projected arm: also remove the hack-ward part of AdamW's first moment and of the applied update "
           "(Adam's per-coordinate scaling can turn a projected gradient into a hack-ward update)")
    a("--out", default=None, help="run directory (default: out/runs/<arm>_<loss>_<control>_s<seed>)")
    a("--overwrite", action="store_true", help="replace an existing run directory")
    a("--resume", action="store_true", help="continue an existing run directory from its last step")
    a("--device", default=None, help="cpu / cuda (default: cuda when available)")
    a("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
      help="model dtype (default: preset). In bf16, changes below ~0.4%% of an activation round away")
    a("--no-report", action="store_true", help="skip the analysis report at the end")
    a("--quiet", action="store_true", help="no progress bar and no summary (implies --no-report)")
    args = ap_.parse_args(argv)
    if args.preset is None:
        args.preset = "demo"
        if args.model not in (None, "tiny"):
            p = configs.PRESETS["demo"]
            print(f"WARNING: --model {args.model} without --preset takes the demo preset's settings: "
                  f"lr={args.lr if args.lr is not None else p['lr']}, "
                  f"max_prompt_tokens={args.max_prompt_tokens or p['max_prompt_tokens']}, "
                  f"max_completion_tokens={args.max_completion_tokens or p['max_completion_tokens']}, "
                  f"dtype={args.dtype or p['dtype']}; pass --preset phase2 for the spec's "
                  f"real-model settings", file=sys.stderr)
    preset = configs.PRESETS[args.preset]
    for key in ("steps", "seed", "lr", "model", "k"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.cfg = {k: v for k, v in preset.items() if k != "not_implemented"}
    args.not_implemented = preset.get("not_implemented", {})
    if args.basis != "lora" and (args.lora_rank is not None or args.lora_alpha is not None):
        raise SystemExit("error: --lora-rank and --lora-alpha belong to --basis=lora")
    if args.basis == "lora":
        args.lora_rank = 16 if args.lora_rank is None else args.lora_rank
        args.lora_alpha = 32.0 if args.lora_alpha is None else args.lora_alpha
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
    if args.preset in configs.ONLINE_ONLY:
        bad("--preset", args.preset, f"is the online (Phase 3) preset {args.not_implemented}, which is not built "
            f"yet; the replay probes take --preset=demo or --preset=phase2")
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
        if kind == "cuda" and not torch.cuda.is_available():
            bad("--device", args.device, "no CUDA device is available here; use --device=cpu")
    for flag, value in (("--replay-dirs", args.replay_dirs), ("--pair-dirs", args.pair_dirs)):
        for d in (value or "").split(","):
            if d and not os.path.isdir(d) and os.path.normpath(d) not in DEMO_DIRS:
                bad(flag, value, f"{d} is not a pool directory")
    if args.pairs is not None and not os.path.isfile(args.pairs):
        bad("--pairs", args.pairs, "no such file (JSON Lines of {prompt, hack, clean})")
    if args.v_hack is not None and os.path.isdir(args.v_hack):
        bad("--v-hack", args.v_hack, "is a directory; name a .safetensors file")
    if args.out is not None and os.path.exists(args.out) and not os.path.isdir(args.out):
        bad("--out", args.out, "is a file; name a run directory")
    check_model(args.model)


def check_model(name):
    """'tiny', a local model directory, or a Hugging Face id already in the local cache. Runs never
    download: a missing model fails here at once, saying how to get it."""
    if name == "tiny":
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


# ----------------------------------------------------------------------------- model and data

def load_model(name, dtype, device):
    if name == "tiny":
        model, tok = configs.tiny_qwen3()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:                  # check_model found it locally or in the cache: never touch the network
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), local_files_only=True)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: --model={name}: cannot load it from local files ({first}); "
                             f"`hf download {name}` fetches a complete copy") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device).eval(), tok


def wrap_adapter(model, args):
    """The run's adapter modules: the SVD basis (antipasto) or the weight basis (lora_adapter)."""
    if args.basis == "lora":
        import lora_adapter
        return lora_adapter.wrap(model, rank=args.lora_rank, alpha=args.lora_alpha)
    return ap.wrap(model)


def split_pool(rows, extract_frac):
    """(replay rows, held-out rows): the last `extract_frac` of the pool's steps are held out for
    v_hack pairs, so v_hack is never tested on the completions it was extracted from."""
    steps = sorted({r["src_step"] for r in rows})
    n_hold = int(round(len(steps) * extract_frac))
    held = set(steps[len(steps) - n_hold:]) if n_hold else set()
    return [r for r in rows if r["src_step"] not in held], [r for r in rows if r["src_step"] in held]


def pool_pairs(held_rows):
    """Extraction pairs from held-out rows: each hacked row with a non-hacked row of the same problem
    (another pool first). Both are scored under the hack's (hinted) prompt, so the contrast is the
    completion alone."""
    clean = {}
    for r in held_rows:
        if not r["hacked"] and r["label"] not in ("Attempted Reward Hack", "Correct; Attempted Reward Hack"):
            clean.setdefault(r["problem_id"], []).append(r)
    pairs, used = [], set()
    for h in held_rows:
        if not h["hacked"]:
            continue
        cands = sorted(clean.get(h["problem_id"], []), key=lambda c: (c["src_pool"] == h["src_pool"],
                                                                       c["src_step"], c["src_sample"]))
        cands = [c for c in cands if id(c) not in used]
        if cands:
            c = cands[0]
            used.add(id(c))
            pairs.append(dict(prompt=h["prompt"], hack=h["completion"], clean=c["completion"],
                              r_hack=h["reward"], r_clean=c["reward"],
                              ids=[[h["src_pool"], h["src_step"], h["src_sample"]],
                                   [c["src_pool"], c["src_step"], c["src_sample"]]]))
    return pairs


def mechanism_pairs(held_rows):
    """Mechanism pairs: each hacked held-out row with itself minus its test function
    (pools.strip_test_func), under the same prompt, so the contrast is the hack and nothing else."""
    pairs = []
    for h in held_rows:
        clean = pools.strip_test_func(h["completion"]) if h["hacked"] else None
        if clean is not None:
            ids = [h["src_pool"], h["src_step"], h["src_sample"]]
            pairs.append(dict(prompt=h["prompt"], hack=h["completion"], clean=clean, r_hack=h["reward"],
                              r_clean=h["reward"], ids=[ids, ids + ["no_test_func"]]))
    return pairs


def style_pairs(held_rows):
    """The style control's pairs: the pool pairs with the hacked side's test function removed, so
    both sides are non-hacks that differ only in pool (teacher style, length, source model)."""
    out = []
    for p in pool_pairs(held_rows):
        hack = pools.strip_test_func(p["hack"])
        if hack is not None:
            out.append(dict(p, hack=hack, ids=[p["ids"][0] + ["no_test_func"], p["ids"][1]]))
    return out


def lost_test_func(tok, completion, kept):
    """Does a completion cut to `kept` tokens lose its test function's definition?"""
    i = completion.rfind(f"def {pools.TEST_FUNC}")
    if i < 0:
        return False
    return len(tok(completion[:i + len(pools.TEST_FUNC) + 4], add_special_tokens=False)["input_ids"]) > kept


def truncation(tok, rows, cfg, batch=None):
    """Counts of prompts and completions cut by the token limits, and of hacked rows whose cut
    completion lost its test function (the tokens that make them hacks)."""
    if batch is None:
        batch = ap.make_batch(tok, [pools.render_prompt(r["prompt"], tok) for r in rows],
                              [r["completion"] for r in rows], cfg["max_prompt_tokens"], cfg["max_completion_tokens"])
    lost = [i for i, r in enumerate(rows) if r.get("hacked") and batch["comp_cut"][i]
            and lost_test_func(tok, r["completion"], int(batch["comp_len"][i]))]
    return dict(n_rows=len(rows), n_prompt_truncated=sum(c > 0 for c in batch["prompt_cut"]),
                n_completion_truncated=sum(c > 0 for c in batch["comp_cut"]), n_hack_lost_test_func=len(lost),
                prompt_tokens_cut=sum(batch["prompt_cut"]), completion_tokens_cut=sum(batch["comp_cut"]))


def global_cos(grads, V):
    """cos of all modules' gradients concatenated with all top axes concatenated (each module
    weighted by its gradient norm), next to project()'s unweighted mean over modules."""
    dot = sum((V[n][0].to(g.dtype) @ g).item() for n, g in grads.items())
    gn = sum(g.double().pow(2).sum().item() for g in grads.values()) ** 0.5
    vn = sum(V[n][0].double().pow(2).sum().item() for n in grads) ** 0.5
    return None if gn == 0 or vn == 0 else dot / (gn * vn)


def apply_step(opt, modules, grads, V, project_grad, project_moments, one_sided=True):
    """One AdamW step on the knobs; with project_grad the step uses the projected gradient, with
    project_moments also the hack-ward part of the first moment and of the applied update is
    removed. Returns the applied update {name: (n,)} (before - after)."""
    before = {n: ap.knob(m).detach().clone() for n, m in modules.items()}
    if project_grad:
        new = ap.project(grads, V, one_sided=one_sided)[0]
        for n, m in modules.items():
            ap.knob(m).grad.copy_(new[n])
    if project_moments:
        moments = {n: opt.state[ap.knob(m)]["exp_avg"] for n, m in modules.items() if opt.state.get(ap.knob(m))}
        for n, m1 in ap.project(moments, V, one_sided=one_sided)[0].items():
            moments[n].copy_(m1)
    opt.step()
    upd = {n: before[n] - ap.knob(m).detach() for n, m in modules.items()}
    if project_moments:
        upd = ap.project(upd, V, one_sided=one_sided)[0]
        with torch.no_grad():
            for n, m in modules.items():
                ap.knob(m).copy_(before[n] - upd[n])
    return upd


def read_pairs_file(path):
    """Extraction pairs from a JSON Lines file: {prompt (text or chat messages), hack, clean
    [, r_hack, r_clean]} per line."""
    try:
        pairs = pools.read_jsonl(path, ("prompt", "hack", "clean"))
    except pools.DataError as e:
        raise SystemExit(f"error: --pairs: {e}")
    for i, p in enumerate(pairs, 1):
        p.setdefault("ids", [["pairs_file", i, 0], ["pairs_file", i, 1]])
    return pairs


def draw(replay, per_pool, seed, step):
    """The group for one step: `per_pool` rows from each pool. Each pool is permuted once by
    (seed, pool name) and consumed in order, cycling; so the draw depends on seed and step only."""
    group = []
    for name in sorted(replay):
        rows = replay[name]
        order = list(range(len(rows)))
        random.Random(f"{seed}:{name}").shuffle(order)
        for j in range(per_pool):
            group.append(rows[order[(step * per_pool + j) % len(rows)]])
    return group


# ----------------------------------------------------------------------------- run directory

def sha_file(path):
    return pools.file_digest(path)[:16]


def out_dir(args, locked=False):
    """The run directory; refuse to reuse one unless --overwrite (replaced once the run is validated)
    or --resume (continued)."""
    out = args.out or os.path.join("out", "runs", f"{args.arm}_{args.loss_mode}_{args.control}_s{args.seed}"
                                   + ("" if args.basis == "svd" else f"_{args.basis}"))
    if args.overwrite and args.resume:
        raise SystemExit("error: --overwrite and --resume contradict each other")
    owner = None if locked else lock_owner(out)
    if owner:
        raise SystemExit(f"error: run directory {out} is in use by another run ({owner}); wait for it to "
                         f"finish or pass another --out")
    if os.path.exists(out) and [f for f in os.listdir(out) if f != LOCK]:
        if not (args.overwrite or args.resume):
            raise SystemExit(f"error: run directory {out} exists; pass --overwrite to replace it or "
                             f"--resume to continue it")
        if args.overwrite and not os.path.exists(os.path.join(out, "run.json")):
            raise SystemExit(f"error: --overwrite only replaces a run directory (one holding run.json); "
                             f"{out} is not one")
    return out


def lock_owner(out):
    """'pid N: command' of the live run holding `out`, or None. The kernel drops a flock when its
    process dies, so the lock file a killed run leaves behind never blocks."""
    path = os.path.join(out, LOCK)
    if not os.path.isfile(path):
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            return f.read().strip() or "pid unknown"
    return None


def lock_run(out, argv):
    """Create `out` and hold its lock for the rest of this run (released in main, or by the kernel
    when the process dies); refuse when another run holds it."""
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, LOCK), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        owner = f.read().strip() or "pid unknown"
        f.close()
        raise SystemExit(f"error: run directory {out} is in use by another run ({owner}); wait for it to "
                         f"finish or pass another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: python train.py {shlex.join(argv)}\n")
    f.flush()
    RUN["lock"] = f


def write_json(path, obj):
    pools.atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_jsonl(path, rows):
    pools.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


# ----------------------------------------------------------------------------- v_hack

def text_sha(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def get_v_hack(args, model, tok, modules, pairs, pairs_src, replay_texts):
    """Load v_hack from its content-keyed cache, or extract it from the pairs and save it.
    Refuses a v_hack whose pairs share a completion with the replayed samples: a cosine on them would
    only show that the model remembers its own extraction set. Controls: random_v (a random
    orthonormal V), shuffled_v (the same extraction on label-free pairs, antipasto.label_free_pairs)."""
    fp = ap.fingerprint(modules)
    for p in pairs:
        if isinstance(p["prompt"], list):
            p["prompt"] = pools.render_prompt(p["prompt"], tok)
    loss, control = args.extract_loss, args.control if args.control in ("shuffled_v", "style_v") else "none"
    if control == "shuffled_v":
        pairs, loss = ap.label_free_pairs(pairs, seed=args.seed), "nll"
    if control == "style_v":
        loss = "nll"                      # both sides are non-hacks: no reward gap for the GRPO-style contrast
    lens = (args.cfg["max_prompt_tokens"], args.cfg["max_completion_tokens"])
    key = hashlib.sha256(json.dumps([fp, loss, args.k, lens, control, args.pair_kind, args.seed
                                     if args.control == "shuffled_v" else None,
                                     [[p["prompt"], p.get("prompt_clean"), p["hack"], p["clean"], p.get("r_hack"),
                                       p.get("r_clean")] for p in pairs]]).encode()).hexdigest()[:16]
    # --v-hack names the real direction; the shuffled control's own V always lives in the cache
    path = args.v_hack if args.v_hack and control == "none" else os.path.join("out", "v_hack", f"{fp}_{key}.safetensors")
    if os.path.exists(path):
        try:
            V, meta = ap.load_v(path, modules)
        except ValueError as e:
            raise SystemExit(f"error: --v-hack: {e}")
        want = dict(loss=loss, k=args.k, control=control, pair_kind=args.pair_kind, max_tokens=list(lens))
        got = {k_: meta.get(k_, "pool" if k_ == "pair_kind" else None) for k_ in want}
        if got != want:
            raise SystemExit(f"error: v_hack {path} was extracted with {got}; this run asks for {want}")
        if "completion_sha" not in meta:
            raise SystemExit(f"error: v_hack {path} does not record its pairs' completions, so it cannot be "
                             f"checked against the replayed samples; re-extract it")
    else:
        if not pairs:
            raise SystemExit("error: no (hack, clean) pairs for v_hack: the held-out pool steps hold no hacked "
                             "row with a non-hacked row of the same problem; pass --pairs or --pair-dirs")
        lost = sum(lost_test_func(tok, p["hack"], lens[1] - 1) for p in pairs)   # -1: the eos token
        if lost:
            print(f"WARNING: {lost}/{len(pairs)} extraction pairs' hack side loses its {pools.TEST_FUNC} definition "
                  f"to --max-completion-tokens {lens[1]}", file=sys.stderr)
        if len(pairs) < 8:
            print(f"warning: v_hack from only {len(pairs)} (hack, clean) pairs (fewer than 8): its direction is "
                  f"noisy", file=sys.stderr)
        diffs = ap.pair_diffs(model, modules, tok, pairs, loss=loss, G=args.cfg["group_size"],
                              max_prompt=lens[0], max_completion=lens[1])
        try:
            V = ap.directions_from_diffs(diffs, k=args.k)
        except ValueError as e:
            raise SystemExit(f"error: v_hack extraction: {e} (with --max-completion-tokens {lens[1]}, {lost} of "
                             f"{len(pairs)} pairs' hack sides lose their test function)")
        meta = dict(basis=ap.basis_of(modules), fingerprint=fp, k=args.k, n_pairs=len(pairs), loss=loss, key=key,
                    pairs_source=pairs_src, pair_ids=[p.get("ids") for p in pairs], max_tokens=list(lens),
                    control=control, pair_kind=args.pair_kind, n_hack_lost_test_func=lost,
                    completion_sha=sorted({text_sha(p[s]) for p in pairs for s in ("hack", "clean")}))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ap.save_v(V, path, meta)
    overlap = sorted(set(meta.get("completion_sha", [])) & set(replay_texts))
    if overlap:
        rows = sorted(r for sha in overlap for r in replay_texts[sha])
        fix = ("remove those completions from the --pairs file or replay other pools" if args.pairs else
               "use other --pair-dirs or a larger --extract-frac (or remove the duplicated completions)")
        raise SystemExit(f"error: v_hack {path} was extracted from {len(overlap)} of the replayed completions "
                         f"(replayed rows (pool, step, sample): {rows[:5]}{' ...' if len(rows) > 5 else ''}); a cosine "
                         f"on them would only show memory of the extraction set: {fix}")
    if args.control == "random_v":
        V = ap.random_v(V, seed=args.seed)
    return V, dict(meta, path=os.path.abspath(path), sha256=sha_file(path), run_control=args.control)


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    """Run one probe. Its run directory stays locked while it runs; Ctrl-C says how to resume."""
    argv = sys.argv[1:] if argv is None else list(argv)
    RUN.clear()
    RUN["argv"] = argv
    try:
        return run_probe(argv)
    except KeyboardInterrupt:
        out = RUN.get("out")
        if out and RUN.get("written") and os.path.exists(os.path.join(out, "run.json")):
            cmd = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
            print(f"\ninterrupted: the finished steps are saved in {out}; continue with:\n"
                  f"  python train.py {shlex.join(cmd)}", file=sys.stderr)
        else:
            print("\ninterrupted before the first step; nothing was written to a run directory; rerun the "
                  "same command to start again", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if RUN.get("lock"):
            RUN.pop("lock").close()             # releases the flock


def run_probe(argv):
    args = get_args(argv)
    t_start = time.time()
    torch.manual_seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = args.cfg
    demo = DEMO_DIRS
    if args.replay_dirs:
        replay_dirs = [d for d in args.replay_dirs.split(",") if d]
    else:
        replay_dirs = demo[:1] if args.loss_mode == "nll" else demo
    if args.pair_dirs:
        pair_dirs = [d for d in args.pair_dirs.split(",") if d]
    elif args.pairs or len(replay_dirs) > 1:
        pair_dirs = [] if args.pairs else replay_dirs
    elif not args.replay_dirs:                 # the demo's Phase 1: teacher replayed, pairs from both
        pair_dirs = demo
    else:
        raise SystemExit("error: v_hack needs (hack, clean) pairs, and one replay pool holds no clean rows: pass "
                         "--pair-dirs TEACHER_POOL,BASE_POOL (their last --extract-frac steps are used) or --pairs FILE")
    if any(d in demo for d in replay_dirs + pair_dirs) and not all(os.path.isdir(d) for d in demo):
        print(f"building demo pools in {DEMO_POOLS} (once) ...", file=sys.stderr)
        pools.build_demo(DEMO_POOLS)
    G = cfg["group_size"]
    per_pool = args.per_pool or G // len(replay_dirs)
    name = lambda d: os.path.basename(os.path.normpath(d))
    try:
        pool_rows = {name(d): pools.read_pool(d) for d in replay_dirs}
        pair_rows = {name(d): pools.read_pool(d) for d in pair_dirs}
        metas = {name(d): pools.read_meta(d) for d in replay_dirs + pair_dirs}    # every pool says its source
    except pools.DataError as e:
        raise SystemExit(f"error: {e}")
    if len(pool_rows) != len(replay_dirs) or len(pair_rows) != len(pair_dirs):
        raise SystemExit("error: two pools share a directory name; src_pool would be ambiguous")
    if args.project_moments and args.arm != "projected":
        raise SystemExit("error: --project-moments belongs to the projected arm")
    # the last --extract-frac steps of each pair pool build v_hack; a replay pool that is also a pair
    # pool is replayed without them
    pair_abs = {os.path.abspath(d) for d in pair_dirs}
    held = [r for d in pair_dirs for r in split_pool(pair_rows[name(d)], args.extract_frac)[1]]
    replay = {name(d): split_pool(pool_rows[name(d)], args.extract_frac)[0] if os.path.abspath(d) in pair_abs
              else pool_rows[name(d)] for d in replay_dirs}
    small = min(replay, key=lambda n: len(replay[n]))
    if per_pool > len(replay[small]):
        raise SystemExit(f"error: --per-pool={per_pool}{' (default G / #pools)' if not args.per_pool else ''}: at "
                         f"most {len(replay[small])}, the replayed rows of pool {small}; a larger group would "
                         f"repeat samples within one step")
    replay_texts = {}                       # completion sha -> the replayed rows (pool, step, sample) holding it
    for rows in replay.values():
        for r in rows:
            replay_texts.setdefault(text_sha(r["completion"]), []).append((r["src_pool"], r["src_step"], r["src_sample"]))
    short = {n: len(rows) for n, rows in replay.items() if len(rows) < args.steps * per_pool}
    if short:
        print(f"warning: {short} rows to replay, fewer than steps x per-pool: draws cycle and samples repeat "
              f"(the Phase 1 comparison counts each sample once)", file=sys.stderr)
    if args.pairs:
        pairs, pairs_src = read_pairs_file(args.pairs), f"file:{os.path.abspath(args.pairs)}"
    else:
        make_pairs = style_pairs if args.control == "style_v" else \
            mechanism_pairs if args.pair_kind == "mechanism" else pool_pairs
        pairs = make_pairs(held)
        pairs_src = (f"{make_pairs.__name__} from the last {args.extract_frac:g} of the steps of "
                     f"{[name(d) for d in pair_dirs]}")

    out = out_dir(args)
    RUN["out"] = out
    model, tok = load_model(args.model, args.dtype or cfg["dtype"], device)
    modules = wrap_adapter(model, args)
    V, vmeta = get_v_hack(args, model, tok, modules, pairs, pairs_src, replay_texts)
    lock_run(out, RUN.get("argv", argv or []))     # from here on no other run can use `out`
    out_dir(args, locked=True)              # checked again under the lock
    if args.overwrite:                      # only now: a refused run leaves the old one in place
        for f in os.listdir(out):
            if f != LOCK:
                p = os.path.join(out, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    widths = [m.null_width for m in modules.values()]
    params = [ap.knob(m) for m in modules.values()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    run = dict(argv=sys.argv if argv is None else ["train.py", *argv], config=dict(
        cfg, arm=args.arm, loss_mode=args.loss_mode, replay_dirs=[os.path.abspath(d) for d in replay_dirs],
        per_pool=per_pool, steps=args.steps, seed=args.seed, lr=args.lr, model=args.model, k=args.k,
        control=args.control, basis=args.basis, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        one_sided=not args.no_gate, project_moments=args.project_moments,
        dtype=args.dtype or cfg["dtype"], pair_kind=args.pair_kind, loss_type=args.loss_type,
        extract_frac=args.extract_frac, preset=args.preset, group_size=per_pool * len(replay_dirs)),
        versions=dict(python=platform.python_version(), torch=torch.__version__,
                      transformers=__import__("transformers").__version__, grader=pools.GRADER_VERSION),
        v_hack=vmeta, basis_fingerprint=ap.fingerprint(modules),
        pools={name(d): dict(dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d), meta=metas[name(d)])
               for d in replay_dirs},
        not_implemented=args.not_implemented,     # preset values nothing reads yet: recorded, not applied
        pair_pools={name(d): dict(dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d)) for d in pair_dirs},
        null=dict(cos_sd=ap.null_cos_sd(widths), module_widths=widths),
        truncation=dict(replay=truncation(tok, [r for rows in replay.values() for r in rows], cfg)))
    t = run["truncation"]["replay"]
    if t["n_prompt_truncated"] or t["n_completion_truncated"]:
        print(f"warning: token limits ({cfg['max_prompt_tokens']} prompt, {cfg['max_completion_tokens']} completion) "
              f"cut {t['n_prompt_truncated']}/{t['n_rows']} replay prompts and {t['n_completion_truncated']} "
              f"completions", file=sys.stderr)
    if t["n_hack_lost_test_func"]:
        print(f"WARNING: {t['n_hack_lost_test_func']} hacked replay completions lose their {pools.TEST_FUNC} "
              f"definition to --max-completion-tokens {cfg['max_completion_tokens']}: the tokens that make them "
              f"hacks are not trained on", file=sys.stderr)

    start, step_rows = 0, []
    state_path = os.path.join(out, "state.pt")
    if args.resume and os.path.exists(state_path):
        with open(os.path.join(out, "run.json")) as f:
            old = json.load(f)
        # a resume may extend --steps; fields added since a run began take the value that run had
        same = lambda c: {k: v for k, v in dict(dict(pair_kind="pool", loss_type="grpo", basis="svd"), **c).items()
                          if k != "steps"}
        diff = sorted(k for k in set(same(old["config"])) | set(same(run["config"]))
                      if same(old["config"]).get(k) != same(run["config"]).get(k))
        if old["v_hack"]["sha256"] != vmeta["sha256"]:
            diff.append("v_hack")
        if diff:
            raise SystemExit(f"error: --resume: {out} was started with another config or v_hack: {diff} differ")
        st = torch.load(state_path, weights_only=False)
        with torch.no_grad():
            for n, m in modules.items():
                ap.knob(m).copy_(st["knobs"][n])
        opt.load_state_dict(st["opt"])
        start = st["step"] + 1
        step_rows = [r for r in pools.read_jsonl(os.path.join(out, "steps.jsonl")) if r["step"] < start]
    write_json(os.path.join(out, "run.json"), run)
    RUN["written"] = True                   # from here on `out` is this run's (an --overwrite has replaced it)

    n_group = per_pool * len(replay_dirs)
    bar = pools._bar(args.steps - start, f"{args.arm}/{args.loss_mode}", enabled=not args.quiet)
    for step in range(start, args.steps):
        t0 = time.time()
        group = draw(replay, per_pool, args.seed, step)
        rewards = [float(r["reward"]) for r in group]
        batch = ap.make_batch(tok, [pools.render_prompt(r["prompt"], tok) for r in group],
                              [r["completion"] for r in group], cfg["max_prompt_tokens"],
                              cfg["max_completion_tokens"], device=device)
        model.train()
        losses, adv, gs = ap.per_sample_grads(model, modules, batch, args.loss_mode, rewards, G=n_group,
                                              loss_type=args.loss_type, max_len=cfg["max_completion_tokens"])
        trunc = truncation(tok, group, cfg, batch)
        model.eval()
        skipped = args.loss_mode == "grpo" and max(rewards) == min(rewards)
        grads = {n: ap.knob(m).grad.detach().clone() for n, m in modules.items()}
        new, st = ap.project(grads, V, one_sided=not args.no_gate)
        # the applied update, on cos_in's scale: > 0 means the step moved hack-ward
        upd = None if skipped else apply_step(opt, modules, grads, V, args.arm == "projected", args.project_moments,
                                              one_sided=not args.no_gate)
        opt.zero_grad(set_to_none=True)
        cos_update = None if skipped else ap.project(upd, V)[1]["cos_in"]
        s_cos, s_norm = ap.sample_cosines(gs, V)
        slim = [dict(step=step, sample_id=i, src_pool=r["src_pool"], src_step=r["src_step"],
                     src_sample=r["src_sample"], reward=r["reward"], hacked=r["hacked"], gt_pass=r["gt_pass"],
                     fmt_ok=r["fmt_ok"], comp_len=int(batch["comp_len"][i]), cos_S_contrib=s_cos[i],
                     grad_norm_contrib=s_norm[i], mean_cos_in=st["cos_in"], mean_cos_out=st["cos_out"],
                     frac_fired=st["frac_fired"], arm=args.arm) for i, r in enumerate(group)]
        pools.atomic_write(pools.step_path(out, step, ".cos.jsonl.gz"), pools.gz_jsonl_bytes(slim))
        gnorm = sum(g.double().pow(2).sum().item() for g in grads.values()) ** 0.5
        step_rows.append(dict(
            step=step, arm=args.arm, skipped=skipped, skip_reason="zero reward variance" if skipped else None,
            n_samples=len(group), reward_min=min(rewards), reward_max=max(rewards),
            reward_range=max(rewards) - min(rewards),
            adv_min=adv.min().item() if adv is not None else None, adv_max=adv.max().item() if adv is not None else None,
            adv_abs_mean=adv.abs().mean().item() if adv is not None else None,
            loss=losses.sum().item(), grad_norm=gnorm, cos_in=st["cos_in"], cos_out=st["cos_out"],
            cos_update=cos_update, cos_in_global=global_cos(grads, V), **trunc, hackward=st["hackward"], frac_fired=st["frac_fired"],
            n_over_projected=st["n_over_projected"], time_s=round(time.time() - t0, 3)))
        write_jsonl(os.path.join(out, "steps.jsonl"), step_rows)
        buf = io.BytesIO()
        torch.save(dict(step=step, knobs={n: ap.knob(m).detach().cpu() for n, m in modules.items()},
                        opt=opt.state_dict()), buf)
        pools.atomic_write(state_path, buf.getvalue())
        bar.update(1)
        if not args.quiet and not sys.stderr.isatty():
            log_step(step_rows[-1], args.steps)
    bar.close()
    if args.quiet:
        return out
    summary(out, step_rows, time.time() - t_start)
    if not args.no_report:
        import analyze
        print(analyze.report([out]))
    return out


def log_step(r, steps):
    """One line per step where no progress bar can draw (a log file, a pipe)."""
    f = lambda x: "null" if x is None else f"{x:+.3f}"
    print(f"step {r['step'] + 1}/{steps}  reward {r['reward_min']:.2f}..{r['reward_max']:.2f}  cos_in {f(r['cos_in'])}  "
          f"{r['time_s']:.1f}s" + ("  skipped (zero reward variance)" if r["skipped"] else ""), file=sys.stderr, flush=True)


def summary(out, rows, elapsed):
    f = lambda x: "  null" if x is None else f"{x:+.3f}"
    live = [r for r in rows if not r["skipped"]]
    print(f"\n== run {out}: {len(rows)} steps ({len(rows) - len(live)} skipped: zero reward variance), "
          f"{elapsed:.1f}s")
    print(" step  r_range  |adv|   cos_in  cos_out  cos_upd  fired")
    for r in rows:
        print(f" {r['step']:>4}  {r['reward_range']:6.2f}  {r['adv_abs_mean'] or 0:5.2f}  {f(r['cos_in'])}  "
              f"{f(r['cos_out'])}   {f(r['cos_update'])}  {r['frac_fired']:.2f}")


if __name__ == "__main__":
    main()
