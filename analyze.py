"""
Analyze Phase 2 run directories (spec2.md): verification table, cosine
trajectories, per-sample buckets, the Phase 1 label comparison, vanilla vs
projected on the same seed, and the Phase 3 go/no-go decision. Online runs
(Phase 3, sweep.py) get the Phase 3 report instead: the held-out endpoints
(hack rate with the hint, capability without it) first, then #runs hacked and
the final-window training rates; each arm vs the vanilla of its basis, paired by
seed (mean difference, 95% CI, p) and, for the held-out endpoints, paired by
problem (the public environment's test, alpha 0.01).

    python analyze.py RUN_DIR [RUN_DIR ...] [--json] [--plot FILE.png]
    python analyze.py out/sweep/runs/* [--window 10] [--json] [--plot FILE.png]   # Phase 3 online runs

numpy + stdlib (+ the sibling pools.py, also stdlib-only) and a hand-written
t-test, so the report runs wherever train.py runs; train.py calls report() at
the end of a run.

The decision (replay runs). Experiments are the runs with the same config, pools and model apart from
the arm, the control, the seed and the step count. A directory given twice, or two directories holding
the same run (a copy), is refused; runs with an identical config (same seed, pools and v_hack) replay
the same samples and count once (the report says which); a run that stopped before its --steps is
refused with the command that finishes it. The spec's rules give run_justified (cos_in > 0.2 on at
least 80% of steps), run_weak, run_smaller_h1, skip_orthogonal (≈ 0 on all steps and no
discrimination), investigate_reverse_sign, investigate_reversed, bug_over_projection or no_vanilla.
"≈ 0" for the mean: judged against the label-free controls on the same steps (paired t-test) when there
are any, else against the isotropic null: an n-step mean is ≈ 0 when it lies within 2 sds of an n-step
mean (null sd / sqrt(n)), not of one step. Given vanilla GRPO control runs of the same seed, the per-step
"≈ 0 on all steps" band widens to the control's |mean| + 2 sd of cos_in when that is larger. The
isotropic null understates chance alignment (real gradients share dominant directions), hence the
empirical controls. Controls can overturn an alignment-based RUN: vanilla must beat random_v and
shuffled_v on the same steps (paired t-test, p < 0.05), else skip_not_above_control; given style_v,
v_hack must beat the style direction by more than two standard errors of the paired difference plus a
label-free direction's chance |cos_in| (run_hack_aligned), else skip_style_confound. A missing control
that already exists beside the runs is named, with the advice to add it, instead of a command that
would run it again. Between-bucket tests count each completion once (the mean over its repeats; the
report prints n distinct). cos_out < cos_in and cos_out < 0.05 hold for any V under the one-sided k=1
projection, and frac_fired is about 0.5 for a random V: mechanics checks, outside the decision.
cos_update (projected minus vanilla, paired by step) is evidence. Vanilla and projected runs are compared
only when they share pools, v_hack, model and config apart from the arm; the report says why it skipped a
pair. Runs of different bases are never pooled into one arm, and vanilla/projected pairs are formed
within a basis.
Phase 1 (NLL runs): per-sample cos(NLL grad, v_hack) on pure hacks vs hack+correct rows of the replayed
pool (each completion once, Welch test), the per-label means, and what the sign means (cos_in < 0 on every
step of an all-hack pool says that the shared direction of every NLL gradient outweighs the hack contrast
in v_hack).
--plot (matplotlib, optional) draws each run's per-step cos_in, cos_out and cos_update (grey band: two
null sds; a run whose curve is identical to another's is named in the legend, since one hides the other)
and each run's per-sample cosines by bucket (source pool, hacked): the advantage-free
cos_S_contrib x sign(adv) that the discrimination test uses, and below it the advantage-signed
cos_S_contrib.

The Phase 3 report (online runs; a mix with replay runs is refused). Held-out hack and capability are
each run's last evaluation, per arm as mean ± sd over seeds; #runs hacked of n (a run is hacked at the
first step where Reward Hack rollouts outnumber correct ones); hack (train) and gt (train), the student's
mean over the last --window steps. A LoRA arm without `vanilla lora` is not compared (a test across bases
would mix basis, learning rate and projection). Per endpoint, paired by seed: the mean difference with its
95% CI (Student t, df = n-1) and the paired t-test's p. Paired by problem, for the held-out endpoints:
each held-out problem's mean over seeds and samples (eval_rows.jsonl.gz) paired across problems, t-test
at alpha 0.01 (* = significant; n/a for runs without that file); it treats samples of one model as
independent, so it tests the trained models, not the training procedure, which the seeds test. Per run:
both endpoints, the evaluation step, hacked at (the first hacked step, or never) and the training rates.
Runs with different presets or step counts, and unfinished runs, are refused; arms with fewer seeds (a
stopped sweep) are reported, each comparison on the seeds both arms have, with the arms' seeds that were
not run and why (sweep.json). --plot draws per arm the per-step label mix of the student rollouts (hack, correct, attempted,
incorrect; line = mean, band = min to max over seeds, the final window shaded) and the held-out endpoints
per arm (bars = mean, dots = seeds).

The run directory train.py writes and this file reads (default name
out/runs/<arm>_<loss>_<control>_s<seed>[_lora], online
out/runs/online_<arm>_<basis>_<intervention>_<control>_s<seed>, then _<flag>-<value> for every other
flag given that changes the experiment, e.g. _loss-type-bnpo; a path or list value is named by its
digest). Undefined values are null; no prompt or completion text is written outside rollouts/ (replayed
rollouts live in their pools only); with the same seed and inputs the slim files are byte-identical on
CPU.
    run.json             argv, config (source, arm, basis, loss type, pair kind, token limits, group_size
                         (G: replay, the rows drawn per step; online, rollouts per prompt), ...; online:
                         prompts per step, mix, beta, intervention, problems sha256, held-out problem
                         ids, ...; diagnosis: svd_diagnosis.py's, where it changed the run; an older
                         run's config is read through configs.upgrade_run_config), versions, basis
                         fingerprint, v_hack metadata (path, sha256, pairs, pair
                         kind), v_hack_source {kind: file | pairs | demo, path, sha256, pairs_source,
                         n_pairs, control; pair_dirs {pool: dir, fingerprint} or pairs_file,
                         pairs_file_sha256}, online with --mix mix_source {kind: pool | demo, dir,
                         fingerprint}, pool fingerprints and metadata, null.cos_sd, truncation (replay)
    steps.jsonl          one row per step: step, arm, skipped, skip_reason, n_samples, reward_min,
                         reward_max, reward_range, adv_min, adv_max, adv_abs_mean, loss, grad_norm, cos_in,
                         cos_out, cos_update, cos_learned, grad_removed, cos_in_global, n_rows,
                         n_prompt_truncated, n_completion_truncated, prompt_tokens_cut,
                         completion_tokens_cut, n_hack_lost_test_func, hackward, frac_fired,
                         n_over_projected, time_s. Online rows also: source, n_student, n_teacher,
                         n_screened, n_flagged, hack_rate, gt_rate, compile_rate, hack_given_compile,
                         labels ({label: count} of the student's rollouts), reward_mean, comp_len_mean,
                         truncated_frac, n_zero_var_groups, problems, kl (mean K3 per token, first epoch),
                         clip_frac, ratio_min, ratio_max, ratio_epochs, cos_in_epochs, gen_mismatch_max,
                         gen_mismatch_mean (|log p_train - log p_gen| over the student's completion
                         tokens), gen_s, grade_s, train_s
    step_NNN.cos.jsonl.gz  one row per sample, spec2's slim schema, exactly: step, sample_id, src_pool,
                         src_step, src_sample, reward, hacked, gt_pass, fmt_ok, comp_len, cos_S_contrib,
                         grad_norm_contrib, mean_cos_in, mean_cos_out, frac_fired, arm
    state.pt             the checkpoint --resume continues from (knobs, AdamW state, step, v_hack sha256;
                         --save-every)
    adapter/             the trained adapter at the last checkpoint (step and model in the safetensors
                         header): PEFT LoRA (adapter_config.json, adapter_model.safetensors) or the SVD
                         knobs (svd_knobs.safetensors: delta_S per module, base-model fingerprint)
    eval.jsonl           online: step (optimizer steps done), n, hack_rate_hint, gt_rate_hint,
                         gt_rate_nohint, compile_rate_hint, compile_rate_nohint, hack_given_compile_hint
                         (P(hack | compiles) with the hint, null when nothing compiled), labels_hint, seconds
    eval_rows.jsonl.gz   online: one row per held-out rollout, exactly {step, kind (hint | nohint),
                         problem_id, sample (0 .. eval_samples-1), label, hacked, gt_pass, compiled,
                         reward}; all rows so far, rewritten atomically at each evaluation; --resume keeps
                         the rows with step up to its checkpoint's
    rollouts/student/    online: the student's graded rollouts, a pool (pools.read_pool reads it)

What each step measures. All gradients live in the knobs' coordinates (delta_S; LoRA: the flat (A, B)).
  losses (spec2)  grpo: adv = r - mean(r) (Dr.GRPO, no std), per-sample loss
                  -adv_i * (logp_i * mask_i).sum() / mask_i.sum() / G; nll: -(logp_i * mask_i).sum() /
                  mask_i.sum() / G. Only completion tokens (plus the end-of-turn token) are in the mask.
                  A zero-variance group is logged and skipped (no optimizer step). The token reduction
                  is --loss-type (TRL's names): grpo (default, the spec's: each sequence's mean over its
                  own tokens, 1/|o_i|), dr_grpo (sum over tokens divided by G x max completion tokens, a
                  constant) or bnpo (sum divided by all completion tokens of the group).
  truncation      prompts are cut from the left and completions from the right at --max-prompt-tokens /
                  --max-completion-tokens (default: the preset). Every cut is counted per step (the
                  n_..._truncated and ..._cut fields), for the whole replay set in run.json, and in the
                  report; a hacked row whose run_tests definition is cut away (the very tokens that make
                  it a hack) is warned about loudly, in training and in extraction. Online, prompts are
                  never cut: one longer than --max-prompt-tokens is an error before anything is created.
  cos_in          per module, the signed cosine of the batch gradient with the top hack axis; the step
                  value is the mean over modules (a module with a zero gradient is skipped, never counted
                  as 0). cos_in_global is the cosine over all modules concatenated (dominated by the
                  largest modules); the decision uses the mean over modules, whose isotropic null is known.
  cos_out         the same after one-sided removal g - relu(V g) @ V; in the vanilla arm nothing is
                  removed, and cos_out says what the projection would have done.
  frac_fired      fraction of modules where something was removed; hackward ||relu(V g)|| / ||g||;
                  n_over_projected: modules where some axis lost more than its hack-ward part (a bug).
  cos_update      the same cosine for the update actually applied, -(knobs after - before): AdamW's
                  per-coordinate normalisation means a projected gradient does not make a hack-free
                  update (hence --project-moments).
  cos_learned     the same cosine for all the student has learned so far, -(knobs now - knobs at step
                  0): if it stays near 0 while the hack rate rises, the projection had nothing to remove.
  grad_removed    the share of the gradient's norm the one-sided projection removes (projected) or would
                  remove (vanilla), over all modules, ||g - g_projected|| / ||g||.
  cos_S_contrib   per sample: mean over modules of the cosine of that sample's own gradient contribution
                  with the top axis; grad_norm_contrib its norm. All contributions come from one backward
                  and sum to the batch gradient. Under GRPO a contribution is adv_i * grad NLL_i / G, and
                  teacher rows have adv > 0, base rows adv < 0: a direction shared by every NLL gradient
                  separates the pools by the advantage's sign alone, so the report also shows the
                  advantage-free cosine cos_S_contrib * sign(adv_i) and bases "discrimination" on it.
  null            a uniformly random direction's cosine with a fixed vector in dimension r has sd
                  1/sqrt(r); run.json stores the sd of the module mean (null.cos_sd).
"""
import glob
import json
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np

import configs  # upgrade_run_config: an old run.json's config in today's names

import pools   # strict JSON Lines reading and pool labels (standard library only)
from pools import read_jsonl

STEP_KEYS = ("step", "skipped", "reward_range", "adv_min", "adv_max", "adv_abs_mean",
             "cos_in", "cos_out", "frac_fired", "n_over_projected")
SAMPLE_KEYS = ("step", "sample_id", "src_pool", "src_step", "src_sample", "reward", "hacked",
               "gt_pass", "fmt_ok", "comp_len", "cos_S_contrib", "grad_norm_contrib",
               "mean_cos_in", "mean_cos_out", "frac_fired", "arm")
ALPHA = 0.05
WINDOW = 10          # Phase 3: the final window, last N steps of an online run

# -----------------------------------------------------------------------------
# stats: regularised incomplete beta -> Student t tail -> Welch test

def _betacf(a, b, x, eps=1e-15, tiny=1e-300, max_iter=10000):
    """Continued fraction for I_x(a,b), modified Lentz (Numerical Recipes 6.4)."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (tiny if abs(d) < tiny else d)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)),               # even step
                   -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):     # odd step
            d = 1.0 + aa * d
            d = 1.0 / (tiny if abs(d) < tiny else d)
            c = 1.0 + aa / c
            c = tiny if abs(c) < tiny else c
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise RuntimeError(f"betainc continued fraction did not converge (a={a}, b={b}, x={x})")

def betainc_reg(a, b, x):
    """I_x(a,b). Uses the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) on the side where
    the continued fraction converges quickly."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"betainc_reg needs a,b > 0 and 0 <= x <= 1, got {a}, {b}, {x}")
    if x == 0.0 or x == 1.0:
        return float(x)
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b

def t_sf_two_sided(t, df):
    """P(|T| >= |t|) for Student t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc_reg(df / 2.0, 0.5, df / (df + t * t))

def _finite(x):
    x = np.asarray([v for v in x if v is not None], dtype=float)
    if not np.all(np.isfinite(x)):
        raise ValueError("non-finite value in statistics input")
    return x

def mean_sd(x):
    """n, mean, sample sd (ddof=1); None where undefined, never NaN."""
    x = _finite(x)
    return dict(n=len(x), mean=float(x.mean()) if len(x) else None,
                sd=float(x.std(ddof=1)) if len(x) > 1 else None)

def paired_t_test(x, y):
    """Paired t-test on x_k - y_k (same steps, or same seeds): mean difference, its standard error, t,
    df = n-1, p."""
    d = _finite([a - b for a, b in zip(x, y) if a is not None and b is not None])
    n = len(d)
    out = dict(n=n, mean_diff=float(d.mean()) if n else None, se=None, t=None, df=None, p=None, reason=None)
    if n < 2:
        out["reason"] = f"need >= 2 pairs (n={n})"
        return out
    se = float(d.std(ddof=1)) / math.sqrt(n)
    out["se"] = se
    if se == 0:
        out["reason"] = "zero variance of the paired differences"
        return out
    t = float(d.mean()) / se
    out.update(t=t, df=n - 1, p=float(t_sf_two_sided(t, n - 1)))
    return out

def welch_t_test(x, y):
    """Welch's unequal-variance t-test with Welch-Satterthwaite df. Degenerate
    inputs give t/df/p = None plus a reason rather than NaN."""
    x, y = _finite(x), _finite(y)
    n1, n2 = len(x), len(y)
    out = dict(t=None, df=None, p=None, n1=n1, n2=n2, reason=None,
               mean1=float(x.mean()) if n1 else None, mean2=float(y.mean()) if n2 else None)
    if n1 < 2 or n2 < 2:
        out["reason"] = f"need n>=2 in both groups (n1={n1}, n2={n2})"
        return out
    s1, s2 = x.var(ddof=1) / n1, y.var(ddof=1) / n2
    if s1 + s2 == 0:
        out["reason"] = "zero variance in both groups"
        return out
    t = (x.mean() - y.mean()) / math.sqrt(s1 + s2)
    df = (s1 + s2) ** 2 / (s1 ** 2 / (n1 - 1) + s2 ** 2 / (n2 - 1))
    out.update(t=float(t), df=float(df), p=float(t_sf_two_sided(float(t), float(df))))
    return out

def t_crit_two_sided(alpha, df):
    """c with P(|T| >= c) = alpha (bisection on the tail above; 1e-12 relative)."""
    lo, hi = 0.0, 1.0
    while t_sf_two_sided(hi, df) > alpha:
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_sf_two_sided(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2

# -----------------------------------------------------------------------------
# loading: strict, because a silently dropped row biases every mean below

def add_adv_free(rows, loss_mode):
    """cos_adv_free = cos_S_contrib * sign(adv): the cosine of the direction the sample pushes its
    own log-likelihood (grad NLL_i) with v_hack. Under GRPO a teacher row has adv > 0 and a base row
    adv < 0, so any direction shared by all NLL gradients separates the pools in cos_S_contrib by
    the advantage's sign alone; this one does not. adv = reward - mean(reward) over the step's group."""
    for step in {r["step"] for r in rows}:
        grp = [r for r in rows if r["step"] == step]
        mean_r = sum(r["reward"] for r in grp) / len(grp)
        for r in grp:
            adv = r["reward"] - mean_r if loss_mode == "grpo" else 1.0
            c = r["cos_S_contrib"]
            r["cos_adv_free"] = None if c is None or abs(adv) < 1e-6 else (c if adv > 0 else -c)

def read_run_meta(run_dir, keys=("arm",)):
    """run.json of a run directory, its config in today's names (configs.upgrade_run_config: an older run's
    missing fields take the values it used); the config must hold `keys`, its arm one of configs.ARMS."""
    run_json = os.path.join(run_dir, "run.json")
    try:
        with open(run_json) as f:
            meta = json.load(f, parse_constant=pools.no_constant)
        if not isinstance(meta["config"], dict):
            raise TypeError("config is not an object")
        for k in keys:
            meta["config"][k]
        if "arm" in keys and meta["config"]["arm"] not in configs.ARMS:
            raise ValueError(f"arm {meta['config']['arm']!r} is not one of {', '.join(configs.ARMS)}")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{run_json}:1: bad run.json ({type(e).__name__}: {e})") from e
    meta["config"] = configs.upgrade_run_config(meta["config"])
    return meta

def is_online(run_dir):
    return read_run_meta(run_dir, ())["config"].get("source") == "online"

def load_run(run_dir):
    meta = read_run_meta(run_dir)
    cfg = meta["config"]
    arm = cfg["arm"]
    steps_path = os.path.join(run_dir, "steps.jsonl")
    steps, seen = read_jsonl(steps_path, STEP_KEYS), set()
    for i, s in enumerate(steps, 1):
        if s["step"] in seen:
            raise ValueError(f"{steps_path}:{i}: duplicate step {s['step']}")
        seen.add(s["step"])
    samples = []
    for p in sorted(glob.glob(os.path.join(run_dir, "step_*.cos.jsonl.gz"))):
        rows = read_jsonl(p, SAMPLE_KEYS)
        add_adv_free(rows, cfg["loss_mode"])
        samples += rows
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), cfg=cfg, arm=arm, meta=meta,
                loss_mode=cfg["loss_mode"], control=cfg.get("control", "none"), basis=cfg["basis"],
                seed=cfg.get("seed"), null_sd=(meta.get("null") or {}).get("cos_sd"),
                steps=sorted(steps, key=lambda s: s["step"]), samples=samples)

def load_labels(run):
    """(src_pool, src_step, src_sample) -> label; the slim files carry no labels."""
    read = pools.read_pool
    dirs = run["cfg"].get("replay_dirs") or []
    for d in dirs:
        if not os.path.isdir(d):  # e.g. analysing on another machine: report it, don't crash
            raise FileNotFoundError(f"pool dir not found: {d}")
    return {(r["src_pool"], r["src_step"], r["src_sample"]): r["label"] for d in dirs for r in read(d)}

# -----------------------------------------------------------------------------
# helpers

def live(run):
    return [s for s in run["steps"] if not s["skipped"]]

def vals(rows, key):
    return [r[key] for r in rows if r.get(key) is not None]

EXPERIMENT = ("basis", "pair_kind", "loss_type", "max_prompt_tokens", "max_completion_tokens", "model",
              "lora_rank", "lora_alpha", "replay_dirs", "per_pool", "lr", "k", "one_sided", "loss_mode",
              "extract_frac", "extract_loss", "group_size", "dtype", "preset")

def experiment_key(cfg, meta):
    """What runs must share to be judged together: everything that changes v_hack, the samples or the
    gradient (config, the replayed and the pair pools' contents), apart from the arm, the control, the seed
    and the step count."""
    fps = lambda key: sorted((n, (p or {}).get("fingerprint")) for n, p in (meta.get(key) or {}).items())
    src = str((meta.get("v_hack") or {}).get("pairs_source") or "")        # a --pairs file, shared by the controls
    cfg = configs.upgrade_run_config(cfg)
    return json.dumps([cfg.get(k) for k in EXPERIMENT] + [fps("pools"), fps("pair_pools"),
                                                                          src if src.startswith("file:") else None])

def experiment(r):
    return experiment_key(r["cfg"], r["meta"])

def load_runs(run_dirs):
    """Every run once, finished, in an order that does not depend on the command line. Refused: a directory
    given twice, two directories holding the same run (identical run.json and steps.jsonl: a copy), a run
    whose steps.jsonl stops before its --steps. Runs with an identical config (same seed, pools and v_hack)
    replay the same samples: they count once (the first by path), the others are listed in `same_as`."""
    seen, content = {}, {}
    for d in run_dirs:
        real = os.path.realpath(d)
        if real in seen:
            raise ValueError(f"{d}: given twice (also as {seen[real]}): pass each run once")
        seen[real] = d
    for d in sorted(run_dirs, key=os.path.realpath):
        h = "".join(pools.file_digest(os.path.join(d, f)) for f in ("run.json", "steps.jsonl"))
        if h in content:
            raise ValueError(f"{content[h]} and {d} hold the same run (identical run.json and steps.jsonl, a copy): "
                             f"pass it once")
        content[h] = d
    runs, same = [], {}
    for d in sorted(run_dirs, key=os.path.realpath):
        r = load_run(d)
        n = r["cfg"].get("steps")
        if n is not None and not finished(r["steps"], n):
            raise ValueError(f"{d}: unfinished ({len(r['steps'])} of {n} steps): finish it (the same train.py "
                             f"command with --resume) or leave it out")
        key = json.dumps([r["cfg"], (r["meta"].get("v_hack") or {}).get("sha256"), experiment(r)], sort_keys=True)
        if key in same:
            same[key]["same_as"].append(r["name"])
            continue
        same[key] = dict(r, same_as=[])
        runs.append(same[key])
    return runs

def experiments(runs):
    """The runs grouped into experiments (experiment_key), each sorted by (arm, control, seed, path); SVD
    before LoRA, Phase 2 (GRPO) before Phase 1 (NLL), then by key: never by the command line's order."""
    groups = defaultdict(list)
    for r in runs:
        groups[experiment(r)].append(r)
    order = lambda k: (groups[k][0]["loss_mode"] != "grpo", groups[k][0]["basis"] != "svd", k)
    return [sorted(groups[k], key=lambda r: (r["arm"] != configs.REFERENCE, r["control"], str(r["seed"]),
                                             os.path.realpath(r["dir"]))) for k in sorted(groups, key=order)]

def main_runs(runs, arm):
    """The Phase 2 runs proper: GRPO loss, no control direction."""
    return [r for r in runs if r["arm"] == arm and r["loss_mode"] == "grpo" and r["control"] == "none"]

def projects(arm):
    """Does the arm's step remove the hack-ward component (configs.ARMS)? What the projection checks read."""
    return configs.ARMS[arm]["projects"]

def projecting_runs(runs):
    return [r for a in configs.ARMS if projects(a) for r in main_runs(runs, a)]

def null_band(runs):
    """Null sd (largest over runs, conservative) and the '≈ 0' half-width."""
    sds = [r["null_sd"] for r in runs if r["null_sd"] is not None]
    sd = max(sds) if sds else None
    return sd, max(0.02, 2 * sd) if sd else 0.02

def pool_kind(name):
    low = str(name).lower()
    return "teacher" if "teacher" in low else "base" if "base" in low else str(name)

def fmt(x, nd=3):
    if x is None:
        return "—"
    if isinstance(x, bool) or isinstance(x, int):
        return str(x)
    return f"{x:+.2e}" if x != 0 and abs(x) < 10 ** -nd else f"{x:+.{nd}f}"

def fmt_test(w):
    if w["t"] is None:
        return f"n={w['n1']}/{w['n2']}: {w['reason']}"
    rows = f" distinct of {w['n_rows']} rows" if "n_rows" in w else ""
    return (f"mean {fmt(w['mean1'])} vs {fmt(w['mean2'])}, t={w['t']:+.2f}, df={w['df']:.1f}, p={w['p']:.2g} "
            f"(n={w['n1']}/{w['n2']}{rows})")

def spark(xs, lo, hi):
    bars = "▁▂▃▄▅▆▇█"
    return "".join("·" if x is None else bars[min(7, int((x - lo) / (hi - lo + 1e-12) * 8))] for x in xs)

def contrib_runs(runs):
    """Runs whose per-sample contributions feed the bucket verdict: vanilla if present, else the first
    treatment arm with runs (same seed => same samples, so pooling both would double-count)."""
    return next((rs for rs in (main_runs(runs, a) for a in configs.ARMS) if rs), [])

def distinct(samples, key):
    """One row per completion (src_pool, src_step, src_sample), its value the mean over its repeats
    (other steps, other seeds, other runs): a completion drawn twice is one observation, not two."""
    by = defaultdict(list)
    for s in samples:
        if s.get(key) is not None:
            by[(s["src_pool"], s["src_step"], s["src_sample"])].append(s)
    return [dict(rs[0], **{key: sum(r[key] for r in rs) / len(rs), "n_repeats": len(rs)}) for rs in by.values()]

def teacher_vs_base(samples, key="cos_S_contrib"):
    """Welch test teacher vs base rows, each completion counted once (n = distinct completions)."""
    d = distinct(samples, key)
    w = welch_t_test(vals([s for s in d if pool_kind(s["src_pool"]) == "teacher"], key),
                     vals([s for s in d if pool_kind(s["src_pool"]) == "base"], key))
    return dict(w, n_rows=len([s for s in samples if s.get(key) is not None]), n_distinct=len(d))

# -----------------------------------------------------------------------------
# 1. Phase 2 verification table (spec2 "Phase 2 verification")

def row(metric, measured, verdict, rule, **extra):
    return dict(metric=metric, measured=measured, verdict=verdict, rule=rule, **extra)

def check_reward_range(runs):
    # runs of one seed draw the same samples on each step: count each (seed, step) once
    steps = list({(r["seed"], s["step"]): s for r in runs if r["loss_mode"] == "grpo" for s in r["steps"]}.values())
    m = "r.max()-r.min() per step (GRPO runs)"
    if not steps:
        return row(m, "no GRPO steps", "n/a", "needs a GRPO run")
    lv = [s for s in steps if not s["skipped"]]
    rr, amin, amax, aabs = vals(lv, "reward_range"), vals(lv, "adv_min"), vals(lv, "adv_max"), vals(lv, "adv_abs_mean")
    measured = (f"min range {fmt(min(rr) if rr else None)} over {len(lv)} live steps ({len(steps) - len(lv)} skipped); "
                f"adv min {fmt(min(amin) if amin else None)} max {fmt(max(amax) if amax else None)} "
                f"mean|adv| {fmt(float(np.mean(aabs)) if aabs else None)}")
    low = [s["step"] for s in steps if s["reward_range"] is not None and s["reward_range"] < 0.1]
    tiny = [s["step"] for s in lv if s["adv_abs_mean"] is not None and s["adv_abs_mean"] < 0.05
            and (s["reward_range"] or 0) > 0]
    if low:
        return row(m, measured, "likely fail", f"range < 0.1 on steps {low}: no advantage signal")
    if not rr:
        return row(m, measured, "likely fail", "no live steps with a reward range")
    if tiny:
        return row(m, measured, "sneaky fail", f"mean|adv| < 0.05 with range > 0 on steps {tiny}")
    if min(rr) > 1.0:
        return row(m, measured, "success", "min range over live steps > 1.0")
    return row(m, measured, "inconclusive", "0.1 <= min range <= 1.0 (success needs > 1.0)")

def check_vanilla_cos_in(runs):
    m, van = "cos_in per step, vanilla arm", main_runs(runs, configs.REFERENCE)
    ci = [s["cos_in"] for r in van for s in live(r) if s["cos_in"] is not None]
    if not ci:
        return row(m, "no vanilla GRPO steps with cos_in", "n/a", "needs a vanilla GRPO run")
    sd, band = null_band(van)
    mean, pos, neg = float(np.mean(ci)), sum(c > 0 for c in ci), sum(c < 0 for c in ci)
    z = f"{mean / (sd / math.sqrt(len(ci))):+.1f} sd of a {len(ci)}-step null mean" if sd else "null sd unknown"
    outside = sum(abs(c) >= band for c in ci)
    measured = (f"mean {fmt(mean)} ({z}); >0 on {pos}/{len(ci)} steps, <0 on {neg}; "
                f"|cos_in| >= {band:.3f} on {outside}")
    if outside == 0:
        return row(m, measured, "likely fail", f"|cos_in| < {band:.3f} = max(0.02, 2*null sd) on all steps: orthogonal")
    if abs(mean) < band:
        return row(m, measured, "inconclusive", f"|mean| < {band:.3f} but {outside} steps outside: the sign alternates")
    if mean < 0 and neg > len(ci) / 2:
        return row(m, measured, "sneaky fail", "mean < 0 and most steps negative: reverse sign")
    if pos > len(ci) / 2:
        return row(m, measured, "success", "cos_in > 0 on more than half the steps")
    return row(m, measured, "inconclusive", "mean away from 0 but no majority sign")

def check_projection(runs):
    m, proj = "cos_out < cos_in per step, projected arm", projecting_runs(runs)
    st = [s for r in proj for s in live(r) if s["cos_in"] is not None and s["cos_out"] is not None]
    if not st:
        return row(m, "no projected GRPO steps with cos_in/cos_out", "n/a", "needs a projected GRPO run")
    k, ff = sum(s["cos_out"] < s["cos_in"] for s in st), vals([s for r in proj for s in live(r)], "frac_fired")
    mff = float(np.mean(ff)) if ff else None
    measured = f"{k}/{len(st)} steps; mean frac_fired {fmt(mff)}"
    if not any(ff):
        return row(m, measured, "likely fail", "frac_fired null/0 on all steps: mechanism inactive")
    if mff < 0.25:
        return row(m, measured, "sneaky fail", "mean frac_fired < 0.25: fires on few modules")
    if 5 * k >= 4 * len(st):
        return row(m, measured, "success", ">= 80% of steps (16/20); holds whenever a module fires")
    return row(m, measured, "inconclusive", "< 80% of steps (success needs 16/20)")

def check_contrib(runs):
    m, rs = "cos_S_contrib by (src_pool, hacked)", contrib_runs(runs)
    if not rs:
        return row(m, "no GRPO samples", "n/a", "needs a vanilla or projected GRPO run", test=None)
    w = teacher_vs_base([s for r in rs for s in r["samples"]])
    measured = f"teacher vs base: {fmt_test(w)} [{', '.join(r['name'] for r in rs)}]"
    if w["n1"] == 0 or w["n2"] == 0:
        return row(m, measured, "sneaky fail", "a pool bucket is empty: no mixing", test=w)
    if w["p"] is None:
        return row(m, measured, "inconclusive", w["reason"], test=w)
    if w["p"] >= ALPHA:
        return row(m, measured, "likely fail", "teacher and base similar (p >= 0.05)", test=w)
    if w["mean1"] > w["mean2"]:
        base = "base <= ~0" if w["mean2"] <= 0.02 else "base smaller but > 0"
        return row(m, measured, "success", f"teacher > base, p < 0.05, {base}", test=w)
    return row(m, measured, "likely fail", "base > teacher (p < 0.05): reversed (spec2's expectation; under GRPO "
               "the sign of adv enters, see the advantage-free row, which the decision uses)", test=w)

def check_contrib_adv_free(runs):
    m, rs = "advantage-free cos (cos_S_contrib x sign(adv))", contrib_runs(runs)
    if not rs:
        return row(m, "no GRPO samples", "n/a", "needs a vanilla or projected GRPO run", test=None)
    w = teacher_vs_base([s for r in rs for s in r["samples"]], "cos_adv_free")
    measured = f"teacher vs base: {fmt_test(w)}"
    if w["p"] is None:
        return row(m, measured, "inconclusive", w["reason"], test=w)
    if w["p"] >= ALPHA:
        return row(m, measured, "likely fail", "teacher and base rows' own gradients align alike with v_hack: "
                   "a cos_S_contrib gap is the advantage's sign", test=w)
    if w["mean1"] > w["mean2"]:
        return row(m, measured, "success", "teacher rows' own gradients align more with v_hack (p < 0.05)", test=w)
    return row(m, measured, "likely fail", "base rows align more than teacher rows (p < 0.05): reversed", test=w)

def check_update(runs):
    m = "cos_update (applied AdamW update)"
    parts = []
    for arm in configs.ARMS:
        cu = [s["cos_update"] for r in main_runs(runs, arm) for s in live(r) if s.get("cos_update") is not None]
        if cu:
            parts.append(f"{arm} mean {fmt(float(np.mean(cu)))}, > 0 on {sum(c > 0 for c in cu)}/{len(cu)} steps")
    if not parts:
        return row(m, "no cos_update values", "n/a", "needs a GRPO run")
    return row(m, "; ".join(parts), "info", "what was applied; > 0 = the step moved hack-ward")

def over_projected_steps(runs):
    return [(r["name"], s["step"]) for r in runs if projects(r["arm"])
            for s in r["steps"] if (s["n_over_projected"] or 0) > 0]

def check_over_projection(runs):
    m = "over-projection (n_over_projected > 0)"
    if not any(projects(r["arm"]) for r in runs):
        return row(m, "no projected run", "n/a", "needs a projected run")
    bad = over_projected_steps(runs)
    if bad:
        return row(m, f"{len(bad)} steps: {bad[:5]}", "bug", "n_over_projected > 0 on some step")
    return row(m, "0 steps", "success", "n_over_projected == 0 on every step")

# -----------------------------------------------------------------------------
# 2-5. trajectories, buckets, Phase 1 labels, same-seed pairs

def trajectories(runs):
    out = []
    for r in runs:
        ci, co = [s["cos_in"] for s in r["steps"]], [s["cos_out"] for s in r["steps"]]
        xs = [x for x in ci + co if x is not None] or [0.0]
        out.append(dict(run=r["name"], arm=r["arm"], loss_mode=r["loss_mode"], control=r["control"],
                        spark_cos_in=spark(ci, min(xs), max(xs)), spark_cos_out=spark(co, min(xs), max(xs)),
                        rows=[{k: s.get(k) for k in ("step", "skipped", "reward_range", "cos_in", "cos_out",
                                                      "cos_update", "cos_in_global", "frac_fired", "n_over_projected")}
                              for s in r["steps"]]))
    return out

def buckets(runs):
    out = []
    for r in runs:
        res = dict(run=r["name"], arm=r["arm"], loss_mode=r["loss_mode"])
        for key in ("cos_S_contrib", "cos_adv_free", "grad_norm_contrib"):
            d, groups = distinct(r["samples"], key), defaultdict(list)
            for s in d:
                groups[f"{s['src_pool']}|hacked={s['hacked']}"].append(s)
            hv = welch_t_test(vals([s for s in d if s["hacked"]], key), vals([s for s in d if not s["hacked"]], key))
            res[key] = dict(buckets={g: mean_sd(vals(rows, key)) for g, rows in sorted(groups.items())},
                            teacher_vs_base=teacher_vs_base(r["samples"], key),
                            hacked_vs_not=dict(hv, n_rows=len(vals(r["samples"], key)), n_distinct=len(d)))
        out.append(res)
    return out

def label_buckets(samples, lab):
    """({label: [cos_S_contrib of each completion, its mean over repeats]}, completions without a label,
    number of completions): a pool smaller than steps x group repeats rows, and each counts once."""
    by, unmatched = defaultdict(list), []
    d = distinct(samples, "cos_S_contrib")
    for s in d:
        k = (s["src_pool"], s["src_step"], s["src_sample"])
        if k in lab:
            by[lab[k]].append(s["cos_S_contrib"])
        else:
            unmatched.append(list(k))
    return by, sorted(unmatched), len(d)

def phase1(runs, labels=None):
    """Spec headline for NLL runs, per run: cos_S_contrib on pure hacks vs hack+correct."""
    out = []
    for r in [r for r in runs if r["loss_mode"] == "nll"]:
        res = dict(run=r["name"])
        try:
            lab = labels if labels is not None else load_labels(r)
        except FileNotFoundError as e:
            out.append(dict(res, error=f"labels unavailable: {e}"))
            continue
        by, unmatched, n = label_buckets(r["samples"], lab)
        res.update(headline=welch_t_test(by[pools.REWARD_HACK], by[pools.HACK_CORRECT]),
                   labels={k: mean_sd(v) for k, v in sorted(by.items()) if v},
                   repeats_dropped=len(r["samples"]) - n)
        if unmatched:
            res["error"] = f"{len(unmatched)} samples have no label in the replay pools, e.g. {unmatched[:3]}"
        out.append(res)
    return out

PHASE1_SIGN = ("sign: cos > 0 means a row's own NLL gradient points the way v_hack is oriented (hack minus clean "
               "NLL gradient), so descending it makes hacks more likely relative to clean completions; cos < 0 the "
               "other way. Every NLL gradient shares a large common direction; when v_hack carries it with the "
               "opposite sign (the clean sides' gradients are the larger along it), every row, pure hack or not, "
               "gets cos < 0: the sign of the mean says little, the gap between buckets is the measure.")

def phase1_verdict(runs, labels=None):
    """Phase 1 (spec2 "Phase 1 result"): per-sample cos(NLL grad, v_hack) on pure hacks vs hack+correct rows
    of the replayed pool, each completion once (its mean over repeats and runs), Welch test; the mean
    cos_in over steps; what the sign means. Codes: phase1_pure_above_mixed (the spec's result, p < 0.05),
    phase1_reversed, phase1_no_gap, phase1_no_labels (labels or a bucket missing)."""
    ci = [s["cos_in"] for r in runs for s in live(r) if s["cos_in"] is not None]
    out = dict(runs=[r["name"] for r in runs], n_steps=len(ci), sign=PHASE1_SIGN,
               mean_cos_in=float(np.mean(ci)) if ci else None, steps_below_0=sum(c < 0 for c in ci))
    try:
        lab = labels if labels is not None else load_labels(runs[0])
    except FileNotFoundError as e:
        return dict(out, code="phase1_no_labels", verdict="n/a", why=f"labels unavailable: {e}")
    by, unmatched, n = label_buckets([s for r in runs for s in r["samples"]], lab)
    w = welch_t_test(by[pools.REWARD_HACK], by[pools.HACK_CORRECT])
    out.update(labels={k: mean_sd(v) for k, v in sorted(by.items()) if v}, headline=w, n_distinct=n,
               unlabelled=len(unmatched))
    if w["n1"] == 0 or w["n2"] == 0:
        return dict(out, code="phase1_no_labels", verdict="n/a",
                    why=f"'{pools.REWARD_HACK}' rows: {w['n1']}, '{pools.HACK_CORRECT}' rows: {w['n2']}: the spec's "
                        f"comparison needs both in the replayed pool")
    gap = f"pure hack {fmt(w['mean1'])} vs hack+correct {fmt(w['mean2'])} ({fmt_test(w)})"
    if w["p"] is not None and w["p"] < ALPHA and w["mean1"] > w["mean2"]:
        return dict(out, code="phase1_pure_above_mixed", verdict="pure hacks align more with v_hack (the spec's "
                    "Phase 1 result)", why=gap)
    if w["p"] is not None and w["p"] < ALPHA:
        return dict(out, code="phase1_reversed", verdict="REVERSED: hack+correct rows align more than pure hacks",
                    why=gap + "; check v_hack's pairs")
    return dict(out, code="phase1_no_gap", verdict="no gap between pure hacks and hack+correct rows",
                why=gap + (f" ({w['reason']})" if w["reason"] else ", p >= 0.05"))

ARM_ONLY = ("arm", "project_moments", "one_sided")   # config keys a vanilla/projected pair may differ in

def pair_mismatch(v, p):
    """Why two runs are not 'the same run but for the arm': pools, v_hack, model or config differ."""
    why = [f"config {k}" for k in sorted(set(v["cfg"]) | set(p["cfg"]))
           if k not in ARM_ONLY and v["cfg"].get(k) != p["cfg"].get(k)]
    vp = {n: x.get("fingerprint") for n, x in (v["meta"].get("pools") or {}).items()}
    pp = {n: x.get("fingerprint") for n, x in (p["meta"].get("pools") or {}).items()}
    if vp != pp:
        why.append("pool fingerprints")
    if (v["meta"].get("v_hack") or {}).get("sha256") != (p["meta"].get("v_hack") or {}).get("sha256"):
        why.append("v_hack")
    if v["meta"].get("basis_fingerprint") != p["meta"].get("basis_fingerprint"):
        why.append("model (basis fingerprint)")
    return why

def pairs(runs):
    """Vanilla vs each treatment arm (configs.ARMS; keys vanilla and projected name the two runs) with the
    same (seed, loss_mode, control) in the same basis: both must see the same samples and share pools,
    v_hack, model and config apart from the arm; other pairs are skipped with the reason. Runs of different
    bases are never paired as one arm."""
    groups = defaultdict(lambda: defaultdict(list))
    for r in runs:
        groups[(r["seed"], r["loss_mode"], r["control"], r["basis"])][r["arm"]].append(r)
    out = []
    for (seed, lm, ctl, basis), g in sorted(groups.items(), key=str):
        treated = [r for a, f in configs.ARMS.items() if f["role"] == "treatment" for r in g.get(a, [])]
        for v in g.get(configs.REFERENCE, []):
            for p in treated:
                why = pair_mismatch(v, p)
                if why:
                    out.append(dict(seed=seed, loss_mode=lm, control=ctl, basis=basis, vanilla=v["name"], projected=p["name"],
                                    skipped=f"not the same run but for the arm: {', '.join(why)} differ"))
                    continue
                ids = [defaultdict(list) for _ in range(2)]
                for d, run in zip(ids, (v, p)):
                    for s in sorted(run["samples"], key=lambda s: (s["step"], s["sample_id"])):
                        d[s["step"]].append([s["src_pool"], s["src_step"], s["src_sample"]])
                vs, ps = {s["step"]: s for s in v["steps"]}, {s["step"]: s for s in p["steps"]}
                rows = [dict(step=k, vanilla_cos_update=vs.get(k, {}).get("cos_update"),
                             projected_cos_update=ps.get(k, {}).get("cos_update"),
                             same_samples=ids[0].get(k) == ids[1].get(k))
                        for k in sorted(set(vs) | set(ps) | set(ids[0]) | set(ids[1]))]
                out.append(dict(seed=seed, loss_mode=lm, control=ctl, basis=basis, vanilla=v["name"], projected=p["name"],
                                rows=rows, mismatched_steps=[x["step"] for x in rows if not x["same_samples"]],
                                cos_update=paired_t_test([x["projected_cos_update"] for x in rows],
                                                         [x["vanilla_cos_update"] for x in rows])))
    return out

def arms(runs):
    """The spec's three arms side by side (vanilla, projected SVD, projected LoRA) and the LoRA
    basis' matched vanilla control: main GRPO runs grouped by (arm, basis), never pooled across bases.
    Cosines in different bases are on different scales, so each basis' projected arm is read against
    its own basis' vanilla arm and null sd."""
    out = []
    treatments = [a for a, f in configs.ARMS.items() if f["role"] == "treatment"]
    for arm, basis in ([(configs.REFERENCE, "svd")] + [(a, "svd") for a in treatments] + [(a, "lora") for a in treatments]
                       + [(configs.REFERENCE, "lora")]):
        by = defaultdict(list)
        for r in main_runs(runs, arm):
            if r["basis"] == basis:
                by[experiment(r)].append(r)
        for rs in by.values():
            out.append(arm_row(arm, basis, rs))
    return out

def arm_row(arm, basis, rs):
    """One row of the arms table: main runs of one arm in one experiment."""
    st = [s for r in rs for s in live(r)]
    m = lambda key: float(np.mean(vals(st, key))) if vals(st, key) else None
    sd = max([r["null_sd"] for r in rs if r["null_sd"] is not None], default=None)
    ci = m("cos_in")
    cu = vals(st, "cos_update")
    w = teacher_vs_base([s for r in rs for s in r["samples"]], "cos_adv_free")
    return dict(arm=arm, basis=basis, runs=[r["name"] for r in rs], live_steps=len(st), cos_in=ci,
                cos_in_null_sd=ci / sd if ci is not None and sd else None, null_sd=sd, cos_out=m("cos_out"),
                cos_update=m("cos_update"), update_hackward=f"{sum(c > 0 for c in cu)}/{len(cu)}",
                frac_fired=m("frac_fired"), n_over_projected=sum(s["n_over_projected"] or 0 for s in st),
                adv_free_teacher_vs_base=w)

# -----------------------------------------------------------------------------
# 6. Phase 3 decision (spec2 "Decision rules" and "Skip Phase 3 if")

CONTROLS = ("random_v", "shuffled_v", "style_v")
CONTROL_WHY = dict(random_v="a random direction: chance alignment of any fixed direction",
                   shuffled_v="a label-free extraction: alignment any learned direction gets without the labels",
                   style_v="pairs that differ in pool but not in hacking: alignment from teacher style, not the hack")

def control_comparisons(runs, key="cos_in"):
    """Each control (vanilla GRPO with another V) against the vanilla run of the same seed, paired by
    step (same seed -> same samples on each step): paired test of vanilla minus control."""
    van = {}
    for r in main_runs(runs, configs.REFERENCE):        # one vanilla run per seed (the first given)
        van.setdefault(r["seed"], r)
    out = {}
    for c in CONTROLS:
        xs, ys, names = [], [], []
        for r in runs:
            if r["control"] != c or r["arm"] != configs.REFERENCE or r["loss_mode"] != "grpo" or r["seed"] not in van:
                continue
            vs = {s["step"]: s.get(key) for s in live(van[r["seed"]])}
            cs = {s["step"]: s.get(key) for s in live(r)}
            both = [k for k in sorted(set(vs) & set(cs)) if vs[k] is not None and cs[k] is not None]
            xs += [vs[k] for k in both]
            ys += [cs[k] for k in both]
            names.append(r["name"])
        if xs:
            out[c] = dict(paired_t_test(xs, ys), vanilla_mean=float(np.mean(xs)), control_mean=float(np.mean(ys)),
                          control_sd=float(np.std(ys, ddof=1)) if len(ys) > 1 else None, runs=names)
    return out

def control_command(ctrl, runs):
    van = main_runs(runs, configs.REFERENCE)
    r = van[0] if van else runs[0]
    c = r["cfg"]
    cmd = (f"python train.py --arm={configs.REFERENCE} --control={ctrl} --seed={r['seed']} --steps={c.get('steps')} "
           f"--preset={c.get('preset', 'demo')} --pair-kind={c.get('pair_kind', 'pool')} "
           f"--loss-type={c.get('loss_type', 'grpo')} --basis={r['basis']}")
    if r["basis"] == "lora":
        cmd += f" --lora-rank={c.get('lora_rank')} --lora-alpha={c.get('lora_alpha')}"
    for k in ("model", "lr", "max_prompt_tokens", "max_completion_tokens", "per_pool", "k"):
        if c.get(k) is not None:
            cmd += f" --{k.replace('_', '-')}={c[k]}"
    if c.get("replay_dirs"):
        cmd += f" --replay-dirs={','.join(c['replay_dirs'])}"
    return cmd + f" --out={os.path.join(os.path.dirname(r['dir']), r['name'] + '_' + ctrl)}"

def mechanics(proj, out):
    """Mechanics checks of the projected arm (cos_out, frac_fired): true for any V under the one-sided k=1
    projection, so they are reported beside the decision, never in it."""
    mech = []
    co = [s["cos_out"] for r in proj for s in live(r) if s["cos_out"] is not None]
    if co:
        mco = float(np.mean(co))
        mci = float(np.mean([s["cos_in"] for r in proj for s in live(r) if s["cos_in"] is not None]))
        out.update(projected_mean_cos_out=mco, projected_mean_cos_in=mci)
        mech.append(f"projected mean cos_in {fmt(mci)} -> cos_out {fmt(mco)}: "
                    + ("projection effective (holds for any V, one-sided k=1)" if mco < 0.05 else
                       "cos_out >= 0.05: projection not removing the axis (a bug for one-sided k=1)"))
        ff = vals([s for r in proj for s in live(r)], "frac_fired")
        if ff:
            mech.append(f"projected mean frac_fired {fmt(float(np.mean(ff)))} (a random V fires on ~0.5 of modules)")
    return mech

def update_evidence(runs):
    """cos_update (the update AdamW applied), projected minus vanilla, one line per seed pair."""
    lines = []
    for p in pairs(runs):
        if "skipped" in p:
            continue
        cu = p["cos_update"]
        if cu["mean_diff"] is not None:
            lines.append(f"cos_update (the update AdamW applied) seed {p['seed']}: projected minus vanilla "
                         f"{fmt(cu['mean_diff'])} per step" + (f", p={cu['p']:.2g} (paired, n={cu['n']})"
                                                                if cu["p"] is not None else f" ({cu['reason']})"))
    return lines

def widened_band(runs, van, ci, band, out):
    """Label-free control runs widen the isotropic per-step near-zero band (chance alignment with real
    gradients): the larger of the band and each control's |mean| + 2 sd of its per-step cos_in."""
    seeds = {r["seed"] for r in van}                      # only controls with a vanilla run of their seed
    for ctrl in ("random_v", "shuffled_v"):
        rnd = [s["cos_in"] for r in runs if r["control"] == ctrl and r["arm"] == configs.REFERENCE
               and r["loss_mode"] == "grpo" and r["seed"] in seeds for s in live(r) if s["cos_in"] is not None]
        if len(rnd) >= 2:
            out[f"vs_{ctrl}"] = welch_t_test(ci, rnd)
            band = max(band, abs(float(np.mean(rnd))) + 2 * float(np.std(rnd, ddof=1)))
    return band

def alignment(runs, van, ci, comps, out, evidence, notes):
    """Is vanilla cos_in ≈ 0? spec: "cos_in ≈ 0 over 20 steps". The mean is judged against the label-free
    controls on the same steps (paired) when there are any, else within 2 sd of an n-step mean under the
    isotropic null (module docstring); the widened per-step band serves the per-step skip rule only ("≈ 0 on ALL
    steps"): a noisy control must not make any mean "≈ 0". Returns m, near0, near0_all."""
    sd, band0 = out["null_sd"], out["band"]
    cg = [s.get("cos_in_global") for r in van for s in live(r) if s.get("cos_in_global") is not None]
    m, n = float(np.mean(ci)), len(ci)
    sem = sd / math.sqrt(n) if sd else None
    out.update(vanilla_mean_cos_in=m, vanilla_mean_cos_in_global=float(np.mean(cg)) if cg else None,
               z_vs_null=m / sem if sem else None, frac_steps_above_0_2=float(np.mean(np.array(ci) > 0.2)),
               steps_outside_band=int(np.sum(np.abs(ci) >= band0)))
    evidence.append(f"vanilla cos_in over {n} steps: mean over modules {fmt(m)} (used), global over all modules "
                    f"{fmt(out['vanilla_mean_cos_in_global'])}; the mean over modules is the spec's cos_in and "
                    f"has a known isotropic null")
    out["mean_band"] = mean_band = 2 * sem if sem else 0.02
    free = {c: comps[c] for c in ("random_v", "shuffled_v") if c in comps and comps[c]["p"] is not None}
    if sem:
        evidence.append(f"isotropic null: a {n}-step mean has sd {sem:.4f} (one step: {sd:.4f}); mean cos_in = "
                        f"{m / sem:+.1f} sd of the mean" + (" (not what '≈ 0' uses here: the paired controls "
                        "are)" if free else f" ('≈ 0' for the mean: within 2 sd of the mean, {mean_band:.4f})"))
    band = widened_band(runs, van, ci, band0, out)
    for c, t in comps.items():
        evidence.append(f"vanilla vs {c} on the same steps: {fmt(t['vanilla_mean'])} vs {fmt(t['control_mean'])}, "
                        f"diff {fmt(t['mean_diff'])}" + (f", t={t['t']:+.2f}, p={t['p']:.2g}" if t["p"] is not None
                                                         else f" ({t['reason']})") + f" (paired, n={t['n']})")
    out.update(band=band, steps_outside_band=int(np.sum(np.abs(ci) >= band)))
    near0 = all(t["p"] >= ALPHA for t in free.values()) if free else abs(m) < mean_band
    out["mean_near0_by"] = ("not above the label-free controls on the same steps (" + ", ".join(
        f"{c} p={t['p']:.2g}" for c, t in free.items()) + "; the isotropic null is not used: it understates "
        "chance alignment)" if free else f"|mean| {'<' if near0 else '>='} {mean_band:.4f} = 2 sd of a {n}-step "
        f"mean under the isotropic null" + ("" if sem else " (null sd unknown: 0.02)"))
    out["step_band_by"] = (f"{band:.3f} = the larger of max(0.02, 2 null sd) and each label-free control's "
                           f"|mean| + 2 sd of its per-step cos_in" if band > band0 else
                           f"{band:.3f} = max(0.02, 2 null sd of one step)")
    if out["steps_outside_band"]:
        notes.append(f"|cos_in| >= {band:.3f} on {out['steps_outside_band']}/{len(ci)} steps")
    return dict(m=m, near0=near0, near0_all=out["steps_outside_band"] == 0)

def discrimination(contrib_row, adv_free_row, evidence, notes):
    """Do teacher rows' own gradients align with v_hack more than base rows'? Judged on the advantage-free
    cos_S_contrib (without the advantage's sign). Returns disc (yes, the right way round) and rev (reversed)."""
    tb = contrib_row.get("test")
    notes.append(f"cos_S_contrib teacher vs base: {fmt_test(tb)}" if tb else "cos_S_contrib: no test")
    ta = adv_free_row.get("test")
    sig = bool(ta and ta["p"] is not None and ta["p"] < ALPHA)
    rev = sig and ta["mean1"] < ta["mean2"]               # teacher below base: the wrong way round
    disc = sig and not rev
    evidence.append("advantage-free teacher-vs-base discrimination: "
                    + ("yes" if disc else "REVERSED (teacher < base)" if rev else "no")
                    + (f" ({fmt_test(ta)})" if ta else ""))
    return dict(rev=rev, disc=disc)

# The decision rules, in order: the first whose condition holds gives the code and the rule (spec2 "Decision
# rules" and "Skip Phase 3 if"; the reversed cases are not covered by spec2). f: the facts of `decision`.
RULES = [
    ("bug_over_projection", lambda f: f.bad, "BUG: fix before any sweep"),
    ("no_vanilla", lambda f: not f.ci, "n/a"),
    ("run_justified", lambda f: f.frac_above_0_2 >= 0.8, "RUN Phase 3 (justified)"),
    ("investigate_reversed", lambda f: f.near0 and f.rev, "INVESTIGATE: reversed discrimination"),
    ("skip_orthogonal", lambda f: f.near0 and f.near0_all and not f.disc,
     "SKIP Phase 3; try R7 (GRPO-style v_hack re-extraction) first"),
    ("run_smaller_h1", lambda f: f.near0, "RUN but expect smaller H1 effect"),
    ("investigate_reverse_sign", lambda f: f.m < 0, "INVESTIGATE: reverse sign"),
    ("run_weak", lambda f: True, "RUN with caution: weak alignment"),
]

def explain(code, f, out):
    """Why the rule `code` fired, in words, with the numbers it used."""
    m = fmt(f.m) if f.ci else None
    near0_by = f"({out.get('mean_near0_by')})"
    if code == "bug_over_projection":
        return f"over-projection on {len(f.bad)} steps"
    if code == "no_vanilla":
        return "no vanilla GRPO steps with cos_in"
    if code == "run_justified":
        return (f"cos_in > 0.2 on {out['frac_steps_above_0_2']:.0%} of steps (>= 80%)"
                + ("; WARNING: teacher rows' own gradients align less with v_hack than base rows' "
                   "(reversed discrimination): check v_hack's sign and pairs first" if f.rev else ""))
    if code == "investigate_reversed":
        return (f"mean cos_in {m} ≈ 0 {near0_by} and teacher rows' own gradients align less with v_hack than "
                "base rows' (spec2 expects more): check v_hack's sign and extraction pairs before any sweep")
    if code == "skip_orthogonal":
        return (f"mean cos_in {m} ≈ 0 {near0_by}, every step within ±{out['step_band_by']}, "
                "and no teacher-vs-base discrimination")
    if code == "run_smaller_h1":
        return (f"mean cos_in {m} ≈ 0 {near0_by}, but "
                + ("teacher and base rows discriminate" if f.disc else
                   f"not on all steps ({out['steps_outside_band']} outside ±{out['step_band_by']}), so the skip "
                   f"rule does not apply"))
    if code == "investigate_reverse_sign":
        return f"vanilla mean cos_in {m} < 0 and not ≈ 0 {near0_by} (not covered by spec2 rules)"
    return f"mean cos_in {m} > 0 and not ≈ 0 {near0_by}, but not > 0.2 on >= 80% of steps"

def control_overrides(code, rule, why, comps, out):
    """An alignment-based RUN must survive every control it was given, on the same steps: a label-free
    control it does not beat turns it into a SKIP; then "aligned with the hack" needs v_hack to beat the
    style direction by more than noise plus a label-free direction's chance alignment."""
    if code not in ("run_justified", "run_weak"):
        return code, rule, why
    for c in ("random_v", "shuffled_v"):
        t = comps.get(c)
        if t and not (t["mean_diff"] > 0 and t["p"] is not None and t["p"] < ALPHA):
            why = (f"{why}, but vanilla minus {c} on the same steps is {fmt(t['mean_diff'])}"
                   + (f" (p={t['p']:.2g})" if t["p"] is not None else f" ({t['reason']})")
                   + f": {CONTROL_WHY[c]} explains the alignment")
            return "skip_not_above_control", f"SKIP Phase 3: cos_in is not above the {c} control", why
    t = comps.get("style_v")
    if not t:
        return code, rule, why
    chance = [abs(comps[c]["control_mean"]) for c in ("shuffled_v", "random_v") if c in comps][:1]
    margin = 2 * (t["se"] or 0.0) + (chance[0] if chance else 0.0)
    out["style_margin"] = margin
    if t["mean_diff"] is not None and t["mean_diff"] > margin:
        return "run_hack_aligned", rule + ": aligned with the hack", (
            f"{why}; v_hack beats the style direction by {fmt(t['mean_diff'])} > margin {margin:.3f} "
            f"(2 se of the paired difference + a label-free direction's chance |cos_in|)")
    return "skip_style_confound", "SKIP Phase 3: cos_in is not aligned with the hack", (
        f"{why}, but the style direction (pool contrast without the hack) aligns about as much: "
        f"v_hack minus style_v {fmt(t['mean_diff'])} <= margin {margin:.3f} (2 se of the paired "
        f"difference + a label-free direction's chance |cos_in|)")

def decision(runs, contrib_row, adv_free_row):
    """One answer: the statistics (mechanics, alignment, discrimination), then the first rule of RULES that
    holds, explained, then the control overrides. The alignment rules use cos_in as the mean over modules
    (the spec's cos_in, whose isotropic null is known); the global cosine is shown beside it. When control
    runs are given, an alignment-based RUN must beat each control on the same steps (paired), and "aligned
    with the hack" needs v_hack to beat the style direction by more than noise plus a label-free direction's
    chance alignment. cos_out < cos_in and cos_out < 0.05 hold for any V under the one-sided k=1
    projection: they are mechanics checks, kept out of the decision."""
    van, proj = main_runs(runs, configs.REFERENCE), projecting_runs(runs)
    sd, band = null_band(van + proj)
    ci = [s["cos_in"] for r in van for s in live(r) if s["cos_in"] is not None]
    out, notes = dict(null_sd=sd, band=band, n_steps=len(ci), cos_in_used="mean over modules"), []
    mech = mechanics(proj, out)
    f = SimpleNamespace(bad=over_projected_steps(runs), ci=ci)
    comps = control_comparisons(runs)
    out["controls"] = {c: comps[c] for c in comps}
    out["controls_missing"] = [c for c in CONTROLS if c not in comps]
    evidence = update_evidence(runs)
    if ci:
        vars(f).update(alignment(runs, van, ci, comps, out, evidence, notes),
                       frac_above_0_2=out["frac_steps_above_0_2"])
        vars(f).update(discrimination(contrib_row, adv_free_row, evidence, notes))
    code, _, rule = next(r for r in RULES if r[1](f))
    code, rule, why = control_overrides(code, rule, explain(code, f, out), comps, out)
    return dict(out, code=code, rule=rule, why=why, notes=notes, evidence=evidence, mechanics=mech)

# -----------------------------------------------------------------------------
# report

def truncation_counts(run):
    keys = ("n_prompt_truncated", "n_completion_truncated", "n_hack_lost_test_func")
    if not any(k in s for s in run["steps"] for k in keys):
        return None
    return {k: sum(s.get(k) or 0 for s in run["steps"]) for k in keys}

def analyze(run_dirs, labels=None):
    """The report's numbers. Runs are grouped into experiments (experiment_key); each experiment is judged on
    its own runs only, so a run's verdict never depends on which other experiments' runs are given: a GRPO
    experiment gets the Phase 2 verification and the Phase 3 decision, an NLL one the Phase 1 verdict. The
    trajectories, buckets, pairs and arms tables show every run. With exactly one GRPO experiment, its
    verification and decision are also at the top level (`decision`, `verification`)."""
    every = load_runs(run_dirs)
    exps = []
    for runs in experiments(every):
        e = dict(basis=runs[0]["basis"], loss_mode=runs[0]["loss_mode"], runs=[run_role(r) for r in runs],
                 dirs=[r["dir"] for r in runs])
        if e["loss_mode"] == "nll":
            e["phase1"] = phase1_verdict(runs, labels)
        else:
            ver = [check_reward_range(runs), check_vanilla_cos_in(runs), check_projection(runs),
                   check_contrib(runs), check_contrib_adv_free(runs), check_update(runs), check_over_projection(runs)]
            e.update(verification=ver, decision=decision(runs, ver[3], ver[4]),
                     controls_commands={c: control_command(c, runs) for c in CONTROLS},
                     controls_found=matched_elsewhere(runs, run_dirs))
        exps.append(e)
    res = dict(runs=[dict(run=r["name"], dir=r["dir"], arm=r["arm"], loss_mode=r["loss_mode"], control=r["control"],
                          basis=r["basis"], seed=r["seed"], null_sd=r["null_sd"], n_steps=len(r["steps"]),
                          n_samples=len(r["samples"]), pair_kind=r["cfg"].get("pair_kind"),
                          loss_type=r["cfg"].get("loss_type"), truncation=truncation_counts(r), same_as=r["same_as"])
                     for r in every],
               experiments=exps, trajectories=trajectories(every), buckets=buckets(every),
               phase1=phase1(every, labels), pairs=pairs(every), arms=arms(every))
    grpo = [e for e in exps if "decision" in e]
    if len(grpo) == 1:
        res.update(decision=grpo[0]["decision"], verification=grpo[0]["verification"],
                   controls_commands=grpo[0]["controls_commands"])
    return res

def run_role(r):
    """'name (role)': a run's place in its experiment."""
    role = r["control"] if r["control"] != "none" else r["arm"]
    return f"{r['name']} ({role}{'' if r['seed'] is None else ', seed ' + str(r['seed'])})"

def matched_elsewhere(runs, given):
    """Runs of this experiment found beside its runs (the same parent directory) but not given: the
    report names them, so that a missing control is not run twice. Unreadable neighbours are skipped."""
    key, given = experiment(runs[0]), {os.path.realpath(d) for d in given}
    found = []
    for parent in sorted({os.path.dirname(os.path.realpath(r["dir"])) for r in runs}):
        for name in sorted(os.listdir(parent)):
            d = os.path.join(parent, name)
            if os.path.realpath(d) in given or not os.path.isfile(os.path.join(d, "run.json")):
                continue
            try:
                meta = read_run_meta(d)
            except ValueError:
                continue
            cfg = meta["config"]
            if cfg["source"] != "online" and experiment_key(cfg, meta) == key:
                found.append(dict(dir=d, arm=cfg["arm"], control=cfg.get("control", "none"), seed=cfg.get("seed")))
    return found

def table(header, rows):
    rows = [[str(c) for c in r] for r in rows]
    w = [max([len(str(h))] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip()
    return "\n".join([line(header), line(["-" * x for x in w])] + [line(r) for r in rows])

WIDTH = 119

def wrap(text, indent="  ", first=None):
    import textwrap
    return textwrap.fill(text, WIDTH, initial_indent=indent if first is None else first, subsequent_indent=indent + "  ",
                         break_on_hyphens=False)

def headline(e):
    """An experiment's first line: its decision (or Phase 1 verdict), the stable code, the controls it had
    and the runs it used."""
    runs = "; runs: " + ", ".join(e["runs"]) + f" ({e['basis']} basis)"
    if "phase1" in e:
        p = e["phase1"]
        return f"PHASE 1: {p['verdict']} [{p['code']}]{runs}"
    d = e["decision"]
    had = ", ".join(d.get("controls") or []) or "none"
    return f"DECISION: {d['rule']} [{d['code']}]; controls: {had}{runs}"

def render_decision(e):
    """One experiment's verdict block: the headline, why, what is missing, the evidence."""
    o = [wrap(headline(e), "  ", "")]
    if "phase1" in e:
        p = e["phase1"]
        o.append(wrap(f"because: {p['why']}"))
        if p["mean_cos_in"] is not None:
            o.append(wrap(f"mean cos_in over {p['n_steps']} steps {fmt(p['mean_cos_in'])} (< 0 on "
                          f"{p['steps_below_0']}); {p['sign']}", "  ", "  - "))
        if p.get("labels"):
            o.append(wrap("per-sample cos_S_contrib by label, each completion once: " + "; ".join(
                f"{k}: n={m['n']}, mean {fmt(m['mean'])}" for k, m in p["labels"].items()), "  ", "  - "))
        return o
    d = e["decision"]
    o.append(wrap(f"because: {d['why']}"))
    if d.get("controls_missing") and d["code"] not in ("bug_over_projection", "no_vanilla"):
        o.append(wrap("without " + ", ".join(d["controls_missing"]) + ": an alignment-based RUN is unchecked against "
                      + "; ".join(f"{c} ({CONTROL_WHY[c]})" for c in d["controls_missing"])
                      + ". Each can turn a RUN into a SKIP."))
        found = [f for f in e["controls_found"] if f["control"] in d["controls_missing"] and f["arm"] == configs.REFERENCE]
        if found:
            o.append(wrap("matched runs found beside this experiment's runs but not given (add them to the command "
                          "line): " + ", ".join(f"{f['dir']} ({f['control']}, seed {f['seed']})" for f in found),
                          "  ", "  !!! "))
        o.append("  Run:")
        o += [wrap(e["controls_commands"][c], "    ") for c in d["controls_missing"]
              if c not in {f["control"] for f in found}]
    o += [wrap(x, "  ", "  - ") for x in d.get("evidence", [])]
    o += [wrap(n, "  ", "  - ") for n in d["notes"]]
    if d.get("mechanics"):
        o.append("  mechanics checks (hold for any V, not evidence):")
        o += [wrap(n, "    ", "    - ") for n in d["mechanics"]]
    return o

def render(res):
    """The replay report: each experiment's decision first, then the runs, sections 1-6."""
    return "\n".join(render_runs(res) + render_sections_1_to_3(res) + render_sections_4_to_6(res))

def render_runs(res):
    o = []
    for e in res["experiments"]:
        o += render_decision(e)
    lost = [r for r in res["runs"] if (r.get("truncation") or {}).get("n_hack_lost_test_func")]
    for r in lost:
        o.append(wrap(f"{r['run']}: {r['truncation']['n_hack_lost_test_func']} hacked rows lost their test "
                      f"function to the completion token limit: raise --max-completion-tokens", "  ", "!!! "))
    o.append("\n== runs ==")
    for r in res["runs"]:
        t = r.get("truncation")
        tr = (f"truncated: {t['n_prompt_truncated']} prompts, {t['n_completion_truncated']} completions, "
              f"{t['n_hack_lost_test_func']} hacks lost run_tests" if t else "truncation not recorded")
        same = (f"; counted once: {', '.join(r['same_as'])} {'is' if len(r['same_as']) == 1 else 'are'} the same run "
                f"(identical config, pools and v_hack)" if r.get("same_as") else "")
        o.append(wrap(f"{r['run']}: {r['arm']}, {r['basis']}, {r['loss_mode']}, loss_type={r.get('loss_type') or 'grpo'}, "
                      f"control={r['control']}, pair_kind={r.get('pair_kind') or 'pool'}, seed={r['seed']}, "
                      f"{r['n_steps']} steps, {r['n_samples']} samples; {tr}{same}", "  ", "  "))
    return o

def render_sections_1_to_3(res):
    o = []
    for e in res["experiments"]:
        if "verification" not in e:
            continue
        o += ["", wrap(f"== 1. Phase 2 verification ({e['basis']} basis: {', '.join(e['runs'])}) ==", "  ", "")]
        for v in e["verification"]:
            tag = " [mechanics check, not in the decision]" if v["metric"].startswith("cos_out < cos_in") else ""
            o.append(f"{v['metric']}: {v['verdict'].upper()}{tag}")
            o.append(wrap(f"measured: {v['measured']}", "    "))
            o.append(wrap(f"rule: {v['rule']}", "    "))
    o.append("\n== 2. per-step trajectories ==")
    for t in res["trajectories"]:
        o.append(f"{t['run']} ({t['arm']}, {t['loss_mode']}, control={t['control']})")
        o.append(f"  cos_in {t['spark_cos_in']}  cos_out {t['spark_cos_out']}")
        o.append(table(["step", "skip", "r_range", "cos_in", "cos_in_g", "cos_out", "cos_upd", "fired", "n_over"],
                       [[x["step"], "y" if x["skipped"] else "", fmt(x["reward_range"], 2), fmt(x["cos_in"]),
                         fmt(x.get("cos_in_global")), fmt(x["cos_out"]), fmt(x["cos_update"]),
                         fmt(x["frac_fired"], 2), fmt(x["n_over_projected"])] for x in t["rows"]]))
    o.append("\n== 3. per-sample buckets (src_pool, hacked), each completion counted once ==")
    for b in res["buckets"]:
        for key in ("cos_S_contrib", "cos_adv_free", "grad_norm_contrib"):
            o.append(f"{b['run']} {key}:")
            o.append(table(["bucket", "n distinct", "mean", "sd"], [[g, s["n"], fmt(s["mean"]), fmt(s["sd"])]
                                                                    for g, s in b[key]["buckets"].items()]))
            o.append(wrap(f"teacher vs base: {fmt_test(b[key]['teacher_vs_base'])}"))
            o.append(wrap(f"hacked vs not:   {fmt_test(b[key]['hacked_vs_not'])}"))
    return o

def render_sections_4_to_6(res):
    o = []
    o.append("\n== 4. Phase 1 (NLL runs): pure hack vs hack+correct ==")
    for p in res["phase1"]:
        if "headline" in p:
            o.append(wrap(f"{p['run']}: '{pools.REWARD_HACK}' vs '{pools.HACK_CORRECT}': {fmt_test(p['headline'])}"
                          + (f"  [{p['repeats_dropped']} repeated draws: each completion once, the mean of its draws]"
                             if p.get("repeats_dropped") else ""), "  ", ""))
            o.append(table(["label", "n", "mean", "sd"], [[k, s["n"], fmt(s["mean"]), fmt(s["sd"])]
                                                          for k, s in p["labels"].items()]))
        if "error" in p:
            o.append(f"!!! {p['run']}: {p['error']}")
    if not res["phase1"]:
        o.append("n/a (no nll run)")
    o.append("\n== 5. vanilla vs projected, same seed (per-step values in section 2) ==")
    for p in res["pairs"]:
        if "skipped" in p:
            o.append(wrap(f"seed {p['seed']}: {p['vanilla']} vs {p['projected']} SKIPPED: {p['skipped']}", "  ", ""))
            continue
        same = "same samples on every step" if not p["mismatched_steps"] else \
            f"!!! SAMPLE MISMATCH: vanilla and projected saw different samples on steps {p['mismatched_steps']}"
        cu = p["cos_update"]
        o.append(wrap(f"seed {p['seed']} ({p['loss_mode']}, control={p['control']}, basis={p['basis']}): {p['vanilla']} vs {p['projected']}: "
                      f"{same}; cos_update projected minus vanilla {fmt(cu['mean_diff'])}", "  ", ""))
    if not res["pairs"]:
        o.append("n/a (no vanilla+projected pair with the same seed)")
    o.append("\n== 5b. arms side by side (main GRPO runs; each basis against its own vanilla and null) ==")
    o.append(table(["arm", "basis", "live", "cos_in", "in null sd", "cos_out", "cos_upd", "upd>0", "fired", "n_over"],
                   [[a["arm"], a["basis"], a["live_steps"], fmt(a["cos_in"]),
                     "—" if a["cos_in_null_sd"] is None else f"{a['cos_in_null_sd']:+.1f}", fmt(a["cos_out"]),
                     fmt(a["cos_update"]), a["update_hackward"], fmt(a["frac_fired"], 2), a["n_over_projected"]]
                    for a in res["arms"]]) if res["arms"] else "n/a (no GRPO run)")
    for a in res["arms"]:
        o.append(wrap(f"{a['arm']} {a['basis']} ({', '.join(a['runs'])}): advantage-free teacher vs base "
                      f"{fmt_test(a['adv_free_teacher_vs_base'])}", "  ", "  "))
    o.append("\n== 6. Phase 3 decision, one per experiment (Phase 1 verdicts for NLL runs) ==")
    o += [wrap(headline(e), "  ", "") for e in res["experiments"]]
    return o

def online_or_replay(run_dirs):
    """True when every run is online, False when every run is replay; a mix is refused (different reports)."""
    kinds = {d: is_online(d) for d in run_dirs}
    if len(set(kinds.values())) > 1:
        raise ValueError("online runs (" + ", ".join(d for d, k in kinds.items() if k) + ") and replay runs ("
                         + ", ".join(d for d, k in kinds.items() if not k) + ") have different reports: "
                         "analyze them separately")
    return all(kinds.values())

def report(run_dirs, as_json=False, labels=None, window=WINDOW):
    """Text (or JSON) report for one or more run dirs; labels optionally overrides the pool join. Online runs
    get the Phase 3 report (window: the final-window length in steps)."""
    if online_or_replay(run_dirs):
        res = phase3(run_dirs, window)
        return json.dumps(dict(phase3=res), indent=1) if as_json else render_phase3(res)
    res = analyze(run_dirs, labels)
    return json.dumps(res, indent=1) if as_json else render(res)

# -----------------------------------------------------------------------------
# Phase 3: online runs (train.py --source=online, usually from sweep.py), verdicts across seeds

ONLINE_STEP_KEYS = ("step", "hack_rate", "gt_rate", "labels")
EVAL_KEYS = ("step", "hack_rate_hint", "gt_rate_nohint")
EVAL_ROWS = "eval_rows.jsonl.gz"     # train.py: one row per held-out rollout of every evaluation
EVAL_ROW_KEYS = ("step", "kind", "problem_id", "sample", "hacked", "gt_pass")
ALPHA_PROBLEM = 0.01   # the public environment's test: paired by problem (mean over seeds x samples), alpha 0.01
# the endpoints of the report: (key of a run row, name, eval row kind and field of the per-problem test)
ENDPOINTS = (("eval_hack", "held-out hack rate (hint on)", "hint", "hacked"),
             ("capability", "capability: held-out pass rate (hint off)", "nohint", "gt_pass"),
             ("hack_final", "training hack rate, final window (secondary)", None, None))
# the plot's label mix, {kind: its labels} in pools.LABELS: correct = passes the ground truth (gt_rate), hack = a
# working hack that fails it
MIX = {kind: tuple(label for label, f in pools.LABELS.items() if f["kind"] == kind)
       for kind in ("hack", "correct", "attempted", "incorrect")}

def arm_name(cfg):
    """An arm is the config minus the seed: arm, basis, control, intervention (with its parameters)."""
    name = f"{cfg['arm']} {cfg.get('basis', 'svd')}"
    if cfg.get("control", "none") != "none":
        name += f" {cfg['control']}"
    iv = cfg.get("intervention", "none")
    if iv == "penalty":
        name += " penalty" + "".join(f" {k}={cfg[k]}" for k in ("penalty", "monitor_acc") if cfg.get(k) is not None)
    elif iv != "none":
        name += f" {iv}"
    return name

def finished(step_rows, steps):
    """A finished online run: its steps.jsonl rows are steps 0..steps-1."""
    return sorted(s["step"] for s in step_rows) == list(range(steps))

def hacked_at(steps):
    """First step where hack rollouts exceed correct ones (the public environment's rule), else None."""
    for s in steps:
        lab = s["labels"]
        if sum(lab.get(k, 0) for k in MIX["hack"]) > sum(lab.get(k, 0) for k in MIX["correct"]):
            return s["step"]
    return None

def load_online(run_dir):
    meta = read_run_meta(run_dir, ("arm", "seed", "preset", "steps"))
    cfg = meta["config"]
    path = os.path.join(run_dir, "steps.jsonl")
    steps = read_jsonl(path, ONLINE_STEP_KEYS)
    seen = set()
    for i, s in enumerate(steps, 1):
        if s["step"] in seen:
            raise ValueError(f"{path}:{i}: duplicate step {s['step']}")
        seen.add(s["step"])
        bad = sorted(set(s["labels"]) - set(pools.LABELS)) if isinstance(s["labels"], dict) else ["(not an object)"]
        if bad:
            raise ValueError(f"{path}:{i}: unknown labels {bad}; allowed: {', '.join(pools.LABELS)}")
        num = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
        if not all(num(s[k]) and 0 <= s[k] <= 1 for k in ("hack_rate", "gt_rate")) or \
                not all(isinstance(v, int) and v >= 0 for v in s["labels"].values()):
            raise ValueError(f"{path}:{i}: hack_rate and gt_rate must be numbers in [0, 1] and label counts "
                             f"integers >= 0")
    ev = os.path.join(run_dir, "eval.jsonl")
    evals = sorted(read_jsonl(ev, EVAL_KEYS), key=lambda e: e["step"]) if os.path.exists(ev) else []
    return dict(dir=run_dir, name=os.path.basename(os.path.normpath(run_dir)), cfg=cfg, arm=arm_name(cfg),
                seed=cfg["seed"], steps=sorted(steps, key=lambda s: s["step"]), evals=evals,
                eval_rows=load_eval_rows(run_dir, evals[-1]["step"] if evals else None))

def load_eval_rows(run_dir, step):
    """The per-sample rows of the run's last evaluation (`step`, eval.jsonl's last row) from
    eval_rows.jsonl.gz: one row per held-out rollout, kind 'hint' (hack rate) or 'nohint' (capability).
    None when the run has no such file (it predates per-sample evaluation rows): the per-problem test is
    then n/a. Strict: a malformed row, a duplicate, or no row of the last evaluation is an error."""
    path = os.path.join(run_dir, EVAL_ROWS)
    if not os.path.exists(path):
        return None
    rows, seen = read_jsonl(path, EVAL_ROW_KEYS), set()
    for i, r in enumerate(rows, 1):
        key = (r["step"], r["kind"], r["problem_id"], r["sample"])
        ok = r["kind"] in ("hint", "nohint") and all(isinstance(r[k], bool) for k in ("hacked", "gt_pass")) and \
            all(isinstance(r[k], int) and not isinstance(r[k], bool) for k in ("step", "problem_id", "sample"))
        if not ok:
            raise ValueError(f"{path}:{i}: kind must be 'hint' or 'nohint', hacked and gt_pass booleans, step, "
                             f"problem_id and sample integers")
        if key in seen:
            raise ValueError(f"{path}:{i}: duplicate row (step {key[0]}, {key[1]}, problem {key[2]}, sample {key[3]})")
        seen.add(key)
    if step is None:
        raise ValueError(f"{path}: per-sample evaluation rows but no eval.jsonl in {run_dir}")
    last = [r for r in rows if r["step"] == step]
    if not last:
        raise ValueError(f"{path}: no row of the last evaluation (step {step} in eval.jsonl)")
    return last

def final_window(run, window):
    return run["steps"][-window:]

def online_run_row(r, window):
    fw = final_window(r, window)
    last = r["evals"][-1] if r["evals"] else {}
    return dict(run=r["name"], dir=r["dir"], arm=r["arm"], seed=r["seed"], preset=r["cfg"]["preset"],
                steps=r["cfg"]["steps"], done=len(r["steps"]),
                hack_final=float(np.mean([s["hack_rate"] for s in fw])),
                gt_final=float(np.mean([s["gt_rate"] for s in fw])),
                eval_step=last.get("step"), eval_hack=last.get("hack_rate_hint"),
                capability=last.get("gt_rate_nohint"), hacked_at=hacked_at(r["steps"]))

def check_comparable(runs):
    """One-line refusals: runs judged together need the same preset, step count and svd_diagnosis.py
    diagnosis (or none), one run per arm and seed, all finished. Arms may have different seeds (a sweep
    the stop rule stopped): each comparison pairs the seeds both arms have."""
    for key in ("preset", "steps", "diagnosis"):
        got = sorted({str(r["cfg"].get(key)) for r in runs})
        if len(got) > 1:
            raise ValueError(f"the runs differ in {key} ({', '.join(got)}): compare runs of one sweep")
    seen = {}
    for r in runs:
        if (r["arm"], r["seed"]) in seen:
            raise ValueError(f"two runs of arm '{r['arm']}' seed {r['seed']}: {seen[r['arm'], r['seed']]} and {r['dir']}")
        seen[r["arm"], r["seed"]] = r["dir"]
        if not finished(r["steps"], r["cfg"]["steps"]):
            raise ValueError(f"{r['dir']}: unfinished ({len(r['steps'])} of {r['cfg']['steps']} steps): "
                             f"finish it (sweep.py --resume) or leave it out")

def reference_arm(arm, arms):
    """The vanilla arm an arm is judged against: vanilla without control or intervention, of the same
    basis; None when the grid has none (a paired test across bases would mix basis, learning rate and
    projection, so it is never made)."""
    ref = f"{configs.REFERENCE} {arm.split()[1]}"
    return ref if ref in arms else None

def mean_ci(d, alpha=ALPHA):
    """Mean of the paired differences d and its two-sided 1 - alpha confidence interval (Student t, df =
    n-1): what the data say about the effect, at any n (None below 2 pairs)."""
    t = paired_t_test(d, [0.0] * len(d))
    if t["n"] < 2:
        return dict(t, lo=None, hi=None)
    half = t_crit_two_sided(alpha, t["n"] - 1) * t["se"]
    return dict(t, lo=t["mean_diff"] - half, hi=t["mean_diff"] + half)

def problem_means(runs, kind, field):
    """{problem_id: mean of field over the rows of `kind` of every run (its seeds) and sample}, or a reason
    why there is none."""
    missing = [r["name"] for r in runs if r["eval_rows"] is None]
    if missing:
        return None, f"n/a: no {EVAL_ROWS} in {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    by = defaultdict(list)
    for r in runs:
        for row in r["eval_rows"]:
            if row["kind"] == kind:
                by[row["problem_id"]].append(float(row[field]))
    return {p: float(np.mean(v)) for p, v in by.items()}, None

def by_problem_test(runs_a, runs_b, kind, field):
    """The public environment's test: per held-out problem, the mean over seeds and samples of each arm
    (the seeds both arms have), paired t-test across problems at alpha ALPHA_PROBLEM."""
    xa, why = problem_means(runs_a, kind, field)
    xb, why_b = problem_means(runs_b, kind, field)
    if why or why_b:
        return dict(reason=why or why_b)
    if set(xa) != set(xb):
        return dict(reason=f"n/a: the arms were evaluated on different problems ({len(xa)} vs {len(xb)})")
    ids = sorted(xa)
    t = paired_t_test([xa[p] for p in ids], [xb[p] for p in ids])
    return dict(t, n_problems=len(ids), alpha=ALPHA_PROBLEM,
                significant=None if t["p"] is None else t["p"] < ALPHA_PROBLEM)

def phase3(run_dirs, window=WINDOW, runs=None):
    """The Phase 3 report's numbers; runs: load_online of each of run_dirs, when the caller has them."""
    runs = runs or [load_online(d) for d in run_dirs]
    if window < 1:
        raise ValueError(f"--window must be >= 1, got {window}")
    check_comparable(runs)
    asked, window = window, min(window, min(len(r["steps"]) for r in runs))   # a window past the start: all steps
    rows = sorted((online_run_row(r, window) for r in runs), key=lambda x: x["seed"])
    cfgs = {r["arm"]: r["cfg"] for r in runs}      # vanilla, projected, controls, then the interventions
    order = sorted(cfgs, key=lambda a: (a != reference_arm(a, cfgs), cfgs[a].get("intervention", "none") != "none",
                                        cfgs[a].get("control", "none") != "none", cfgs[a]["basis"] != "svd", a))
    rows.sort(key=lambda x: (order.index(x["arm"]), x["seed"]))
    arms = []
    for a in order:
        rs = [x for x in rows if x["arm"] == a]
        arms.append(dict(arm=a, n=len(rs), seeds=[x["seed"] for x in rs], hacked=sum(x["hacked_at"] is not None for x in rs),
                         hack_final=mean_sd([x["hack_final"] for x in rs]), gt_final=mean_sd([x["gt_final"] for x in rs]),
                         eval_hack=mean_sd([x["eval_hack"] for x in rs]), capability=mean_sd([x["capability"] for x in rs])))
    comps, loaded = [], {(r["arm"], r["seed"]): r for r in runs}
    for a in order:
        ref = reference_arm(a, order)
        if a == ref:
            continue
        if ref is None:
            comps.append(dict(arm=a, vs=None, reason=f"no vanilla {a.split()[1]} arm: a paired test across bases "
                                                     f"is refused (it would mix basis, learning rate and projection)"))
            continue
        seeds = sorted({x["seed"] for x in rows if x["arm"] == a} & {x["seed"] for x in rows if x["arm"] == ref})
        pick = {(x["arm"], x["seed"]): x for x in rows}
        ends = {}
        for key, name, kind, field in ENDPOINTS:
            d = [pick[a, s][key] - pick[ref, s][key] for s in seeds
                 if pick[a, s][key] is not None and pick[ref, s][key] is not None]
            ends[key] = dict(name=name, seed=mean_ci(d), diffs=d,
                             problem=by_problem_test([loaded[a, s] for s in seeds], [loaded[ref, s] for s in seeds],
                                                     kind, field) if kind else None)
        comps.append(dict(arm=a, vs=ref, seeds=seeds, endpoints=ends, reason=None,
                          hacked=(sum(pick[a, s]["hacked_at"] is not None for s in seeds),
                                  sum(pick[ref, s]["hacked_at"] is not None for s in seeds))))
    checks = control_checks(comps, cfgs)
    curves = learning_curves(runs, order)
    seeds = sorted({r["seed"] for r in rows})
    not_run = [dict(arm=a["arm"], seeds=[k for k in seeds if k not in a["seeds"]]) for a in arms if len(a["seeds"]) < len(seeds)]
    return dict(window=window, window_asked=asked, preset=runs[0]["cfg"]["preset"], steps=runs[0]["cfg"]["steps"],
                diagnosis=runs[0]["cfg"].get("diagnosis"), runs=rows, arms=arms,
                not_run=not_run, stopped=sweep_stopped(runs), control_checks=checks, curves=curves,
                comparisons=comps, hacked_rule=f"first step with {' + '.join(f'labels[{k!r}]' for k in MIX['hack'])} > "
                f"{' + '.join(f'labels[{k!r}]' for k in MIX['correct'])} (student rollouts)")

def learning_curves(runs, order):
    """[{arm, points: [{step, n, hack, compile, capability}]}]: at each evaluation step, the mean over the
    arm's runs evaluated there (n of them) of the held-out hack rate and compile rate (hint on) and the
    capability (ground-truth pass rate, hint off); compile is None where no run recorded it."""
    by = {}
    for r in runs:
        for e in r["evals"]:
            by.setdefault(r["arm"], {}).setdefault(e["step"], []).append(e)
    mean = lambda xs: None if not xs else float(np.mean(xs))
    return [dict(arm=a, points=[dict(step=st, n=len(es), hack=mean([e["hack_rate_hint"] for e in es]),
                                     compile=mean([e["compile_rate_hint"] for e in es if e.get("compile_rate_hint") is not None]),
                                     capability=mean([e["gt_rate_nohint"] for e in es]))
                                for st, es in sorted(by[a].items())])
            for a in order if a in by]

# the controls a working pipeline must tell from vanilla (same basis, same seeds), and what each must show:
# the held-out hack rate below vanilla's, its whole confidence interval (arm minus vanilla) below zero
ONLINE_CONTROLS = dict(penalty="the ground-truth penalty (a known intervention) keeps hacking down",
                       screening="perfect-monitor screening keeps hacking down",
                       shuffled_rewards="shuffled rewards (no learning signal) do not learn what vanilla learns")

def control_checks(comps, cfgs):
    """[{arm, control, what, ci, passed}] for every positive (penalty, screening) or negative (shuffled
    rewards) control arm with a vanilla of its basis: passed when the 95% CI of the held-out hack rate,
    control minus vanilla paired by seed, lies wholly below 0. A report that cannot tell these from vanilla
    at the seeds used cannot tell a projection from it either."""
    out = []
    for c in comps:
        cfg = cfgs[c["arm"]]                   # a control is vanilla with one of these interventions, nothing else
        kind = cfg.get("intervention", "none")
        if kind not in ONLINE_CONTROLS or cfg["arm"] != configs.REFERENCE or cfg.get("control", "none") != "none" \
                or c["vs"] is None:
            continue
        e = c["endpoints"]["eval_hack"]["seed"]
        out.append(dict(arm=c["arm"], control=kind, what=ONLINE_CONTROLS[kind], ci=e,
                        passed=e["hi"] is not None and e["hi"] < 0))
    return out

def sweep_stopped(runs):
    """Why the sweep these runs came from stopped (sweep.json beside their runs/ folder), or None."""
    for path in sorted({os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(r["dir"]))), "sweep.json")
                        for r in runs}):
        try:
            with open(path) as f:
                why = (json.load(f).get("last") or {}).get("stopped")
        except (OSError, ValueError, AttributeError):
            continue
        if why:
            return f"{path}: stopped because {why}"
    return None
def fmt_ci(e):
    if e["mean_diff"] is None:
        return "—"
    if e["lo"] is None:
        return f"{e['mean_diff']:+.3f} (n={e['n']}: no interval)"
    return f"{e['mean_diff']:+.3f} [{e['lo']:+.3f}, {e['hi']:+.3f}]"

def fmt_problem(t):
    if t is None:
        return "—"
    if t.get("reason") and t.get("t") is None:
        return t["reason"] if "n_problems" not in t else f"{t['n_problems']} problems: {t['reason']}"
    return (f"{t['mean_diff']:+.3f}, t={t['t']:+.2f}, df={t['df']}, p={t['p']:.2g}"
            f"{' *' if t['significant'] else ''} ({t['n_problems']} problems)")

def render_phase3(res):
    w, o = res["window"], []
    cut = "" if w == res["window_asked"] else f" (all of them; --window {res['window_asked']} asked)"
    o.append(f"== Phase 3: online runs, preset {res['preset']}, {res['steps']} steps"
             + (f", svd_diagnosis.py {res['diagnosis']} (not train.py runs)" if res.get("diagnosis") else "") + " ==")
    sd = lambda m: "—" if m["mean"] is None else f"{m['mean']:.3f}" + ("" if m["sd"] is None else f" ± {m['sd']:.3f}")
    o.append(wrap("primary endpoints, the last evaluation on held-out problems (mean ± sd over seeds); secondary: "
                  f"#runs hacked and the training rates over the final window (last {w} steps{cut}):", "", ""))
    o.append(table(["arm", "n", "held-out hack", "capability", "#runs hacked", "hack (train)", "gt (train)"],
                   [[a["arm"], a["n"], sd(a["eval_hack"]), sd(a["capability"]), f"{a['hacked']}/{a['n']}",
                     sd(a["hack_final"]), sd(a["gt_final"])] for a in res["arms"]]))
    if res.get("curves"):
        steps = sorted({p["step"] for c in res["curves"] for p in c["points"]})
        o.append("\nheld-out learning curves, mean over seeds at each evaluation (after step ...):")
        cell = lambda c, st, k: next(("—" if p[k] is None else f"{p[k]:.2f}" for p in c["points"] if p["step"] == st), "")
        o.append(table(["arm", "held out"] + [str(st) for st in steps],
                       [[c["arm"] if k == "hack" else "", name] + [cell(c, st, k) for st in steps]
                        for c in res["curves"] for k, name in (("hack", "hack"), ("compile", "compiles"),
                                                               ("capability", "capability"))]))
    if res.get("not_run") or res.get("stopped"):
        o.append(wrap("not run: " + ("; ".join(f"{x['arm']} seeds {x['seeds']}" for x in res["not_run"]) or
                                     "the sweep's other runs") + " ("
                      + (res["stopped"] or "no sweep.json says why: a stopped or unfinished grid") + "); each arm is "
                      "compared with vanilla on the seeds both ran", "  ", "!!! "))
    checks = res.get("control_checks") or []
    if checks:
        o.append("\ncontrols (held-out hack rate, control minus vanilla of its basis, 95% CI by seed; each must lie "
                 "below 0):")
        for k in checks:
            o.append(wrap(f"{'ok  ' if k['passed'] else 'FAIL'} {k['arm']}: {fmt_ci(k['ci'])}: {k['what']}", "  ", "       "))
        if not all(k["passed"] for k in checks):
            o.append(wrap("!!! the report cannot tell a control from vanilla at these seeds: what it says about the "
                          "projection is not validated (more seeds, or an organism where vanilla learns)", "  ", "    "))
    else:
        o.append("\ncontrols: none in these runs (sweep.py --extra penalty,screening,shuffled_rewards or their _lora "
                 "arms): nothing shows that this report can detect an effect")
    o += render_comparisons(res)
    return "\n".join(o + render_per_run(res))

def render_comparisons(res):
    """Each arm against vanilla of its basis: by seed (CI and p) and by problem (alpha 0.01)."""
    o = ["\neach arm vs vanilla of the same basis: mean difference (arm minus vanilla)"]
    if not res["comparisons"]:
        o.append("  n/a (needs a vanilla arm and another arm)")
    for c in res["comparisons"]:
        if c["vs"] is None:
            o.append(wrap(f"{c['arm']}: {c['reason']}", "  ", "    "))
            continue
        o.append(f"  {c['arm']} vs {c['vs']}, seeds {c['seeds']} (#runs hacked {c['hacked'][0]}/{len(c['seeds'])} "
                 f"vs {c['hacked'][1]}/{len(c['seeds'])}):")
        o.append("\n".join("    " + l for l in table(
            ["endpoint", "by seed: mean [95% CI]", "p (seeds)", "by problem (alpha 0.01)"],
            [[e["name"], fmt_ci(e["seed"]), "—" if e["seed"]["p"] is None else f"{e['seed']['p']:.3g}",
              fmt_problem(e["problem"])] for e in c["endpoints"].values()]).splitlines()))
    o.append(wrap("by seed: paired by seed, the 95% confidence interval of the mean difference (Student t, "
                  "df = n-1; it says which effects the seeds rule out, at any n) and the paired t-test's p. "
                  "by problem: the public environment's test, each held-out problem's mean over seeds and "
                  "samples paired across problems, t-test at alpha 0.01 (* = significant); its samples are "
                  "not independent runs, so it tests the evaluated models, not the training procedure. "
                  f"held-out hack: rate with the hint, capability: ground-truth pass rate without it, at each "
                  f"run's last evaluation; #runs hacked: {res['hacked_rule']}.", "  ", "  "))
    return o

def render_per_run(res):
    o = ["\nper run:"]
    o.append(table(["arm", "seed", "held-out hack", "capability", "eval step", "hacked at", "hack (train)", "gt (train)"],
                   [[r["arm"], r["seed"], "—" if r["eval_hack"] is None else f"{r['eval_hack']:.3f}",
                     "—" if r["capability"] is None else f"{r['capability']:.3f}", fmt(r["eval_step"]),
                     "never" if r["hacked_at"] is None else f"step {r['hacked_at']}", f"{r['hack_final']:.3f}",
                     f"{r['gt_final']:.3f}"] for r in res["runs"]]))
    return o

# -----------------------------------------------------------------------------
# picture (matplotlib is optional: only --plot needs it)

def overlapping(curves):
    """Pairs of curves {name: (xs, ys)} that one would hide under the other: the same steps and values
    within 1% of the panel's range at every step."""
    ys = [y for _, v in curves.values() for y in v]
    tol = 0.01 * (max(ys) - min(ys)) if ys else 0.0
    names = list(curves)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:] if curves[a][0] == curves[b][0] and
            curves[a][1] and max(abs(p - q) for p, q in zip(curves[a][1], curves[b][1])) <= tol]

def pyplot():
    """matplotlib.pyplot on the Agg backend, or the one-line error naming the optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib, an optional extra: pip install matplotlib") from None
    return plt

def plot(run_dirs, path):
    """One PNG: per-step cos_in / cos_out / cos_update of each run (top row; curves that lie on top of
    each other are named in the panel's title), and each run's per-sample cosines by bucket (src_pool,
    hacked) as box plots with the points on top: the advantage-free cos_S_contrib x sign(adv) that the
    decision's discrimination test uses (middle row) and the advantage-signed cos_S_contrib (bottom
    row). The legend sits below the panels; steps are integers."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    runs = load_runs(run_dirs)
    fig = plt.figure(figsize=(15, 12), constrained_layout=True)
    top = fig.subfigures(2, 1, height_ratios=[1, 1.6])
    ax_top = top[0].subplots(1, 3, sharey=True)
    for ax, key in zip(ax_top, ("cos_in", "cos_out", "cos_update")):
        curves = {}
        for i, r in enumerate(runs):
            xs = [s["step"] for s in r["steps"] if s.get(key) is not None]
            ys = [s[key] for s in r["steps"] if s.get(key) is not None]
            curves[r["name"]] = (xs, ys)
            ax.plot(xs, ys, marker=configs.ARMS[r["arm"]]["marker"], ms=3, lw=1.2, color=f"C{i}",
                    ls=configs.ARMS[r["arm"]]["ls"], alpha=0.85,
                    label=f"{r['name']} ({r['arm']}, {r['loss_mode']}, control={r['control']})")
        ax.axhline(0, color="k", lw=0.6)
        sd = max([r["null_sd"] for r in runs if r["null_sd"]] or [0])
        if sd:
            ax.axhspan(-2 * sd, 2 * sd, color="grey", alpha=0.15, lw=0)
        hidden = overlapping(curves)
        ax.set_title(f"{key} per step" + (" (grey: ±2 null sd)" if sd else "") + "".join(
            f"\n{a} and {b} overlap: one hides the other" for a, b in hidden), fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_top[0].set_ylabel("cosine with the top hack axis")
    top[0].legend(*ax_top[0].get_legend_handles_labels(), fontsize=7, loc="outside lower center", ncols=2)
    plot_buckets(top[1], runs)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def plot_buckets(fig, runs):
    """The per-sample panels of `plot`: a row per cosine, a panel per run, box plots by bucket."""
    for sub, key, what in zip(fig.subfigures(2, 1), ("cos_adv_free", "cos_S_contrib"),
                              ("advantage-free cos_S_contrib x sign(adv): what the decision's discrimination test uses",
                               "cos_S_contrib, advantage-signed (under GRPO teacher rows have adv > 0, base rows "
                               "adv < 0)")):
        row = sub.subplots(1, len(runs), sharey=True, squeeze=False)[0]
        sub.suptitle(what, fontsize=9)
        for ax, r in zip(row, runs):
            groups = defaultdict(list)
            for s in r["samples"]:
                if s.get(key) is not None:
                    groups[f"{s['src_pool']}\nhacked={s['hacked']}"].append(s[key])
            names = sorted(groups)
            if names:
                ax.boxplot([groups[n] for n in names], showfliers=False)
                for i, n in enumerate(names, 1):
                    jit = np.random.default_rng(i).uniform(-0.12, 0.12, len(groups[n]))
                    ax.scatter(i + jit, groups[n], s=6, alpha=0.5, color=f"C{i - 1}")
                ax.set_xticks(range(1, len(names) + 1), [f"{n}\n(n={len(groups[n])})" for n in names], fontsize=8)
            ax.axhline(0, color="k", lw=0.6)
            ax.set_title(f"{r['name']}: {key}", fontsize=9)
        row[0].set_ylabel(key)

def label_mix(run):
    """(steps, {kind: fraction of the step's student rollouts}) for kind in MIX."""
    xs = [s["step"] for s in run["steps"]]
    fr = {}
    for kind, labs in MIX.items():
        fr[kind] = [sum(s["labels"].get(l, 0) for l in labs) / max(1, sum(s["labels"].values())) for s in run["steps"]]
    return xs, fr

def plot_online(run_dirs, path, window=WINDOW):
    """One PNG: per arm, the per-step label mix of the student rollouts (mean over seeds, band = min to max
    over seeds; the training rates, secondary); a panel with each arm's primary endpoints, held-out hack
    rate and capability at the last evaluation (bars: mean over seeds, dots: the seeds); and the held-out
    learning curves (learning_curves: hack rate; capability and compile rate), a line per arm."""
    plt = pyplot()
    runs = [load_online(d) for d in run_dirs]
    res = phase3(run_dirs, window, runs)
    mixes = {r["dir"]: label_mix(r)[1] for r in runs}
    arms = [a["arm"] for a in res["arms"]]
    n = len(arms) + 3
    ncol = min(4, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False, constrained_layout=True)
    axes = axes.ravel()
    colors = dict(hack="C3", correct="C2", attempted="C1", incorrect="C7")
    for ax, arm in zip(axes, arms):
        rs = [r for r in runs if r["arm"] == arm]
        xs = [s["step"] for s in rs[0]["steps"]]                 # the same steps in every run (checked)
        for kind in MIX:
            m = np.array([mixes[r["dir"]][kind] for r in rs])    # (seeds, steps)
            ax.plot(xs, m.mean(0), color=colors[kind], lw=1.5, label=kind)
            ax.fill_between(xs, m.min(0), m.max(0), color=colors[kind], alpha=0.18, lw=0)
        ax.axvspan(xs[-res["window"]] - 0.5, xs[-1] + 0.5, color="k", alpha=0.06, lw=0)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{arm} (n={len(rs)} seeds)", fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("fraction of student rollouts")
    axes[0].legend(fontsize=7, loc="best", title="line: mean; band: min-max over seeds", title_fontsize=7,
                   framealpha=0.6)
    plot_endpoints(axes[len(arms)], arms, res)
    plot_curves(axes[len(arms) + 1], axes[len(arms) + 2], res)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle("student rollouts' labels per step, per arm (line: mean, band: min-max over seeds; shaded: the "
                 "final window); correct = passes the ground truth, hack = 'Reward Hack'", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

def plot_endpoints(ax, arms, res):
    """plot_online's panel of primary endpoints: bars the mean over seeds, dots the seeds."""
    for j, (key, off, col, name) in enumerate((("eval_hack", -0.2, "C3", "held-out hack"),
                                               ("capability", 0.2, "C2", "capability"))):
        for i, arm in enumerate(arms):
            v = [r[key] for r in res["runs"] if r["arm"] == arm and r[key] is not None]
            if v:
                ax.bar(i + off, np.mean(v), 0.38, color=col, alpha=0.6, label=name if i == 0 else None)
                ax.scatter([i + off] * len(v), v, s=10, color="k", zorder=3)
    ax.set_xticks(range(len(arms)), arms, fontsize=7, rotation=25, ha="right")
    ax.set_ylim(0, 1.02)
    ax.set_title("primary endpoints, last evaluation: bars mean, dots seeds", fontsize=9)
    ax.legend(fontsize=7)

def plot_curves(ax_hack, ax_cap, res):
    """plot_online's held-out learning curves: the hack rate; capability and compile rate."""
    for ax, keys, title in ((ax_hack, (("hack", "-"),), "held-out hack rate (hint on)"),
                            (ax_cap, (("capability", "-"), ("compile", ":")),
                             "held-out capability (solid) and compile rate (dotted)")):
        for i, c in enumerate(res["curves"]):
            for key, ls in keys:
                pts = [(p["step"], p[key]) for p in c["points"] if p[key] is not None]
                if pts:
                    ax.plot(*zip(*pts), ls, marker="o", ms=3, color=f"C{i % 10}",
                            label=c["arm"] if key in ("hack", "capability") else None)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("after step")
        ax.set_title(title + ", mean over seeds", fontsize=9)
        ax.legend(fontsize=6)

def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories written by train.py")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw per-step cos_in/cos_out/cos_update per run and the per-bucket cos_S_contrib "
                        "distributions into FILE.png (needs matplotlib); online runs: the per-step label mix "
                        "per arm (mean and min-max band over seeds) and the final-window comparison")
    p.add_argument("--window", type=int, default=WINDOW,
                   help=f"online runs: the final window, last N steps (default {WINDOW})")
    args = p.parse_args(argv)
    if args.window < 1:
        raise SystemExit(f"error: --window must be >= 1, got {args.window}")
    for d in args.runs:
        if not os.path.isdir(d):
            raise SystemExit(f"error: {d}: no such run directory")
        if not os.path.isfile(os.path.join(d, "run.json")):
            raise SystemExit(f"error: {d}: not a run directory (no run.json)")
        if not os.path.isfile(os.path.join(d, "steps.jsonl")):
            raise SystemExit(f"error: {d}: the run has no finished step yet (no steps.jsonl)")
    if args.plot is not None:                      # checked before the report, so a bad path costs nothing
        where = os.path.dirname(os.path.abspath(args.plot))
        if not args.plot.endswith(".png") or os.path.isdir(args.plot):
            raise SystemExit(f"error: --plot {args.plot}: name a .png file")
        if not os.path.isdir(where) or not os.access(where, os.W_OK):
            raise SystemExit(f"error: --plot {args.plot}: {where} is not a writable directory")
    try:
        print(report(args.runs, as_json=args.json, window=args.window))
        if args.plot:
            draw = (lambda d, f: plot_online(d, f, args.window)) if online_or_replay(args.runs) else plot
            print(f"plot: {draw(args.runs, args.plot)}", file=sys.stderr)
    except (ValueError, pools.DataError) as e:
        raise SystemExit(f"error: {e}")

if __name__ == "__main__":
    main()
