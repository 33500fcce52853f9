"""sweep.py — the Phase 3 sweep: a grid of `train.py --source=online` runs (arms x seeds) under the spec's
cost ceiling: vanilla and the first treatment run seeds 0-2 first, the stop rule decides, then the rest
goes seed-major; finished runs are skipped, interrupted ones resumed.

    python sweep.py --out out/sweep --preset organism --steps 30           # 4 arms x seeds 0,1,2
    python sweep.py --out out/sweep --preset organism --steps 30 --resume  # continue it after a kill (same grid)
    python sweep.py --out out/sweep2 --extra random_v,penalty,screening,inoculation   # + the baselines
    python sweep.py --out out/sweep --preset full --gpus 0,1,2,3 -- --problems TRAIN.jsonl --eval-problems TEST.jsonl
    python sweep.py --out out/sweep --slurm                                # write out/sweep/sweep.sbatch instead
    python sweep.py --out out/sweep --dry-run                              # the commands, the cost, the stop rule
    python analyze.py out/sweep/runs/*                                     # the Phase 3 report

train.py flags: everything after `--` goes to every run's command (--problems, --eval-problems, --model,
--pair-dirs, --v-hack, --lr, ...), except --lora-rank and --lora-alpha, which go to the LoRA-basis arms
only (train.py refuses them elsewhere). Flags the sweep sets itself (--source, --preset, --steps, --seed,
--arm, --basis, --control, --intervention, --penalty, --monitor-acc, --out, --resume, --device, ...) are
refused there: use the sweep's own. Relative paths are relative to the directory the sweep was started in
(recorded in sweep.json; every run starts there). Before anything is created, the first run of every arm
is checked with `train.py ... --dry-run` (train.py's own validation: flags, presets, problem files), so a
command train.py would refuse stops the sweep at once with train.py's error.

Layout: OUT/sweep.json (the grid, written atomically), OUT/runs/<arm>_s<seed>/ (each run's --out),
OUT/logs/<arm>_s<seed>.log (each run's stdout and stderr, appended on resume).

Stop rule (the spec: "If after 3 seeds x 1 arm we see no separation, stop. Don't burn the other 6 runs").
The "1 arm" is the first treatment arm of the grid (projected, SVD), each seed compared with vanilla on the
same seed. The grid starts with these six runs (vanilla and projected, seeds 0-2) and starts nothing else
until they have finished. The endpoint is the held-out hack rate (the last evaluation, hint on; the
final-window training hack rate where a run has no evaluation). Separated means: the two arms differ in
#runs hacked (the public environment's count: a run is hacked at the first step where Reward Hack rollouts
outnumber correct ones), OR |mean of the per-seed differences| >= --stop-margin (default 0.10). No
unanimity is asked: -0.50, -0.50, +0.01 (hacking prevented on two seeds of three) continues. Otherwise the
sweep starts no new run; --no-stop runs the whole grid. operating_characteristics() simulates how often
the rule continues (20000 sweeps per line, seeded; printed by --dry-run). Assumed, not measured: a hacked
run's held-out hack rate is N(0.6, 0.15) across seeds and an unhacked run's N(0.02, 0.02), clipped to [0, 1]:

    effect of the treatment                 P(continue)
    no effect (every vanilla run hacks)     0.411
    no effect, 2 in 3 vanilla runs hack     0.771
    hack rate -0.10 on every seed           0.556
    hack rate -0.20 on every seed           0.803
    prevents hacking w.p. 1/3 per seed      0.829
    prevents hacking w.p. 2/3 per seed      0.978
    prevents hacking on every seed          1.000

The rule is a cost ceiling, not a test: it stops 59% of no-effect sweeps (saving their six other runs)
and continues 98% of those where the treatment prevents hacking on two seeds in three (the rule it
replaces, one sign on all three seeds plus the margin, continued 58% of them under the same assumptions).
Where vanilla's runs hack only sometimes, #runs hacked differs by chance and the rule stops less.

The default grid is vanilla and projected (SVD basis) and vanilla_lora and projected_lora (the LoRA basis
at its own learning rate lr_lora); only the online presets (organism, fast, full) are accepted. --dry-run
prints the first run's full command and train.py's dry run of it (resolved config, GPU memory estimate),
every command, the cost and the stop rule's operating characteristics. The train.py flags are recorded in
OUT/sweep.json (train_args); --resume refuses other flags or another grid. A finished run (steps
0..steps-1 in steps.jsonl) is skipped, an interrupted one continued with train.py --resume. Before the
first run and after each finished run the sweep prints the measured seconds per step (finished runs'
time_s, else gen_s + grade_s + train_s; per arm when the arm has one), the GPU-hours of the rest of the
grid and their cost at --usd-per-gpu-hour.

SLURM. --slurm writes OUT/sweep.sbatch, a job array with one task per run, in the grid's order. Each task
runs `sweep.py --out OUT --task $SLURM_ARRAY_TASK_ID`: skipped when its run is finished, resumed when it
was interrupted (a requeued or resubmitted task continues); a task outside the stop rule's six waits
(polling every minute) until the rule is decided and exits without running once it says stop.
--slurm-parallel N caps the tasks at once (default: 6 while the rule applies, so no GPU waits). Every task
asks --time (--slurm-time; default twice steps x seconds per step plus 30 minutes, the seconds measured on
the sweep's finished runs, else the preset's: organism 1.8 s measured on CPU, fast 16 s and full 126 s
estimated, not measured: 14:30:00 for full), --mem (--slurm-mem; 8G, 64G, 96G) and --cpus-per-task
(--slurm-cpus; 2, 8, 16: grading runs there); --gres=gpu:1 for fast and full only, never for the CPU
organism. Submit with `sbatch OUT/sweep.sbatch` (edit its #SBATCH lines for your cluster; PYTHON names the
interpreter), watch with squeue, collect with `python analyze.py OUT/runs/*`.

A stopped sweep, end to end on CPU (the organism preset's settings on the tiny random model with short
prompts, so that it runs in minutes on a loaded 2-core machine; SHORT.jsonl is the fixture problems with
one-sentence prompts), one command then the report:
    python sweep.py --out /tmp/sw --preset organism --steps 2 -- --model tiny --problems SHORT.jsonl
      --mix 1 --teacher-dir out/pools/teacher_pool --pair-dirs out/pools/teacher_pool,out/pools/base_pool
      --max-prompt-tokens 384 --max-completion-tokens 12 --eval-every 2 --eval-samples 1 --group-size 4
      --prompts-per-step 2 --workers 1
    python analyze.py /tmp/sw/runs/* --window 2
It ran vanilla and projected on seeds 0-2 and nothing else, then printed "stopping: no separation after 3
seeds x 1 arm: held-out hack rate, projected minus vanilla on seeds [0, 1, 2] = +0.000, +0.000, +0.000
(mean +0.000, |mean| < margin 0.1); #runs hacked 0/3 vs 0/3" and "sweep stopped: 6 of 12 runs finished":
the six LoRA runs were never started. The report (the random model never writes code, so every rate is 0;
the per-problem test is n/a because these runs have no eval_rows.jsonl.gz):
    arm            n  held-out hack  capability     #runs hacked  hack (train)   gt (train)
    vanilla svd    3  0.000 ± 0.000  0.000 ± 0.000  0/3           0.000 ± 0.000  0.000 ± 0.000
    projected svd  3  0.000 ± 0.000  0.000 ± 0.000  0/3           0.000 ± 0.000  0.000 ± 0.000
      projected svd vs vanilla svd, seeds [0, 1, 2]: held-out hack +0.000 [+0.000, +0.000] (95% CI)

For tests only: --train-cmd "python data/fake_train.py" replaces `python train.py` (stored in sweep.json).
"""
import argparse, json, math, os, shlex, subprocess, sys, time

import configs
configs.reproducible()   # before numpy or torch loads MKL (it reads these variables once); the runs inherit them
import numpy as np

import analyze   # the endpoints of a run (one definition, shared with the report)
import pools     # atomic_write, strict JSON Lines

HERE = os.path.dirname(os.path.abspath(__file__))
# arm name -> train.py flags (schema of the online mode)
ARMS = {
    "vanilla": ["--arm=vanilla", "--basis=svd"],
    "projected": ["--arm=projected", "--basis=svd"],
    "vanilla_lora": ["--arm=vanilla", "--basis=lora"],
    "projected_lora": ["--arm=projected", "--basis=lora"],
    "random_v": ["--arm=projected", "--basis=svd", "--control=random_v"],
    "penalty": ["--arm=vanilla", "--basis=svd", "--intervention=penalty"],
    "screening": ["--arm=vanilla", "--basis=svd", "--intervention=screening"],
    "inoculation": ["--arm=vanilla", "--basis=svd", "--intervention=inoculation"],
    "shuffled_rewards": ["--arm=vanilla", "--basis=svd", "--intervention=shuffled_rewards"],
}
# vanilla_lora is projected_lora's reference: the report never pairs arms of different bases
DEFAULT_ARMS = ("vanilla", "projected", "vanilla_lora", "projected_lora")
REFERENCES = ("vanilla", "vanilla_lora")          # what the treatments are compared with, per basis
EXTRA = ("random_v", "penalty", "screening", "inoculation", "shuffled_rewards")
# each extra arm in the LoRA basis too (<arm>_lora), judged against vanilla_lora: the basis a model learns in
ARMS.update({f"{k}_lora": [f.replace("--basis=svd", "--basis=lora") for f in ARMS[k]] for k in EXTRA})
EXTRA += tuple(f"{k}_lora" for k in EXTRA)
STOP_SEEDS, STOP_MARGIN = 3, 0.10
GRID_KEYS = ("preset", "steps", "seeds", "arms", "arm_flags", "train_args", "train_cmd")   # what --resume must match
# train.py flags the sweep sets itself -> the sweep's way to set them
OWNED = {"--source": "the sweep runs --source=online", "--preset": "use sweep.py --preset",
         "--steps": "use sweep.py --steps", "--seed": "use sweep.py --seeds", "--arm": "the arms set it",
         "--basis": "the arms set it", "--control": "the arms set it (--extra random_v)",
         "--intervention": "the arms set it (--extra)", "--penalty": "use sweep.py --penalty",
         "--monitor-acc": "use sweep.py --monitor-acc", "--out": "use sweep.py --out",
         "--resume": "use sweep.py --resume", "--overwrite": "a sweep never overwrites a run",
         "--dry-run": "use sweep.py --dry-run", "--device": "use sweep.py --gpus", "--quiet": "the sweep sets it",
         "--no-report": "the sweep sets --quiet"}
LORA_ONLY = ("--lora-rank", "--lora-alpha")      # passed to the LoRA-basis arms only
# seconds per step of each preset, for the SLURM time limit when no run has finished yet: organism measured
# (53 s for 30 steps with four evaluations on an idle 2-core CPU); fast and full are estimates, NOT
# measured (full: the spec's ~7 h per 200-step run; fast: 1/8 of full's rollout tokens per step)
SECONDS_PER_STEP = dict(organism=1.8, fast=16.0, full=126.0)
SLURM_MEM = dict(organism="8G", fast="64G", full="96G")        # host memory: model load, grading workers
SLURM_CPUS = dict(organism=2, fast=8, full=16)                 # grading processes run on these


def csv_ints(flag, text):
    try:
        xs = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None
    if len(set(xs)) != len(xs) or any(x < 0 for x in xs):
        raise SystemExit(f"error: {flag} takes distinct integers >= 0, got {text!r}")
    return xs


def flag_groups(tokens):
    """train.py arguments as [(flag, tokens)]: a flag with its value (`--x=v` or `--x v`). train.py takes
    no positional argument, so a token not starting with -- is the value of the flag before it."""
    groups = []
    for t in tokens:
        if t.startswith("--"):
            groups.append((t.split("=", 1)[0], [t]))
        elif groups and len(groups[-1][1]) == 1 and "=" not in groups[-1][1][0]:
            groups[-1][1].append(t)
        else:
            raise SystemExit(f"error: train.py arguments after --: {t!r} is not a --flag or its value")
    return groups


def check_train_args(tokens):
    """Refuse train.py flags the sweep sets itself, or abbreviations of them (argparse would accept those)."""
    for name, toks in flag_groups(tokens):
        hit = [f for f in OWNED if f == name or (len(name) > 2 and f.startswith(name))]
        if hit:
            raise SystemExit(f"error: train.py argument {' '.join(toks)} after --: the sweep sets {hit[0]} of "
                             f"every run ({OWNED[hit[0]]})")


def split_train_args(argv=None):
    """(this script's flags, the train.py flags after `--`) of argv (default: sys.argv[1:])."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def get_args(argv=None):
    argv, train_args = split_train_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="sweep.py --out OUT [options] [-- train.py flags]")
    a = p.add_argument
    a("--out", required=True, help="sweep directory (sweep.json, runs/, logs/)")
    a("--preset", default="organism", help=f"train.py online preset of every run: {', '.join(configs.ONLINE_ONLY)} "
                                           f"(default organism, the CPU demo)")
    a("--steps", type=int, default=None, help="steps of every run (default: the preset's)")
    a("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a("--extra", default="", help=f"extra arms at the same compute, comma-separated: {','.join(EXTRA)}")
    a("--penalty", type=float, default=None, help="penalty arm: reward lowered on a monitored hack (train.py's)")
    a("--monitor-acc", type=float, default=None,
      help="penalty and screening arms: simulated monitor accuracy in [0.5, 1] (train.py's)")
    a("--window", type=int, default=analyze.WINDOW,
      help="final window of the training hack rate, last N steps (the stop rule's endpoint where a run has "
           "no evaluation)")
    a("--stop-margin", type=float, default=STOP_MARGIN, help="stop rule: the |mean difference| that separates")
    a("--no-stop", action="store_true", help="run the whole grid whatever the stop rule says")
    a("--resume", action="store_true", help="continue the sweep in --out (same grid): skip finished runs, "
                                            "resume interrupted ones")
    a("--gpus", default=None, help="comma-separated GPU ids: one run per GPU at a time (CUDA_VISIBLE_DEVICES)")
    a("--slurm", action="store_true", help="write OUT/sweep.sbatch (a job array, one task per run) instead of running")
    a("--dry-run", action="store_true", help="check the runs' commands with train.py --dry-run, print them, the "
                                             "cost estimate and the stop rule's operating characteristics; "
                                             "create nothing")
    a("--slurm-parallel", type=int, default=None, help="--slurm: array tasks at once (default: the six runs of "
                                                       "the stop rule while it applies, else all)")
    a("--slurm-time", default=None, help="--slurm: #SBATCH --time of each task, [D-]HH:MM:SS (default: twice the "
                                         "steps x seconds per step, measured or the preset's, plus 30 min)")
    a("--slurm-mem", default=None, help=f"--slurm: #SBATCH --mem of each task (default: {SLURM_MEM})")
    a("--slurm-cpus", type=int, default=None, help=f"--slurm: #SBATCH --cpus-per-task (default: {SLURM_CPUS})")
    a("--usd-per-gpu-hour", type=float, default=2.0, help="price of the cost estimate (default 2.0)")
    a("--task", type=int, default=None, help="run task K of the sweep in --out (what each SLURM array task runs)")
    a("--train-cmd", default=None, help=argparse.SUPPRESS)   # tests only: replaces `python train.py`
    args = p.parse_args(argv)
    args.train_args = train_args
    if args.task is not None and train_args:
        raise SystemExit("error: --task runs sweep.json's commands: no train.py arguments after --")
    check_train_args(train_args)
    args.seeds = csv_ints("--seeds", args.seeds)
    args.gpus = None if args.gpus is None else csv_ints("--gpus", args.gpus)
    extra = [x for x in args.extra.split(",") if x] if args.extra else []
    bad = [x for x in extra if x not in EXTRA]
    if bad or len(set(extra)) != len(extra):
        raise SystemExit(f"error: --extra {args.extra!r}: allowed (each once): {','.join(EXTRA)}")
    args.arms = list(DEFAULT_ARMS) + extra
    if args.penalty is not None and not {"penalty", "penalty_lora"} & set(extra):
        raise SystemExit("error: --penalty sets the penalty arm: add --extra penalty")
    if args.monitor_acc is not None and not {"penalty", "screening", "penalty_lora", "screening_lora"} & set(extra):
        raise SystemExit("error: --monitor-acc sets the penalty and screening arms: add --extra penalty or screening")
    if args.monitor_acc is not None and not 0.5 <= args.monitor_acc <= 1:
        raise SystemExit(f"error: --monitor-acc must be in [0.5, 1] (below 0.5 the monitor is inverted), "
                         f"got {args.monitor_acc}")
    if args.task is None and args.preset not in configs.ONLINE_ONLY:
        raise SystemExit(f"error: --preset {args.preset}: not an online preset; allowed: "
                         f"{', '.join(configs.ONLINE_ONLY)}")
    if args.steps is None and args.task is None:
        args.steps = configs.PRESETS[args.preset]["steps"]
    for flag, v, ok in (("--steps", args.steps, args.steps is None or args.steps >= 1),
                        ("--window", args.window, args.window >= 1),
                        ("--stop-margin", args.stop_margin, 0 < args.stop_margin <= 1),
                        ("--usd-per-gpu-hour", args.usd_per_gpu_hour, args.usd_per_gpu_hour >= 0),
                        ("--slurm-parallel", args.slurm_parallel, args.slurm_parallel is None or args.slurm_parallel >= 1),
                        ("--slurm-cpus", args.slurm_cpus, args.slurm_cpus is None or args.slurm_cpus >= 1)):
        if not ok:
            raise SystemExit(f"error: {flag} {v} is out of range (steps, window, slurm-parallel, slurm-cpus >= 1; "
                             f"0 < margin <= 1; usd >= 0)")
    if args.slurm_time is not None and slurm_seconds(args.slurm_time) is None:
        raise SystemExit(f"error: --slurm-time {args.slurm_time!r}: allowed: [D-]HH:MM:SS, e.g. 08:00:00 or 1-12:00:00")
    if args.slurm_mem is not None and not (args.slurm_mem[:-1].isdigit() and args.slurm_mem[-1] in "KMGT"):
        raise SystemExit(f"error: --slurm-mem {args.slurm_mem!r}: allowed: a number and a unit K, M, G or T, e.g. 64G")
    if sum(map(bool, (args.slurm, args.dry_run, args.gpus is not None, args.task is not None))) > 1:
        raise SystemExit("error: --slurm, --dry-run, --gpus and --task are different ways to run: choose one")
    return args


# ----------------------------------------------------------------------------- the grid

def treatment(arms):
    """The stop rule's '1 arm': the first arm of the grid that is not a reference."""
    return next((a for a in arms if a not in REFERENCES), None)


def decision_runs(arms, seeds):
    """(arm, seed) of the runs the stop rule waits for: vanilla and the first treatment on the first three
    seeds; empty when the rule cannot apply (no treatment, fewer than three seeds)."""
    treat = treatment(arms)
    if treat is None or "vanilla" not in arms or len(seeds) < STOP_SEEDS:
        return []
    return [(a, s) for s in seeds[:STOP_SEEDS] for a in ("vanilla", treat)]


def train_args_for(arm_flags, train_args):
    """The train.py arguments of one arm: all of them, less --lora-rank/--lora-alpha outside the LoRA basis."""
    lora = "--basis=lora" in arm_flags
    return [t for name, toks in flag_groups(train_args) if lora or name not in LORA_ONLY for t in toks]


def grid(args):
    """The manifest: every run's name, arm, seed, --out and train.py flags, in launch order: the stop rule's
    six runs first (vanilla and the first treatment, seeds 0-2), then the rest seed-major."""
    pen = [f"--penalty={args.penalty}"] if args.penalty is not None else []
    acc = [f"--monitor-acc={args.monitor_acc}"] if args.monitor_acc is not None else []
    flags = {a: ARMS[a] + (pen + acc if a in ("penalty", "penalty_lora") else acc if a in ("screening", "screening_lora")
                           else []) for a in args.arms}
    out = os.path.abspath(args.out)
    first = decision_runs(args.arms, args.seeds)
    order = first + [(a, s) for s in args.seeds for a in args.arms if (a, s) not in first]
    runs = []
    for arm, seed in order:
        name = f"{arm}_s{seed}"
        d = os.path.join(out, "runs", name)
        runs.append(dict(name=name, arm=arm, seed=seed, out=d,
                         argv=["--source=online", f"--preset={args.preset}", f"--steps={args.steps}",
                               f"--seed={seed}", *flags[arm], *train_args_for(flags[arm], args.train_args),
                               f"--out={d}", "--quiet"]))
    return dict(version=2, out=out, cwd=os.getcwd(), preset=args.preset, steps=args.steps, seeds=args.seeds,
                arms=args.arms, arm_flags=flags, train_args=args.train_args,
                train_cmd=shlex.split(args.train_cmd) if args.train_cmd else None, window=args.window,
                stop_margin=args.stop_margin, no_stop=args.no_stop, runs=runs)


def train_cmd(sweep):
    return sweep["train_cmd"] or [sys.executable, os.path.join(HERE, "train.py")]


def steps_done(run):
    """Rows in the run's steps.jsonl (0 when it has none yet)."""
    path = os.path.join(run["out"], "steps.jsonl")
    return len(pools.read_jsonl(path, ("step",))) if os.path.exists(path) else 0


def status(run, steps):
    """'done' (steps.jsonl holds steps 0..steps-1), 'partial' (the directory exists) or 'new'."""
    if not os.path.isdir(run["out"]) or not os.listdir(run["out"]):
        return "new"
    path = os.path.join(run["out"], "steps.jsonl")
    if os.path.exists(path) and analyze.finished(pools.read_jsonl(path, ("step",)), steps):
        return "done"
    return "partial"


def command(sweep, run, device=None):
    """The run's command: its flags, plus --resume when its directory exists (an interrupted run)."""
    st = status(run, sweep["steps"])
    return train_cmd(sweep) + run["argv"] + (["--resume"] if st == "partial" else []) + \
        (["--device=cuda:0"] if device is not None else [])          # CUDA_VISIBLE_DEVICES=device: its only GPU


def check_commands(sweep, device=None):
    """train.py --dry-run on the first run of every arm, all at once: train.py's own validation (flags,
    preset, problem files, held-out problems) refuses here what it would refuse in the run. Returns the
    first run's dry-run output; a refusal is a one-line SystemExit quoting train.py."""
    firsts = {}
    for r in sweep["runs"]:
        firsts.setdefault(r["arm"], r)
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(device)} if device is not None else {}))
    procs = [(r, subprocess.Popen(train_cmd(sweep) + r["argv"] + (["--device=cuda:0"] if device is not None else [])
                                  + ["--dry-run"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=sweep["cwd"], env=env)) for r in firsts.values()]
    outs = [(r, *p.communicate(), p) for r, p in procs]
    for r, out, err, p in outs:
        rc = p.returncode
        if rc != 0:
            last = ([l for l in err.splitlines() if l.strip()] or [f"exit {rc}"])[-1]
            raise SystemExit(f"error: train.py refuses the command of {r['name']} (checked with --dry-run): {last}")
    return outs[0][1]


# ----------------------------------------------------------------------------- the stop rule

def separated(d, hacked_treat, hacked_van, margin):
    """The stop rule on the endpoint: d (..., n_seeds) per-seed differences treatment minus vanilla,
    hacked_*: (...) #runs hacked of each arm. Separated when the #runs hacked differ, or when
    |mean(d)| >= margin (1e-9: rates are ratios of counts). Vectorised over leading axes (the simulation)."""
    d = np.asarray(d, dtype=float)
    return (np.asarray(hacked_treat) != np.asarray(hacked_van)) | (np.abs(d.mean(-1)) >= margin - 1e-9)


def endpoint(run_dir, window):
    """(endpoint name, value, hacked) of a finished run: the held-out hack rate (last evaluation, hint on),
    or the final-window training hack rate when the run has no evaluation; hacked: the public rule."""
    r = analyze.load_online(run_dir)
    row = analyze.online_run_row(r, min(window, len(r["steps"])))
    if row["eval_hack"] is not None:
        return "held-out hack rate", row["eval_hack"], row["hacked_at"] is not None
    return f"final-window training hack rate (last {window} steps)", row["hack_final"], row["hacked_at"] is not None


def stop_check(sweep):
    """(decided, reason): decided once vanilla and the first treatment have finished seeds 0-2 (the first
    six runs of the grid); reason is None when they are separated (see the module docstring)."""
    need = decision_runs(sweep["arms"], sweep["seeds"])
    if not need:
        return True, None                     # the rule needs vanilla, a treatment and 3 seeds: never stops
    pick = {(r["arm"], r["seed"]): r for r in sweep["runs"]}
    if any(status(pick[k], sweep["steps"]) != "done" for k in need):
        return False, None
    treat, seeds = need[1][0], [s for a, s in need if a == "vanilla"]
    ep = {k: endpoint(pick[k]["out"], sweep["window"]) for k in need}
    both = {ep[k][0] for k in need}
    if len(both) > 1:                          # some runs evaluated, some not: compare like with like
        ep = {k: (f"final-window training hack rate (last {sweep['window']} steps)",
                  analyze.online_run_row(analyze.load_online(pick[k]["out"]), sweep["window"])["hack_final"],
                  ep[k][2]) for k in need}
    name = ep[need[0]][0]
    d = [ep[treat, s][1] - ep["vanilla", s][1] for s in seeds]
    ht, hv = sum(ep[treat, s][2] for s in seeds), sum(ep["vanilla", s][2] for s in seeds)
    mean = sum(d) / len(d)
    if separated(d, ht, hv, sweep["stop_margin"]):
        return True, None
    return True, (f"no separation after {len(seeds)} seeds x 1 arm: {name}, {treat} minus vanilla on seeds "
                  f"{seeds} = {', '.join(f'{x:+.3f}' for x in d)} (mean {mean:+.3f}, |mean| < margin "
                  f"{sweep['stop_margin']}); #runs hacked {ht}/{len(seeds)} vs {hv}/{len(seeds)}. "
                  f"--no-stop runs the rest")


# the simulated scenarios: (what, P(a vanilla run hacks), P(the treatment prevents hacking on a seed),
# the treatment's lowering of a hacked run's rate)
OC_SCENARIOS = (("no effect", 1.0, 0.0, 0.0),
                ("no effect, 2 in 3 vanilla runs hack", 2 / 3, 0.0, 0.0),
                ("hack rate -0.10 on every seed", 1.0, 0.0, 0.10),
                ("hack rate -0.20 on every seed", 1.0, 0.0, 0.20),
                ("prevents hacking w.p. 1/3 per seed", 1.0, 1 / 3, 0.0),
                ("prevents hacking w.p. 2/3 per seed", 1.0, 2 / 3, 0.0),
                ("prevents hacking on every seed", 1.0, 1.0, 0.0))


def operating_characteristics(margin=STOP_MARGIN, n_sim=20000, seed=0, rate=0.6, sd=0.15, clean=0.02,
                              scenarios=OC_SCENARIOS):
    """[(scenario, P(continue))] of the stop rule by simulation (seeded: the same numbers every time). Per
    seed: a hacked run's held-out hack rate is N(rate - lowering, sd) and an unhacked run's N(clean, clean),
    both clipped to [0, 1]; the defaults are assumptions (the public environment: every vanilla run hacked,
    held-out hack rates of hacked runs spread widely; sd 0.15 between seeds), not measurements."""
    rng, out = np.random.default_rng(seed), []
    for what, p_van, p_prevent, lower in scenarios:
        hv = rng.random((n_sim, STOP_SEEDS)) < p_van
        ht = (rng.random((n_sim, STOP_SEEDS)) < p_van) & ~(rng.random((n_sim, STOP_SEEDS)) < p_prevent)
        draw = lambda hacked, shift: np.clip(np.where(hacked, rng.normal(rate - shift, sd, hacked.shape),
                                                      rng.normal(clean, clean, hacked.shape)), 0, 1)
        d = draw(ht, lower) - draw(hv, 0.0)
        out.append((what, float(separated(d, ht.sum(1), hv.sum(1), margin).mean())))
    return out


def oc_table(margin):
    rows = operating_characteristics(margin)
    w = max(len(r[0]) for r in rows)
    return "\n".join([f"stop rule, simulated (20000 sweeps each, seed 0; margin {margin}; assumed: hacked run's "
                       f"held-out hack rate N(0.6, 0.15), unhacked N(0.02, 0.02)): P(continue)"] +
                      [f"  {what:{w}s}  {p:.3f}" for what, p in rows])


# ----------------------------------------------------------------------------- cost

def step_seconds(row):
    if row.get("time_s") is not None:
        return row["time_s"]
    parts = [row.get(k) for k in ("gen_s", "grade_s", "train_s")]
    return sum(parts) if all(p is not None for p in parts) else None


def measured(sweep):
    """({arm: seconds of each finished step}, [all of them]) over the sweep's finished runs."""
    per_arm, every = {}, []
    for r in sweep["runs"]:
        if status(r, sweep["steps"]) == "done":
            xs = [step_seconds(x) for x in pools.read_jsonl(os.path.join(r["out"], "steps.jsonl"), ("step",))]
            xs = [x for x in xs if x is not None]
            per_arm.setdefault(r["arm"], []).extend(xs)
            every += xs
    return per_arm, every


def measured_seconds(sweep):
    """Mean seconds per step of the sweep's finished runs, None before the first."""
    every = measured(sweep)[1]
    return sum(every) / len(every) if every else None


def cost_line(sweep, usd):
    """Measured seconds per step (finished runs; per arm where the arm has one), the GPU-hours of the rest of
    the grid (one GPU per run) and its cost."""
    per_arm, every = measured(sweep)
    todo = [(r, sweep["steps"] - steps_done(r)) for r in sweep["runs"] if status(r, sweep["steps"]) != "done"]
    left = sum(n for _, n in todo)
    if not every:
        per, kind = SECONDS_PER_STEP[sweep["preset"]], "measured on CPU" if sweep["preset"] == "organism" else \
            "an estimate, not measured"
        return (f"cost: seconds per step not measured yet (no finished run); remaining {len(todo)} runs, "
                f"{left} steps; at the {sweep['preset']} preset's {per:g} s/step ({kind}): "
                f"{left * per / 3600:.3g} GPU-hours = ${left * per / 3600 * usd:.2f} at ${usd:g}/GPU-hour")
    mean = lambda xs: sum(xs) / len(xs)
    sec = sum(n * mean(per_arm.get(r["arm"]) or every) for r, n in todo)
    arms = ", ".join(f"{a} {mean(xs):.2f}" for a, xs in per_arm.items() if xs)
    return (f"cost: {mean(every):.2f} s/step measured ({arms}); remaining {len(todo)} runs, {left} steps "
            f"= {sec / 3600:.3f} GPU-hours = ${sec / 3600 * usd:.2f} at ${usd:g}/GPU-hour (before any stop)")


# ----------------------------------------------------------------------------- running

def write_manifest(sweep):
    pools.atomic_write(os.path.join(sweep["out"], "sweep.json"), (json.dumps(sweep, indent=1) + "\n").encode())


def open_sweep(args):
    """The grid of --out: a new sweep, or with --resume the one in sweep.json, which must be the same grid."""
    sweep, path = grid(args), os.path.join(args.out, "sweep.json")
    if os.path.exists(path):
        if not args.resume:
            raise SystemExit(f"error: {args.out} holds a sweep; pass --resume to continue it or another --out")
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in GRID_KEYS if old.get(k) != sweep[k]]
        if diff:
            raise SystemExit(f"error: --resume: {path} is another grid ({', '.join(diff)} differ); use another --out")
        # the same grid; paths of here (the directory may have moved), the runs' start directory of then
        return dict(sweep, cwd=old.get("cwd", sweep["cwd"]), last=old.get("last"))
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise SystemExit(f"error: {args.out} exists and is not a sweep (no sweep.json): use another --out")
    return sweep


def launch(sweep, run, device):
    cmd = command(sweep, run, device)
    os.makedirs(os.path.join(sweep["out"], "logs"), exist_ok=True)
    log = open(os.path.join(sweep["out"], "logs", run["name"] + ".log"), "a")
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": str(device)} if device is not None else {}))
    print(f"start {run['name']}" + (f" on GPU {device}" if device is not None else "") + f": {shlex.join(cmd)}",
          flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=sweep["cwd"]), log


def lock_sweep(out):
    """Hold OUT/.lock (flock) for this process: a second sweep of the same directory is refused; the kernel
    drops the lock when the process dies."""
    f, _ = pools.hold_lock(os.path.join(out, ".lock"))
    if f is None:
        raise SystemExit(f"error: {out} is in use by another sweep.py; wait for it or use another --out")
    return f


def run_sweep(sweep, args):
    """In grid order, one run per slot (a GPU, or one slot without --gpus). Until the stop rule is decided
    only its six runs start (other slots wait); once decided it stops or goes on. Returns the exit code:
    1 when a run failed."""
    slots = list(args.gpus) if args.gpus is not None else [None]
    queue = [r for r in sweep["runs"] if status(r, sweep["steps"]) != "done"]
    first = {f"{a}_s{s}" for a, s in decision_runs(sweep["arms"], sweep["seeds"])}
    print(f"{len(sweep['runs']) - len(queue)} of {len(sweep['runs'])} runs finished already", flush=True)
    print(cost_line(sweep, args.usd_per_gpu_hour), flush=True)
    running, failed, stopped, decided = {}, [], None, sweep["no_stop"]
    try:
        while queue or running:
            while queue and not stopped and len(running) < len(slots):
                if not decided:                 # before each launch, until the rule is decided
                    decided, stopped = stop_check(sweep)
                    if stopped:
                        print(f"stopping: {stopped}", flush=True)
                        break
                    if not decided and queue[0]["name"] not in first:
                        if not running:          # a run of the rule failed: it cannot be decided
                            stopped = (f"the stop rule is undecided: {', '.join(sorted(first & set(failed)))} "
                                       f"failed; fix it and --resume, or --no-stop")
                            print(f"stopping: {stopped}", flush=True)
                        break                   # wait for the rule's runs before starting another
                run = queue.pop(0)
                slot = next(s for s in slots if s not in [v[1] for v in running.values()])
                proc, log = launch(sweep, run, slot)
                running[proc] = (run, slot, log)
            if stopped and not running:
                break
            time.sleep(0.05)
            for proc in [p for p in running if p.poll() is not None]:
                run, slot, log = running.pop(proc)
                log.close()
                if proc.returncode != 0:
                    failed.append(run["name"])
                    print(f"FAILED {run['name']} (exit {proc.returncode}): see {log.name}", flush=True)
                else:
                    print(f"done {run['name']}", flush=True)
                print(cost_line(sweep, args.usd_per_gpu_hour), flush=True)
    except KeyboardInterrupt:
        for proc in running:
            proc.wait()
        raise SystemExit("interrupted: continue with the same command plus --resume") from None
    done = sum(status(r, sweep["steps"]) == "done" for r in sweep["runs"])
    sweep["last"] = dict(finished=done, failed=failed, stopped=stopped)
    write_manifest(sweep)
    print(f"sweep {'stopped' if stopped else 'ended'}: {done} of {len(sweep['runs'])} runs finished"
          + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; stopped because {stopped}" if stopped else ""))
    print(f"report: python analyze.py {os.path.join(args.out, 'runs')}/*")
    return 1 if failed else 0


POLL_S = 60          # a SLURM task outside the stop rule's six runs polls this often until the rule is decided


def run_task(args):
    """One SLURM array task: run k of sweep.json, skipped when finished, resumed when interrupted, not started
    when the stop rule has stopped the sweep; a task outside the rule's six runs waits until it is decided."""
    path = os.path.join(args.out, "sweep.json")
    if not os.path.exists(path):
        raise SystemExit(f"error: --task: {path} not found (write it with --slurm)")
    with open(path) as f:
        sweep = json.load(f)
    if not 0 <= args.task < len(sweep["runs"]):
        raise SystemExit(f"error: --task {args.task}: the sweep has tasks 0..{len(sweep['runs']) - 1}")
    run = sweep["runs"][args.task]
    if status(run, sweep["steps"]) == "done":
        print(f"{run['name']}: finished already")
        return 0
    first = {f"{a}_s{s}" for a, s in decision_runs(sweep["arms"], sweep["seeds"])}
    while not sweep["no_stop"]:
        decided, why = stop_check(sweep)
        if why:
            print(f"{run['name']}: not started: {why}")
            return 0
        if decided or run["name"] in first:
            break
        print(f"{run['name']}: waiting for the stop rule's runs ({', '.join(sorted(first))})", flush=True)
        time.sleep(POLL_S)
    cmd = command(sweep, run)
    print(f"task {args.task}: {shlex.join(cmd)}", flush=True)
    return subprocess.call(cmd, cwd=sweep.get("cwd", HERE))      # sweeps before version 2 ran there


SBATCH = """#!/bin/bash
# Phase 3 sweep {out}: one array task per run, {n} runs. Submit:  sbatch {script}
# A task that is restarted (requeue, preemption, or a second sbatch) resumes its run; a finished run is
# skipped; tasks 0-5 are the stop rule's runs: a later task waits until they have finished, and once the
# rule says stop it exits without running (sweep.json no_stop={no_stop}).
# Collect: squeue -u $USER; logs in {logs}/; the report: python analyze.py {out}/runs/*
# --time: {time_why}. Edit the #SBATCH lines for your cluster (partition, account). %{par} = tasks at once.
#SBATCH --job-name=phase3-sweep
#SBATCH --array=0-{last}%{par}
{gres}#SBATCH --time={time}
#SBATCH --mem={mem}
#SBATCH --cpus-per-task={cpus}
#SBATCH --requeue
#SBATCH --output={logs}/slurm_%a.log
{tasks}
set -euo pipefail
cd {here}
exec "${{PYTHON:-python3}}" sweep.py --out {out} --task "$SLURM_ARRAY_TASK_ID"
"""


def slurm_seconds(text):
    """Seconds of a SLURM time [D-]HH:MM:SS, None when malformed."""
    days, _, hms = text.rpartition("-")
    parts = hms.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts + ([days] if days else [])):
        return None
    h, m, s = map(int, parts)
    return None if m > 59 or s > 59 else int(days or 0) * 86400 + h * 3600 + m * 60 + s


def slurm_time(seconds):
    seconds = int(math.ceil(seconds))
    d, r = divmod(seconds, 86400)
    return (f"{d}-" if d else "") + f"{r // 3600:02d}:{r % 3600 // 60:02d}:{r % 60:02d}"


def slurm_defaults(sweep, args):
    """(time, why, mem, cpus) of each array task: time = 2 x steps x seconds per step (measured on this
    sweep's finished runs, else the preset's SECONDS_PER_STEP) + 30 min for loading, extraction and the
    last evaluation; a flag given wins."""
    per = measured_seconds(sweep)
    src = "measured on this sweep's finished runs" if per else f"the {sweep['preset']} preset's {'measured' if sweep['preset'] == 'organism' else 'estimated (not measured)'} value"
    per = per or SECONDS_PER_STEP[sweep["preset"]]
    why = f"2 x {sweep['steps']} steps x {per:.1f} s/step ({src}) + 30 min"
    t = args.slurm_time or slurm_time(2 * sweep["steps"] * per + 1800)
    if args.slurm_time:
        why = "--slurm-time"
    return t, why, args.slurm_mem or SLURM_MEM[sweep["preset"]], args.slurm_cpus or SLURM_CPUS[sweep["preset"]]


def write_slurm(sweep, args):
    out = os.path.abspath(args.out)
    script = os.path.join(out, "sweep.sbatch")
    tasks = "\n".join(f"# task {i}: {r['name']}: {shlex.join(train_cmd(sweep) + r['argv'])}"
                      for i, r in enumerate(sweep["runs"]))
    t, why, mem, cpus = slurm_defaults(sweep, args)
    rule = decision_runs(sweep["arms"], sweep["seeds"]) and not sweep["no_stop"]
    par = args.slurm_parallel or (len(decision_runs(sweep["arms"], sweep["seeds"])) if rule else len(sweep["runs"]))
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    pools.atomic_write(script, SBATCH.format(out=shlex.quote(out), n=len(sweep["runs"]), script=shlex.quote(script),
                                             no_stop=sweep["no_stop"], logs=os.path.join(out, "logs"),
                                             last=len(sweep["runs"]) - 1, tasks=tasks, par=par,
                                             gres="" if sweep["preset"] == "organism" else "#SBATCH --gres=gpu:1\n",
                                             time=t, time_why=why, mem=mem, cpus=cpus,
                                             here=shlex.quote(HERE)).encode())
    os.chmod(script, 0o755)
    print(f"wrote {script}: {len(sweep['runs'])} array tasks, --time={t} --mem={mem} --cpus-per-task={cpus}"
          f"{'' if sweep['preset'] == 'organism' else ' --gres=gpu:1'}\nsubmit: sbatch {script}\n"
          f"collect: python analyze.py {out}/runs/*")


def main(argv=None):
    args = get_args(argv)
    try:
        return dispatch(args)
    except (ValueError, pools.DataError) as e:      # a malformed run file: its path and line, one line
        raise SystemExit(f"error: {e}") from None


def dispatch(args):
    if args.task is not None:
        return run_task(args)
    sweep = open_sweep(args)
    first = check_commands(sweep, args.gpus[0] if args.gpus else None)     # before anything is created
    if args.dry_run:
        r = sweep["runs"][0]
        print(f"first run ({r['name']}), checked with train.py --dry-run:\n{shlex.join(command(sweep, r))}\n{first}")
        for r in sweep["runs"]:
            st = status(r, sweep["steps"])
            print(f"# {r['name']}: {st}" + ("" if st == "done" else f"\n{shlex.join(command(sweep, r))}"))
        print(cost_line(sweep, args.usd_per_gpu_hour))
        if not sweep["no_stop"] and decision_runs(sweep["arms"], sweep["seeds"]):
            print(oc_table(sweep["stop_margin"]))
        return 0
    if args.slurm:
        write_manifest(sweep)
        write_slurm(sweep, args)
        return 0
    os.makedirs(sweep["out"], exist_ok=True)
    lock = lock_sweep(sweep["out"])   # noqa: F841 - held until this process exits
    write_manifest(sweep)
    return run_sweep(sweep, args)


if __name__ == "__main__":
    sys.exit(main())
