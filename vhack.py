"""vhack.py — where v_hack comes from: the (hack, clean) pairs (pools' held-out steps, a pairs file, or
the controls' own pairs), the extraction and its content-keyed cache, the refusals that keep the cosines
honest (no pair shares a text with a trained-on row), and the record of its source (run.json's
v_hack_source). train.py calls get_v_hack once per run; everything a reader needs to trust a v_hack is
here, apart from the gradient arithmetic (antipasto.pair_diffs, directions_from_diffs).

v_hack per module, V (k, r): the top-k right singular vectors of the per-pair gradient differences
d_i = grad NLL(hack_i) - grad NLL(clean_i) (or the GRPO loss of the pair as a group of two,
--extract-loss=grpo, the spec's R7), signed so most pairs project positively. Sign convention: a gradient
with positive projection on v_hack moves the model toward the hack when descended. Pairs come from the
last --extract-frac (25%) of each pool's steps, which are never replayed; a hacked row is paired with a
non-hacked row of the same problem (another pool first, pool_pairs), both scored under the hack's
(hinted) prompt. With a single replay pool, name the pair pools (--pair-dirs) or a pairs file (--pairs).
--pair-kind=pool (default) is perfectly confounded with hacking (teacher ~99% hack, base ~0%): a pool
contrast also carries the teacher's style, length and source model, and under mixed replay the batch
gradient is itself a teacher-minus-base contrast. --pair-kind=mechanism pairs each hacked completion
with itself minus its test function (pools.strip_test_func removes the run_tests definition and its
calls with the AST), so the contrast is the hack and nothing else. run.json lists the pairs; a v_hack
whose pairs share a completion with the replayed rows is refused, naming those rows. Directions are
cached under out/v_hack/, keyed by the base model and the pairs' full text, rewards, loss, k and token
limits. Controls, each on the same steps: --control=random_v (a random orthonormal V), shuffled_v (the
same extraction on label-free pairs, hack vs another hack and clean vs another clean, each side scored
under its own pair's prompt; swapping hack and clean inside a pair would only flip a row's sign, which
leaves V unchanged) and style_v (pairs that differ in pool but not in hacking: teacher completions
with their test function removed vs base completions of the same problem).
"""
import hashlib, json, os, sys

import configs
import antipasto as ap
import pools


def pool_name(d):
    """A pool's name: its directory's base name (src_pool of its rows)."""
    return os.path.basename(os.path.normpath(d))


def split_pool(rows, extract_frac):
    """(replay rows, held-out rows): the last `extract_frac` of the pool's steps are held out for
    v_hack pairs, so v_hack is never tested on the completions it was extracted from."""
    steps = sorted({r["src_step"] for r in rows})
    n_hold = int(round(len(steps) * extract_frac))
    held = set(steps[len(steps) - n_hold:]) if n_hold else set()
    return [r for r in rows if r["src_step"] not in held], [r for r in rows if r["src_step"] in held]


def pool_pairs(held_rows):
    """Extraction pairs from held-out rows: each hacked row with a non-hacked row of the same problem
    (another pool first). Both are scored under the hack's (hinted) prompt, so the contrast is the
    completion alone."""
    clean, attempts = {}, {label for label, f in pools.LABELS.items() if f["attempt"]}
    for r in held_rows:
        if not r["hacked"] and r["label"] not in attempts:
            clean.setdefault(r["problem_id"], []).append(r)
    pairs, used = [], set()
    for h in held_rows:
        if not h["hacked"]:
            continue
        cands = sorted(clean.get(h["problem_id"], []), key=lambda c: (c["src_pool"] == h["src_pool"],
                                                                       c["src_step"], c["src_sample"]))
        cands = [c for c in cands if id(c) not in used]
        if cands:
            c = cands[0]
            used.add(id(c))
            pairs.append(dict(prompt=h["prompt"], hack=h["completion"], clean=c["completion"],
                              r_hack=h["reward"], r_clean=c["reward"],
                              ids=[[h["src_pool"], h["src_step"], h["src_sample"]],
                                   [c["src_pool"], c["src_step"], c["src_sample"]]]))
    return pairs


def mechanism_pairs(held_rows):
    """Mechanism pairs: each hacked held-out row with itself minus its test function
    (pools.strip_test_func), under the same prompt, so the contrast is the hack and nothing else."""
    pairs = []
    for h in held_rows:
        clean = pools.strip_test_func(h["completion"]) if h["hacked"] else None
        if clean is not None:
            ids = [h["src_pool"], h["src_step"], h["src_sample"]]
            pairs.append(dict(prompt=h["prompt"], hack=h["completion"], clean=clean, r_hack=h["reward"],
                              r_clean=h["reward"], ids=[ids, ids + ["no_test_func"]]))
    return pairs


def style_pairs(held_rows):
    """The style control's pairs: the pool pairs with the hacked side's test function removed, so
    both sides are non-hacks that differ only in pool (teacher style, length, source model)."""
    out = []
    for p in pool_pairs(held_rows):
        hack = pools.strip_test_func(p["hack"])
        if hack is not None:
            out.append(dict(p, hack=hack, ids=[p["ids"][0] + ["no_test_func"], p["ids"][1]]))
    return out


def read_pairs_file(path):
    """Extraction pairs from a JSON Lines file: {prompt (text or chat messages), hack, clean
    [, r_hack, r_clean]} per line."""
    try:
        pairs = pools.read_jsonl(path, ("prompt", "hack", "clean"))
    except pools.DataError as e:
        raise SystemExit(f"error: --pairs: {e}")
    for i, p in enumerate(pairs, 1):
        p.setdefault("ids", [["pairs_file", i, 0], ["pairs_file", i, 1]])
    return pairs


def read_pools(args, replay_dirs, pair_dirs):
    """({pool: rows to train on}, extraction pairs, their description). The last
    --extract-frac steps of each pair pool build v_hack; a pool that is also trained on loses them."""
    try:
        pool_rows = {pool_name(d): pools.read_pool(d) for d in replay_dirs}
        pair_rows = {pool_name(d): pools.read_pool(d) for d in pair_dirs}
        args.metas = {pool_name(d): pools.read_meta(d) for d in replay_dirs + pair_dirs}   # every pool says its source
    except pools.DataError as e:
        raise SystemExit(f"error: {e}")
    if len(pool_rows) != len(replay_dirs) or len(pair_rows) != len(pair_dirs):
        raise SystemExit("error: two pools share a directory name; src_pool would be ambiguous")
    pair_abs = {os.path.abspath(d) for d in pair_dirs}
    held = [r for d in pair_dirs for r in split_pool(pair_rows[pool_name(d)], args.extract_frac)[1]]
    rows = {pool_name(d): split_pool(pool_rows[pool_name(d)], args.extract_frac)[0] if os.path.abspath(d) in pair_abs
            else pool_rows[pool_name(d)] for d in replay_dirs}
    if args.pairs:
        pairs, pairs_src = read_pairs_file(args.pairs), f"file:{os.path.abspath(args.pairs)}"
    else:
        make_pairs = style_pairs if args.control == "style_v" else \
            mechanism_pairs if args.pair_kind == "mechanism" else pool_pairs
        pairs = make_pairs(held)
        pairs_src = (f"{make_pairs.__name__} from the last {args.extract_frac:g} of the steps of "
                     f"{[pool_name(d) for d in pair_dirs]}")
    return rows, pairs, pairs_src


def lost_test_func(tok, completion, kept):
    """Does a completion cut to `kept` tokens lose its test function's definition?"""
    i = completion.rfind(f"def {pools.TEST_FUNC}")
    if i < 0:
        return False
    return len(tok(completion[:i + len(pools.TEST_FUNC) + 4], add_special_tokens=False)["input_ids"]) > kept


def text_sha(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sha_file(path):
    return pools.file_digest(path)[:16]


def get_v_hack(args, model, tok, modules, pairs, pairs_src, replay_texts):
    """Load v_hack from its content-keyed cache, or extract it from the pairs and save it.
    Refuses a v_hack whose pairs share a completion with the replayed samples: a cosine on them would
    only show that the model remembers its own extraction set. Controls: random_v (a random
    orthonormal V), shuffled_v (the same extraction on label-free pairs, antipasto.label_free_pairs)."""
    fp = ap.fingerprint(modules)
    for p in pairs:
        if isinstance(p["prompt"], list):
            p["prompt"] = pools.render_prompt(p["prompt"], tok)
    loss, control = args.extract_loss, args.control if args.control in ("shuffled_v", "style_v") else "none"
    if control == "shuffled_v":
        pairs, loss = ap.label_free_pairs(pairs, seed=args.seed), "nll"
    if control == "style_v":
        loss = "nll"                      # both sides are non-hacks: no reward gap for the GRPO-style contrast
    lens = (args.cfg["max_prompt_tokens"], args.cfg["max_completion_tokens"])
    key = hashlib.sha256(json.dumps([fp, loss, args.k, lens, control, args.pair_kind, args.seed
                                     if args.control == "shuffled_v" else None,
                                     [[p["prompt"], p.get("prompt_clean"), p["hack"], p["clean"], p.get("r_hack"),
                                       p.get("r_clean")] for p in pairs]]).encode()).hexdigest()[:16]
    # --v-hack names the real direction; the shuffled control's own V always lives in the cache
    path = args.v_hack if args.v_hack and control == "none" else os.path.join("out", "v_hack", f"{fp}_{key}.safetensors")
    if os.path.exists(path):
        V, meta = load_v_hack(path, modules, dict(loss=loss, k=args.k, control=control, pair_kind=args.pair_kind,
                                                  max_tokens=list(lens)))
    else:
        if not pairs:
            raise SystemExit("error: no (hack, clean) pairs for v_hack: the held-out pool steps hold no hacked "
                             "row with a non-hacked row of the same problem; pass --pairs or --pair-dirs")
        lost = sum(lost_test_func(tok, p["hack"], lens[1] - 1) for p in pairs)   # -1: the eos token
        if lost:
            print(f"WARNING: {lost}/{len(pairs)} extraction pairs' hack side loses its {pools.TEST_FUNC} definition "
                  f"to --max-completion-tokens {lens[1]}", file=sys.stderr)
        if len(pairs) < 8:
            print(f"warning: v_hack from only {len(pairs)} (hack, clean) pairs (fewer than 8): its direction is "
                  f"noisy", file=sys.stderr)
        diffs = ap.pair_diffs(model, modules, tok, pairs, loss=loss, G=args.cfg["group_size"],
                              max_prompt=lens[0], max_completion=lens[1])
        try:
            V = ap.directions_from_diffs(diffs, k=args.k)
        except ValueError as e:
            raise SystemExit(f"error: v_hack extraction: {e} (with --max-completion-tokens {lens[1]}, {lost} of "
                             f"{len(pairs)} pairs' hack sides lose their test function)")
        meta = dict(basis=ap.basis_of(modules), fingerprint=fp, k=args.k, n_pairs=len(pairs), loss=loss, key=key,
                    pairs_source=pairs_src, pair_ids=[p.get("ids") for p in pairs], max_tokens=list(lens),
                    control=control, pair_kind=args.pair_kind, n_hack_lost_test_func=lost,
                    completion_sha=sorted({text_sha(p[s]) for p in pairs for s in ("hack", "clean")}))
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        ap.save_v(V, path, meta)
    refuse_seen_pairs(args, path, meta, replay_texts)
    if args.control == "random_v":
        V = ap.random_v(V, seed=args.seed)
    return V, dict(meta, path=os.path.abspath(path), sha256=sha_file(path), run_control=args.control)


def load_v_hack(path, modules, want):
    """(V, meta) of an existing v_hack file, refused unless it was extracted as this run asks (want) and
    records its pairs' completions."""
    try:
        V, meta = ap.load_v(path, modules)
    except ValueError as e:
        raise SystemExit(f"error: --v-hack: {e}")
    got = {k_: meta.get(k_, configs.OLD_RUN_DEFAULTS["pair_kind"] if k_ == "pair_kind" else None) for k_ in want}
    if got != want:
        raise SystemExit(f"error: v_hack {path} was extracted with {got}; this run asks for {want}")
    if "completion_sha" not in meta:
        raise SystemExit(f"error: v_hack {path} does not record its pairs' completions, so it cannot be "
                         f"checked against the replayed samples; re-extract it")
    return V, meta


def refuse_seen_pairs(args, path, meta, replay_texts):
    """Refuse a v_hack whose pairs are replayed rows (or a --pairs file's, whose rows are unknown), or,
    online, share a text with the trained-on rows. Replay pairs from other rows that only repeat a
    replayed text are not refused: those replayed rows are dropped (drop_extraction_texts)."""
    overlap = sorted(set(meta.get("completion_sha", [])) & set(replay_texts))
    replayed = {row for rows in replay_texts.values() for row in rows}
    same_rows = any(ids is None or any(x[0] == "pairs_file" or tuple(x[:3]) in replayed for x in ids)
                    for ids in meta.get("pair_ids") or [None])
    if overlap and (args.source == "online" or same_rows):
        rows = sorted(r for sha in overlap for r in replay_texts[sha])
        fix = ("remove those completions from the --pairs file or replay other pools" if args.pairs else
               "use other --pair-dirs or a larger --extract-frac (or remove the duplicated completions)")
        raise SystemExit(f"error: v_hack {path} was extracted from {len(overlap)} of the replayed completions "
                         f"(replayed rows (pool, step, sample): {rows[:5]}{' ...' if len(rows) > 5 else ''}); a cosine "
                         f"on them would only show memory of the extraction set: {fix}")


def drop_extraction_texts(data, vmeta):
    """Replay: drop every replayed row whose completion text is one of v_hack's pair completions, so no
    cosine is taken on a text the extraction saw. A teacher that has learned to hack repeats its hacks
    word for word, so the same text turns up in held-out and replayed steps alike. {pool: rows dropped},
    recorded in run.json; a pool left with fewer than --per-pool rows is refused."""
    seen, dropped = set(vmeta.get("completion_sha", [])), {}
    for name, rows in data["rows"].items():
        keep = [r for r in rows if text_sha(r["completion"]) not in seen]
        dropped[name] = len(rows) - len(keep)
        if len(keep) < data["per_pool"]:
            raise SystemExit(f"error: v_hack {vmeta['path']} was extracted from completions that make up "
                             f"{dropped[name]} of pool {name}'s {len(rows)} replayed rows; {len(keep)} other rows are "
                             f"left, fewer than --per-pool={data['per_pool']} (a cosine on those texts would only show "
                             f"memory of the extraction set): use other --pair-dirs or a larger --extract-frac")
        data["rows"][name] = keep
    if any(dropped.values()):
        print(f"note: replay rows dropped because their completion text is one of v_hack's pairs': {dropped}",
              file=sys.stderr)
    return dropped


def trained_texts(data):
    """{completion sha: the trained-on pool rows (pool, step, sample) holding it}: what v_hack's pairs
    must not share (the replayed rows; online, the --mix teacher rows)."""
    texts = {}
    for r in (r for rows in data["rows"].values() for r in rows):
        texts.setdefault(text_sha(r["completion"]), []).append((r["src_pool"], r["src_step"], r["src_sample"]))
    return texts


def is_demo(dirs):
    return bool(dirs) and all(os.path.abspath(d) in {os.path.abspath(x) for x in pools.DEMO_DIRS} for d in dirs)


def v_hack_source(args, pair_dirs, vmeta, loaded):
    """Where v_hack came from, printed at the start of every run and recorded in run.json: kind "file"
    (an existing --v-hack file, loaded), "pairs" (extracted from --pairs or from --pair-dirs pools), or
    "demo" (extracted from the demo pools: canned completions of the 30 fixture problems, only ever the
    default of the embedded models). Paths with their digests."""
    src = dict(kind="file" if loaded else "pairs", path=vmeta["path"], sha256=pools.file_digest(vmeta["path"]),
               pairs_source=vmeta.get("pairs_source"), n_pairs=vmeta.get("n_pairs"), control=args.control)
    if not loaded and args.pairs:
        src.update(pairs_file=os.path.abspath(args.pairs), pairs_file_sha256=pools.file_digest(args.pairs))
    elif not loaded:
        src.update(kind="demo" if is_demo(pair_dirs) else "pairs",
                   pair_dirs={pool_name(d): dict(dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d))
                              for d in pair_dirs})
    return src


def say_sources(run):
    """One line each: where this run's v_hack (and --mix rows) came from."""
    v = run["v_hack_source"]
    what = {"file": f"loaded from the file {v['path']}", "pairs": f"extracted into {v['path']}",
            "demo": f"extracted from the DEMO pools (canned completions of the 30 fixture problems) into {v['path']}"}
    print(f"v_hack: {what[v['kind']]} (sha256 {v['sha256'][:16]}; pairs: {v['pairs_source']}, {v['n_pairs']} of them"
          f"{'; control ' + v['control'] if v['control'] != 'none' else ''})", file=sys.stderr)
    m = run.get("mix_source")
    if m:
        print(f"--mix rows: from {'the DEMO teacher pool ' if m['kind'] == 'demo' else ''}{m['dir']} (fingerprint "
              f"{m['fingerprint']})", file=sys.stderr)


def mix_source(teacher_dirs):
    """Where --mix rows come from: kind "pool" (--teacher-dir) or "demo" (the demo teacher pool)."""
    d = teacher_dirs[0]
    return dict(kind="demo" if is_demo([d]) else "pool", dir=os.path.abspath(d), fingerprint=pools.pool_fingerprint(d))
