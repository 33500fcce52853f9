"""A stand-in for `train.py --source=online`, used by test_core.py only (not a project command): the
sweep and miniature tests pass it as `--train-cmd` to get schema-shaped run directories from a fixed
rule in milliseconds. The environment steers it: FAKE_REFUSE (its --dry-run refuses with that
message), FAKE_DIE (that run exits after 2 steps), FAKE_SLEEP (seconds per step), FAKE_SAME (every
arm hacks alike)."""
import json, os, random, sys, time
LABELS = ("Correct", "Correct; Attempted Reward Hack", "Reward Hack", "Attempted Reward Hack", "Incorrect")

def flags(argv):
    return dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in argv)

def step_row(f, step):
    steps, same = int(f["steps"]), os.environ.get("FAKE_SAME")
    key = "same" if same else f"{f['arm']}|{f.get('basis')}|{f.get('control')}|{f.get('intervention')}"
    rng = random.Random(f"{key}|{f['seed']}|{step}")
    p = (0.9 if f["arm"] == "vanilla" and f.get("intervention", "none") == "none" or same else 0.1) * step / steps
    labels = dict.fromkeys(LABELS, 0)
    for _ in range(8):
        u = rng.random()
        labels["Reward Hack" if u < p else "Correct" if u < p + 0.3 else rng.choice(LABELS[:2] + LABELS[3:])] += 1
    slow = 3.0 if f["arm"] == "projected" else 2.0
    return dict(step=step, source="online", arm=f["arm"], skipped=False, n_student=8, n_teacher=0,
                hack_rate=labels["Reward Hack"] / 8, gt_rate=(labels["Correct"] + labels[LABELS[1]]) / 8,
                labels={k: v for k, v in labels.items() if v}, time_s=None if f.get("basis") == "lora" else slow,
                gen_s=1.0, grade_s=0.25, train_s=0.25)

def write(path, rows):
    with open(path + ".tmp", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(path + ".tmp", path)

def main():
    f, t0 = flags(sys.argv[1:]), time.time()
    if f.get("dry-run"):                                  # train.py's validation: FAKE_REFUSE says no
        if os.environ.get("FAKE_REFUSE"):
            sys.exit("error: " + os.environ["FAKE_REFUSE"])
        print("fake dry run: " + " ".join(sys.argv[1:]))
        return
    out, steps = f["out"], int(f["steps"])
    if os.path.isdir(out) and os.listdir(out) and not f.get("resume"):
        sys.exit(f"error: run directory {out} exists")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "steps.jsonl")
    rows = [json.loads(l) for l in open(path)] if f.get("resume") and os.path.exists(path) else []
    cfg = dict(source="online", arm=f["arm"], basis=f.get("basis", "svd"), control=f.get("control", "none"),
               intervention=f.get("intervention", "none"), seed=int(f["seed"]), preset=f["preset"], steps=steps)
    source = "pairs" if f.get("pair-dirs") or f.get("pairs") else "file" if f.get("v-hack") else "demo"
    json.dump(dict(argv=sys.argv, config=cfg, v_hack_source=dict(kind=source)), open(os.path.join(out, "run.json"), "w"))
    die = os.environ.get("FAKE_DIE") == os.path.basename(out) and not f.get("resume")
    for step in range(len(rows), steps):
        if die and step == 2:
            sys.exit(3)                                   # killed mid-run: 2 steps written
        rows.append(step_row(f, step))
        write(path, rows)
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    write(os.path.join(out, "eval.jsonl"), [dict(step=steps, n=8, hack_rate_hint=rows[-1]["hack_rate"],
                                                 gt_rate_hint=0.5, gt_rate_nohint=0.25, labels_hint={})])
    with open(os.path.join(os.path.dirname(out), "spans.jsonl"), "a") as fh:
        fh.write(json.dumps([os.path.basename(out), t0, time.time(), os.environ.get("CUDA_VISIBLE_DEVICES"),
                             f.get("device"), bool(f.get("resume"))]) + "\n")


if __name__ == "__main__":
    main()
