"""miniature.py — the spec's whole workflow in miniature on the CPU organism: one command, one answer.

  1 student  vanilla GRPO in the LoRA basis on the organism, seed STUDENT_SEED (apart from the sweep's
             seeds): the analogue of the hacking teacher checkpoint, exported as a PEFT adapter (adapter/)
  2 pools    `rollout.py generate`: a teacher pool from the student with the hint, a base pool from the base
             organism without it (one seed, so rollout (step, sample) of both pools is the same problem)
  3 probes   the replay probes on those pools: Phase 1 (NLL on the teacher pool) and Phase 2 (vanilla,
             projected, random_v, shuffled_v in the SVD basis; vanilla and projected in the LoRA basis),
             and their go/no-go (`analyze.py`)
  4 sweep    `sweep.py` with v_hack from those pools (--pair-dirs): vanilla and projected in both bases,
             random_v, and the controls the report must detect (penalty, screening, shuffled rewards)
  4b demo_v  the sweep's projected LoRA runs again with the default v_hack (the demo pools' canned
             hacks, not the student's): the effect per v_hack source, against the same vanilla LoRA runs
  5 answer   per basis and v_hack source: the projection's effect on the held-out hack rate and on
             capability (projected minus vanilla, 95% CI by seed), the controls check, and whether the
             Phase 2 verdict predicted the effect; printed and written to OUT/answer.json

Each stage runs the commands a researcher would type (printed before they run; their output goes to
OUT/logs/), so any one can be rerun by hand. A rerun skips what has finished and continues what was
interrupted (train.py --resume, rollout.py generate's continuation, sweep.py --resume).

    python miniature.py --out out/mini                        # the README's organism result
    python miniature.py --out out/mini2 --pools T_DIR,B_DIR   # stages 3-5 on pools you already have

train.py flags after `--` go to every online run (the student and the sweep's runs), e.g. `-- --lr=2e-3`.

"Predicted" compares the Phase 2 decision (RUN ... = go, anything else = no-go) with whether the projected
arm lowered the held-out hack rate (the CI of projected minus vanilla wholly below 0).
"""
import argparse, contextlib, json, os, shlex, subprocess, sys, time

import configs
configs.reproducible()   # before numpy or torch loads MKL (it reads these variables once); the runs inherit them
import analyze
import pools
import sweep     # its split of the command line at `--`

HERE = os.path.dirname(os.path.abspath(__file__))
STUDENT_SEED = 1000
CONTROLS = ("random_v_lora", "penalty_lora", "screening_lora", "shuffled_rewards_lora")
PHASE2 = (("p2_vanilla", ["--arm=vanilla"]), ("p2_projected", ["--arm=projected"]),
          ("p2_random_v", ["--arm=projected", "--control=random_v"]),
          ("p2_shuffled_v", ["--arm=vanilla", "--control=shuffled_v"]),
          ("arm3_vanilla", ["--arm=vanilla", "--basis=lora"]), ("arm3_projected", ["--arm=projected", "--basis=lora"]))


def get_args(argv=None):
    argv, online = sweep.split_train_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="miniature.py --out OUT [options] [-- train.py flags of the online runs]")
    a = p.add_argument
    a("--out", required=True, help="study directory (student/, pools/, probes/, sweep/, logs/, answer.json)")
    a("--model", default="organism", help="the policy every stage trains or samples (default: the CPU organism)")
    a("--seeds", default="0,1,2,3,4,5,6,7",
      help="the sweep's seeds (default 0-7: with the paired sd of projected minus vanilla measured on the organism, "
           "0.083 over 8 seeds, a 95%% CI of about +-0.07, 80%% power for a 0.1 effect; 5 seeds give +-0.10)")
    a("--steps", type=int, default=None, help="steps of the student and of every sweep run (default: the preset's)")
    a("--pool-batches", type=int, default=20, help="steps of each generated pool (default 20)")
    a("--pool-batch-size", type=int, default=8, help="rollouts per pool step (default 8)")
    a("--probe-steps", type=int, default=20, help="steps of each Phase 1/2 replay run (default 20)")
    a("--pools", default=None, metavar="TEACHER,BASE", help="use these pools: skips stages 1 and 2")
    a("--problems", default=pools.FIXTURE_PROBLEMS, help="problem file of the pools and the online runs "
                                                         "(default: the 30 fixture problems)")
    a("--controls", default=",".join(CONTROLS), help=f"the sweep's extra arms (default {','.join(CONTROLS)})")
    a("--train-cmd", default=None, help=argparse.SUPPRESS)   # tests only: the sweep's stand-in for train.py
    args = p.parse_args(argv)
    args.online = online
    if not os.path.isfile(args.problems):
        raise SystemExit(f"error: --problems {args.problems}: no such file")
    if args.steps is not None and args.steps < 1:
        raise SystemExit(f"error: --steps must be >= 1, got {args.steps}")
    for flag in ("pool_batches", "pool_batch_size", "probe_steps"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    sweep.csv_ints("--seeds", args.seeds)                    # the sweep's own checks, before any stage runs
    bad = [x for x in args.controls.split(",") if x and x not in sweep.EXTRA]
    if bad:
        raise SystemExit(f"error: --controls {args.controls!r}: allowed: {','.join(sweep.EXTRA)}")
    if args.pools is not None:
        dirs = [d for d in args.pools.split(",") if d]
        bad = [d for d in dirs if not os.path.isdir(d)]
        if len(dirs) != 2 or bad:
            raise SystemExit(f"error: --pools {args.pools!r}: two existing pool directories, TEACHER,BASE"
                             + (f" ({bad[0]} does not exist)" if bad else ""))
    return args


def run(cmd, log):
    """Run one stage command (a list), echo it, append its output to `log`; a failure stops the study
    with the command and the log's last lines. train.py commands run in this process (train.main with the
    same arguments: the same run, without another interpreter's start-up for each of the probes)."""
    print("$ " + shlex.join(cmd), flush=True)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        if os.path.basename(cmd[1]) == "train.py":
            import train
            rc = 0
            with contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                try:
                    train.main(cmd[2:])
                except (SystemExit, train.RunError) as e:
                    rc = 0 if isinstance(e, SystemExit) and e.code in (None, 0) else 1
                    print(e if isinstance(e, train.RunError) else e.code, file=f)
        else:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        with open(log) as f:
            tail = "".join(f.readlines()[-8:])
        raise SystemExit(f"error: stage command failed (exit {rc}): {shlex.join(cmd)}\n{tail}see {log}")


def train_cmd(out, flags):
    """train.py with `flags` into `out`: --resume when an interrupted run is there, nothing when it finished."""
    if os.path.exists(os.path.join(out, "run.json")):
        if run_finished(out):
            return None
        flags = flags + ["--resume"]
    return [sys.executable, os.path.join(HERE, "train.py"), f"--out={out}", "--quiet"] + flags


def run_finished(out):
    """A train.py run whose steps.jsonl holds every one of run.json's steps (analyze.finished)."""
    try:
        with open(os.path.join(out, "run.json")) as f:
            steps = json.load(f)["config"]["steps"]
        return analyze.finished(pools.read_jsonl(os.path.join(out, "steps.jsonl"), ("step",)), steps)
    except (OSError, ValueError, KeyError, pools.DataError):
        return False


def report(run_dirs, compute, text, log):
    """compute(run_dirs) once, in this process; the report `python analyze.py RUN_DIRS` would print,
    text(res), goes to the log under that command. A run analyze.py refuses stops the study in one line."""
    cmd = [sys.executable, os.path.join(HERE, "analyze.py")] + run_dirs
    print("$ " + shlex.join(cmd), flush=True)
    try:
        res = compute(run_dirs)
    except ValueError as e:
        raise SystemExit(f"error: analyze.py: {e}") from None
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(cmd)}\n{text(res)}\n")
    return res


def stage_student(args, log):
    out = os.path.join(args.out, "student")
    cmd = train_cmd(out, ["--source=online", f"--model={args.model}", "--arm=vanilla", "--basis=lora",
                          f"--seed={STUDENT_SEED}", f"--problems={args.problems}"]
                   + ([f"--steps={args.steps}"] if args.steps else []) + args.online)
    if cmd:
        run(cmd, log)
    return os.path.join(out, "adapter")


def stage_pools(args, adapter, log):
    dirs = [os.path.join(args.out, "pools", n) for n in pools.DEMO_NAMES]     # teacher_pool, base_pool
    common = ["--problems", args.problems, "--batches", str(args.pool_batches), "--batch-size",
              str(args.pool_batch_size), "--seed", "0", "--max-new-tokens", "192", "--model", args.model]
    run([sys.executable, os.path.join(HERE, "rollout.py"), "generate", "--lora", adapter, "--hint", "--out", dirs[0]] + common, log)
    run([sys.executable, os.path.join(HERE, "rollout.py"), "generate", "--no-hint", "--out", dirs[1]] + common, log)
    return dirs


def stage_probes(args, dirs, log):
    """Phase 1 and Phase 2 on the pools; returns {basis: decision} of the Phase 2 experiments."""
    P = ",".join(dirs)
    base = os.path.join(args.out, "probes")
    cmds = [train_cmd(os.path.join(base, "p1_nll"), [f"--model={args.model}", "--arm=vanilla", "--loss-mode=nll",
                                                     f"--replay-dirs={dirs[0]}", f"--pair-dirs={P}",
                                                     f"--steps={args.probe_steps}", "--seed=0"])]
    cmds += [train_cmd(os.path.join(base, name), [f"--model={args.model}", f"--replay-dirs={P}",
                                                  f"--steps={args.probe_steps}", "--seed=0"] + flags)
             for name, flags in PHASE2]
    for cmd in cmds:
        if cmd:
            run(cmd, log)
    res = report([os.path.join(base, "p1_nll")] + [os.path.join(base, name) for name, _ in PHASE2], analyze.analyze,
                 analyze.render, log)                  # each experiment is judged on its own runs only
    return {e["basis"]: dict(code=e["decision"]["code"], rule=e["decision"]["rule"], why=e["decision"]["why"],
                             go=e["decision"]["code"].startswith("run"))
            for e in res["experiments"] if "decision" in e}


def stage_sweep(args, dirs, log):
    out = os.path.join(args.out, "sweep")
    cmd = [sys.executable, os.path.join(HERE, "sweep.py"), "--out", out, "--no-stop", "--seeds", args.seeds, "--extra", args.controls]
    cmd += (["--steps", str(args.steps)] if args.steps else [])
    cmd += ["--resume"] if os.path.exists(os.path.join(out, "sweep.json")) else []
    cmd += ["--train-cmd", args.train_cmd] if args.train_cmd else []
    cmd += ["--", f"--model={args.model}", f"--pair-dirs={','.join(dirs)}", f"--problems={args.problems}"] + args.online
    run(cmd, log)
    runs = sorted(os.path.join(out, "runs", d) for d in os.listdir(os.path.join(out, "runs"))
                  if os.path.isdir(os.path.join(out, "runs", d)))
    return report(runs, analyze.phase3, analyze.render_phase3, log)


def stage_demo_v(args, log):
    """Stage 4b: the sweep's projected LoRA runs again, the same commands but for their v_hack, which comes
    from the demo pools' canned completions (train.py's default for an embedded model) instead of the
    student's pools: the projection's effect per v_hack source, against the same vanilla LoRA runs.
    Returns (the Phase 3 report of exactly those runs and the sweep's vanilla LoRA runs, None), or (None,
    why it was skipped). Refused in one line: a run there from other flags (a sweep redone since), or
    one whose v_hack did not come from the demo pools (the online flags name v_hack or its pairs)."""
    if args.model not in configs.EMBEDDED:
        return None, f"--model {args.model} has no default v_hack to compare with"
    grid = json.load(open(os.path.join(args.out, "sweep", "sweep.json")))
    proj = [r for r in grid["runs"] if r["arm"] == "projected_lora"]
    van = [r["out"] for r in grid["runs"] if r["arm"] == "vanilla_lora"]
    if not proj or not van:
        return None, "the sweep has no projected_lora and vanilla_lora runs to compare"
    out, dirs = os.path.join(args.out, "sweep_demo_v"), []
    for r in proj:
        d = os.path.join(out, r["name"])
        argv = [t for t in r["argv"] if not t.startswith(("--pair-dirs=", "--out="))] + [f"--out={d}"]
        dirs.append(d)
        if os.path.exists(os.path.join(d, "run.json")):
            with open(os.path.join(d, "run.json")) as f:
                had = [t for t in json.load(f)["argv"][1:] if t != "--resume"]
            if had != argv:
                raise SystemExit(f"error: {d} was run with other flags than the sweep's {r['name']} now has "
                                 f"(a sweep redone since?): remove it and rerun to redo stage 4b")
            if run_finished(d):
                continue
            argv.append("--resume")
        run((grid["train_cmd"] or [sys.executable, os.path.join(HERE, "train.py")]) + argv, log)
    for d in dirs:
        with open(os.path.join(d, "run.json")) as f:
            kind = (json.load(f).get("v_hack_source") or {}).get("kind")
        if kind != "demo":
            raise SystemExit(f"error: {d}: its v_hack came from {kind!r}, not the demo pools (the train.py flags "
                             f"after -- name v_hack or its pairs): stage 4b compares the demo pools' v_hack")
    return report(sorted(van) + dirs, analyze.phase3, analyze.render_phase3, log), None


def effect(c):
    """Projected minus vanilla (held-out hack and capability, 95% CI by seed) of one comparison."""
    hack, cap = c["endpoints"]["eval_hack"]["seed"], c["endpoints"]["capability"]["seed"]
    return dict(hack=hack, capability=cap, seeds=c["seeds"], lowered=hack["hi"] is not None and hack["hi"] < 0)


def answer(phase2, res, demo=(None, None)):
    """{basis: the projection's effect and Phase 2's prediction} + the controls check, from the Phase 3 report
    `res` (analyze.phase3)."""
    out = dict(controls=[dict(arm=c["arm"], control=c["control"], ci=c["ci"], passed=c["passed"])
                         for c in res["control_checks"]], bases={})
    for c in res["comparisons"]:
        arm = c["arm"].split()
        if c["vs"] is None or arm[0] != "projected" or len(arm) != 2:     # projected <basis>, no control
            continue
        e, p2 = effect(c), phase2.get(arm[1])
        out["bases"][arm[1]] = dict(e, phase2=p2, predicted=None if p2 is None else p2["go"] == e["lowered"])
    out["controls_ok"] = bool(out["controls"]) and all(c["passed"] for c in out["controls"])
    out["demo_v"] = None if demo[0] is None else \
        next((effect(c) for c in demo[0]["comparisons"] if c["arm"] == "projected lora" and c["vs"]), None)
    out["demo_v_skipped"] = demo[1]
    return out


def render(ans):
    o = ["== miniature study: did the projection change the held-out hack rate, and did Phase 2 predict it? =="]
    for c in ans["controls"]:
        o.append(f"  control {c['arm']}: held-out hack minus vanilla {analyze.fmt_ci(c['ci'])} "
                 f"{'ok' if c['passed'] else 'FAIL'}")
    if not ans["controls_ok"]:
        o.append("  the controls were not all detected: nothing below says anything about the projection")
    for basis, b in ans["bases"].items():
        p2 = b["phase2"]
        o.append(f"  {basis}: projected minus vanilla, held-out hack {analyze.fmt_ci(b['hack'])}, capability "
                 f"{analyze.fmt_ci(b['capability'])} (seeds {','.join(map(str, b['seeds']))}): "
                 f"{'lowered' if b['lowered'] else 'no detected change'}")
        o.append(f"    Phase 2 said {p2['rule'] if p2 else '(no Phase 2 experiment in this basis)'}"
                 + ("" if p2 is None else f" -> {'predicted' if b['predicted'] else 'NOT predicted'}"))
    b = ans.get("demo_v")
    if ans.get("demo_v_skipped"):
        o.append(f"  (stage 4b, the demo pools' v_hack, skipped: {ans['demo_v_skipped']})")
    if b:
        o.append(f"  lora, v_hack from the demo pools instead: projected minus vanilla, held-out hack "
                 f"{analyze.fmt_ci(b['hack'])}, capability {analyze.fmt_ci(b['capability'])} (seeds "
                 f"{','.join(map(str, b['seeds']))}): {'lowered' if b['lowered'] else 'no detected change'}")
    return "\n".join(o)


def main(argv=None):
    args = get_args(argv)
    t0, log = time.time(), os.path.join(args.out, "logs", "miniature.log")
    os.makedirs(args.out, exist_ok=True)
    if args.pools:
        dirs = [d for d in args.pools.split(",") if d]
    else:
        print("== 1 student ==", flush=True)
        adapter = stage_student(args, log)
        print("== 2 pools ==", flush=True)
        dirs = stage_pools(args, adapter, log)
        if not any(r["hacked"] for r in pools.read_pool(dirs[0])):
            raise SystemExit(f"error: the teacher pool {dirs[0]} holds no hacked rollout: the student did not learn "
                             f"to hack (train it longer: --steps), so there is no v_hack to extract")
    print("== 3 Phase 1/2 probes ==", flush=True)
    phase2 = stage_probes(args, dirs, log)
    print("== 4 Phase 3 sweep ==", flush=True)
    res = stage_sweep(args, dirs, log)
    print("== 4b the projected LoRA arm with the demo pools' v_hack ==", flush=True)
    demo = stage_demo_v(args, log)
    ans = dict(answer(phase2, res, demo), pools=[os.path.abspath(d) for d in dirs], seconds=round(time.time() - t0, 1))
    pools.atomic_write(os.path.join(args.out, "answer.json"), (json.dumps(ans, indent=1) + "\n").encode())
    print(render(ans))
    print(f"({ans['seconds']:.0f} s; {os.path.join(args.out, 'answer.json')})")
    return ans


if __name__ == "__main__":
    main()
