"""svd_diagnosis.py — why the SVD basis does not learn to hack on the CPU organism: the README's measurements.

The organism learns to hack in the LoRA basis and hardly at all in the SVD basis (delta_S). Each diagnosis
runs train.py's own main() (online, vanilla) with one thing changed for that run, so the rest (rollouts,
grading, loss, evaluation, run directory) is the trainer's. None is a flag of train.py: they answer a
question about the basis, not a setting a study should use. They combine (comma-separated); everything
after `--` goes to train.py:

    python svd_diagnosis.py consistency -- --source=online --basis=svd --steps=24 --eval-every=0 --out=out/diag/c_svd
    python svd_diagnosis.py hack_reward -- --source=online --basis=svd --lr=1e-2 --out=out/diag/h_svd
    python svd_diagnosis.py freeze=self_attn -- --source=online --basis=svd --lr=1e-2 --out=out/diag/f_svd
    python svd_diagnosis.py relative -- --source=online --basis=svd --lr=1e-2 --out=out/diag/r_svd
    python svd_diagnosis.py wide -- --source=online --basis=svd --intervention=shuffled_rewards --out=out/diag/ws

  consistency   the knobs never move; every trained step's gradient (of the knobs not frozen) is recorded,
                and the run ends by printing, and writing to OUT/consistency.json, how consistent the
                gradient is: |E g|^2 over one step's noise E|g - E g|^2 (0: no signal; 1: the signal is as
                large as one step's noise). Low consistency means the basis is starved of signal; similar
                consistency with no learning means it cannot express what the reward asks.
  hack_reward   reward 1 if the rollout hacks, else 0: can the basis learn to hack at all? (The step row's
                reward_mean stays the grader's; reward_min/max and the advantages are the diagnosis's.)
  freeze=NAME   the knobs of every module whose name contains NAME never move (AdamW with a zero gradient
                and no weight decay leaves them where they are); repeat for more names:
                freeze=q_proj,freeze=k_proj. The step row's cosines and norms stay those of the whole gradient.
  relative      each knob's step scaled by its singular value over the module's mean (Adam on
                delta_S / (S / mean S)): equal relative steps, where AdamW gives equal absolute ones
  wide          the embedded models at hidden 128, MLP 256, head_dim 32 (the organism: 1,536 SVD knobs; its
                own cache entry)

A diagnosis run needs its own --out. Its run.json records the diagnosis (config `diagnosis`, and argv is
this command), so analyze.py never compares it with runs of another diagnosis or none, and a plain
`train.py --resume` refuses it. One run per process: the changes are made to train.py's functions.
"""
import json, os, sys

import configs
configs.reproducible()   # before torch (MKL) loads, as every entry point does
import torch

import antipasto as ap
import interventions
import pools
import train

WIDE = dict(hidden_size=128, intermediate_size=256, head_dim=32)
DIAGNOSES = ("consistency", "hack_reward", "freeze", "relative", "wide")


def consistency(G):
    """G (S, n): one gradient per step, the knobs fixed. Returns (signal^2, noise^2, their ratio): the
    squared norm of the mean gradient less its expected noise (an unbiased estimate of |E g|^2) and the
    expected squared norm of one step's deviation from the mean (ratio None when there is no noise)."""
    S = G.shape[0]
    m = G.double().mean(0)                                         # (n,)
    noise2 = (G.double() - m).pow(2).sum().item() / (S - 1)        # E |g - E g|^2, one step
    signal2 = m.pow(2).sum().item() - noise2 / S                   # |mean|^2 is |E g|^2 + noise^2 / S
    return signal2, noise2, signal2 / noise2 if noise2 > 0 else None


def hack_only(cells):
    """The hack_reward diagnosis's rewards: 1.0 where the rollout's oracle label is a hack, else 0.0."""
    return [1.0 if cell[0]["hacked"] else 0.0 for cell in cells]


def check_freeze(freeze, names):
    """Refuse, in one line, freeze names that match none of the adapted modules `names`, or all of them."""
    for f in freeze:
        if not any(f in n for n in names):
            raise SystemExit(f"error: freeze={f} matches no adapted module (e.g. {names[0]})")
    if freeze and all(any(f in n for f in freeze) for n in names):
        raise SystemExit("error: freeze matches every adapted module: nothing would train")


def patch_step(diagnoses, freeze, recorded):
    """train.apply_step with the diagnoses' changes: frozen modules' gradients zeroed, steps scaled by S
    (relative), or no step at all with every gradient recorded (consistency). Vanilla only: the step
    uses the knobs' .grad, never the projection."""
    real = train.apply_step

    def apply_step(opt, modules, grads, V, project_grad, project_moments, one_sided=True):
        live = [n for n in modules if not any(f in n for f in freeze)]
        for n, m in modules.items():
            if n not in live:
                ap.knob(m).grad.zero_()
        if "consistency" in diagnoses:
            recorded.append({n: grads[n].detach().clone() for n in live})
            return {n: g * 0 for n, g in grads.items()}
        before = {n: ap.knob(m).detach().clone() for n, m in modules.items()}
        upd = real(opt, modules, grads, V, project_grad, project_moments, one_sided)
        if "relative" in diagnoses:
            for n, m in modules.items():
                s = m.S.float() / m.S.float().mean()                 # (r,)
                upd[n] = upd[n] * s
                with torch.no_grad():
                    ap.knob(m).copy_(before[n] - upd[n])
        return upd
    train.apply_step = apply_step


def parse(argv):
    """(diagnosis string, diagnoses, freeze names, train.py's resolved args, its argv) from
    `DIAGNOSIS[,DIAGNOSIS...] -- TRAIN FLAGS`; every refusal a one-line error before anything is made
    (the freeze names are checked once the model's adapter exists: check_freeze)."""
    if "--" not in argv or argv.index("--") != 1:
        raise SystemExit(f"usage: python svd_diagnosis.py DIAGNOSIS[,DIAGNOSIS...] -- TRAIN.PY FLAGS  "
                         f"(diagnoses: {', '.join(DIAGNOSES)})")
    diagnoses, freeze = set(), []
    for p in argv[0].split(","):
        name, _, val = p.partition("=")
        if name not in DIAGNOSES or (name == "freeze") != bool(val):
            raise SystemExit(f"error: diagnosis {p!r}: allowed {', '.join(DIAGNOSES)} (freeze=NAME names modules)")
        diagnoses.add(name)
        freeze += [val] if val else []
    train_argv = argv[2:]
    if not any(a == "--out" or a.startswith("--out=") for a in train_argv):
        raise SystemExit("error: a diagnosis run needs its own --out (it is not a train.py run and must not take one's place)")
    args = configs.get_args(train_argv)                 # train.py's own checks of its flags, nothing created
    need = [(args.source == "online", "--source=online"), (args.arm == "vanilla", "--arm=vanilla"),
            ("relative" not in diagnoses or args.basis == "svd", "relative: --basis=svd (it scales by S)"),
            ("hack_reward" not in diagnoses or args.intervention == "none",
             "hack_reward: no --intervention (it replaces the rewards)"),
            ("consistency" not in diagnoses or args.cfg["inner_epochs"] == 1,
             "consistency: --inner-epochs=1 (the epochs' gradients of one batch are not independent)"),
            ("consistency" not in diagnoses or "relative" not in diagnoses, "consistency never steps: no relative")]
    for ok, what in need:
        if not ok:
            raise SystemExit(f"error: svd_diagnosis.py needs {what}")
    return ",".join(sorted(argv[0].split(","))), diagnoses, freeze, args, train_argv


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    diagnosis, diagnoses, freeze, args, train_argv = parse(argv)
    if "wide" in diagnoses:
        configs.TINY_QWEN3.update(WIDE)        # before the organism loads: its cache key covers the shape
    if "hack_reward" in diagnoses:
        real = interventions.intervene

        def intervene(cells, group_of, args, step):
            cells, rewards, n_flag, n_screened = real(cells, group_of, args, step)
            return cells, hack_only(cells), n_flag, n_screened
        interventions.intervene = intervene
    load = train.load               # freeze names checked against the adapted modules, before the run directory

    def checked_load(*a):
        model, tok, messages_fn, modules = load(*a)
        check_freeze(freeze, list(modules))
        return model, tok, messages_fn, modules
    train.load = checked_load
    record = train.run_record       # run.json: the diagnosis in its config (a plain --resume is refused) and argv

    def run_record(*a):
        run = record(*a)
        return dict(run, config=dict(run["config"], diagnosis=diagnosis),
                    argv=["svd_diagnosis.py", diagnosis, "--"] + run["argv"][1:])
    train.run_record = run_record
    recorded = []
    patch_step(diagnoses, freeze, recorded)
    try:
        out = train.main(train_argv)
    except train.RunError as e:
        raise SystemExit(f"error: {e}") from None
    if "consistency" in diagnoses:
        if len(recorded) < 2:
            raise SystemExit(f"error: consistency needs 2 trained steps or more, {out} has {len(recorded)}")
        names = list(recorded[0])
        G = torch.stack([torch.cat([r[n] for n in names]) for r in recorded])    # (S, n)
        s2, n2, ratio = consistency(G)
        res = dict(steps=len(recorded), knobs=G.shape[1], signal2=s2, noise2=n2, ratio=ratio)
        pools.atomic_write(os.path.join(out, "consistency.json"), json.dumps(res, indent=1).encode())
        print(f"gradient consistency over {len(recorded)} steps, {G.shape[1]} knobs: |E g|^2 {s2:.3e}, "
              f"one step's noise {n2:.3e}, ratio {'null' if ratio is None else f'{ratio:.3f}'}")
    return out


if __name__ == "__main__":
    main()
