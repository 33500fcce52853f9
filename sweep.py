"""sweep.py — the Phase 3 sweep: a grid of `train.py --source=online` runs (arms x seeds), run in
seed-major order under the spec's cost ceiling; finished runs are skipped, interrupted ones resumed.

    python sweep.py --out out/sweep --preset organism --steps 30           # vanilla, projected, projected_lora x seeds 0,1,2
    python sweep.py --out out/sweep --preset organism --steps 30 --resume  # continue it after a kill (same grid)
    python sweep.py --out out/sweep2 --extra random_v,penalty,screening,inoculation   # + the baselines
    python sweep.py --out out/sweep --gpus 0,1,2,3                         # one run per GPU at a time
    python sweep.py --out out/sweep --slurm                                # write out/sweep/sweep.sbatch instead
    python sweep.py --out out/sweep --dry-run                              # print the commands and the cost only
    python analyze.py out/sweep/runs/*                                     # the Phase 3 report

Layout: OUT/sweep.json (the grid, written atomically), OUT/runs/<arm>_s<seed>/ (each run's --out),
OUT/logs/<arm>_s<seed>.log (each run's stdout and stderr, appended on resume).

Stop rule (the spec: "If after 3 seeds x 1 arm we see no separation, stop"). Reading: the "1 arm" is the
first treatment arm of the grid (projected, SVD) on seeds 0-2, each seed compared with vanilla on the same
seed, since separation is always from vanilla. Once those six runs have finished, take the paired
differences d_k = final-window hack rate (treatment) - (vanilla) for the three seeds. Separated means: all
three d_k nonzero with the same sign AND |mean d| >= --stop-margin (default 0.10, ten points of hack rate).
Otherwise the sweep starts no new run. Why not a paired t-test: with 3 seeds it has df = 2 (|t| > 4.30
needed) and power below 0.5 even for an effect of 2 sd, so it would stop most real effects; the same sign
on all three seeds has chance 1/4 with no effect, and the margin asks the difference to matter. A
difference in either direction counts (a treatment that makes hacking worse is also a result). In
seed-major order the rule is decided after run 2 x (number of arms) + 2; --no-stop runs the whole grid.

For tests only: --train-cmd "python fake_train.py" replaces `python train.py` (stored in sweep.json).
"""
import argparse, json, os, shlex, subprocess, sys, time

import analyze   # the final-window hack rate of a run (one definition, shared with the report)
import configs
import pools     # atomic_write, strict JSON Lines

HERE = os.path.dirname(os.path.abspath(__file__))
# arm name -> train.py flags (schema of the online mode); the first of DEFAULT_ARMS is the reference
ARMS = {
    "vanilla": ["--arm=vanilla", "--basis=svd"],
    "projected": ["--arm=projected", "--basis=svd"],
    "projected_lora": ["--arm=projected", "--basis=lora"],
    "random_v": ["--arm=projected", "--basis=svd", "--control=random_v"],
    "penalty": ["--arm=vanilla", "--basis=svd", "--intervention=penalty"],
    "screening": ["--arm=vanilla", "--basis=svd", "--intervention=screening"],
    "inoculation": ["--arm=vanilla", "--basis=svd", "--intervention=inoculation"],
    "shuffled_rewards": ["--arm=vanilla", "--basis=svd", "--intervention=shuffled_rewards"],
}
DEFAULT_ARMS = ("vanilla", "projected", "projected_lora")
EXTRA = ("random_v", "penalty", "screening", "inoculation", "shuffled_rewards")
STOP_SEEDS, STOP_MARGIN = 3, 0.10
GRID_KEYS = ("preset", "steps", "seeds", "arms", "arm_flags", "train_cmd")   # what a --resume must match


def csv_ints(flag, text):
    try:
        xs = [int(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {flag} takes comma-separated integers, got {text!r}") from None
    if len(set(xs)) != len(xs) or any(x < 0 for x in xs):
        raise SystemExit(f"error: {flag} takes distinct integers >= 0, got {text!r}")
    return xs


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", required=True, help="sweep directory (sweep.json, runs/, logs/)")
    a("--preset", default="organism", help="train.py preset of every run (default organism, the CPU demo)")
    a("--steps", type=int, default=None, help="steps of every run (default: the preset's)")
    a("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    a("--extra", default="", help=f"extra arms at the same compute, comma-separated: {','.join(EXTRA)}")
    a("--penalty", type=float, default=None, help="penalty arm: reward lowered on a monitored hack (train.py's)")
    a("--monitor-acc", type=float, default=None,
      help="penalty and screening arms: simulated monitor accuracy in [0.5, 1] (train.py's)")
    a("--window", type=int, default=analyze.WINDOW, help="final window of the stop rule, last N steps")
    a("--stop-margin", type=float, default=STOP_MARGIN, help="stop rule: the |mean difference| that separates")
    a("--no-stop", action="store_true", help="run the whole grid whatever the stop rule says")
    a("--resume", action="store_true", help="continue the sweep in --out (same grid): skip finished runs, "
                                            "resume interrupted ones")
    a("--gpus", default=None, help="comma-separated GPU ids: one run per GPU at a time (CUDA_VISIBLE_DEVICES)")
    a("--slurm", action="store_true", help="write OUT/sweep.sbatch (a job array, one task per run) instead of running")
    a("--dry-run", action="store_true", help="print the commands and the cost estimate; create nothing")
    a("--slurm-parallel", type=int, default=None, help="--slurm: array tasks at once (default: all; fewer lets "
                                                       "the stop rule save the later tasks)")
    a("--usd-per-gpu-hour", type=float, default=2.0, help="price of the cost estimate (default 2.0)")
    a("--task", type=int, default=None, help="run task K of the sweep in --out (what each SLURM array task runs)")
    a("--train-cmd", default=None, help=argparse.SUPPRESS)   # tests only: replaces `python train.py`
    args = p.parse_args(argv)
    args.seeds = csv_ints("--seeds", args.seeds)
    args.gpus = None if args.gpus is None else csv_ints("--gpus", args.gpus)
    extra = [x for x in args.extra.split(",") if x] if args.extra else []
    bad = [x for x in extra if x not in EXTRA]
    if bad or len(set(extra)) != len(extra):
        raise SystemExit(f"error: --extra {args.extra!r}: allowed (each once): {','.join(EXTRA)}")
    args.arms = list(DEFAULT_ARMS) + extra
    if args.penalty is not None and "penalty" not in extra:
        raise SystemExit("error: --penalty sets the penalty arm: add --extra penalty")
    if args.monitor_acc is not None and not {"penalty", "screening"} & set(extra):
        raise SystemExit("error: --monitor-acc sets the penalty and screening arms: add --extra penalty or screening")
    if args.monitor_acc is not None and not 0.5 <= args.monitor_acc <= 1:
        raise SystemExit(f"error: --monitor-acc must be in [0.5, 1] (below 0.5 the monitor is inverted), "
                         f"got {args.monitor_acc}")
    if args.task is None and args.preset not in configs.PRESETS:
        raise SystemExit(f"error: --preset {args.preset}: allowed: {', '.join(sorted(configs.PRESETS))}")
    if args.steps is None and args.task is None:
        args.steps = configs.PRESETS[args.preset]["steps"]
    for flag, v, ok in (("--steps", args.steps, args.steps is None or args.steps >= 1),
                        ("--window", args.window, args.window >= 1),
                        ("--stop-margin", args.stop_margin, 0 < args.stop_margin <= 1),
                        ("--usd-per-gpu-hour", args.usd_per_gpu_hour, args.usd_per_gpu_hour >= 0),
                        ("--slurm-parallel", args.slurm_parallel, args.slurm_parallel is None or args.slurm_parallel >= 1)):
        if not ok:
            raise SystemExit(f"error: {flag} {v} is out of range (steps, window, slurm-parallel >= 1; "
                             f"0 < margin <= 1; usd >= 0)")
    if sum(map(bool, (args.slurm, args.dry_run, args.gpus is not None, args.task is not None))) > 1:
        raise SystemExit("error: --slurm, --dry-run, --gpus and --task are different ways to run: choose one")
    return args


# ----------------------------------------------------------------------------- the grid

def grid(args):
    """The manifest: every run's name, arm, seed, --out and train.py flags, seed-major (seed 0 of every arm,
    then seed 1, ...) so that the stop rule can be applied early."""
    pen = [f"--penalty={args.penalty}"] if args.penalty is not None else []
    acc = [f"--monitor-acc={args.monitor_acc}"] if args.monitor_acc is not None else []
    flags = {a: ARMS[a] + (pen + acc if a == "penalty" else acc if a == "screening" else []) for a in args.arms}
    out = os.path.abspath(args.out)
    runs = []
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{arm}_s{seed}"
            d = os.path.join(out, "runs", name)
            runs.append(dict(name=name, arm=arm, seed=seed, out=d,
                             argv=["--source=online", f"--preset={args.preset}", f"--steps={args.steps}",
                                   f"--seed={seed}", *flags[arm], f"--out={d}", "--quiet"]))
    return dict(version=1, out=out, preset=args.preset, steps=args.steps, seeds=args.seeds, arms=args.arms, arm_flags=flags,
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


# ----------------------------------------------------------------------------- the stop rule

def final_hack(run, window):
    r = analyze.load_online(run["out"])
    return analyze.online_run_row(r, min(window, len(r["steps"])))["hack_final"]


def stop_check(sweep):
    """(decided, reason): decided once the first treatment arm and vanilla have finished seeds 0-2 (the first
    three of the grid); reason is None when they are separated (see the module docstring)."""
    treat = [a for a in sweep["arms"] if a != "vanilla"][:1]
    seeds = sweep["seeds"][:STOP_SEEDS]
    if not treat or len(seeds) < STOP_SEEDS:
        return True, None                     # the rule needs vanilla, a treatment and 3 seeds: never stops
    pick = {(r["arm"], r["seed"]): r for r in sweep["runs"]}
    need = [pick[a, s] for s in seeds for a in ("vanilla", treat[0])]
    if any(status(r, sweep["steps"]) != "done" for r in need):
        return False, None
    d = [final_hack(pick[treat[0], s], sweep["window"]) - final_hack(pick["vanilla", s], sweep["window"]) for s in seeds]
    mean = sum(d) / len(d)
    same_sign = all(x > 0 for x in d) or all(x < 0 for x in d)
    if same_sign and abs(mean) >= sweep["stop_margin"] - 1e-9:     # 1e-9: rates are ratios of counts
        return True, None
    why = "the differences change sign or are 0" if not same_sign else \
        f"|mean| {abs(mean):.3f} < margin {sweep['stop_margin']}"
    return True, (f"no separation after {len(seeds)} seeds x 1 arm: final-window hack rate {treat[0]} minus vanilla "
                  f"on seeds {seeds} = {', '.join(f'{x:+.3f}' for x in d)} (mean {mean:+.3f}); {why}. "
                  f"--no-stop runs the rest")


# ----------------------------------------------------------------------------- cost

def step_seconds(row):
    if row.get("time_s") is not None:
        return row["time_s"]
    parts = [row.get(k) for k in ("gen_s", "grade_s", "train_s")]
    return sum(parts) if all(p is not None for p in parts) else None


def cost_line(sweep, usd):
    """Measured seconds per step (finished runs; per arm where the arm has one), the GPU-hours of the rest of
    the grid (one GPU per run) and its cost."""
    per_arm, every = {}, []
    for r in sweep["runs"]:
        if status(r, sweep["steps"]) == "done":
            xs = [step_seconds(x) for x in pools.read_jsonl(os.path.join(r["out"], "steps.jsonl"), ("step",))]
            xs = [x for x in xs if x is not None]
            per_arm.setdefault(r["arm"], []).extend(xs)
            every += xs
    todo = [(r, sweep["steps"] - steps_done(r)) for r in sweep["runs"] if status(r, sweep["steps"]) != "done"]
    left = sum(n for _, n in todo)
    if not every:
        return (f"cost: seconds per step not measured yet (no finished run); remaining {len(todo)} runs, "
                f"{left} steps")
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
        return dict(sweep, last=old.get("last"))      # the same grid; paths of here (the directory may have moved)
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
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=HERE), log


def lock_sweep(out):
    """Hold OUT/.lock (flock) for this process: a second sweep of the same directory is refused; the kernel
    drops the lock when the process dies."""
    import fcntl
    f = open(os.path.join(out, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise SystemExit(f"error: {out} is in use by another sweep.py; wait for it or use another --out") from None
    return f


def run_sweep(sweep, args):
    """Seed-major, one run per slot (a GPU, or one slot without --gpus); the stop rule is checked before
    every launch. Returns the exit code: 1 when a run failed."""
    slots = list(args.gpus) if args.gpus is not None else [None]
    queue = [r for r in sweep["runs"] if status(r, sweep["steps"]) != "done"]
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
        raise SystemExit(f"interrupted: continue with the same command plus --resume") from None
    done = sum(status(r, sweep["steps"]) == "done" for r in sweep["runs"])
    sweep["last"] = dict(finished=done, failed=failed, stopped=stopped)
    write_manifest(sweep)
    print(f"sweep {'stopped' if stopped else 'ended'}: {done} of {len(sweep['runs'])} runs finished"
          + (f"; failed: {', '.join(failed)}" if failed else "") + (f"; stopped because {stopped}" if stopped else ""))
    print(f"report: python analyze.py {os.path.join(args.out, 'runs')}/*")
    return 1 if failed else 0


def run_task(args):
    """One SLURM array task: run k of sweep.json, skipped when finished, resumed when interrupted, not started
    when the stop rule has stopped the sweep."""
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
    if not sweep["no_stop"]:
        why = stop_check(sweep)[1]
        if why:
            print(f"{run['name']}: not started: {why}")
            return 0
    cmd = command(sweep, run)
    print(f"task {args.task}: {shlex.join(cmd)}", flush=True)
    return subprocess.call(cmd, cwd=HERE)


SBATCH = """#!/bin/bash
# Phase 3 sweep {out}: one array task per run, {n} runs. Submit:  sbatch {script}
# A task that is restarted (requeue, preemption, or a second sbatch) resumes its run; a finished run is
# skipped; once the stop rule says stop, tasks not started yet exit without running (sweep.json no_stop={no_stop}).
# Collect: squeue -u $USER; logs in {logs}/; the report: python analyze.py {out}/runs/*
# Edit the #SBATCH lines for your cluster (partition, time, account). %{par} = tasks at once.
#SBATCH --job-name=phase3-sweep
#SBATCH --array=0-{last}%{par}
#SBATCH --gres=gpu:1
#SBATCH --requeue
#SBATCH --output={logs}/slurm_%a.log
{tasks}
set -euo pipefail
cd {here}
exec "${{PYTHON:-python3}}" sweep.py --out {out} --task "$SLURM_ARRAY_TASK_ID"
"""


def write_slurm(sweep, args):
    out = os.path.abspath(args.out)
    script = os.path.join(out, "sweep.sbatch")
    tasks = "\n".join(f"# task {i}: {r['name']}: {shlex.join(train_cmd(sweep) + r['argv'])}"
                      for i, r in enumerate(sweep["runs"]))
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    pools.atomic_write(script, SBATCH.format(out=shlex.quote(out), n=len(sweep["runs"]), script=shlex.quote(script),
                                             no_stop=sweep["no_stop"], logs=os.path.join(out, "logs"),
                                             last=len(sweep["runs"]) - 1, tasks=tasks,
                                             par=args.slurm_parallel or len(sweep["runs"]),
                                             here=shlex.quote(HERE)).encode())
    os.chmod(script, 0o755)
    print(f"wrote {script}: {len(sweep['runs'])} array tasks\nsubmit: sbatch {script}\n"
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
    if args.dry_run:
        for r in sweep["runs"]:
            st = status(r, sweep["steps"])
            print(f"# {r['name']}: {st}" + ("" if st == "done" else f"\n{shlex.join(command(sweep, r))}"))
        print(cost_line(sweep, args.usd_per_gpu_hour))
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
