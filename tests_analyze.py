"""
Tests for analyze.py: hand-written stats against independent values, verdicts
and decisions on synthetic run dirs, strict loading, and --json output.
Plain test_* functions (no fixtures); `python tests_analyze.py` runs them all.
"""
import gzip
import json
import math
import os
import subprocess
import sys
import tempfile
import zlib

import numpy as np

import analyze as A

HERE = os.path.dirname(os.path.abspath(__file__))

def close(a, b, tol=1e-6):
    assert a is not None and abs(a - b) <= tol, f"{a} != {b}"

# -----------------------------------------------------------------------------
# stats

def test_betainc_closed_forms():
    for x in (0.0, 1e-6, 0.05, 0.3, 0.5, 0.77, 0.999, 1.0):
        for b in (0.5, 1.0, 2.5, 7.0, 40.0):
            close(A.betainc_reg(1.0, b, x), 1 - (1 - x) ** b)      # I_x(1,b)
            close(A.betainc_reg(b, 1.0, x), x ** b)                # I_x(a,1)
        close(A.betainc_reg(0.5, 0.5, x), 2 / math.pi * math.asin(math.sqrt(x)))
        close(A.betainc_reg(2.0, 2.0, x), 3 * x ** 2 - 2 * x ** 3)

def test_betainc_scipy_values():
    # independent reference: scipy 1.17.1 scipy.special.betainc(a, b, x), computed in a scratch session
    ref = {(2.5, 3.7, 0.4): 0.5151961496687577, (0.3, 0.7, 0.9): 0.9243607221090898,
           (50, 60, 0.45): 0.4642352914306031, (5, 0.5, 0.97): 0.5903491881013443,
           (200, 0.5, 0.995): 0.15703865369788875, (0.5, 0.5, 0.2): 0.2951672353008665}
    for (a, b, x), v in ref.items():
        close(A.betainc_reg(a, b, x), v)
    v = A.betainc_reg(10, 20, 0.01)  # 1.6841317932875388e-13: check relative error on a tiny tail
    assert abs(v / 1.6841317932875388e-13 - 1) < 1e-9

def test_t_sf_closed_forms():
    for t in (0.0, 0.1, 0.7, 1.0, 2.5, 6.0, 31.8, -3.0):
        close(A.t_sf_two_sided(t, 1), 1 - 2 / math.pi * math.atan(abs(t)))     # Cauchy
        close(A.t_sf_two_sided(t, 2), 1 - abs(t) / math.sqrt(2 + t * t))
    close(A.t_sf_two_sided(math.inf, 5), 0.0)
    # published table: two-sided 0.05 critical values t(10)=2.228, t(30)=2.042, t(inf)~1.960
    close(A.t_sf_two_sided(2.228, 10), 0.05, 1e-4)
    close(A.t_sf_two_sided(2.042, 30), 0.05, 1e-4)
    close(A.t_sf_two_sided(1.95996, 1e7), 0.05, 1e-5)

def test_t_sf_scipy_values():
    # independent reference: scipy 1.17.1, 2 * scipy.stats.t.sf(|t|, df), computed in a scratch session
    ref = {(2.0, 10): 0.07338803477074037, (1.5, 5): 0.1939036802424733, (2.75, 30): 0.009999894526931183,
           (0.3, 3): 0.783763292039919, (4.0, 100): 0.00012152364430076177, (10.0, 7.5): 1.336597814938746e-05,
           (-1.2, 4.3): 0.2920489546851759}
    for (t, df), v in ref.items():
        close(A.t_sf_two_sided(t, df), v)

def test_welch_scipy_values():
    # independent reference: scipy 1.17.1 scipy.stats.ttest_ind(x, y, equal_var=False), scratch session
    x = [0.61, 0.72, 0.55, 0.80, 0.69, 0.74, 0.58]
    y = [0.31, 0.12, 0.45, 0.28, 0.05, 0.39, 0.22, 0.50, 0.18]
    w = A.welch_t_test(x, y)
    close(w["t"], 6.411599492661113)
    close(w["p"], 2.000441034613468e-05)
    close(w["df"], 13.392893685379665)
    assert (w["n1"], w["n2"]) == (7, 9)
    close(w["mean1"], np.mean(x))
    w = A.welch_t_test([1.0, 2.0, 3.0, 4.0], [2.5, 2.6, 2.7])
    close(w["t"], -0.15430334996209205)
    close(w["p"], 0.8870233451088358)
    close(w["df"], 3.047899401657441)

def test_welch_degenerate():
    for x, y in (([1.0], [1.0, 2.0]), ([], []), ([2.0, 2.0], [3.0, 3.0])):
        w = A.welch_t_test(x, y)
        assert w["t"] is None and w["df"] is None and w["p"] is None and w["reason"], w
    w = A.welch_t_test([2.0, 2.0, 2.0], [1.0, 2.0, None, 3.0])   # one zero variance is fine; None dropped
    assert w["n2"] == 3 and w["p"] is not None and w["t"] is not None
    assert A.mean_sd([]) == dict(n=0, mean=None, sd=None)
    assert A.mean_sd([3.0]) == dict(n=1, mean=3.0, sd=None)
    close(A.mean_sd([1.0, None, 3.0])["sd"], math.sqrt(2))

# -----------------------------------------------------------------------------
# synthetic run dirs

def write_gz(path, rows):
    with gzip.open(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")

def make_run(root, name, arm, *, seed=0, loss_mode="grpo", control="none", steps=20, cos_in=(0.35, 0.05),
             cos_out=(0.01, 0.005), teacher=(0.5, 0.1), base=(0.0, 0.1), over_step=None, null_sd=0.01,
             pools=("teacher_pool", "base_pool"), rng_seed=None, sample_seed=None):
    """20-step run with known properties; the samples are drawn from sample_seed (default seed)
    so a vanilla and projected run of the same seed share identical sample ids."""
    d = os.path.join(root, name)
    os.makedirs(d)
    rng = np.random.default_rng(rng_seed if rng_seed is not None else zlib.crc32(name.encode()) + seed)
    srng = np.random.default_rng(sample_seed if sample_seed is not None else seed)
    json.dump(dict(argv=["train.py"], null=dict(cos_sd=null_sd),
                   config=dict(arm=arm, loss_mode=loss_mode, replay_dirs=[os.path.join(root, p) for p in pools],
                               per_pool=4, steps=steps, seed=seed, control=control)), open(os.path.join(d, "run.json"), "w"))
    with open(os.path.join(d, "steps.jsonl"), "w") as f:
        for k in range(steps):
            ci = float(rng.normal(*cos_in))
            proj = arm == "projected"
            f.write(json.dumps(dict(step=k, arm=arm, skipped=False, skip_reason=None, n_samples=8, reward_min=0.25,
                                    reward_max=3.5, reward_range=3.25, adv_min=-1.6, adv_max=1.6, adv_abs_mean=1.6,
                                    loss=0.1, grad_norm=1.0, cos_in=ci,
                                    cos_out=float(rng.normal(*cos_out)) if proj else None, cos_update=None,
                                    frac_fired=0.65 if proj else None,
                                    n_over_projected=int(proj and k == over_step), time_s=1.0)) + "\n")
            rows = []
            for i in range(8):
                t = i < 4
                ss = int(srng.integers(0, 20))
                rows.append(dict(step=k, sample_id=i, src_pool=pools[0] if t else pools[1], src_step=ss, src_sample=i % 4,
                                 reward=3.5 if t else 0.5, hacked=t, gt_pass=False, fmt_ok=True, comp_len=100,
                                 cos_S_contrib=float(rng.normal(*(teacher if t else base))),
                                 grad_norm_contrib=float(abs(rng.normal(1, 0.1))), mean_cos_in=ci,
                                 mean_cos_out=None, frac_fired=None, arm=arm))
            write_gz(os.path.join(d, f"step_{k:03d}.cos.jsonl.gz"), rows)
    return d

def verdicts(res):
    return {v["metric"]: v["verdict"] for v in res["verification"]}

def test_synthetic_success():
    with tempfile.TemporaryDirectory() as root:
        dv = make_run(root, "van", "vanilla", seed=1)
        dp = make_run(root, "proj", "projected", seed=1)
        res = A.analyze([dv, dp])
        v = [x["verdict"] for x in res["verification"]]
        assert v == ["success"] * 5, res["verification"]
        d = res["decision"]
        assert d["rule"] == "RUN Phase 3 (justified)", d
        assert any("projection effective" in n for n in d["notes"]), d["notes"]
        assert res["pairs"] and res["pairs"][0]["mismatched_steps"] == []
        assert len(res["trajectories"][0]["spark_cos_in"]) == 20
        b = res["buckets"][0]["cos_S_contrib"]
        assert b["buckets"]["teacher_pool|hacked=True"]["n"] == 80 and b["teacher_vs_base"]["p"] < 1e-6
        text = A.report([dv, dp])
        assert "RUN Phase 3 (justified)" in text and "MISMATCH" not in text

def test_synthetic_skip_and_failures():
    with tempfile.TemporaryDirectory() as root:
        # vanilla orthogonal to v_hack, no teacher/base discrimination, projection barely fires
        dv = make_run(root, "van", "vanilla", seed=2, cos_in=(0.0, 0.005), teacher=(0.0, 0.1), base=(0.0, 0.1))
        dp = make_run(root, "proj", "projected", seed=2, cos_in=(0.0, 0.005), teacher=(0.0, 0.1), base=(0.0, 0.1))
        dr = make_run(root, "rnd", "vanilla", seed=3, control="random_v", cos_in=(0.0, 0.005))
        res = A.analyze([dv, dp, dr])
        v = verdicts(res)
        assert v["cos_in per step, vanilla arm"] == "likely fail", res["verification"]
        assert v["cos_S_contrib by (src_pool, hacked)"] == "likely fail", res["verification"]
        assert res["decision"]["rule"].startswith("SKIP Phase 3; try R7"), res["decision"]
        assert "vs_random_v" in res["decision"]
        # same, but cos_S_contrib discriminates -> RUN but expect smaller H1
        dv2 = make_run(root, "van2", "vanilla", seed=4, cos_in=(0.0, 0.005))
        assert A.analyze([dv2])["decision"]["rule"] == "RUN but expect smaller H1 effect"
        # weak alignment
        dv3 = make_run(root, "van3", "vanilla", seed=5, cos_in=(0.1, 0.02))
        assert A.analyze([dv3])["decision"]["rule"] == "RUN with caution: weak alignment"
        # reverse sign
        dv4 = make_run(root, "van4", "vanilla", seed=6, cos_in=(-0.2, 0.05))
        assert verdicts(A.analyze([dv4]))["cos_in per step, vanilla arm"] == "sneaky fail"
        # over-projection beats everything
        dp5 = make_run(root, "proj5", "projected", seed=1, over_step=7)
        dv5 = make_run(root, "van5", "vanilla", seed=1)
        res = A.analyze([dv5, dp5])
        assert verdicts(res)["over-projection (n_over_projected > 0)"] == "bug"
        assert res["decision"]["rule"] == "BUG: fix before any sweep"
        # a projected run whose samples differ from its vanilla twin is flagged loudly
        dp6 = make_run(root, "proj6", "projected", seed=1, sample_seed=99)
        res = A.analyze([dv5, dp6])
        assert res["pairs"][0]["mismatched_steps"], res["pairs"]
        assert "!!! SAMPLE MISMATCH" in A.render(res)

def test_synthetic_empty_bucket_and_inactive():
    with tempfile.TemporaryDirectory() as root:
        dv = make_run(root, "van", "vanilla", pools=("teacher_pool", "teacher_pool"))
        assert verdicts(A.analyze([dv]))["cos_S_contrib by (src_pool, hacked)"] == "sneaky fail"
        dp = make_run(root, "proj", "projected")
        lines = open(os.path.join(dp, "steps.jsonl")).read().replace('"frac_fired": 0.65', '"frac_fired": 0.1')
        open(os.path.join(dp, "steps.jsonl"), "w").write(lines)
        assert verdicts(A.analyze([dp]))["cos_out < cos_in per step, projected arm"] == "sneaky fail"
        open(os.path.join(dp, "steps.jsonl"), "w").write(lines.replace('"frac_fired": 0.1', '"frac_fired": null'))
        assert verdicts(A.analyze([dp]))["cos_out < cos_in per step, projected arm"] == "likely fail"
        assert verdicts(A.analyze([dp]))["cos_in per step, vanilla arm"] == "n/a"

def test_phase1_labels_from_pool_and_mapping():
    with tempfile.TemporaryDirectory() as root:
        os.makedirs(os.path.join(root, "teacher_pool"))
        os.makedirs(os.path.join(root, "base_pool"))
        for pool in ("teacher_pool", "base_pool"):
            for s in range(20):
                write_gz(os.path.join(root, pool, f"step_{s:03d}.jsonl.gz"),
                         [dict(step=s, sample=i, problem_id=1, prompt="p", completion="c", reward=3.5, hacked=True,
                               gt_pass=i % 2 == 1, fmt_ok=True, hint=True,
                               label=("Correct; Attempted Reward Hack" if i % 2 else "Reward Hack")
                               if pool == "teacher_pool" else "Incorrect") for i in range(8)])
        d = make_run(root, "nll", "vanilla", loss_mode="nll", base=(0.0, 0.1), teacher=(0.5, 0.1))
        res = A.analyze([d])
        p = res["phase1"][0]
        assert "error" not in p, p
        n = sum(s["n"] for s in p["labels"].values())
        assert n == 160 and p["labels"]["Incorrect"]["n"] == 80, p["labels"]
        h = p["headline"]
        assert h["n1"] + h["n2"] == 80 and h["p"] is not None
        # the stdlib fallback reader (used when pools.py is not importable) gives the same join
        saved = sys.modules.get("pools")
        sys.modules["pools"] = None   # makes `import pools` raise ImportError
        try:
            assert A.analyze([d])["phase1"][0]["labels"] == p["labels"]
        finally:
            sys.modules.pop("pools")
            if saved is not None:
                sys.modules["pools"] = saved
        # missing pool dirs (e.g. another machine) are reported in the section, not a crash
        d2 = make_run(root, "nll2", "vanilla", loss_mode="nll", pools=("gone_teacher", "gone_base"))
        assert "labels unavailable" in A.analyze([d2])["phase1"][0]["error"]
        # an explicit mapping overrides the pool join; unmatched samples are reported, not dropped silently
        res = A.analyze([d], labels={})
        assert "no label" in res["phase1"][0]["error"]
        assert "!!!" in A.render(res)

# -----------------------------------------------------------------------------
# strict loading and CLI

def test_corrupt_steps_line_raises_with_path_and_line():
    with tempfile.TemporaryDirectory() as root:
        d = make_run(root, "van", "vanilla", steps=5)
        p = os.path.join(d, "steps.jsonl")
        lines = open(p).read().splitlines()
        lines[2] = lines[2][:40]
        open(p, "w").write("\n".join(lines) + "\n")
        try:
            A.load_run(d)
        except ValueError as e:
            assert f"{p}:3:" in str(e), str(e)
        else:
            raise AssertionError("corrupt line did not raise")

def test_truncated_gz_raises_with_path_and_line():
    with tempfile.TemporaryDirectory() as root:
        d = make_run(root, "van", "vanilla", steps=3)
        p = os.path.join(d, "step_001.cos.jsonl.gz")
        raw = open(p, "rb").read()
        open(p, "wb").write(raw[: len(raw) // 2])
        try:
            A.load_run(d)
        except ValueError as e:
            assert p in str(e) and any(f"{p}:{k}:" in str(e) for k in range(1, 10)), str(e)
        else:
            raise AssertionError("truncated gz did not raise")
        make_run(root, "van2", "vanilla", steps=3)
        p = os.path.join(root, "van2", "steps.jsonl")
        open(p, "a").write('{"step": 9, "skipped": false}\n')   # missing keys
        try:
            A.load_run(os.path.join(root, "van2"))
        except ValueError as e:
            assert f"{p}:4:" in str(e) and "missing keys" in str(e), str(e)
        else:
            raise AssertionError("missing keys did not raise")

def test_cli_json_parses():
    with tempfile.TemporaryDirectory() as root:
        dv = make_run(root, "van", "vanilla", seed=1)
        dp = make_run(root, "proj", "projected", seed=1)
        out = subprocess.run([sys.executable, os.path.join(HERE, "analyze.py"), dv, dp, "--json"],
                             capture_output=True, text=True, cwd=HERE)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert set(res) >= {"verification", "trajectories", "buckets", "phase1", "pairs", "decision"}
        assert res["decision"]["rule"] == "RUN Phase 3 (justified)"
        out = subprocess.run([sys.executable, os.path.join(HERE, "analyze.py"), dv], capture_output=True, text=True)
        assert out.returncode == 0 and "== 6. Phase 3 decision ==" in out.stdout, out.stderr

if __name__ == "__main__":
    import traceback
    tests = [(k, v) for k, v in sorted(globals().items()) if k.startswith("test_") and callable(v)]
    passed = failed = 0
    for name, fn in tests:
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
