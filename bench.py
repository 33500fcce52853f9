"""bench.py — what a step costs, measured side by side, and the memory budget of the full preset.

    python bench.py              # the whole table (CPU: several minutes)
    python bench.py --quick      # CI-sized shapes and rounds; never fails on timing
    python bench.py --rows 1,6   # some rows only
    python bench.py --gpu        # the GPU check: one online step of a random Qwen3-4B at the full preset's shapes

Every comparison runs its variants in rotated order over repeated rounds after a warm-up and reports
the median of the per-round ratios with their min and max (load that shifts between rounds hits every
variant of a round alike; a ratio of separate medians would not cancel it). Rows:
    1  per-sample contributions: plain forward+backward, one backward with capture, a forward+backward
       per sample, the spec's snapshot-diff (one forward, G backwards with retain_graph); both bases
    2  a replay step split into tokenising, forward, backward, projection (+ cosines), saving
    3  generation tokens/s on merged weights vs through the adapter's hooks; the previous decode loop vs
       rollout.decode (bench model without stops; the organism with its own stop tokens)
    4  an online step split into generation, grading, training (from a short train.py run); without
       --quick, the generation seconds of the same 20 online steps with the previous loop and with this one
    5  grader completions/s, fresh interpreter vs warm path, 1 worker and all cores; cache hit rate
    6  memory: measured peaks of the bench model, base vs wrapped; the capture hooks' temporaries; the
       computed budget of Qwen3-4B at the full preset (configs.memory_budget) against 80 GB
With CUDA, rows 1, 3 and 6 run again at Qwen3-4B shapes (random weights, bf16) on the GPU.

The GPU check, `python bench.py --gpu` (one 80-140 GB GPU, no downloads, meant to finish within 8
minutes): a random-weight Qwen3 of Qwen3-4B's shape in bf16, its SVD adapter built from random orthonormal
factors of the SVD's shapes (same cost and memory; the real SVD of a 4B model takes minutes once, then is
cached), runs one online step of the trainer's own code (sources.online_group and train.train_step,
projected arm) at the full preset's shapes: 43 prompts x 6 rollouts, 1536 + 1024 tokens, gen_batch 64,
micro-batch 4, checkpointing. It prints seconds per phase (generation, grading, batch and reference
log-probs, training; plus the grading of as many canned fixture completions, since random text holds no
code), generated tokens per second merged vs hooked (64 rows x 64 new tokens, interleaved rounds) and the
previous decode loop vs rollout.decode on the same rows, one
micro-batch's forward+backward with per-sample capture vs plain, and the peak memory of generation and of
training beside configs.memory_budget's estimate. `python bench.py --gpu --gpu-shape tiny` runs the same
check on a CPU at a tiny shape (a test runs it). Not measured: no GPU was available.

Measured on an idle 2-core x86_64 CPU (AMD EPYC, torch 2.13.0+cpu, 2 torch threads, no GPU):
`python bench.py --rows 1 --rounds 8` and `python bench.py --rows 2,3,4,5,6` (5 rounds), one after the
other. The GPU rows were not measured (no CUDA device).
  1  per-sample contributions, 12.6M-parameter Qwen3, G=8, T=512, 8 rounds; ratio to a plain
     forward+backward (3.8 s SVD, 2.8 s LoRA). SVD: one backward + capture 1.09x (0.89-1.14), a
     forward+backward per sample 0.93x, snapshot-diff 5.26x, snapshot-diff / capture 5.00x (3.73-5.67).
     LoRA: 0.97x, 0.82x, 5.00x, 5.22x (4.19-6.05). Goals: capture <= 1.10x plain: met (SVD by 0.01, inside
     the rounds' spread); >= 4x faster than snapshot-diff: met.
  2  replay step, 12.6M-parameter Qwen3, 8 demo rows cut to 384+128 tokens: tokenising 6 ms, forward
     2024 ms, backward 2162 ms, projection + cosines 21 ms, saving 13 ms (step 4.6 s): projection 0.50% of
     the step (0.34-0.95%). Goal < 5%: met.
  3  generation, 12.6M-parameter Qwen3, 8 rows x 64 new tokens, fixture prompts (about 1,400 byte tokens).
     Decode loop: SVD merged 476 tok/s vs hooked 317 tok/s, 1.53x (1.40-1.57); LoRA 429 vs 381, 1.16x.
     With the prefill: SVD 1.57x, LoRA 1.14x. Weights a decoded token reads, hooked / merged: SVD 1.99x,
     LoRA 1.05x. Goal merged >= 2x hooked: missed on this CPU (1.53x); see below.
  4  online step by phase, CPU organism (`train.py --source=online --steps=2`: 4 prompts x 8 rollouts, up
     to 192 new tokens): generation 0.5 s, grading 0.2-0.3 s, training 0.2 s; step 1.0-1.1 s.
  5  grader, 30 fixture problems. Canonical solutions, 1 worker: fresh interpreter 9.7/s, warm path
     59.2/s (6.13x); print-only hacks 3.4/s vs 21.7/s (6.41x); 2 workers 16.3 vs 93.5/s (5.72x) and 5.7
     vs 35.6/s (6.24x); exact grade cache over the demo pools: 69.4% hits (320 rows).
  6  memory, bf16 12.6M-parameter Qwen3, one forward+backward of 4 x 256 tokens: resident 24.0 / 41.9 /
     25.7 MiB (base / SVD / LoRA), step peak 248.7 / 242.2 / 280.2 MiB. Capture temporaries of one large
     module at Qwen3-4B shapes (B=8, T=2560, bf16): SVD hook 599.8 MiB with whole float32 copies, 90.2 MiB
     in token slices (configs.CAPTURE_CHUNK elements at a time, so a bf16 model never holds whole float32
     copies of its activations); LoRA hook (d=9728) 765.8 MiB, 71.0 MiB. Goal: fit 80 GB (below).
Row 3's goal is a GPU goal. Merging removes the adapter's factors from every decoded token: the SVD
adapter's U and Vh are as large as the targeted weights again (1.99x the bytes a token reads at the bench
shape, 2.22x for Qwen3-4B in bf16: 8.04 GB of weights + 9.78 GB of factors), so a memory-bound decode step
gains up to that much. On this CPU each decode step also pays costs that merging does not touch (attention
over the ~1,400-token KV cache, the cache's concatenation, the top-p sort of the vocabulary, Python), so the
measured 1.53x stays below the 1.99x bound. The decode-loop column times only the forward calls on one new
position (hooks on the model, every step through it), so the prompts' prefill is not in it. Those
figures are of the previous decode loop. Row 3 also times the previous loop (dynamic_decode: DynamicCache,
a chunk decoded to its longest row, HF forward, per-row torch.sort) beside rollout.decode (cache written in
place, finished rows refilled, token_step, numpy's sort of unique keys), interleaved, same tokens
(`python bench.py --rows 3 --rounds 3`, idle): on the organism's real spread of completion lengths (2-96
tokens) 2971 -> 5993 tok/s, 2.02x (2.00-2.02) with all 32 rows at once, and 1.36x (1.36-1.36) at a
gen_batch of 8; on the bench model (8 rows, no stop token, nothing to refill) 1.07x (1.06-1.09). Row 4b
(`python bench.py --rows 4`): the organism preset's generation seconds per online step, median of the
same 20 steps, 0.435 s -> 0.220 s, 1.95x (1.74-2.17), the same rollouts. Row 1's
"forward+backward per sample" is a little cheaper than the batched plain pass on this CPU (one row's
activations and logits stay in cache); on a GPU, where one row leaves most of the device idle, G separate
passes cost more (not measured here). Capture costs what the plain pass costs either way.

The computed budget of Qwen3-4B at the full preset (6 x 43 prompts, 1536 + 1024 tokens, bf16;
configs.memory_budget with configs.QWEN3_4B, GB = 1e9 bytes; print_budget() prints it; the online
trainer's --dry-run prints the same numbers for its own run):
    item                                                svd, mb 1, ckpt  svd, mb 8, no ckpt  lora r=16, mb 1, ckpt
    weights                                             8.04             8.04                8.04
    SVD factors (U, Vh bf16; S float32)                 9.78             9.78                0
    knobs + grads (batch and per-sample) + AdamW state  0.01             0.03                0.65
    merged generation copy                              7.27             7.27                7.27
    KV cache, 145 rows decoded at once (all 258: 97.4)  54.74            54.74               54.74
    saved activations (without / with checkpointing)    14.63 / 0.88     117.02 / 7.03       11.91 / 0.80
    logits (bf16 + float32 copy + float32 log-softmax)  3.89             31.12               3.89
    per-sample capture temporaries                      0.05             0.05                0.05
    total = resident + max(generation, training)        79.8             166.0               70.7
Generation must decode at most 145 of the 258 rows at a time on an 80 GB GPU (0.38 GB of KV cache a row);
training fits with micro-batches of 1 to 8 with checkpointing, not with 8 without it. The full preset
therefore decodes 64 rollouts at a time (gen_batch, 24 GB of KV cache) and trains 4 rows per micro-batch
with checkpointing: `train.py --source=online --preset=full --problems=FILE --pair-dirs=T,B --dry-run`
prints 49.3 GB in all (fast: 34.8 GB). These are estimates; not checked on a GPU. The SVD adapter's
factors are cached on disk (antipasto.CACHE_DIR, ~/.cache/antipasto_svd/, one file per weight, keyed by
its bytes) in the model's dtype: about 9.8 GB of disk for Qwen3-4B in bf16 (U and Vh are about 1.35x the
targeted weights), 19.6 GB in float32.
"""
import argparse, contextlib, ctypes, functools, gc, io, os, subprocess, sys, tempfile, time

import configs
configs.reproducible()   # before torch (MKL) loads: it reads these variables once, when it loads
import antipasto as ap
import pools
import torch

# the bench model: a Qwen3 of 12.6M parameters (random weights), big enough that the matmuls dominate
BENCH_QWEN3 = dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                   num_key_value_heads=2, head_dim=64, vocab_size=8192, tie_word_embeddings=False)
QUICK_QWEN3 = dict(configs.TINY_QWEN3, vocab_size=512)
# the full preset's shape of one step (spec2 Phase 3), as configs.memory_budget reads it
FULL_RUN = dict(group=6, prompts_per_step=43, max_prompt_tokens=1536, max_completion_tokens=1024, micro_batch=1,
                dtype_bytes=2, basis="svd", lora_rank=configs.LORA_RANK, grad_checkpointing=True)
GPU_GB = 80


# ----------------------------------------------------------------------------- measuring

def med(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleave(fns, rounds, device="cpu", warmup=1):
    """{name: [seconds per round]}: every variant once per round, the order rotated each round."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            sync(device)
            t = time.perf_counter()
            fns[k]()
            sync(device)
            times[k].append(time.perf_counter() - t)
    return times


def ratio(times, num, den):
    """(median, min, max) of the per-round ratios num / den."""
    rs = [a / b for a, b in zip(times[num], times[den])]
    return med(rs), min(rs), max(rs)


def fmt_ratio(r):
    return f"{r[0]:.2f}x ({r[1]:.2f}-{r[2]:.2f})"


def rss_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key}")


@functools.lru_cache(1)
def exact_malloc():
    """Large CPU allocations straight from mmap and back on free (glibc), so the resident set follows
    live tensors; False where that is unavailable (not Linux/glibc: CPU peaks are then not measured)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)              # M_MMAP_THRESHOLD: 64 KiB, fixed
        open("/proc/self/clear_refs", "w").write("5")
        return libc
    except OSError:
        return False


def peak_bytes(fn, device="cpu"):
    """(fn's result, its peak memory above what was live before it): CUDA's allocator peak on a GPU,
    the resident-set high-water mark (reset through /proc/self/clear_refs) on a CPU; None where
    neither can be read."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - before
    libc = exact_malloc()
    if not libc:
        return fn(), None
    libc.malloc_trim(0)
    before = rss_kb("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")   # resets VmHWM to the current resident set
    out = fn()
    return out, (rss_kb("VmHWM") - before) * 1024


# ----------------------------------------------------------------------------- models and batches

def bench_model(shape, dtype=torch.float32, device="cpu", seed=0):
    """A randomly initialised Qwen3 of `shape` (configs' shape keys), room for 4096 positions."""
    return configs.random_qwen3(shape, seed, dtype, device,
                                max_position_embeddings=max(4096, shape.get("max_position_embeddings", 0)))


def adapter(model, basis, cache_dir):
    if basis == "svd":
        return ap.wrap(model, cache_dir=cache_dir)
    import lora_adapter
    return lora_adapter.wrap(model, rank=configs.LORA_RANK, alpha=configs.LORA_ALPHA)


def set_knobs(modules, scale=0.01, seed=0):
    """Knobs away from zero (a trained-looking adapter; LoRA's B nonzero, so A has gradients too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules.values():
            k = ap.knob(m)
            k.add_(torch.randn(k.shape, generator=g).to(k.device) * scale)


def random_batch(B, T, vocab, device, prompt_frac=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g).to(device)
    cm = torch.zeros(B, T, device=device)
    cm[:, int(T * prompt_frac):] = 1.0
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), comp_mask=cm)


# ----------------------------------------------------------------------------- row 1

def row_per_sample(shape, G, T, rounds, device="cpu", dtype=torch.float32, cache_dir=None):
    """Per-sample contributions four ways, both bases: {basis: {variant: ratio to plain}}."""
    out = {}
    for basis in ("svd", "lora"):
        model = bench_model(shape, dtype, device)
        modules = adapter(model, basis, cache_dir)
        set_knobs(modules)
        model.train()
        batch = random_batch(G, T, shape["vocab_size"], device)
        rewards = [3.5, 0.5] * (G // 2) + [0.0] * (G % 2)

        def zero():
            for m in modules.values():
                ap.knob(m).grad = None

        def losses_of(b):
            return ap.sample_losses(ap.token_logps(model, b), b["comp_mask"], "grpo", rewards, G=G)[0]

        def plain():
            zero()
            losses_of(batch).sum().backward()

        def capture():
            ap.per_sample_grads(model, modules, batch, "grpo", rewards, G=G)

        adv = torch.tensor(rewards) - torch.tensor(rewards).mean()

        def separate():                        # one forward+backward per sample
            for b in range(G):
                zero()
                one = {k: v[b:b + 1] for k, v in batch.items()}
                lp = ap.token_logps(model, one)
                (-adv[b] * (lp * one["comp_mask"]).sum() / one["comp_mask"].sum() / G).backward()

        def snapshot_diff():                   # the spec's: one forward, G backwards, diff the .grad snapshots
            zero()
            losses = losses_of(batch)
            prev = {n: torch.zeros_like(ap.knob(m)) for n, m in modules.items()}
            for b in range(G):
                losses[b].backward(retain_graph=b < G - 1)
                for n, m in modules.items():
                    g = ap.knob(m).grad.clone()
                    _ = g - prev[n]                # sample b's contribution
                    prev[n] = g

        fns = dict(plain=plain, capture=capture, separate=separate, snapshot_diff=snapshot_diff)
        times = interleave(fns, rounds, device)
        out[basis] = dict(ms={k: med(v) * 1e3 for k, v in times.items()},
                          **{k: ratio(times, k, "plain") for k in fns if k != "plain"},
                          snap_over_capture=ratio(times, "snapshot_diff", "capture"))
        del model, modules
    return out


def print_row1(res, where):
    print(f"1. per-sample contributions ({where}); ratio to plain forward+backward, median (min-max) of rounds")
    print(f"   {'basis':6s} {'plain ms':>9s}  {'one backward + capture':>22s}  {'fwd+bwd per sample':>20s}  "
          f"{'snapshot-diff':>17s}  {'snapshot / capture':>18s}")
    for basis, r in res.items():
        print(f"   {basis:6s} {r['ms']['plain']:9.1f}  {fmt_ratio(r['capture']):>22s}  {fmt_ratio(r['separate']):>20s}  "
              f"{fmt_ratio(r['snapshot_diff']):>17s}  {fmt_ratio(r['snap_over_capture']):>18s}")
    print("   goals: capture <= 1.10x plain; capture >= 4x faster than snapshot-diff")


# ----------------------------------------------------------------------------- row 2

def demo_rows(tmp):
    """The demo pools' rows (out/pools when built, else built once into `tmp`)."""
    dirs = pools.DEMO_DIRS
    if not all(os.path.isdir(d) for d in dirs):
        with contextlib.redirect_stdout(io.StringIO()):
            dirs = pools.build_demo(os.path.join(tmp, "pools"), workers=os.cpu_count())
    return [pools.read_pool(d) for d in dirs]


def row_replay_step(shape, G, max_prompt, max_completion, rounds, tmp, cache_dir):
    """One replay step of G demo rows (half teacher, half base) on the bench model, by phase:
    {phase: [seconds per round]} and the projection's share per round."""
    import train
    teacher, base = demo_rows(tmp)
    group = teacher[:G // 2] + base[:G - G // 2]
    tok = configs.byte_tokenizer()
    model = bench_model(shape)
    modules = ap.wrap(model, cache_dir=cache_dir)
    set_knobs(modules)
    V = ap.random_v({n: torch.ones(1, ap.knob(m).numel()) for n, m in modules.items()}, seed=0)
    opt = torch.optim.AdamW([ap.knob(m) for m in modules.values()], lr=1e-4)
    rewards = [float(r["reward"]) for r in group]
    out_dir = tempfile.mkdtemp(dir=tmp)
    phases = ("tokenise", "forward", "backward", "projection", "saving")
    times = {k: [] for k in phases}

    def step(record):
        t = [time.perf_counter()]
        batch = ap.make_batch(tok, [pools.render_prompt(r["prompt"], tok) for r in group],
                              [r["completion"] for r in group], max_prompt, max_completion)
        t.append(time.perf_counter())
        for m in modules.values():
            ap.knob(m).grad = None
        model.train()
        with ap.capture_per_sample(modules):
            lp = ap.token_logps(model, batch)
            losses, _ = ap.sample_losses(lp, batch["comp_mask"], "grpo", rewards, G)
            t.append(time.perf_counter())
            losses.sum().backward()
        gs = {n: m.grad_sample for n, m in modules.items()}
        t.append(time.perf_counter())
        grads = {n: ap.knob(m).grad.detach().clone() for n, m in modules.items()}
        new, st = ap.project(grads, V)
        ap.sample_cosines(gs, V)
        train.global_cos(grads, V)
        for n, m in modules.items():
            ap.knob(m).grad = new[n]
        opt.step()
        t.append(time.perf_counter())
        slim = [dict(step=0, sample_id=i, cos_in=st["cos_in"]) for i in range(G)]
        pools.atomic_write(os.path.join(out_dir, "step_000.cos.jsonl.gz"), pools.gz_jsonl_bytes(slim))
        buf = io.BytesIO()
        torch.save(dict(knobs={n: ap.knob(m).detach() for n, m in modules.items()}, opt=opt.state_dict()), buf)
        pools.atomic_write(os.path.join(out_dir, "state.pt"), buf.getvalue())
        t.append(time.perf_counter())
        if record:
            for k, a, b in zip(phases, t, t[1:]):
                times[k].append(b - a)

    step(False)                                # warm-up
    for _ in range(rounds):
        step(True)
    total = [sum(ts) for ts in zip(*times.values())]
    share = [p / s for p, s in zip(times["projection"], total)]
    return dict(times=times, total=total, share=(med(share), min(share), max(share)))


def print_row2(res, where):
    print(f"2. replay step by phase ({where}); median ms and share of the step")
    parts = "  ".join(f"{k} {med(v) * 1e3:.0f} ms ({med([a / s for a, s in zip(v, res['total'])]) * 100:.1f}%)"
                      for k, v in res["times"].items())
    print(f"   {parts}  | step {med(res['total']) * 1e3:.0f} ms")
    s = res["share"]
    print(f"   projection + cosines share: {s[0] * 100:.2f}% ({s[1] * 100:.2f}-{s[2] * 100:.2f}%)  goal < 5%")


# ----------------------------------------------------------------------------- row 3

@contextlib.contextmanager
def forward_stopwatch(model, device, spent):
    """Inside the block rollout.decode runs every step through model() (no token_step, even on merged
    weights, so that merged vs hooked compares what merging saves, the weights a token reads; token_step's
    own saving is row_loops'), and each forward call's seconds go to spent["prefill"] (calls on more than
    one new position: the prompts) or spent["decode"] (one position: a decoded token)."""
    import rollout
    t0, can = [], rollout.can_step_by_hand

    def pre(m, args, kwargs):
        sync(device)
        t0.append(time.perf_counter())

    def post(m, args, kwargs, out):
        sync(device)
        ids = kwargs.get("input_ids", args[0] if args else None)
        spent["decode" if ids.shape[1] == 1 else "prefill"] += time.perf_counter() - t0.pop()
    hooks = [model.register_forward_pre_hook(pre, with_kwargs=True), model.register_forward_hook(post, with_kwargs=True)]
    rollout.can_step_by_hand = lambda model: False
    try:
        yield spent
    finally:
        rollout.can_step_by_hand = can
        for h in hooks:
            h.remove()


def weight_bytes_per_token(model, modules):
    """(merged, hooked) bytes of weights one decoded token reads: every parameter and buffer but the
    input embedding (a row lookup), with the tensors the adapter modules' forward reads (U, Vh, delta_S
    or the LoRA knob) on top when hooked."""
    emb = model.get_input_embeddings().weight
    own = {id(t): (k, t) for m in modules.values()
           for k, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))}
    rest = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if id(t) not in own and t is not emb}
    own = {i: t for i, (k, t) in own.items() if k != "S"}   # SVDLinear keeps S for reference; forward never reads it
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    merged = size(rest.values()) + (size([emb]) if model.get_output_embeddings().weight is emb else 0)
    return merged, merged + size(own.values())


def dynamic_decode(model, pad_id, rows, max_new_tokens, temperature, top_p, eos, gen_batch=None):
    """The previous decode loop, kept as the baseline row 3 compares rollout.decode against (same
    arguments and results): chunks of gen_batch rows, each left-padded and decoded to its longest row
    with a DynamicCache (keys and values concatenated at every token)."""
    bs = gen_batch or len(rows)
    out = [[], [], []]
    for a in range(0, len(rows), bs):
        for acc, part in zip(out, dynamic_decode_chunk(model, pad_id, rows[a:a + bs], max_new_tokens, temperature,
                                                       top_p, eos)):
            acc += part
    return tuple(out)


def sorted_pick(logits, u, temperature, top_p):
    """The previous rollout.pick, kept with the previous loop: the same tokens, with the vocabulary sorted per
    row by torch.sort (rollout.sort_rows now sorts all rows in one pass)."""
    import rollout
    return rollout.pick(logits, u, temperature, top_p, sort=lambda p: p.sort(dim=-1, descending=True, stable=True))


def dynamic_decode_chunk(model, pad_id, chunk, max_new_tokens, temperature, top_p, eos):
    """One chunk [(prompt ids, seed)] of dynamic_decode: left padding, position ids that skip the
    padding, DynamicCache. Returns (token ids, log-probs, truncated) per row."""
    import rollout
    from transformers import DynamicCache
    dev = next(model.parameters()).device
    B = len(chunk)
    T = max(len(e) for e, _ in chunk)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, (e, _) in enumerate(chunk):
        ids[i, T - len(e):] = torch.tensor(e)
        mask[i, T - len(e):] = 1
    u = torch.stack([torch.rand(max(max_new_tokens, 1), generator=torch.Generator().manual_seed(s),
                                dtype=torch.float64) for _, s in chunk]).to(dev)   # (B, max_new)
    ids, mask, eos = ids.to(dev), mask.to(dev), eos.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)                                  # (B, T)
    cache = DynamicCache()
    kw = {rollout.cache_kwarg(model): cache}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **kw).logits[:, -1].float()                                # (B, V)
    nxt = pos[:, -1:] + 1                                                     # (B, 1)
    new, lps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        tok_t = sorted_pick(logits, u[:, t], temperature, top_p)                      # (B,)
        lp_t = torch.log_softmax(logits, -1).gather(-1, tok_t[:, None])[:, 0]  # (B,)
        new.append(torch.where(done, -1, tok_t))
        lps.append(lp_t)
        done = done | torch.isin(tok_t, eos)
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=dev)], 1)   # (B, T + t + 1)
        logits = model(input_ids=tok_t[:, None], attention_mask=mask, position_ids=nxt, use_cache=True,
                       **kw).logits[:, -1].float()
        nxt = nxt + 1
    if not new:
        return [[] for _ in chunk], [[] for _ in chunk], [True] * B
    new, lps = torch.stack(new, 1).cpu(), torch.stack(lps, 1).cpu()          # (B, steps)
    out_ids, out_lp, trunc = [], [], []
    for i in range(B):
        k = int((new[i] >= 0).sum())
        out_ids.append(new[i, :k].tolist())
        out_lp.append(lps[i, :k].tolist())
        trunc.append(not bool(torch.isin(new[i, :k], eos.cpu()).any()))
    return out_ids, out_lp, trunc


def fixture_prompts(tok, B):
    """The first B fixture problems' hinted prompts, rendered."""
    return [pools.render_prompt(p["prompt"], tok) for p in pools.load_problems(pools.FIXTURE_PROBLEMS, hint=True)[:B]]


def row_generation(shape, B, new_tokens, rounds, device="cpu", dtype=torch.float32, cache_dir=None):
    """Tokens/s through the adapter's hooks vs on merged weights, same model, prompts and seed, for
    the decode loop alone (forward calls on one new position, timed by hooks) and the whole generation
    (prompt prefill included); and the weight bytes a decoded token reads each way, the ratio a
    memory-bound decode step cannot beat."""
    import rollout
    tok = configs.byte_tokenizer()
    probs = pools.load_problems(pools.FIXTURE_PROBLEMS, hint=True)[:B]
    prompts = fixture_prompts(tok, B)
    out = {}
    for basis in ("svd", "lora"):
        model = bench_model(shape, dtype, device)
        modules = adapter(model, basis, cache_dir)
        set_knobs(modules)
        n_tok, parts = [], {"hooked": [], "merged": []}

        def run(kind):
            spent = {"prefill": 0.0, "decode": 0.0}
            with forward_stopwatch(model, device, spent):
                o = rollout.sample(model, tok, prompts, 1, new_tokens, 1.0, 1.0, 0, 0, [p["id"] for p in probs],
                                   eos_ids=[-1])   # no stop token: every row makes new_tokens
            n_tok.append(sum(len(x) for x in o["token_ids"]))
            parts[kind].append(spent)

        def on_merged():
            with rollout.merged(model):
                run("merged")
        times = interleave(dict(hooked=lambda: run("hooked"), merged=on_merged), rounds, device)
        dec = {k: [p["decode"] for p in v[-rounds:]] for k, v in parts.items()}    # the timed rounds
        n, n_dec = n_tok[-1], n_tok[-1] - B           # the first new token of each row comes from the prefill
        mb, hb = weight_bytes_per_token(model, modules)
        out[basis] = dict(hooked=n / med(times["hooked"]), merged=n / med(times["merged"]),
                          speedup=ratio(times, "hooked", "merged"),
                          dec_hooked=n_dec / med(dec["hooked"]), dec_merged=n_dec / med(dec["merged"]),
                          dec_speedup=ratio(dec, "hooked", "merged"), bytes_ratio=hb / mb)
        del model, modules
    return out


def row_loops(model, tok, prompts, new_tokens, gen_batches, rounds, eos_ids=None, device="cpu", ids=None):
    """Tokens/s of the previous decode loop (dynamic_decode) vs rollout.decode on the same rows and
    seeds, interleaved, for each gen_batch: {gen_batch: dict(old, new tok/s, speedup = median (min-max)
    of per-round old / new seconds, same = both loops returned the same tokens and truncation,
    max_dlogp, lengths)}. eos_ids None: the model's stop tokens (its real spread of lengths)."""
    import rollout
    ids = ids or list(range(len(prompts)))
    rows = [(tok(p, add_special_tokens=False)["input_ids"], rollout.sample_seed(0, 0, i, r))
            for r, (i, p) in enumerate(zip(ids, prompts))]
    eos = torch.tensor(rollout.stop_token_ids(model, tok) if eos_ids is None else list(eos_ids))
    out = {}
    for gb in gen_batches:
        res = {}
        args = (model, tok.pad_token_id, rows, new_tokens, 1.0, 1.0, eos, gb)

        def run(kind, loop):
            with torch.no_grad():
                res[kind] = loop(*args)
        times = interleave(dict(old=lambda: run("old", dynamic_decode), new=lambda: run("new", rollout.decode)),
                           rounds, device)
        n = sum(len(x) for x in res["new"][0])
        out[gb] = dict(old=n / med(times["old"]), new=n / med(times["new"]), speedup=ratio(times, "old", "new"),
                       same=res["old"][0] == res["new"][0] and res["old"][2] == res["new"][2],
                       max_dlogp=max((abs(a - b) for x, y in zip(res["old"][1], res["new"][1]) for a, b in zip(x, y)),
                                     default=0.0),
                       lengths=sorted(len(x) for x in res["new"][0]))
    return out


def print_loops(res, what):
    for gb, r in res.items():
        ls = r["lengths"]
        print(f"   {what}, gen_batch {gb or len(ls)}: previous loop {r['old']:8.1f} tok/s  new {r['new']:8.1f} tok/s  "
              f"new / previous {fmt_ratio(r['speedup'])}  (same tokens: {'yes' if r['same'] else 'NO'}, "
              f"max |d logp| {r['max_dlogp']:.1e}; {len(ls)} rows of {ls[0]}-{ls[-1]} tokens, median {med(ls):g})")


def print_row3(res, where, B, new_tokens):
    print(f"3. generation ({where}, {B} rows x {new_tokens} new tokens, prompts of the fixture problems); "
          f"merged / hooked = median (min-max) of per-round ratios")
    for basis, r in res.items():
        print(f"   {basis:6s} decode loop: hooked {r['dec_hooked']:8.1f} tok/s  merged {r['dec_merged']:8.1f} tok/s  "
              f"merged / hooked {fmt_ratio(r['dec_speedup'])}  (weights read per token, hooked / merged: "
              f"{r['bytes_ratio']:.2f}x)")
        print(f"   {'':6s} with prefill: hooked {r['hooked']:8.1f} tok/s  merged {r['merged']:8.1f} tok/s  "
              f"merged / hooked {fmt_ratio(r['speedup'])}")
    print("   goal: merged >= 2x hooked for decoding")


# ----------------------------------------------------------------------------- row 4

def row_online(tmp, timeout=900):
    """Per-step gen_s / grade_s / train_s of `train.py --source=online --steps=2` (steps.jsonl)."""
    out = os.path.join(tmp, "online")
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py"), "--source=online",
           "--steps=2", "--quiet", "--out", out]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=tmp)
    except subprocess.TimeoutExpired:
        return f"not measured: `{' '.join(cmd[1:])}` ran past {timeout} s"
    if p.returncode != 0:
        return f"not measured: `{' '.join(cmd[1:])}` exited {p.returncode}: {(p.stderr.strip().splitlines() or [''])[-1][:200]}"
    rows = pools.read_jsonl(os.path.join(out, "steps.jsonl"))
    return [{k: r.get(k) for k in ("step", "gen_s", "grade_s", "train_s", "time_s")} for r in rows]


def print_row4(res):
    print("4. online step (train.py --source=online --steps=2, CPU organism), seconds by phase")
    if isinstance(res, str):
        print(f"   {res}")
        return
    f = lambda x: "   n/a" if x is None else f"{x:6.1f}"
    for r in res:
        print(f"   step {r['step']}: generation {f(r['gen_s'])}  grading {f(r['grade_s'])}  training {f(r['train_s'])}"
              f"  (step {f(r['time_s'])})")


def row_online_loops(tmp, steps=20, rounds=1, argv=()):
    """The online step's generation seconds with the previous decode loop (dynamic_decode, sorted_pick) and
    with rollout.decode, on the same `steps` steps of one train.py run (in process, the organism preset):
    both loops sample the same tokens, so both runs train on the same rollouts step for step. Variants
    rotate over `rounds`; per loop, every step's gen_s of every round; `argv`: more train.py flags (tests).
    A string with the reason when a run fails."""
    import rollout, train
    loops = dict(previous=dynamic_decode, current=rollout.decode)
    gen, completions = {k: [] for k in loops}, {}
    real = rollout.decode
    for i in range(rounds):
        for name in list(loops)[i % 2:] + list(loops)[:i % 2]:
            out = os.path.join(tmp, f"loops_{name}_{i}")
            rollout.decode, cwd = loops[name], os.getcwd()
            os.chdir(tmp)                    # the demo pools and the v_hack cache land in tmp, not the checkout
            try:
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    train.main(["--source=online", f"--steps={steps}", "--eval-every=0", "--quiet", *argv, "--out", out])
            except (SystemExit, train.RunError) as e:
                return f"not measured: train.py --source=online --steps={steps} ({name} loop) stopped: {e}"
            finally:
                rollout.decode = real
                os.chdir(cwd)
            gen[name].append([r["gen_s"] for r in pools.read_jsonl(os.path.join(out, "steps.jsonl"))])
            completions[name] = [r["completion"] for r in pools.read_pool(os.path.join(out, "rollouts", "student"))]
    per_step = [a / b for ra, rb in zip(gen["previous"], gen["current"]) for a, b in zip(ra, rb)]
    return dict(steps=steps, rounds=rounds, previous=med([x for r in gen["previous"] for x in r]),
                current=med([x for r in gen["current"] for x in r]), ratio=(med(per_step), min(per_step), max(per_step)),
                same=completions["previous"] == completions["current"])


def print_row4b(res):
    print("4b. online generation seconds per step, the previous decode loop vs rollout.decode (organism preset, "
          "in process; the same steps: both loops sample the same tokens)")
    if isinstance(res, str):
        print(f"   {res}")
        return
    print(f"   median over {res['steps']} steps x {res['rounds']} round(s): previous {res['previous']:.3f} s, current "
          f"{res['current']:.3f} s; per-step ratio previous/current {fmt_ratio(res['ratio'])}; same rollouts: "
          f"{'yes' if res['same'] else 'NO'}")


# ----------------------------------------------------------------------------- row 5

def row_grader(rounds, limit, tmp):
    """pools.bench_grader's fresh vs warm rates at 1 worker and all cores, and the hit rate an exact
    grade cache has over the demo pools (rows whose grade key was seen before)."""
    import sandbox
    with contextlib.redirect_stdout(io.StringIO()):
        rates, ratios = pools.bench_grader(pools.FIXTURE_PROBLEMS, rounds, limit,
                                           workers_list=sorted({1, os.cpu_count() or 1}))
    seen, hits, n = set(), 0, 0
    for rows in demo_rows(tmp):
        for r in rows:
            hint = bool(r.get("hint"))
            by_id = {p["id"]: p for p in pools.load_problems(pools.FIXTURE_PROBLEMS, hint=hint)}
            key = pools.grade_key(by_id[r["problem_id"]], pools.extract_code(r["completion"]),
                                  dict(cpu_s=sandbox.CPU_S, mem_mb=sandbox.MEM_MB))
            hits += key in seen
            seen.add(key)
            n += 1
    return dict(rates=rates, ratios=ratios, hit_rate=hits / n, n_rows=n)


def print_row5(res, n_problems):
    print(f"5. grader completions/s ({n_problems} fixture problems; median over rounds; speedup = median (min-max) "
          f"of per-round warm/fresh)")
    for (kind, workers), rs in res["ratios"].items():
        fr, wa = med(res["rates"][(kind, workers, "fresh")]), med(res["rates"][(kind, workers, "warm")])
        print(f"   {kind:>15s} workers={workers}: fresh {fr:6.1f}/s  warm {wa:6.1f}/s  "
              f"speedup {fmt_ratio((med(rs), min(rs), max(rs)))}")
    print(f"   exact grade cache over the demo pools: {res['hit_rate'] * 100:.1f}% hits ({res['n_rows']} rows)")


# ----------------------------------------------------------------------------- row 6

def float32_copies_sum(a, b):
    """The capture formulation token_sum replaced: whole float32 copies, (B, T, r) -> (B, r)."""
    return (a.float() * b.float()).sum(1)


def float32_copies_outer(a, b):
    """The LoRA capture formulation token_outer replaced: (B, T, m) x (B, T, k) -> (B, m, k)."""
    return a.float().transpose(1, 2) @ b.float()


def row_memory(shape, G, T, dtype, device="cpu", cache_dir=None, hook_shape=None):
    """Measured peaks (bytes): the bench model's resident tensors and one forward+backward, base
    (gradients to the input embeddings only) vs each adapter (per-sample capture on); and the
    capture temporaries of one large module at `hook_shape` (B, T, r, d), new vs float32 copies."""
    import lora_adapter
    res = {}
    batch = random_batch(G, T, shape["vocab_size"], device)
    for kind in ("base", "svd", "lora"):
        model = bench_model(shape, dtype, device)
        modules = None if kind == "base" else adapter(model, kind, cache_dir)
        if modules:
            set_knobs(modules)
        resident = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        model.train()

        def step():
            if modules is None:
                emb = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
                lp = model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).logits[:, :-1].float().log_softmax(-1)
                lp.gather(-1, batch["input_ids"][:, 1:, None]).mean().backward()
            else:
                ap.per_sample_grads(model, modules, batch, "nll", G=G)
        step()                                   # warm-up: lazy initialisations are not the step's
        _, peak = peak_bytes(step, device)
        res[kind] = dict(resident=resident, peak=peak)
        del model, modules
    if hook_shape:
        B, Th, r, d = hook_shape
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(B, Th, r, generator=g, device=device).to(dtype)
        b = torch.randn(B, Th, r, generator=g, device=device).to(dtype)
        res["hook_svd"] = {k: peak_bytes(lambda: f(a, b), device)[1]
                           for k, f in (("float32 copies", float32_copies_sum), ("token slices", ap.token_sum))}
        del a, b
        a = torch.randn(B, Th, d, generator=g, device=device).to(dtype)
        b = torch.randn(B, Th, 16, generator=g, device=device).to(dtype)
        res["hook_lora"] = {k: peak_bytes(lambda: f(a, b), device)[1]
                            for k, f in (("float32 copies", float32_copies_outer),
                                         ("token slices", lora_adapter.token_outer))}
        res["hook_shape"] = hook_shape
    return res


def print_row6(res, where, G, T):
    mb = lambda x: "   n/a" if x is None else f"{x / 2 ** 20:7.1f}"
    print(f"6. memory ({where}), MiB; step = one forward+backward of {G} x {T} tokens above the resident tensors")
    for kind in ("base", "svd", "lora"):
        r = res[kind]
        what = "base (grads to embeddings)" if kind == "base" else f"{kind} adapter, capture on"
        print(f"   {what:28s} resident {mb(r['resident'])}   step peak {mb(r['peak'])}")
    if "hook_shape" in res:
        B, Th, r, d = res["hook_shape"]
        for key, what in (("hook_svd", f"svd hook (B={B}, T={Th}, r={r})"), ("hook_lora", f"lora hook (B={B}, T={Th}, d={d})")):
            h = res[key]
            print(f"   capture temporaries, {what}: float32 copies {mb(h['float32 copies'])}  "
                  f"token slices {mb(h['token slices'])}")


def print_budget(shape=configs.QWEN3_4B, run=FULL_RUN):
    """The computed budget (configs.memory_budget, the numbers train.py --dry-run prints) for a few
    micro-batch / checkpointing choices of both bases, and the generation batch that fits."""
    n_rows = run["group"] * run["prompts_per_step"]
    b = configs.memory_budget(shape, run)
    per_row = b["kv_cache"] / n_rows
    fit = int((GPU_GB - b["resident"] - b["merged_copy"]) // per_row)
    cols = [("svd", 1, True), ("svd", 8, True), ("svd", 8, False), ("lora", 1, True), ("lora", 8, False)]
    budgets = [configs.memory_budget(shape, dict(run, basis=bs, micro_batch=m, grad_checkpointing=ck, gen_batch=fit))
               for bs, m, ck in cols]
    print(f"   computed budget, Qwen3-4B at the full preset ({run['group']} x {run['prompts_per_step']} prompts, "
          f"{run['max_prompt_tokens']}+{run['max_completion_tokens']} tokens, bf16), GB = 1e9 bytes; "
          f"generation decodes {fit} rows at once")
    print("   " + f"{'':22s}" + "".join(f"{f'{bs} mb={m} ' + ('ckpt' if ck else 'no ckpt'):>18s}" for bs, m, ck in cols))
    keys = ("weights", "adapter_basis", "knobs", "grads", "optimizer", "merged_copy", "kv_cache",
            "activations_no_ckpt", "activations_ckpt", "logits", "capture", "resident", "generation", "training", "total")
    for k in keys:
        print("   " + f"{k:22s}" + "".join(f"{x[k]:18.2f}" for x in budgets))
    print("   " + f"{'fits ' + str(GPU_GB) + ' GB':22s}" + "".join(f"{'yes' if x['total'] <= GPU_GB else 'NO':>18s}" for x in budgets))
    print(f"   total = resident + max(generation, training). The KV cache is {per_row:.3f} GB a row: all {n_rows} "
          f"rows at once need {b['kv_cache']:.1f} GB (total {b['total']:.1f} GB), so generation must decode at most "
          f"{fit} rows at a time on an {GPU_GB} GB GPU")


# ----------------------------------------------------------------------------- the GPU check (--gpu)

# --gpu-shape: (model shape, train.py flags over the full preset). qwen3-4b is the check itself; tiny runs the
# same code on a CPU in seconds (tests)
GPU_SHAPES = {"qwen3-4b": (configs.QWEN3_4B, ()),
              "tiny": (QUICK_QWEN3, ("--group", "2", "--prompts-per-step", "2", "--max-completion-tokens", "8",
                                     "--gen-batch", "2", "--micro-batch", "2"))}


def random_factors(seed=0):
    """factors(weight) for antipasto.wrap: random orthonormal U (d_out, r) and Vh (r, d_in) by QR on the
    weight's device, S = 1: the SVD's shapes and dtype, so the same cost and memory, in seconds where
    the SVD of a 4B model takes minutes (the real one is cached on disk after the first run)."""
    gens, count = {}, [0]

    def factors(w):
        d_out, d_in = w.shape
        r = min(d_out, d_in)
        g = gens.setdefault(str(w.device), torch.Generator(device=w.device).manual_seed(seed))   # drawn on the device
        q = lambda n: torch.linalg.qr(torch.randn(n, r, generator=g, device=w.device))[0]   # (n, r) float32
        count[0] += 1
        return q(d_out).to(w.dtype), torch.ones(r), q(d_in).T.contiguous().to(w.dtype), f"random-{seed}-{count[0]}"
    return factors


def distinct_problems(n):
    """n problems with distinct ids: the fixture problems, repeated under new ids when n > 30."""
    probs = pools.load_problems(pools.FIXTURE_PROBLEMS, hint=True)
    return [dict(p, id=f"{p['id']}~{i // len(probs)}") for i, p in enumerate(probs * (n // len(probs) + 1))][:n]


def gpu_check(shape, flags=(), device="cuda", dtype=torch.bfloat16, rounds=2, new_tokens=64, workers=None,
              problems=None):
    """One online step of train.py at the full preset's shapes (flags override them) on a random Qwen3
    of `shape`: the trainer's own online_group (generation on merged weights, grading, the batch and
    the reference log-probs) and train_step (projected arm, micro-batches, checkpointing, per-sample
    capture). Then, side by side in rounds: generated tokens/s merged vs hooked (gen_batch rows x
    new_tokens, the fixture prompts), and one micro-batch's forward+backward with per-sample capture vs
    plain. Peak memory (CUDA) of generation and training beside configs.memory_budget. problems: the
    step's problems (default: the fixture's, under distinct ids). Returns a dict."""
    import rollout, sources, train
    args = configs.get_args(["--source=online", "--preset=full", "--problems", pools.FIXTURE_PROBLEMS, "--eval-every",
                             "0", "--model", "tiny", "--arm", "projected", "--dry-run", *flags])
    c, cuda = args.cfg, str(device).startswith("cuda")
    res = dict(cfg={k: c[k] for k in ("group_size", "prompts_per_step", "max_prompt_tokens", "max_completion_tokens",
                                      "gen_batch", "micro_batch", "grad_checkpointing", "beta")},
               budget=configs.memory_budget(shape, dict(train.budget_run(args), dtype_bytes=torch.finfo(dtype).bits // 8)))
    t = time.perf_counter()
    model = bench_model(shape, dtype, device)
    sync(device)
    res["model_s"], t = time.perf_counter() - t, time.perf_counter()
    modules = ap.wrap(model, factors=random_factors())
    if c["grad_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    sync(device)
    res["adapter_s"] = time.perf_counter() - t
    tok = configs.byte_tokenizer()
    V = ap.random_v({n: torch.ones(1, ap.knob(m).numel()) for n, m in modules.items()}, seed=0)
    V = {n: v.to(device) for n, v in V.items()}
    opt = torch.optim.AdamW([ap.knob(m) for m in modules.values()], lr=args.lr, weight_decay=0.0)
    S = dict(train=problems or distinct_problems(c["prompts_per_step"]), teacher={})
    args.workers = workers
    peak = lambda: torch.cuda.max_memory_allocated() if cuda else None
    with tempfile.TemporaryDirectory() as tmp:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res["resident_bytes"] = torch.cuda.memory_allocated() if cuda else None
        t = time.perf_counter()
        g = sources.online_group(model, tok, modules, None, S, args, 0, tmp)   # the student's rollouts go to tmp
        sync(device)
        res["group_s"], res["gen_peak"] = time.perf_counter() - t, peak()
        res.update(gen_s=g["record"]["gen_s"], grade_s=g["record"]["grade_s"],
                   n_rollouts=g["record"]["n_student"], n_tokens=int(g["batch"]["comp_len"].sum()))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        r = train.train_step(model, modules, g, V, opt, args)
        sync(device)
        res["train_s"], res["train_peak"] = time.perf_counter() - t, peak()
        res.update(kl=r["kl"], gen_mismatch_max=r["gen_mismatch_max"], gen_mismatch_mean=r["gen_mismatch_mean"])
    # grading of canned code (the random model's text holds no code block): as many completions as the step
    pairs = [(p, (pools.teacher_completion if j % 2 else pools.base_completion)(p, j))
             for p in S["train"] for j in range(c["group_size"])]
    t = time.perf_counter()
    pools.grade_many(pairs, workers=workers, progress=False)
    res["grade_canned_s"] = time.perf_counter() - t
    # generated tokens/s, merged vs hooked
    prompts = [pools.render_prompt(p["prompt"], tok) for p in S["train"]][:c["gen_batch"] or 1]
    n_rows = c["gen_batch"] or len(prompts)
    prompts = (prompts * n_rows)[:n_rows]
    spent, counts = {}, {}

    def generate(kind):
        sp = {"prefill": 0.0, "decode": 0.0}
        with forward_stopwatch(model, device, sp):
            o = rollout.sample(model, tok, prompts, 1, new_tokens, 1.0, 1.0, 0, 0, eos_ids=[-1])
        spent.setdefault(kind, []).append(sp["decode"])
        counts[kind] = sum(len(x) for x in o["token_ids"])

    def merged():
        with rollout.merged(model):
            generate("merged")
    times = interleave(dict(hooked=lambda: generate("hooked"), merged=merged), rounds, device)
    dec = {k: v[-rounds:] for k, v in spent.items()}
    n = counts["merged"]
    res["gen_cmp"] = dict(rows=n_rows, new_tokens=new_tokens, merged=n / med(times["merged"]),
                          hooked=n / med(times["hooked"]), speedup=ratio(times, "hooked", "merged"),
                          dec_merged=(n - n_rows) / med(dec["merged"]), dec_hooked=(n - n_rows) / med(dec["hooked"]),
                          dec_speedup=ratio(dec, "hooked", "merged"))
    # the previous decode loop vs rollout.decode, on merged weights (no stop token: nothing to refill)
    with rollout.merged(model):
        res["loops"] = row_loops(model, tok, prompts, new_tokens, [n_rows], rounds, eos_ids=[-1], device=device)[n_rows]
    # one micro-batch's forward+backward, per-sample capture vs plain
    mb = c["micro_batch"] or len(g["rows"])
    part = ap.slice_batch(g["batch"], 0, min(mb, len(g["rows"])))

    def fwd_bwd(capture):
        for m in modules.values():
            ap.knob(m).grad = None
        model.train()
        with ap.capture_per_sample(modules) if capture else contextlib.nullcontext():
            lp = ap.token_logps(model, part)
            ap.policy_losses(lp, part["comp_mask"], part["adv"], part["denom"], lp.detach(), part["ref_logp"],
                             c["clip_eps"], c["beta"])[0].sum().backward()
        for m in modules.values():
            m.grad_sample = None
        model.eval()
    times = interleave(dict(plain=lambda: fwd_bwd(False), capture=lambda: fwd_bwd(True)), rounds, device)
    res["capture"] = dict(rows=part["input_ids"].shape[0], T=part["input_ids"].shape[1],
                          plain_s=med(times["plain"]), capture_s=med(times["capture"]),
                          ratio=ratio(times, "capture", "plain"))
    return res


def print_gpu_check(res, where):
    c, b, GB = res["cfg"], res["budget"], 1e9
    gb = lambda x: "not measured (no CUDA)" if x is None else f"{x / GB:.2f} GB"
    print(f"GPU check ({where}): one online step at {c['prompts_per_step']} prompts x G={c['group_size']}, "
          f"{c['max_prompt_tokens']}+{c['max_completion_tokens']} tokens, gen_batch {c['gen_batch']}, micro-batch "
          f"{c['micro_batch']}, checkpointing {'on' if c['grad_checkpointing'] else 'off'}")
    print(f"   set-up: random model {res['model_s']:.1f} s, SVD adapter (random orthonormal factors) {res['adapter_s']:.1f} s")
    print(f"   generation {res['gen_s']:.1f} s ({res['n_tokens']} tokens of {res['n_rollouts']} rollouts, merged weights: "
          f"{res['n_tokens'] / res['gen_s']:.0f} tok/s)   grading {res['grade_s']:.1f} s (the random text; "
          f"{res['n_rollouts']} canned completions: {res['grade_canned_s']:.1f} s)")
    print(f"   batch + reference log-probs {res['group_s'] - res['gen_s'] - res['grade_s']:.1f} s   training "
          f"{res['train_s']:.1f} s   (kl {res['kl']:.2e}; |log p_train - log p_gen| max {res['gen_mismatch_max']:.2e}, "
          f"mean {res['gen_mismatch_mean']:.2e})")
    g = res["gen_cmp"]
    print(f"   generated tok/s, {g['rows']} rows x {g['new_tokens']} new tokens: decode loop merged {g['dec_merged']:.0f} vs "
          f"hooked {g['dec_hooked']:.0f}, merged / hooked {fmt_ratio(g['dec_speedup'])}; with prefill {g['merged']:.0f} vs "
          f"{g['hooked']:.0f}, {fmt_ratio(g['speedup'])}")
    print_loops({g["rows"]: res["loops"]}, f"decode loops on merged weights, {g['rows']} rows x {g['new_tokens']} "
                                          f"tokens (no stop)")
    k = res["capture"]
    print(f"   one micro-batch ({k['rows']} x {k['T']} tokens) forward+backward: plain {k['plain_s']:.2f} s, per-sample "
          f"capture {k['capture_s']:.2f} s, capture / plain {fmt_ratio(k['ratio'])}")
    print(f"   peak memory: generation {gb(res['gen_peak'])} (estimate resident + generation "
          f"{b['resident'] + b['generation']:.2f} GB), training {gb(res['train_peak'])} (estimate resident + training "
          f"{b['resident'] + b['training']:.2f} GB); configs.memory_budget total {b['total']:.2f} GB")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI-sized shapes and rounds (timings not meaningful)")
    p.add_argument("--rows", default="1,2,3,4,5,6", help="comma-separated rows to run (default: all)")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison (default 5, quick 2)")
    p.add_argument("--gpu", action="store_true",
                   help="the GPU check: one online step of a random-weight Qwen3-4B at the full preset's shapes")
    p.add_argument("--gpu-shape", choices=sorted(GPU_SHAPES), default="qwen3-4b",
                   help="--gpu's model and step shape (tiny: the same check on a CPU in seconds)")
    a = p.parse_args(argv)
    if a.gpu:
        return main_gpu(a)
    try:
        rows = {int(r) for r in a.rows.split(",") if r}
    except ValueError:
        rows = {0}
    if not rows or not rows <= {1, 2, 3, 4, 5, 6}:
        raise SystemExit(f"error: --rows {a.rows}: must be comma-separated numbers from 1 to 6")
    if a.rounds is not None and a.rounds < 1:
        raise SystemExit(f"error: --rounds {a.rounds}: must be an integer >= 1")
    rounds = a.rounds or (2 if a.quick else 5)
    shape = QUICK_QWEN3 if a.quick else BENCH_QWEN3
    G, T = (4, 64) if a.quick else (8, 512)
    n_params = sum(p.numel() for p in bench_model(shape).parameters())
    where = f"cpu, {torch.get_num_threads()} threads, {n_params / 1e6:.1f}M-parameter random Qwen3, G={G}, T={T}"
    import platform
    print(f"bench.py{' --quick' if a.quick else ''}: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, {rounds} rounds after a warm-up")
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "svd")
        if 1 in rows:
            print_row1(row_per_sample(shape, G, T, rounds, cache_dir=cache), where)
        if 2 in rows:
            mp, mc = (32, 32) if a.quick else (384, 128)
            print_row2(row_replay_step(shape, G, mp, mc, rounds, tmp, cache),
                       f"{where.split(', G=')[0]}, G={G} demo rows cut to {mp}+{mc} tokens")
        if 3 in rows:
            B, new = (2, 8) if a.quick else (8, 64)
            print_row3(row_generation(shape, B, new, rounds, cache_dir=cache), where.split(", G=")[0], B, new)
            print("   decode loops: the previous one (DynamicCache, a chunk decoded to its longest row, the model's forward, "
                  "per-row sort) vs rollout.decode (cache written in place, finished rows refilled, token_step, one sort "
                  "of unique keys); median (min-max) of per-round ratios")
            tok = configs.byte_tokenizer()
            print_loops(row_loops(bench_model(shape), tok, fixture_prompts(tok, B), new, [None], rounds, eos_ids=[-1]),
                        f"bench model, {B} rows x {new} tokens (no stop)")
            if a.quick:
                model, tok = configs.tiny_qwen3()
                ps, pids = fixture_prompts(tok, 4), None
            else:
                import organism
                model, tok = organism.load()
                probs = pools.load_problems(pools.FIXTURE_PROBLEMS, hint=True)[:4]
                ps = [pools.render_prompt(organism.prompt_messages(p), tok) for p in probs for _ in range(8)]
                pids = [p["id"] for p in probs for _ in range(8)]
            top = configs.PRESETS["organism"]["max_completion_tokens"] if not a.quick else 8
            print_loops(row_loops(model, tok, ps, top, [None, 8], rounds, ids=pids,
                                  eos_ids=[-1] if a.quick else None),
                        f"{'tiny model (quick), no stop' if a.quick else 'organism, its stop tokens'}, up to {top} tokens")
        if 4 in rows:
            print_row4(row_online(tmp))
            if not a.quick:
                print_row4b(row_online_loops(tmp, steps=20, rounds=1))
        if 5 in rows:
            limit = 4 if a.quick else None
            n = len(pools.load_problems(pools.FIXTURE_PROBLEMS)[:limit])
            print_row5(row_grader(1 if a.quick else max(2, rounds // 2), limit, tmp), n)
        if 6 in rows:
            hook = (2, 512, 512, 1024) if a.quick else (8, 2560, 2560, 9728)
            G6, T6 = (4, 64) if a.quick else (4, 256)      # bf16 matmuls are slow on most CPUs
            res = row_memory(shape, G6, T6, torch.bfloat16, cache_dir=cache, hook_shape=hook)
            print_row6(res, where.split(", G=")[0].replace("random Qwen3", "random Qwen3 in bf16"), G6, T6)
            print_budget()
        if torch.cuda.is_available() and rows & {1, 3, 6}:
            dev = "cuda"
            name = torch.cuda.get_device_name()
            gw = f"{name}, Qwen3-4B shapes, random weights, bf16"
            if 1 in rows:
                print_row1(row_per_sample(configs.QWEN3_4B, 8, 512, rounds, dev, torch.bfloat16, cache), gw + ", G=8, T=512")
            if 3 in rows:
                print_row3(row_generation(configs.QWEN3_4B, 8, 64, rounds, dev, torch.bfloat16, cache), gw, 8, 64)
            if 6 in rows:
                print_row6(row_memory(configs.QWEN3_4B, 8, 512, torch.bfloat16, dev, cache, (8, 2560, 2560, 9728)),
                           gw, 8, 512)
        elif rows & {1, 3, 6}:
            print("GPU rows (1, 3, 6 at Qwen3-4B shapes): not measured, no CUDA device")



def main_gpu(a):
    shape, flags = GPU_SHAPES[a.gpu_shape]
    if a.gpu_shape != "tiny" and not torch.cuda.is_available():
        raise SystemExit(f"error: --gpu --gpu-shape={a.gpu_shape}: needs a CUDA device (--gpu-shape=tiny runs the "
                         f"same check on this CPU)")
    if a.rounds is not None and a.rounds < 1:
        raise SystemExit(f"error: --rounds {a.rounds}: must be an integer >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32       # bf16 matmuls are slow on most CPUs
    t = time.perf_counter()
    res = gpu_check(shape, flags, device, dtype, rounds=a.rounds or 2, new_tokens=8 if a.gpu_shape == "tiny" else 64)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print_gpu_check(res, f"{name}, {a.gpu_shape} shape, random weights, {str(dtype).split('.')[1]}")
    print(f"   wall {time.perf_counter() - t:.0f} s")
    return res


if __name__ == "__main__":
    main()
