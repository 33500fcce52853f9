"""svd_probe.py — why the SVD basis does not learn to hack on the CPU organism: the README's measurements.

The organism learns to hack in the LoRA basis and hardly at all in the SVD basis (delta_S). Each probe
runs train.py's own main() with one thing changed for that run, so the rest (rollouts, grading, loss,
evaluation, run directory) is the trainer's. None is a flag of train.py: they are diagnoses, not settings
a study should use. Probes combine (comma-separated); everything after `--` goes to train.py:

    python svd_probe.py consistency -- --source=online --basis=svd --steps=24 --eval-every=0 --out=out/probe/c_svd
    python svd_probe.py hack_reward -- --source=online --basis=svd --lr=1e-2 --out=out/probe/h_svd
    python svd_probe.py freeze=self_attn -- --source=online --basis=svd --lr=1e-2 --out=out/probe/f_svd
    python svd_probe.py relative -- --source=online --basis=svd --lr=1e-2 --out=out/probe/r_svd
    python svd_probe.py wide,shuffled -- --source=online --basis=svd --out=out/probe/ws_svd

A probe run needs its own --out, and its run.json records the probe (config `probe`), so it is never taken
for a train.py run, and `train.py --resume` refuses it.

  consistency   the knobs never move; every step's gradient is recorded and the run ends by printing
                how consistent the gradient is: |mean|^2 (less its noise) over one step's noise (0: no
                signal; 1: the signal is as large as one step's noise). Low consistency means the basis
                is starved of signal; similar consistency with no learning means it cannot express it.
  hack_reward   reward 1 if the rollout hacks, else 0: can the basis learn to hack at all?
  freeze=NAME   the knobs of every module whose name contains NAME never move (AdamW with a zero
                gradient and no weight decay leaves them where they are); repeat for more names:
                freeze=q_proj,freeze=k_proj
  relative      each knob's step scaled by its singular value over the module's mean (Adam on
                delta_S / (S / mean S)): equal relative steps, where AdamW gives equal absolute ones
  wide          the organism at hidden 128, MLP 256, head_dim 32 (1,536 SVD knobs; its own cache entry)
  shuffled      shorthand for train.py's --intervention=shuffled_rewards, for the matching control
"""
import sys

import configs
configs.reproducible()   # before torch (MKL) loads, as every entry point does
import torch

import antipasto as ap
import interventions
import train

WIDE = dict(hidden_size=128, intermediate_size=256, head_dim=32)
PROBES = ("consistency", "hack_reward", "freeze", "relative", "wide", "shuffled")


def consistency(G):
    """G (S, n): one gradient per step, the knobs fixed. Returns (signal^2, noise^2, their ratio): the
    squared norm of the mean gradient less its expected noise (an unbiased estimate of |E g|^2) and the
    expected squared norm of one step's deviation from the mean."""
    S = G.shape[0]
    m = G.double().mean(0)                                         # (n,)
    noise2 = (G.double() - m).pow(2).sum().item() / (S - 1)        # E |g - E g|^2, one step
    signal2 = m.pow(2).sum().item() - noise2 / S                   # |mean|^2 is |E g|^2 + noise^2 / S
    return signal2, noise2, signal2 / noise2


def hack_only(cells):
    """The hack_reward probe's rewards: 1.0 where the rollout's oracle label is a hack, else 0.0."""
    return [1.0 if cell[0]["hacked"] else 0.0 for cell in cells]


def patch_step(probes, freeze, recorded):
    """train.apply_step with the probes' changes: frozen modules' gradients zeroed, steps scaled by S
    (relative), or no step at all with every gradient recorded (consistency)."""
    real = train.apply_step

    def apply_step(opt, modules, grads, V, project_grad, project_moments, one_sided=True):
        for n, m in modules.items():
            if any(f in n for f in freeze):
                ap.knob(m).grad.zero_()
                grads[n].zero_()
        if "consistency" in probes:
            recorded.append({n: g.detach().clone() for n, g in grads.items()})
            return {n: g * 0 for n, g in grads.items()}
        before = {n: ap.knob(m).detach().clone() for n, m in modules.items()}
        upd = real(opt, modules, grads, V, project_grad, project_moments, one_sided)
        if "relative" in probes:
            for n, m in modules.items():
                s = m.S.float() / m.S.float().mean()                 # (r,)
                upd[n] = upd[n] * s
                with torch.no_grad():
                    ap.knob(m).copy_(before[n] - upd[n])
        return upd
    train.apply_step = apply_step


def parse(argv):
    """(probes, freeze substrings, train.py's argv) from `PROBE[,PROBE...] -- TRAIN FLAGS`."""
    if "--" not in argv or argv.index("--") != 1:
        raise SystemExit(f"usage: python svd_probe.py PROBE[,PROBE...] -- TRAIN.PY FLAGS  (probes: {', '.join(PROBES)})")
    probes, freeze = set(), []
    for p in argv[0].split(","):
        name, _, val = p.partition("=")
        if name not in PROBES or (name == "freeze") != bool(val):
            raise SystemExit(f"error: probe {p!r}: allowed {', '.join(PROBES)} (freeze=NAME names modules)")
        probes.add(name)
        freeze += [val] if val else []
    if "consistency" in probes and "relative" in probes:
        raise SystemExit("error: consistency never steps, so relative has nothing to scale")
    if "hack_reward" in probes and "shuffled" in probes:
        raise SystemExit("error: hack_reward replaces the rewards shuffled would permute; run them apart")
    if "relative" in probes and "--basis=svd" not in argv[2:]:
        raise SystemExit("error: relative scales by singular values: it needs --basis=svd")
    if not any(a == "--out" or a.startswith("--out=") for a in argv[2:]):
        raise SystemExit("error: a probe run needs its own --out (it is not a train.py run and must not take one's place)")
    return probes, freeze, argv[2:]


def main(argv=None):
    probes, freeze, train_argv = parse(sys.argv[1:] if argv is None else argv)
    if "wide" in probes:
        configs.TINY_QWEN3.update(WIDE)        # before the organism loads: its cache key covers the shape
    if "shuffled" in probes:
        train_argv.append("--intervention=shuffled_rewards")
    if "hack_reward" in probes:
        real = interventions.intervene

        def intervene(cells, group_of, args, step):
            cells, rewards, n_flag, n_screened = real(cells, group_of, args, step)
            return cells, hack_only(cells), n_flag, n_screened
        interventions.intervene = intervene
    record = train.run_record                  # run.json's config says which probe changed the run, so a
                                               # plain train.py --resume of it is refused as another config
    def run_record(*a):
        run = record(*a)
        return dict(run, config=dict(run["config"], probe=sys.argv[1] if argv is None else argv[0]))
    train.run_record = run_record
    recorded = []
    patch_step(probes, freeze, recorded)
    out = train.main(train_argv)
    if "consistency" in probes and len(recorded) > 1:
        names = list(recorded[0])
        G = torch.stack([torch.cat([r[n] for n in names]) for r in recorded])    # (S, n)
        s2, n2, ratio = consistency(G)
        print(f"gradient consistency over {len(recorded)} steps, {G.shape[1]} knobs: |E g|^2 {s2:.3e}, "
              f"one step's noise {n2:.3e}, ratio {ratio:.3f}")
    return out


if __name__ == "__main__":
    main()
