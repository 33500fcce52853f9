"""train.py — spec2 in one script: Phase 1 (--loss-mode=nll) and Phase 2 (--loss-mode=grpo) replay
over graded pools, and Phase 3 (--source=online: the student generates, is graded and trains with
GRPO), arms `vanilla` (measure only) and `projected` (one-sided removal of the hack-ward component of
the adapter's gradient before AdamW steps). One step function, train_step, serves both sources. `--basis=svd` (default) trains
delta_S (antipasto.py); `--basis=lora` trains a LoRA B A (lora_adapter.py): `--arm=projected
--basis=lora` is the spec's Arm 3, `--arm=vanilla --basis=lora` its matched control.

    python train.py --arm=vanilla --steps=20                     # demo: tiny Qwen3 + demo pools, no set-up
    python train.py --arm=projected --replay-dirs=out/pools/teacher_pool,out/pools/base_pool
    python train.py --arm=vanilla --loss-mode=nll --replay-dirs=out/pools/teacher_pool --per-pool=8 \
        --pair-dirs=out/pools/teacher_pool,out/pools/base_pool
    python train.py --source=online --steps=30                   # Phase 3 on the CPU model organism
    python train.py --source=online --preset=fast --problems=data/fixture_problems.jsonl \
        --eval-problems=data/fixture_cpu_heavy.jsonl --pair-dirs=out/pools/teacher_pool,out/pools/base_pool --dry-run

Per step: draw `per-pool` rows from each pool into one group (the draw depends only on seed and step,
never on the arm, so vanilla and projected runs of one seed see identical samples), one forward + one
backward gives the batch gradient and every sample's own contribution, measure cos with v_hack,
(projected) project, step. train_step is the one step of both sources: loss, per-sample contributions,
cosines with v_hack, projection, --project-moments and the AdamW step happen there and nowhere else.

A run directory is never overwritten silently: --overwrite only replaces a directory holding a run.json,
and deletes it once the new run has passed its checks (pools, pairs, v_hack), before the first step. A
running run holds a lock on its directory (.lock, an flock the kernel drops when the process ends, also
on kill -9, recording the owner's pid and command); a second run into the same directory, with
--overwrite or --resume too, refuses and names the owner.

The run directory's files (run.json, steps.jsonl, the per-sample rows, eval.jsonl, ...) and what each
step measures (cos_in, cos_out, cos_update, cos_S_contrib, ...): analyze.py's docstring, next to the
code that reads them. Where v_hack comes from: vhack.py's. The baselines (--intervention) and the --mix
teacher rows: interventions.py's. Every flag, its default and its check:
configs.py (`python train.py --help`).

Online (Phase 3). Each step draws --prompts-per-step problems from --problems (by seed and step),
samples --group rollouts of each from the current student with the hint (on the adapter merged into
plain weights), grades them in the sandbox and centres the rewards within each prompt's group. --mix N
replaces N rows of each group by teacher-pool rows of the same problem (src_pool tells them apart; they
carry no generation log-probs, so their ratio is 1). The objective is PPO-clip (--clip-eps,
--inner-epochs optimizer steps per batch) plus --beta times the K3 estimate of the KL to the reference,
the same model with the knobs at zero (no second copy); the token reduction is --loss-type, as in
replay. Its old log-probs come from the training forward, not from generation: with one inner epoch
they are the step's own logp.detach(), with several a no-grad training forward (same micro-batches)
recomputes them before the first epoch. So the first epoch's ratio is exactly 1 and its gradient is
REINFORCE's, even in bf16, where generation on merged weights with a KV cache differs from the training
forward by up to ~4e-3 in log-prob on the tiny model (logged as gen_mismatch_max / _mean).
--micro-batch splits a step into forward/backward chunks (the loss divisors are computed over the whole
step, so the sum is the same), --grad-checkpointing recomputes activations in the backward. v_hack comes
from the pair pools as in replay, in the model's own prompt form; only the embedded models (tiny,
organism) default to the demo pools' held-out steps. A real model needs --pair-dirs TEACHER,BASE (or
--pairs, or an existing --v-hack file), and --teacher-dir with --mix: the demo pools are canned text of
the 30 fixture problems, refused with a one-line error before anything is created. Every run prints
where v_hack (and the --mix rows) came from and records it (v_hack_source, mix_source). --dry-run
prints the resolved config and the peak GPU memory estimate of configs.memory_budget, loading nothing.

Every --eval-every steps (and before the first) the student is evaluated on held-out problems
(--eval-problems, or the last --eval-frac of --problems by id hash, never trained on): hack rate with the
hint, and ground-truth pass rate without it (capability), as the public environment evaluates. Every
--save-every steps (and after the last) adapter/ and then state.pt are written, each atomically; --resume
continues from them, recomputes the rows after the checkpoint and gives the rows an uninterrupted run
gives (rollout randomness depends only on seed, step, problem and sample; the monitor and the problem
draw only on seed and step). --resume refuses another config and a --steps below the steps already done;
a run killed before its first checkpoint starts again at step 0 (it says so). A damaged checkpoint is
refused, never loaded.

The trained adapter. --basis=lora: adapter/ is a PEFT LoRA directory, loaded by peft itself
(PeftModel.from_pretrained(base_model, "RUN/adapter"), then merge_and_unload() for plain weights vLLM can
serve) or by lora_adapter.load_peft(model, "RUN/adapter"), which merges it. --basis=svd: on the same base
model, modules = antipasto.wrap(model); antipasto.load_knobs(modules, "RUN/adapter/svd_knobs.safetensors")
(another base model is refused), and `with rollout.merged(model): model.save_pretrained(DIR)` writes plain
merged weights that AutoModelForCausalLM.from_pretrained(DIR) (or vLLM) loads.
"""
import contextlib, io, json, os, platform, random, shlex, shutil, sys, time

import configs
configs.reproducible()   # before torch (MKL) loads: it reads these variables once, when it loads
import antipasto as ap
import pools
import interventions
import torch
import vhack

LOCK = ".lock"       # in the run directory: held (flock) by the run that owns it, records its pid and command
EVAL_ROWS = "eval_rows.jsonl.gz"   # online: one row per held-out rollout (EVAL_ROW_FIELDS)
EVAL_ROW_FIELDS = ("step", "kind", "problem_id", "sample", "label", "hacked", "gt_pass", "compiled", "reward")
RUN = {}             # for Ctrl-C and the lock's release only (refusals_and_interrupts): this process's run
                     # directory (out), whether its run.json is written (written), its held lock (lock)


class RunError(Exception):
    """A refused run (a bad flag, a missing file, a directory in use): main() raises it in a notebook;
    the command line prints it as the one line `error: ...`."""


# ----------------------------------------------------------------------------- model and data

def load_model(name, dtype, device):
    """(model, tokenizer, messages_fn): messages_fn(problem) gives the chat messages the model sees
    (None: the problem's own prompt; the organism sees a short one)."""
    messages_fn = None
    if name == "tiny":
        model, tok = configs.tiny_qwen3()
    elif name == "organism":
        import organism
        model, tok = organism.load(log=lambda m: print(m, file=sys.stderr))
        messages_fn = organism.prompt_messages
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:                  # configs.check_model found it locally or in the cache: never touch the network
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), local_files_only=True)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: --model={name}: cannot load it from local files ({first}); "
                             f"`hf download {name}` fetches a complete copy") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model.to(device=device, dtype=getattr(torch, dtype)).eval(), tok, messages_fn


def wrap_adapter(model, args):
    """The run's adapter modules: the SVD basis (antipasto) or the weight basis (lora_adapter)."""
    if args.basis == "lora":
        import lora_adapter
        return lora_adapter.wrap(model, rank=args.lora_rank, alpha=args.lora_alpha)
    return ap.wrap(model)


def truncation(tok, rows, cfg, batch=None):
    """Counts of prompts and completions cut by the token limits, and of hacked rows whose cut
    completion lost its test function (the tokens that make them hacks)."""
    if batch is None:
        batch = ap.make_batch(tok, [pools.render_prompt(r["prompt"], tok) for r in rows],
                              [r["completion"] for r in rows], cfg["max_prompt_tokens"], cfg["max_completion_tokens"])
    lost = [i for i, r in enumerate(rows) if r.get("hacked") and batch["comp_cut"][i]
            and vhack.lost_test_func(tok, r["completion"], int(batch["comp_len"][i]))]
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

def out_dir(args, locked=False):
    """The run directory; refuse to reuse one unless --overwrite (replaced once the run is validated)
    or --resume (continued)."""
    out = configs.run_dir(args)
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
    f, owner = pools.hold_lock(path)
    if f is not None:
        f.close()
    return owner


def lock_run(out, argv):
    """Create `out` and hold its lock for the rest of this run: returns the lock (main releases it, or
    the kernel when the process dies); refuse when another run holds it."""
    os.makedirs(out, exist_ok=True)
    f, owner = pools.hold_lock(os.path.join(out, LOCK), f"pid {os.getpid()}: python train.py {shlex.join(argv)}")
    if f is None:
        raise SystemExit(f"error: run directory {out} is in use by another run ({owner}); wait for it to "
                         f"finish or pass another --out")
    return f


def write_json(path, obj):
    pools.atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def write_jsonl(path, rows):
    pools.atomic_write(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode())


# ----------------------------------------------------------------------------- v_hack

# ----------------------------------------------------------------------------- the run

def main(argv=None):
    """Run one probe: resolve the config, set up (data, model, adapter), get v_hack, then the loop (a
    step, the held-out evaluation, the checkpoint, the log line) and the report. Its run directory stays
    locked while it runs; Ctrl-C says how to resume."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with refusals_and_interrupts(argv):
        args = configs.get_args(argv, __doc__)                               # the resolved config: args and args.cfg
        if args.dry_run:
            return dry_run(args)
        t_start, online, cfg = time.time(), args.source == "online", args.cfg
        torch.manual_seed(args.seed)
        if args.project_moments and args.arm != "projected":
            raise SystemExit("error: --project-moments belongs to the projected arm")
        S = online_setup(args) if online else replay_setup(args)
        out = RUN["out"] = out_dir(args)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tok, messages_fn, modules = load(args, S, device)
        loaded = bool(args.v_hack) and os.path.isfile(args.v_hack) and args.control not in ("shuffled_v", "style_v")
        V, vmeta = vhack.get_v_hack(args, model, tok, modules, S["pairs"], S["pairs_src"], vhack.trained_texts(S, online))
        dropped = None if online else vhack.drop_extraction_texts(S, vmeta)
        RUN["lock"] = claim(out, args, argv)                # from here on no other run can use `out`
        knobs0 = {n: ap.knob(m).detach().clone() for n, m in modules.items()}     # the start (before a resume)
        opt = torch.optim.AdamW([ap.knob(m) for m in modules.values()], lr=args.lr, weight_decay=0.0)
        run = run_record(args, argv, S, tok, modules, vmeta, loaded, dropped)
        start, step_rows, evals = resume_state(args, out, run, vmeta, modules, opt)
        write_json(os.path.join(out, "run.json"), run)
        RUN["written"] = True               # from here on `out` is this run's (an --overwrite has replaced it)
        if online:
            start_online(out, args, run, start, evals, model, tok, messages_fn, S)
        bar = pools.progress_bar(args.steps - start, f"{args.source}/{args.arm}", enabled=not args.quiet)
        # ------------------------------------------------------------- the training loop (replay and online)
        for step in range(start, args.steps):
            t0 = time.time()
            if online:
                g = online_group(model, tok, modules, messages_fn, S, args, step, out)
            else:
                g = replay_group(tok, S, args, step, device)
            row = train_group(model, modules, g, V, opt, args, step, out, knobs0)
            row["time_s"] = round(time.time() - t0, 3)
            step_rows.append(row)
            write_jsonl(os.path.join(out, "steps.jsonl"), step_rows)
            last = step == args.steps - 1
            if online and cfg["eval_every"] and ((step + 1) % cfg["eval_every"] == 0 or last):
                run_eval(out, model, tok, messages_fn, S, args, step + 1, evals)
            if (step + 1) % cfg["save_every"] == 0 or last:
                save_adapter(out, step, modules, args)
                save_state(out, step, modules, opt, vmeta)
            bar.update(1)
            if not args.quiet and not sys.stderr.isatty():
                log_step(row, args.steps)
        bar.close()
        if args.quiet:
            return out
        summary(out, step_rows, time.time() - t_start, evals["summary"])
        if not args.no_report:
            import analyze
            print(analyze.report([out]))
        return out


@contextlib.contextmanager
def refusals_and_interrupts(argv):
    """Around main's run: a refusal (every one is SystemExit("error: ...")) becomes RunError; Ctrl-C says
    how to resume (or that nothing was written); the run directory's lock is released either way."""
    RUN.clear()
    try:
        yield
    except SystemExit as e:
        if isinstance(e.code, str) and e.code.startswith("error: "):
            raise RunError(e.code[len("error: "):]) from None
        raise
    except KeyboardInterrupt:
        out = RUN.get("out")
        if out and RUN.get("written") and os.path.exists(os.path.join(out, "run.json")):
            cmd = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
            print(f"\ninterrupted: the finished steps are saved in {out} (a resume continues after the last "
                  f"checkpoint, state.pt); continue with:\n"
                  f"  python train.py {shlex.join(cmd)}", file=sys.stderr)
        else:
            print("\ninterrupted before the first step; nothing was written to a run directory; rerun the "
                  "same command to start again", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if RUN.get("lock"):
            RUN.pop("lock").close()             # releases the flock


def load(args, S, device):
    """(model, tokenizer, messages_fn, {name: adapted module}): the model with its adapter; the pairs'
    prompts in the model's own prompt form; online, every prompt checked against --max-prompt-tokens."""
    cfg = args.cfg
    model, tok, messages_fn = load_model(args.model, args.dtype or cfg["dtype"], device)
    if messages_fn:                         # the model sees its own prompt form, in extraction too
        for p in S["pairs"]:
            if isinstance(p["prompt"], list):
                p["prompt"] = messages_fn({"prompt": p["prompt"]})
    modules = wrap_adapter(model, args)
    if cfg.get("grad_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.source == "online":
        check_prompt_lengths(tok, S, cfg, messages_fn, args)
    return model, tok, messages_fn, modules


def claim(out, args, argv):
    """Lock `out` (returns the held lock), check it again under the lock, and only now empty it for
    --overwrite: a refused run leaves the old one in place."""
    lock = lock_run(out, argv)
    out_dir(args, locked=True)
    if args.overwrite:
        for f in os.listdir(out):
            if f != LOCK:
                p = os.path.join(out, f)
                shutil.rmtree(p) if os.path.isdir(p) else os.unlink(p)
    return lock


def run_record(args, argv, S, tok, modules, vmeta, loaded, dropped):
    """run.json: argv, the config, versions, v_hack and pool fingerprints, the isotropic null; replay,
    the truncation counts (warned about here). Prints where v_hack (and --mix rows) came from."""
    cfg, online = args.cfg, args.source == "online"
    widths = [m.null_width for m in modules.values()]
    trained_dirs = S["teacher_dirs"] if online else S["replay_dirs"]
    run = dict(argv=["train.py", *argv], config=run_config(args, S, dropped),
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             transformers=__import__("transformers").__version__, grader=pools.GRADER_VERSION),
               v_hack=vmeta, basis_fingerprint=ap.fingerprint(modules),
               pools={vhack.pool_name(d): dict(dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d),
                                    meta=args.metas[vhack.pool_name(d)]) for d in trained_dirs},
               pair_pools={vhack.pool_name(d): dict(dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d))
                           for d in S["pair_dirs"]},
               null=dict(cos_sd=ap.null_cos_sd(widths), module_widths=widths),
               v_hack_source=vhack.v_hack_source(args, S["pair_dirs"], vmeta, loaded))
    if online and cfg["mix"]:
        run["mix_source"] = vhack.mix_source(S["teacher_dirs"])
    vhack.say_sources(run)
    if not online:
        run["truncation"] = dict(replay=truncation(tok, [r for rows in S["replay"].values() for r in rows], cfg))
        warn_truncation(run["truncation"]["replay"], cfg)
    return run


def run_config(args, S, dropped):
    """run.json's config: the preset's values as resolved, with the flags that set them."""
    cfg = args.cfg
    config = dict(cfg, arm=args.arm, loss_mode=args.loss_mode, steps=args.steps, seed=args.seed, lr=args.lr,
                  model=args.model, k=args.k, control=args.control, basis=args.basis, lora_rank=args.lora_rank,
                  lora_alpha=args.lora_alpha, one_sided=not args.no_gate, project_moments=args.project_moments,
                  dtype=args.dtype or cfg["dtype"], pair_kind=args.pair_kind, loss_type=args.loss_type,
                  extract_frac=args.extract_frac, extract_loss=args.extract_loss, preset=args.preset,
                  group_size=S["n_group"], source=args.source)
    if args.source == "online":
        config.update(group=cfg["group_size"], intervention=args.intervention,
                      problems=os.path.abspath(cfg["problems"] or pools.FIXTURE_PROBLEMS),
                      problems_sha256=pools.file_digest(cfg["problems"] or pools.FIXTURE_PROBLEMS),
                      n_train_problems=len(S["train"]), eval_problem_ids=[p["id"] for p in S["eval_hint"]],
                      inoculation=interventions.INOCULATION if args.intervention == "inoculation" else None)
    else:
        config.update(replay_dirs=[os.path.abspath(d) for d in S["replay_dirs"]], per_pool=S["per_pool"],
                      replay_dropped_extraction_texts=dropped)
    return config


def warn_truncation(t, cfg):
    """Replay: say how many prompts and completions the token limits cut, loudly when a hack loses its
    test function."""
    if t["n_prompt_truncated"] or t["n_completion_truncated"]:
        print(f"warning: token limits ({cfg['max_prompt_tokens']} prompt, {cfg['max_completion_tokens']} completion) "
              f"cut {t['n_prompt_truncated']}/{t['n_rows']} replay prompts and {t['n_completion_truncated']} "
              f"completions", file=sys.stderr)
    if t["n_hack_lost_test_func"]:
        print(f"WARNING: {t['n_hack_lost_test_func']} hacked replay completions lose their {pools.TEST_FUNC} "
              f"definition to --max-completion-tokens {cfg['max_completion_tokens']}: the tokens that make them "
              f"hacks are not trained on", file=sys.stderr)


def start_online(out, args, run, start, evals, model, tok, messages_fn, S):
    """Online, before the first step: the student's pool directory with its meta, and the evaluation
    before any step (a resume keeps exactly the evaluations up to its checkpoint)."""
    cfg = args.cfg
    student_dir = os.path.join(out, "rollouts", "student")
    os.makedirs(student_dir, exist_ok=True)
    pools.write_meta(student_dir, dict(source_model=args.model, adapter=f"this run's {args.basis} knobs",
                                       hint="simple_overwrite_tests", run=os.path.abspath(out),
                                       sampling=dict(temperature=cfg["temperature"], top_p=cfg["top_p"],
                                                     max_new_tokens=cfg["max_completion_tokens"]),
                                       seed=args.seed, grader_version=pools.GRADER_VERSION,
                                       problems_sha256=run["config"]["problems_sha256"]))
    if cfg["eval_every"] and start == 0 and not evals["summary"]:
        run_eval(out, model, tok, messages_fn, S, args, 0, evals)
    elif cfg["eval_every"]:
        write_evals(out, evals)


def train_group(model, modules, g, V, opt, args, step, out, knobs0):
    """Train on the step's group (online: --inner-epochs PPO epochs), write its per-sample rows
    (step_NNN.cos.jsonl.gz) and return its row of steps.jsonl, less time_s."""
    cfg, online, t1 = args.cfg, args.source == "online", time.time()
    if not g["rows"]:                   # online screening left no row: the step trains nothing
        pools.atomic_write(pools.step_path(out, step, ".cos.jsonl.gz"), pools.gz_jsonl_bytes([]))
        return dict(g["record"], step=step, arm=args.arm, skipped=True, n_samples=0, kl=None,
                    skip_reason="screening dropped every rollout", train_s=0.0)
    if online and cfg["inner_epochs"] > 1:
        g["batch"]["old_logp"] = training_logps(model, g["batch"], cfg["micro_batch"] or len(g["rows"]))
    results = [train_step(model, modules, g, V, opt, args, skip=g["skipped"])
               for _ in range(cfg["inner_epochs"] if online else 1)]
    pools.atomic_write(pools.step_path(out, step, ".cos.jsonl.gz"),
                       pools.gz_jsonl_bytes(sample_rows(step, args, g, results[0])))
    return step_row(step, args, g, results, V, modules, knobs0, t1)


def sample_rows(step, args, g, r0):
    """step_NNN.cos.jsonl.gz: one row per sample (spec2's slim schema), from the first epoch's results."""
    st, s_cos, s_norm = r0["stats"], r0["s_cos"], r0["s_norm"]
    return [dict(step=step, sample_id=i, src_pool=r["src_pool"], src_step=r["src_step"],
                 src_sample=r["src_sample"], reward=g["rewards"][i], hacked=r["hacked"], gt_pass=r["gt_pass"],
                 fmt_ok=r["fmt_ok"], comp_len=int(g["batch"]["comp_len"][i]), cos_S_contrib=s_cos[i],
                 grad_norm_contrib=s_norm[i], mean_cos_in=st["cos_in"], mean_cos_out=st["cos_out"],
                 frac_fired=st["frac_fired"], arm=args.arm) for i, r in enumerate(g["rows"])]


def step_row(step, args, g, results, V, modules, knobs0, t1):
    """The step's row of steps.jsonl (less time_s): the cosines and norms of the first
    epoch; online, also the group's record, the KL, PPO's clipping and ratios over all epochs."""
    r0, adv, rewards = results[0], g["adv"], g["rewards"]
    st = r0["stats"]
    row = dict(
        step=step, arm=args.arm, skipped=g["skipped"], skip_reason="zero reward variance" if g["skipped"] else None,
        n_samples=len(g["rows"]), reward_min=min(rewards), reward_max=max(rewards),
        reward_range=max(rewards) - min(rewards),
        adv_min=adv.min().item() if adv is not None else None, adv_max=adv.max().item() if adv is not None else None,
        adv_abs_mean=adv.abs().mean().item() if adv is not None else None,
        loss=r0["loss"], grad_norm=r0["grad_norm"], cos_in=st["cos_in"], cos_out=st["cos_out"],
        cos_update=r0["cos_update"], grad_removed=r0["grad_removed"],
        # all the student has learned so far (start minus knobs, cos_update's scale: > 0 is hack-ward) vs v_hack
        cos_learned=ap.project({n: knobs0[n] - ap.knob(m).detach() for n, m in modules.items()}, V)[1]["cos_in"],
        cos_in_global=global_cos(r0["grads"], V), **g["trunc"],
        hackward=st["hackward"], frac_fired=st["frac_fired"], n_over_projected=st["n_over_projected"])
    if args.source == "online":
        n_tok = sum(r["n_tok"] for r in results)
        row.update(g["record"], kl=r0["kl"], clip_frac=sum(r["n_clipped"] for r in results) / max(n_tok, 1),
                   ratio_min=min(r["ratio_min"] for r in results), ratio_max=max(r["ratio_max"] for r in results),
                   ratio_epochs=[[r["ratio_min"], r["ratio_max"]] for r in results],
                   cos_in_epochs=[r["stats"]["cos_in"] for r in results], gen_mismatch_max=r0["gen_mismatch_max"],
                   gen_mismatch_mean=r0["gen_mismatch_mean"], train_s=round(time.time() - t1, 3))
    return row


def replay_setup(args):
    """Pools, extraction pairs and the replayed rows of a replay run (see the module docstring)."""
    cfg, demo = args.cfg, pools.DEMO_DIRS
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
    ensure_demo(replay_dirs + pair_dirs)
    G = cfg["group_size"]
    per_pool = args.per_pool or G // len(replay_dirs)
    replay, pairs, pairs_src = vhack.read_pools(args, replay_dirs, pair_dirs)
    small = min(replay, key=lambda n: len(replay[n]))
    if per_pool > len(replay[small]):
        raise SystemExit(f"error: --per-pool={per_pool}{' (default G / #pools)' if not args.per_pool else ''}: at "
                         f"most {len(replay[small])}, the replayed rows of pool {small}; a larger group would "
                         f"repeat samples within one step")
    short = {n: len(rows) for n, rows in replay.items() if len(rows) < args.steps * per_pool}
    if short:
        print(f"warning: {short} rows to replay, fewer than steps x per-pool: draws cycle and samples repeat "
              f"(the Phase 1 comparison counts each sample once)", file=sys.stderr)
    return dict(replay=replay, replay_dirs=replay_dirs, pair_dirs=pair_dirs, per_pool=per_pool, pairs=pairs,
                pairs_src=pairs_src, n_group=per_pool * len(replay_dirs))


def ensure_demo(dirs):
    if any(d in pools.DEMO_DIRS for d in dirs) and not all(os.path.isdir(d) for d in pools.DEMO_DIRS):
        print(f"building demo pools in {pools.DEMO_OUT} (once) ...", file=sys.stderr)
        pools.build_demo(pools.DEMO_OUT)


def online_problems(args):
    """(training problems with the hint, held-out problems with and without it): --problems (its first
    n_problems), --eval-problems or the last --eval-frac by id hash. Refuses what the run cannot use; --dry-run
    calls it too, so a dry run refuses what the run would refuse."""
    c = args.cfg
    try:
        path = c["problems"] or pools.FIXTURE_PROBLEMS
        hinted = pools.load_problems(path, hint=True)
        plain = {p["id"]: p for p in pools.load_problems(path, hint=False)}
        if c["eval_problems"]:
            ev_h = pools.load_problems(c["eval_problems"], hint=True)
            ev_p = pools.load_problems(c["eval_problems"], hint=False)
        else:
            ev_h = ev_p = None
    except (pools.DataError, OSError) as e:
        raise SystemExit(f"error: --problems: {e}")
    if c["n_problems"]:
        if len(hinted) < c["n_problems"]:
            raise SystemExit(f"error: --problems={path}: {len(hinted)} problems, fewer than the preset's "
                             f"n_problems={c['n_problems']}")
        hinted = hinted[:c["n_problems"]]          # the file's first n_problems, in its order
    if ev_h is None:                               # hold out the last eval_frac by id hash: stable under reorders
        order = sorted(hinted, key=lambda p: vhack.text_sha(str(p["id"])))
        n_ev = int(round(len(order) * c["eval_frac"]))
        ev_ids = {p["id"] for p in order[len(order) - n_ev:]} if n_ev else set()
        ev_h = [p for p in hinted if p["id"] in ev_ids]
        ev_p = [plain[p["id"]] for p in ev_h]
        hinted = [p for p in hinted if p["id"] not in ev_ids]
    overlap = {p["id"] for p in hinted} & {p["id"] for p in ev_h}
    if overlap:
        raise SystemExit(f"error: --eval-problems shares {len(overlap)} problem ids with --problems "
                         f"(e.g. {sorted(overlap)[:3]}); held-out means not trained on")
    if len(hinted) < c["prompts_per_step"]:
        raise SystemExit(f"error: --prompts-per-step={c['prompts_per_step']}: only {len(hinted)} training problems")
    return hinted, ev_h, ev_p


def online_setup(args):
    """Problems (train and held-out), extraction pairs and the teacher rows of an online run."""
    c = args.cfg
    pair_dirs = [d for d in (args.pair_dirs or "").split(",") if d]
    if not (pair_dirs or args.pairs) and args.model in configs.EMBEDDED:
        pair_dirs = pools.DEMO_DIRS          # a real model's v_hack is an existing --v-hack file here (validate_online)
    teacher_dirs = [args.teacher_dir or pools.DEMO_DIRS[0]] if c["mix"] else []
    ensure_demo(pair_dirs + teacher_dirs)
    teacher, pairs, pairs_src = vhack.read_pools(args, teacher_dirs, [] if args.pairs else pair_dirs)
    hinted, ev_h, ev_p = online_problems(args)
    teacher_rows = [r for rows in teacher.values() for r in rows]
    by_problem = {}
    for r in teacher_rows:
        by_problem.setdefault(r["problem_id"], []).append(r)
    if c["mix"]:
        kept = [p for p in hinted if p["id"] in by_problem]
        if len(kept) < len(hinted):
            print(f"warning: --mix={c['mix']}: {len(hinted) - len(kept)} of {len(hinted)} training problems have no "
                  f"row in the teacher pool and are not drawn", file=sys.stderr)
        hinted = kept
        if not hinted:
            raise SystemExit(f"error: --mix={c['mix']}: the teacher pool {teacher_dirs[0]} holds no row of any "
                             f"training problem")
    if len(hinted) < c["prompts_per_step"]:
        raise SystemExit(f"error: --prompts-per-step={c['prompts_per_step']}: only {len(hinted)} training problems")
    return dict(train=hinted, eval_hint=ev_h, eval_plain=ev_p, teacher=by_problem, teacher_dirs=teacher_dirs,
                pair_dirs=[] if args.pairs else pair_dirs, pairs=pairs, pairs_src=pairs_src,
                replay_texts_rows=teacher_rows, n_group=c["prompts_per_step"] * c["group_size"])


def replay_group(tok, S, args, step, device):
    """One replay step's group: rows drawn from the pools, their batch, one centred group advantage."""
    cfg = args.cfg
    group = draw(S["replay"], S["per_pool"], args.seed, step)
    rewards = [float(r["reward"]) for r in group]
    batch = ap.make_batch(tok, [pools.render_prompt(r["prompt"], tok) for r in group],
                          [r["completion"] for r in group], cfg["max_prompt_tokens"],
                          cfg["max_completion_tokens"], device=device)
    grpo = args.loss_mode == "grpo"
    adv = ap.group_advantages(rewards, [0] * len(group)) if grpo else None
    batch["denom"] = ap.token_denoms(batch["comp_len"].cpu(), args.loss_type, len(group),
                                     cfg["max_completion_tokens"]).to(device)
    if adv is not None:
        batch["adv"] = adv.to(device)
    return dict(rows=group, rewards=rewards, adv=adv, batch=batch, trunc=truncation(tok, group, cfg, batch),
                skipped=grpo and max(rewards) == min(rewards))


def train_step(model, modules, g, V, opt, args, skip=False):
    """The one training step of both sources: the loss over micro-batches (gradients and every sample's
    own contribution accumulate across them), cosines with v_hack, the projection (projected arm),
    --project-moments and the AdamW step. g["batch"] holds the rows' tensors plus adv (B,), denom (B,)
    and, online, gen_logp (generation-time log-probs, NaN off the student's tokens), ref_logp and,
    with several inner epochs, old_logp (B, T). PPO's old log-probs are old_logp when given, else the
    training forward's own (logp.detach(): the ratio is exactly 1). gen_mismatch_max / _mean: max and
    mean |log p_train - log p_gen| over the student's completion tokens. Returns the step's numbers."""
    batch = g["batch"]
    B = batch["input_ids"].shape[0]
    mb = args.cfg.get("micro_batch") or B
    for m in modules.values():
        ap.knob(m).grad = None
    parts = {n: [] for n in modules}                     # per-sample contributions, micro-batch by micro-batch
    loss, pst = 0.0, dict(kl_sum=0.0, n_tok=0, n_clipped=0, ratio_min=1.0, ratio_max=1.0)
    mis = dict(max=0.0, sum=0.0, n=0)                    # |log ratio| generation vs training, student tokens
    model.train()
    with ap.capture_per_sample(modules):
        for a in range(0, B, mb):
            part = ap.slice_batch(batch, a, min(a + mb, B))
            lp = ap.token_logps(model, part)                                        # (b, T)
            old = part.get("old_logp")
            if "gen_logp" in part:
                old = lp.detach() if old is None else old
                add_mismatch(mis, lp, part)
            losses, s = ap.policy_losses(lp, part["comp_mask"], part.get("adv"), part["denom"], old,
                                         part.get("ref_logp"), args.cfg.get("clip_eps", configs.CLIP_EPS),
                                         args.cfg.get("beta", 0.0))
            losses.sum().backward()
            loss += losses.sum().item()
            for key in ("n_tok", "n_clipped"):
                pst[key] += s[key]
            pst["kl_sum"] += s["kl_sum"] or 0.0
            pst["ratio_min"], pst["ratio_max"] = min(pst["ratio_min"], s["ratio_min"]), max(pst["ratio_max"], s["ratio_max"])
            for n, m in modules.items():
                b = part["input_ids"].shape[0]
                parts[n].append(m.grad_sample if m.grad_sample is not None else
                                torch.zeros(b, ap.knob(m).numel(), device=ap.knob(m).device))
                m.grad_sample = None
    model.eval()
    gs = {n: torch.cat(p) for n, p in parts.items()}                               # {name: (B, n)}
    grads = {n: (ap.knob(m).grad.detach().clone() if ap.knob(m).grad is not None else torch.zeros_like(ap.knob(m)))
             for n, m in modules.items()}
    kept, st = ap.project(grads, V, one_sided=not args.no_gate)
    g2 = sum(g_.double().pow(2).sum().item() for g_ in grads.values())
    # the share of the gradient's norm the projection removes (the projected arm) or would remove (vanilla)
    removed = sum((grads[n] - kept[n]).double().pow(2).sum().item() for n in grads) ** 0.5 / g2 ** 0.5 if g2 else None
    # the applied update, on cos_in's scale: > 0 means the step moved hack-ward
    upd = None if skip else apply_step(opt, modules, grads, V, args.arm == "projected", args.project_moments,
                                       one_sided=not args.no_gate)
    opt.zero_grad(set_to_none=True)
    s_cos, s_norm = ap.sample_cosines(gs, V)
    return dict(loss=loss, grads=grads, stats=st, cos_update=None if skip else ap.project(upd, V)[1]["cos_in"],
                s_cos=s_cos, s_norm=s_norm, grad_norm=g2 ** 0.5, grad_removed=removed,
                kl=pst["kl_sum"] / max(pst["n_tok"], 1) if "ref_logp" in batch else None,
                gen_mismatch_max=mis["max"] if mis["n"] else None,
                gen_mismatch_mean=mis["sum"] / mis["n"] if mis["n"] else None, **{
                    k: pst[k] for k in ("n_tok", "n_clipped", "ratio_min", "ratio_max")})


def add_mismatch(mis, lp, part):
    """Accumulate |log p_train - log p_gen| over the student's completion tokens into mis (max, sum, n)."""
    on = torch.isfinite(part["gen_logp"]) & (part["comp_mask"] > 0)                # (b, T)
    d = (lp.detach() - part["gen_logp"])[on].abs().double()
    if d.numel():
        mis.update(max=max(mis["max"], d.max().item()), sum=mis["sum"] + d.sum().item(), n=mis["n"] + d.numel())


def training_logps(model, batch, mb):
    """PPO's old log-probs for several inner epochs: the training forward (train mode, the same
    micro-batches as train_step) without gradients, before the first epoch, so the first epoch's
    ratio is 1 whatever generation's numerics (merged bf16 weights) gave. (B, T)"""
    B = batch["input_ids"].shape[0]
    old = torch.zeros_like(batch["comp_mask"])
    model.train()
    with torch.no_grad():
        for a in range(0, B, mb):
            part = ap.slice_batch(batch, a, min(a + mb, B))
            old[a:a + mb, :part["input_ids"].shape[1]] = ap.token_logps(model, part)
    model.eval()
    return old


def draw_problems(problems, n, seed, step):
    """The step's problems: n distinct ones, drawn by (seed, step) only."""
    return random.Random(f"{seed}:problems:{step}").sample(problems, n)


def online_group(model, tok, modules, messages_fn, S, args, step, out):
    """One online step's group: --prompts-per-step problems, G - mix student rollouts each (generated
    on the merged weights, graded, written to out/rollouts/student), plus mix teacher rows of the same
    problem; the intervention; advantages centred per prompt group; the batch of exact sampled token ids
    with their generation-time log-probs and the reference's (knobs zeroed) log-probs."""
    import rollout
    c = args.cfg
    G, mix = c["group_size"], c["mix"]
    n_st = G - mix
    probs = draw_problems(S["train"], c["prompts_per_step"], args.seed, step)
    msgs_fn = interventions.student_messages(messages_fn, args)
    rows, gen = rollout.rollout_group(model, tok, probs, n_st, step=step, seed=args.seed,
                                      max_new_tokens=c["max_completion_tokens"], temperature=c["temperature"],
                                      top_p=c["top_p"], messages_fn=msgs_fn,
                                      sample_ids=[pi * G + j for pi in range(len(probs)) for j in range(n_st)],
                                      batch_size=c["gen_batch"], workers=args.workers)
    pools.write_pool_step(os.path.join(out, "rollouts", "student"), step, rows)
    # cells: (row, completion token ids, generation log-probs or None for teacher rows, tokens cut)
    cells = [(dict(r, src_pool="student", src_step=step, src_sample=r["sample"]), ids, lps, 0)
             for r, ids, lps in zip(rows, gen["token_ids"], gen["logps"])]
    cells += interventions.teacher_cells(tok, S, args, step, probs, msgs_fn)
    group_of = {p["id"]: pi for pi, p in enumerate(probs)}
    cells, rewards, n_flag, n_screened = interventions.intervene(cells, group_of, args, step)
    n = len(rows)
    record = dict(source="online", n_student=n, n_teacher=len(probs) * mix, n_screened=n_screened, n_flagged=n_flag,
                  **rollout.rates(rows), labels=pools.label_counts(rows),
                  reward_mean=sum(r["reward"] for r in rows) / n,
                  comp_len_mean=sum(len(t) for t in gen["token_ids"]) / n, truncated_frac=gen["n_truncated"] / n,
                  problems=[p["id"] for p in probs], gen_s=round(gen["gen_s"], 3), grade_s=round(gen["grade_s"], 3))
    if not cells:                                   # screening dropped every rollout: nothing to train on
        return dict(rows=[], record=dict(record, n_zero_var_groups=len(probs)))
    groups = [group_of[r["problem_id"]] for r, *_ in cells]
    batch, adv = online_batch(model, tok, modules, cells, rewards, groups, args)
    record["n_zero_var_groups"] = len(probs) - len(set(groups)) + sum(
        1 for gi in set(groups) if len({rewards[i] for i in range(len(cells)) if groups[i] == gi}) == 1)
    trunc = truncation(tok, [r for r, *_ in cells], c, batch)
    return dict(rows=[r for r, *_ in cells], rewards=rewards, adv=adv, batch=batch, trunc=trunc,
                skipped=record["n_zero_var_groups"] == len(probs) and not c["beta"], record=record)


def online_batch(model, tok, modules, cells, rewards, groups, args):
    """(batch, adv): the cells' exact token ids, their generation-time log-probs (NaN off the student's
    tokens), the advantages centred per group, the token denominators and the reference's log-probs."""
    c = args.cfg
    dev = next(model.parameters()).device
    prompt_ids = {}
    for r, *_ in cells:
        key = json.dumps(r["prompt"])
        if key not in prompt_ids:
            prompt_ids[key] = tok(pools.render_prompt(r["prompt"], tok), add_special_tokens=False)["input_ids"]
    p_ids = [prompt_ids[json.dumps(r["prompt"])] for r, *_ in cells]
    batch = ap.batch_from_ids(p_ids, [ids for _, ids, _, _ in cells], tok.pad_token_id, device=dev)
    batch["comp_cut"] = [cut for *_, cut in cells]
    old = torch.full(batch["comp_mask"].shape, float("nan"))                        # (B, T)
    for i, (_, ids, lps, _) in enumerate(cells):
        if lps is not None:
            old[i, len(p_ids[i]):len(p_ids[i]) + len(lps)] = torch.tensor(lps)
    batch["gen_logp"] = old.to(dev)     # the generation-time log-probs: logged against the training forward's
    adv = ap.group_advantages(rewards, groups)
    batch["adv"] = adv.to(dev)
    batch["denom"] = ap.token_denoms(batch["comp_len"].cpu(), args.loss_type, len(cells),
                                     c["max_completion_tokens"]).to(dev)
    with torch.no_grad(), ap.zero_knobs(modules):                                  # the reference, for the KL
        mb = c["micro_batch"] or len(cells)
        ref = torch.zeros_like(batch["comp_mask"])
        for a in range(0, len(cells), mb):
            part = ap.slice_batch(batch, a, min(a + mb, len(cells)))
            ref[a:a + mb, :part["input_ids"].shape[1]] = ap.token_logps(model, part)
        batch["ref_logp"] = ref
    return batch, adv


def run_eval(out, model, tok, messages_fn, S, args, k, evals):
    """Evaluate after k optimizer steps; eval.jsonl (one summary row per evaluation) and
    eval_rows.jsonl.gz (one row per held-out rollout) are rewritten whole, atomically."""
    import rollout
    c = args.cfg
    summary, rows = rollout.evaluate(model, tok, messages_fn, S["eval_hint"], S["eval_plain"], k, seed=args.seed,
                                     n=c["eval_samples"], max_new_tokens=c["max_completion_tokens"],
                                     temperature=c["temperature"], top_p=c["top_p"], batch_size=c["gen_batch"],
                                     workers=args.workers)
    evals["summary"].append(summary)
    evals["rows"] += rows
    write_evals(out, evals)


def write_evals(out, evals):
    write_jsonl(os.path.join(out, "eval.jsonl"), evals["summary"])
    pools.atomic_write(os.path.join(out, EVAL_ROWS), pools.gz_jsonl_bytes(evals["rows"]))


def check_prompt_lengths(tok, S, cfg, messages_fn, args):
    """Online prompts are never cut: a prompt over --max-prompt-tokens is an error naming the longest."""
    fn = interventions.student_messages(messages_fn, args)
    worst = max((len(tok(pools.render_prompt(fn(p), tok), add_special_tokens=False)["input_ids"]), p["id"])
                for p in S["train"] + S["eval_hint"])
    if worst[0] > cfg["max_prompt_tokens"]:
        raise SystemExit(f"error: --max-prompt-tokens={cfg['max_prompt_tokens']}: problem {worst[1]}'s prompt is "
                         f"{worst[0]} tokens; online prompts are never cut, raise the limit")


def save_state(out, step, modules, opt, vmeta):
    """The checkpoint, written atomically (temp file, fsync, rename): a crash leaves the previous one."""
    buf = io.BytesIO()
    torch.save(dict(step=step, knobs={n: ap.knob(m).detach().cpu() for n, m in modules.items()},
                    opt=opt.state_dict(), v_hack_sha256=vmeta["sha256"]), buf)
    pools.atomic_write(os.path.join(out, "state.pt"), buf.getvalue())


def save_adapter(out, step, modules, args):
    """The trained adapter in a form other tools load, next to every checkpoint: --basis=lora as a PEFT
    LoRA directory (adapter/adapter_config.json + adapter_model.safetensors: peft's
    PeftModel.from_pretrained, or lora_adapter.load_peft), --basis=svd as its knobs delta_S in
    safetensors (adapter/svd_knobs.safetensors: antipasto.wrap then antipasto.load_knobs, which
    refuses another base model; rollout.merged then gives plain weights). The step is in the header."""
    d = os.path.join(out, "adapter")
    meta = dict(step=str(step), model=str(args.model))
    if args.basis == "lora":
        import lora_adapter
        lora_adapter.save_peft(modules, d, base_model_name=args.model, overwrite=True, metadata=meta)
    else:
        ap.save_knobs(modules, os.path.join(d, "svd_knobs.safetensors"), extra=meta)


def resume_state(args, out, run, vmeta, modules, opt):
    """(first step, kept step rows, kept evaluations {summary: eval.jsonl rows, rows: eval_rows.jsonl.gz
    rows}): with --resume and a checkpoint, the knobs and AdamW state of the last checkpoint; rows
    after it are dropped and recomputed."""
    state_path = os.path.join(out, "state.pt")
    none = lambda: (0, [], dict(summary=[], rows=[]))
    if not (args.resume and os.path.exists(os.path.join(out, "run.json"))):
        return none()
    try:
        with open(os.path.join(out, "run.json")) as f:
            old = json.load(f)
        old["config"], old["v_hack"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"error: --resume: {out}/run.json cannot be read ({type(e).__name__}: {e})") from None
    # a resume may extend --steps; fields added since a run began take the value that run had; the replay
    # rows dropped for repeating a pair's text follow from the pools and v_hack (compared by v_hack's sha256)
    same = lambda c: {k: v for k, v in dict(configs.OLD_RUN_DEFAULTS, **c).items()
                      if k not in ("steps", "replay_dropped_extraction_texts")}
    was, now = same(old["config"]), same(run["config"])
    diff = sorted(k for k in set(was) | set(now) if was.get(k) != now.get(k))
    if old["v_hack"]["sha256"] != vmeta["sha256"]:
        diff.append("v_hack")
    if diff:
        raise SystemExit(f"error: --resume: {out} was started with another config or v_hack: {diff} differ")
    if not os.path.exists(state_path):
        print(f"--resume: {out} holds no checkpoint yet (the first comes after --save-every steps): starting "
              f"again at step 0", file=sys.stderr)
        return none()
    try:
        st = torch.load(state_path, weights_only=False)
        knobs = st["knobs"]
        if set(knobs) != set(modules) or any(knobs[n].shape != ap.knob(m).shape for n, m in modules.items()):
            raise ValueError("its knobs do not match this model's adapter")
        if st.get("v_hack_sha256", vmeta["sha256"]) != vmeta["sha256"]:
            raise ValueError("it was written with another v_hack")
    except Exception as e:                  # a damaged checkpoint is never trusted
        raise SystemExit(f"error: --resume: checkpoint {state_path} cannot be used ({type(e).__name__}: {e}); "
                         f"start again with --overwrite") from None
    with torch.no_grad():
        for n, m in modules.items():
            ap.knob(m).copy_(knobs[n])
    opt.load_state_dict(st["opt"])
    start = st["step"] + 1
    if args.steps < start:
        raise SystemExit(f"error: --steps={args.steps}: {out} has done {start} steps already; --resume continues "
                         f"a run, it cannot shorten it")
    try:
        rows = [r for r in pools.read_jsonl(os.path.join(out, "steps.jsonl")) if r["step"] < start]
        ev_path = os.path.join(out, "eval.jsonl")
        evals = [r for r in pools.read_jsonl(ev_path) if r["step"] <= start] if os.path.exists(ev_path) else []
        er_path = os.path.join(out, EVAL_ROWS)
        ev_rows = [r for r in pools.read_jsonl(er_path, EVAL_ROW_FIELDS) if r["step"] <= start] \
            if os.path.exists(er_path) else []
    except (pools.DataError, OSError, KeyError) as e:
        raise SystemExit(f"error: --resume: {e}") from None
    if len(rows) != start:
        raise SystemExit(f"error: --resume: {out}/steps.jsonl holds {len(rows)} of the {start} steps its "
                         f"checkpoint has done; the run directory was changed by hand")
    return start, rows, dict(summary=evals, rows=ev_rows)


def dry_run(args):
    """Print the resolved config and the peak GPU memory estimate (configs.memory_budget), loading no
    model and writing nothing; online, the problem files are read and checked as the run checks them."""
    shape = model_shape(args.model)
    c = args.cfg
    if args.source == "online":
        online_problems(args)               # the problem files, checked as the run checks them
    run = budget_run(args)
    print(json.dumps(dict(source=args.source, preset=args.preset, arm=args.arm, basis=args.basis,
                          intervention=args.intervention, steps=args.steps, seed=args.seed, lr=args.lr,
                          model=args.model, config=c), indent=1, sort_keys=True, default=str))
    budget = configs.memory_budget(shape, run)
    print(f"\npeak GPU memory estimate for {args.model} (no model loaded; configs.memory_budget):")
    for k, v in budget.items():
        print(f"  {k:40s} {v:8.2f} GB")
    return None


def budget_run(args):
    """The run dict configs.memory_budget reads, from the resolved flags (--dry-run; bench.py --gpu)."""
    c = args.cfg
    return dict(group=c["group_size"], prompts_per_step=c.get("prompts_per_step", 1),
                max_prompt_tokens=c["max_prompt_tokens"], max_completion_tokens=c["max_completion_tokens"],
                micro_batch=c.get("micro_batch") or c.get("prompts_per_step", 1) * c["group_size"],
                gen_batch=c.get("gen_batch"), dtype_bytes=torch.finfo(getattr(torch, args.dtype or c["dtype"])).bits // 8,
                basis=args.basis, lora_rank=args.lora_rank or configs.LORA_RANK,
                grad_checkpointing=c["grad_checkpointing"])


def model_shape(name):
    """The model's config dict (hidden size, layers, heads, vocab) without loading weights: the tiny
    and organism shapes from configs.py, a local or cached config.json, or the known Qwen3-4B shape."""
    if name in ("tiny", "organism"):
        return dict(configs.TINY_QWEN3, vocab_size=1024 if name == "organism" else 259)
    path = os.path.join(name, "config.json") if os.path.isdir(name) else None
    if path is None:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")
        path = hit if isinstance(hit, str) else None
    if path:
        with open(path) as f:
            return json.load(f)
    if name == "Qwen/Qwen3-4B":
        return dict(configs.QWEN3_4B)
    raise SystemExit(f"error: --model={name}: --dry-run needs its config.json (a local directory or the Hugging Face "
                     f"cache)")


def log_step(r, steps):
    """One line per step where no progress bar can draw (a log file, a pipe)."""
    f = lambda x: "null" if x is None else f"{x:+.3f}"
    rng = "" if r.get("reward_min") is None else f"reward {r['reward_min']:.2f}..{r['reward_max']:.2f}  "
    hack = f"hack {r['hack_rate']:.2f}  " if "hack_rate" in r else ""
    if r.get("compile_rate") is not None:
        hc = r["hack_given_compile"]
        hack += f"compiles {r['compile_rate']:.2f}  hack|compiles {'null' if hc is None else f'{hc:.2f}'}  "
    print(f"step {r['step'] + 1}/{steps}  {rng}{hack}cos_in {f(r.get('cos_in'))}  {r['time_s']:.1f}s"
          + (f"  skipped ({r['skip_reason']})" if r["skipped"] else ""), file=sys.stderr, flush=True)


def summary(out, rows, elapsed, evals=()):
    f = lambda x: "  null" if x is None else f"{x:+.3f}"
    g = lambda x, w: " " * (w - 4) + "null" if x is None else f"{x:{w}.2f}"
    live = [r for r in rows if not r["skipped"]]
    online = any("hack_rate" in r for r in rows)
    print(f"\n== run {out}: {len(rows)} steps ({len(rows) - len(live)} skipped: no reward variance or no row), "
          f"{elapsed:.1f}s")
    print(" step  r_range  |adv|   cos_in  cos_out  cos_upd  cos_lrn  fired  g_rem"
          + ("   hack  comp  h|c     gt      kl" if online else ""))
    for r in rows:
        print(f" {r['step']:>4}  {g(r.get('reward_range'), 6)}  {g(r.get('adv_abs_mean'), 5)}  {f(r.get('cos_in'))}  "
              f"{f(r.get('cos_out'))}   {f(r.get('cos_update'))}   {f(r.get('cos_learned'))}  "
              f"{g(r.get('frac_fired'), 4)}  {g(r.get('grad_removed'), 5)}"
              + (f"  {r['hack_rate']:5.2f} {g(r.get('compile_rate'), 5)} {g(r.get('hack_given_compile'), 4)}  "
                 f"{r['gt_rate']:5.2f}  {g(r.get('kl'), 6)}" if online else ""))
    if evals:
        print(" held out: after step  n  hack  compiles  hack|compiles  capability (gt, no hint)")
        for e in evals:
            print(f"  {e['step']:>19}  {e['n']:>3}  {g(e.get('hack_rate_hint'), 4)}  {g(e.get('compile_rate_hint'), 8)}"
                  f"  {g(e.get('hack_given_compile_hint'), 13)}  {g(e.get('gt_rate_nohint'), 10)}")


if __name__ == "__main__":
    try:
        main()
    except RunError as e:
        raise SystemExit(f"error: {e}") from None
