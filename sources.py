"""sources.py — the two values of --source: where each step's group of rows comes from. setup() gives
the run's data, one plain dict with the same keys for both sources (None where a source has no such
thing); group() gives one step's group (rows, rewards, advantages, the batch), which train.train_step
trains on, whatever its source.

    rows           {pool: rows trained on}: replay, the replayed rows; online, the --mix teacher rows
    pool_dirs      the directories of those pools
    pair_dirs      the pools v_hack's pairs come from; pairs, pairs_src: the pairs and where they came from
    per_pool       replay: rows drawn from each pool per step
    train          online: the training problems (with the hint); eval_hint, eval_plain: the held-out ones
    teacher        online: {problem id: teacher rows} for --mix
    group_size     G, the rows of one group: replay, the rows drawn per step (one group); online, the
                   rollouts per prompt (a step trains prompts_per_step groups)

replay: each step draws `per_pool` rows from each pool into one group (the draw depends only on seed and
step, never on the arm, so vanilla and projected runs of one seed see identical samples); one centred
advantage over the group (Dr.GRPO, no std), or none for --loss-mode=nll.
online: each step draws --prompts-per-step problems (by seed and step), the student generates G - mix
rollouts of each (on its merged weights), the sandbox grades them, --mix teacher rows and the
--intervention apply (interventions.py), and the advantages are centred per prompt group.
"""
import json, os, random, sys

import configs
import antipasto as ap
import interventions
import pools
import torch
import vhack


def ensure_demo(dirs):
    if any(d in pools.DEMO_DIRS for d in dirs) and not all(os.path.isdir(d) for d in pools.DEMO_DIRS):
        print(f"building demo pools in {pools.DEMO_OUT} (once) ...", file=sys.stderr)
        pools.build_demo(pools.DEMO_OUT)


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
    return dict(rows=replay, pool_dirs=replay_dirs, pair_dirs=pair_dirs, pairs=pairs, pairs_src=pairs_src,
                per_pool=per_pool, train=None, eval_hint=None, eval_plain=None, teacher=None,
                group_size=per_pool * len(replay_dirs))


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
    by_problem = {}
    for r in (r for rows in teacher.values() for r in rows):
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
        if len(hinted) < c["prompts_per_step"]:        # online_problems checked the count before --mix's cut
            raise SystemExit(f"error: --prompts-per-step={c['prompts_per_step']}: only {len(hinted)} training problems")
    return dict(rows=teacher, pool_dirs=teacher_dirs, pair_dirs=[] if args.pairs else pair_dirs, pairs=pairs,
                pairs_src=pairs_src, per_pool=None, train=hinted, eval_hint=ev_h, eval_plain=ev_p, teacher=by_problem,
                group_size=c["group_size"])


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


def replay_group(tok, data, args, step, device):
    """One replay step's group: rows drawn from the pools, their batch, one centred group advantage."""
    cfg = args.cfg
    group = draw(data["rows"], data["per_pool"], args.seed, step)
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


def draw_problems(problems, n, seed, step):
    """The step's problems: n distinct ones, drawn by (seed, step) only."""
    return random.Random(f"{seed}:problems:{step}").sample(problems, n)


def online_group(model, tok, modules, messages_fn, data, args, step, out):
    """One online step's group: --prompts-per-step problems, G - mix student rollouts each (generated
    on the merged weights, graded, written to out/rollouts/student), plus mix teacher rows of the same
    problem; the intervention; advantages centred per prompt group; the batch of exact sampled token ids
    with their generation-time log-probs and the reference's (knobs zeroed) log-probs."""
    import rollout
    c = args.cfg
    G, mix = c["group_size"], c["mix"]
    n_st = G - mix
    probs = draw_problems(data["train"], c["prompts_per_step"], args.seed, step)
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
    cells += interventions.teacher_cells(tok, data["teacher"], args, step, probs, msgs_fn)
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


def check_prompt_lengths(tok, data, cfg, messages_fn, args):
    """Online prompts are never cut: a prompt over --max-prompt-tokens is an error naming the longest."""
    fn = interventions.student_messages(messages_fn, args)
    worst = max((len(tok(pools.render_prompt(fn(p), tok), add_special_tokens=False)["input_ids"]), p["id"])
                for p in data["train"] + data["eval_hint"])
    if worst[0] > cfg["max_prompt_tokens"]:
        raise SystemExit(f"error: --max-prompt-tokens={cfg['max_prompt_tokens']}: problem {worst[1]}'s prompt is "
                         f"{worst[0]} tokens; online prompts are never cut, raise the limit")


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


def setup(args):
    """The run's data: the module docstring's keys, for either source."""
    return online_setup(args) if args.source == "online" else replay_setup(args)


def group(model, tok, modules, messages_fn, data, args, step, out):
    """One step's group: drawn from the pools (replay) or generated by the student and graded (online)."""
    if args.source == "online":
        return online_group(model, tok, modules, messages_fn, data, args, step, out)
    return replay_group(tok, data, args, step, next(model.parameters()).device)
