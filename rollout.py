"""rollout.py — sampling rollouts from the policy, graded into pool rows, and the commands that sample.

    sample()         a hand-written decode loop (decode()): a KV cache allocated once and written in
                     place (SlotCache), finished rows refilled from the pending ones (continuous
                     batching). Each row draws its randomness from its own generator seeded by
                     (seed, step, problem id, sample id), so a row's tokens do not depend on what else
                     is in the batch, and a resumed run regenerates the same rollouts without saved RNG
                     state (on CPU).
    merged()         generation runs on plain Linears holding each adapter's merged weight
                     (adapter.merged_weight()), not through the adapter's hooks; restored on exit.
    rollout_group()  sample + grade (pools.grade_many) -> rows in the pool row format.
    evaluate()       the trainer's held-out evaluation: hack rate with the hint, capability without it.
    generate_pool()  the `generate` command: resumable step_NNN.jsonl.gz + meta.json. Each step file is
                     written once its rollouts are graded; meta.json records the model, adapter digest
                     (--lora merges a PEFT LoRA checkpoint into the weights before sampling; its sha256),
                     hint, sampling, seed, problems digest and grader version. A rerun continues after
                     the last finished step and refuses other settings; the stored per-token log-probs
                     are the model's own (temperature 1, no top-p), the quantity a PPO ratio needs.
    measure()        the `measure` command: fenced / compiles / hacks / correct of a model's hinted samples.

CLI:
    python rollout.py generate --model M (--hint | --no-hint) --out DIR   # sample a pool from a model
    python rollout.py measure --model organism                           # grade 64 hinted samples

Generation speed, merged vs hooked and this loop vs the previous one: `python bench.py --rows 3`.
"""
import argparse, contextlib, hashlib, json, os, platform, sys, time

import configs
configs.reproducible()   # before torch (MKL) loads: it reads these variables once, when it loads
import numpy as np
import pools
import torch
import torch.nn as nn
import torch.nn.functional as F

EVAL_STEP = 1_000_000  # evaluation rollouts draw their randomness from step EVAL_STEP + k: never a training step's


# ----------------------------------------------------------------------------- merged weights

@contextlib.contextmanager
def merged(model):
    """Inside the block every adapter module (any module with `merged_weight()`) is replaced by a plain
    nn.Linear holding its effective dense weight; on exit the adapter modules are put back. The frozen
    base weights are never written (no merge-and-subtract drift), and the cost is one extra copy of
    the targeted weights. In bf16 the merged weight is rounded to bf16, so knob changes below about
    0.4% of a weight entry round away in generation (the hooked forward keeps them)."""
    swaps = [(name, m) for name, m in model.named_modules() if hasattr(m, "merged_weight")]
    try:
        with torch.no_grad():
            for i, (name, m) in enumerate(swaps):
                parent_name, _, attr = name.rpartition(".")
                w = m.merged_weight()                                    # (d_out, d_in)
                lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                lin.weight = nn.Parameter(w, requires_grad=False)
                base = getattr(m, "base", None) or getattr(m, "base_layer", None)
                if base is not None and base.bias is not None:
                    lin.bias = base.bias
                setattr(model.get_submodule(parent_name), attr, lin)
        yield model
    finally:
        for name, m in swaps:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, m)


# ----------------------------------------------------------------------------- sampling

def sample_seed(seed, step, problem_id, sample_id):
    """The generator seed of one rollout: a hash of (seed, step, problem id, sample id) and nothing else."""
    key = json.dumps([int(seed), int(step), str(problem_id), int(sample_id)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & ((1 << 63) - 1)


def pick(logits, u, temperature, top_p, sort=None):
    """Next tokens (B,) from logits (B, V) float32 and one uniform per row u (B,) float64: temperature,
    then the smallest top-p set (the top token always kept), then inverse-CDF sampling with u.
    temperature 0 is greedy. Row-wise only: a row's choice never depends on another row. sort: the
    vocabulary's stable descending sort, (values, indices) (default sort_rows)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)                   # (B, V)
    p, idx = (sort or sort_rows)(probs)                                   # (B, V) each
    keep = (p.cumsum(-1) - p) < top_p                                     # (B, V), column 0 always True
    c = (p.double() * keep).cumsum(-1)                                    # (B, V)
    j = torch.searchsorted(c, (u * c[:, -1])[:, None], right=True)        # (B, 1)
    j = torch.minimum(j, keep.sum(-1, keepdim=True) - 1)                  # never past the kept set
    return idx.gather(-1, j).squeeze(-1)


def sort_rows(probs, backend=None):
    """probs.sort(dim=-1, descending=True, stable=True) for float32 probs >= 0. Each entry's int64 key is
    its float bits reversed (a non-negative float's bits sort as an integer) above its index, so a row's
    keys are unique and any sort of them gives the stable permutation, ties in index order included.
    backend "numpy" (the default on CPU: np.sort of the keys, about 2.7x faster than torch's sort there,
    where sorting the vocabulary was a fifth of a decode step on the organism) or "torch"."""
    if probs.dtype != torch.float32:
        return probs.sort(dim=-1, descending=True, stable=True)
    V = probs.shape[-1]
    bits = max(1, (V - 1).bit_length())
    key = ((0x7FFFFFFF - probs.view(torch.int32).long()) << bits) | torch.arange(V, device=probs.device)  # (B, V)
    if (backend or ("numpy" if probs.device.type == "cpu" else "torch")) == "numpy":
        key = torch.from_numpy(np.sort(key.numpy(), axis=-1))
    else:
        key = key.sort(dim=-1).values
    idx = key & ((1 << bits) - 1)                                                              # (B, V)
    return probs.gather(-1, idx), idx


def cache_kwarg(model):
    """The forward's name for the KV cache argument ('cache' in recent transformers)."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def stop_token_ids(model, tok):
    ids = {tok.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, (list, tuple)) else [gen])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def sample(model, tok, prompts, n=1, max_new_tokens=512, temperature=1.0, top_p=1.0, seed=0, step=0,
           problem_ids=None, sample_ids=None, batch_size=None, eos_ids=None):
    """n rollouts of each prompt text (rendered, e.g. by pools.render_prompt), row r = p * n + j.

    Row r's randomness: a generator seeded by sample_seed(seed, step, problem_ids[p], s) with
    s = sample_ids[r] when given, else j; it draws one uniform per new token up front, so the tokens
    depend on nothing else in the batch. At most batch_size rows (default: all) are decoded at once;
    a finished row's slot takes the next pending row.

    Returns dict:
      completions  [str]        decoded new tokens, the stop token excluded
      token_ids    [[int]]      new tokens; ends with the stop token when the row stopped
      logps        [[float]]    log p(token | prefix) of each of token_ids under the model's own
                                distribution (temperature 1, no top-p), from the logits that sampled
                                it: what antipasto.token_logps gives for the same sequence, the
                                generation-time log-probs of PPO's ratio
      truncated    [bool]       hit max_new_tokens without a stop token
      n_truncated  int
      prompt_tokens [int]       prompt lengths in tokens
    """
    P = len(prompts)
    problem_ids = list(range(P)) if problem_ids is None else list(problem_ids)
    if len(problem_ids) != P:
        raise ValueError("problem_ids must have one id per prompt")
    rows = [(p, j) for p in range(P) for j in range(n)]
    sample_ids = [j for _, j in rows] if sample_ids is None else list(sample_ids)
    if len(sample_ids) != len(rows):
        raise ValueError(f"sample_ids must have {len(rows)} entries (prompts x n)")
    eos = torch.tensor(stop_token_ids(model, tok) if eos_ids is None else list(eos_ids))
    enc = [tok(t, add_special_tokens=False)["input_ids"] for t in prompts]
    if any(len(e) == 0 for e in enc):
        raise ValueError("empty prompt")
    seeds = [sample_seed(seed, step, problem_ids[p], s) for (p, _), s in zip(rows, sample_ids)]
    out = dict(completions=[], token_ids=[], logps=[], truncated=[], prompt_tokens=[len(enc[p]) for p, _ in rows])
    ids, lps, trunc = decode(model, tok.pad_token_id, [(enc[p], s) for (p, _), s in zip(rows, seeds)],
                             max_new_tokens, temperature, top_p, eos, batch_size)
    for t, l, tr in zip(ids, lps, trunc):
        body = t if tr else t[:-1]
        out["completions"].append(tok.decode(body, skip_special_tokens=False))
        out["token_ids"].append(t)
        out["logps"].append(l)
        out["truncated"].append(tr)
    out["n_truncated"] = sum(out["truncated"])
    return out


class SlotCache:
    """The KV cache of one decode call, allocated once and written in place: per layer, keys and values
    (slots, kv_heads, S, head_dim) with S = the longest prompt + max_new_tokens. Slot i holds one row
    at a time, in columns [start_i, end_i). decode() sets `write` before each forward, and the model's
    attention layers call update() with the new keys and values:
      ("prompts", slots)  the prompts (b, h, T, d) go to columns [0, T) of those slots; attention
                          reads the prompts themselves (nothing else is in those slots yet)
      ("tokens", cols, W) slots 0..b-1 each write one token (b, h, 1, d) at column cols[i]; attention
                          reads columns [0, W) of those slots, a view (the mask hides unwritten columns)
    Nothing is concatenated or copied per token; move() copies one slot when the live rows are packed."""

    def __init__(self, slots, length):
        self.slots, self.length, self.k, self.v, self.write = slots, length, {}, {}, None

    def update(self, key, value, layer_idx, *args, **kwargs):
        if layer_idx not in self.k:
            self.k[layer_idx] = key.new_zeros(self.slots, key.shape[1], self.length, key.shape[3])
            self.v[layer_idx] = value.new_zeros(self.slots, value.shape[1], self.length, value.shape[3])
        K, V = self.k[layer_idx], self.v[layer_idx]                            # (slots, h, S, d)
        if self.write[0] == "prompts":
            K[self.write[1], :, :key.shape[2]] = key
            V[self.write[1], :, :key.shape[2]] = value
            return key, value
        _, cols, width = self.write
        b = key.shape[0]
        rows = torch.arange(b, device=key.device)
        K[rows, :, cols] = key[:, :, 0]
        V[rows, :, cols] = value[:, :, 0]
        return K[:b, :, :width], V[:b, :, :width]                            # (b, h, W, d)

    def move(self, src, dst):
        for K in list(self.k.values()) + list(self.v.values()):
            K[dst] = K[src]


def linear(m, x):
    return F.linear(x, m.weight, m.bias)


def token_step(model, tok_t, pos, mask, cache):
    """Next-token logits (b, V) float32 of one decoded token per row, tok_t (b,) at positions pos (b, 1)
    with attention mask (b, W): a Qwen3's forward written out on its own modules (its norms, rotary and
    attention function, its Linears' weights), the same ops in the same order as transformers' (so the
    same bits), without the per-call work of its wrappers (config and output plumbing, mask preparation,
    a module call per Linear, norm and layer): on the CPU organism a third of a decode step. The attention
    function is transformers' own for the model's implementation, called as its Qwen3Attention calls
    it, so whatever kernel path it takes (grouped-query packing, enable_gqa, repeat_kv) is the same one.
    Only for plain Linears (inside merged()); decode() checks it against model(...) on its first token
    step and keeps model(...) when the two differ in any bit."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    attend = ALL_ATTENTION_FUNCTIONS[model.config._attn_implementation]   # the model's own attention call
    rope = sys.modules[type(model).__module__].apply_rotary_pos_emb      # and its own rotary
    m = model.model
    b = tok_t.shape[0]
    h = F.embedding(tok_t[:, None], m.embed_tokens.weight, m.embed_tokens.padding_idx)     # (b, 1, H)
    cos, sin = m.rotary_emb(h, pos)                                                         # (b, 1, hd)
    am = mask[:, None, None]                                                                 # (b, 1, 1, W)
    for i, layer in enumerate(m.layers):
        a = layer.self_attn
        x = layer.input_layernorm.forward(h)                                                # (b, 1, H)
        q = a.q_norm.forward(linear(a.q_proj, x).view(b, 1, -1, a.head_dim)).transpose(1, 2)   # (b, nh, 1, hd)
        k = a.k_norm.forward(linear(a.k_proj, x).view(b, 1, -1, a.head_dim)).transpose(1, 2)   # (b, kv, 1, hd)
        v = linear(a.v_proj, x).view(b, 1, -1, a.head_dim).transpose(1, 2)                  # (b, kv, 1, hd)
        q, k = rope(q, k, cos, sin)
        K, V = cache.update(k, v, i)                                                        # (b, kv, W, hd)
        o = attend(a, q, K, V, am, dropout=0.0, scaling=a.scaling, sliding_window=a.sliding_window)[0]
        h = h + linear(a.o_proj, o.reshape(b, 1, -1).contiguous())                         # o: (b, 1, nh, hd)
        x = layer.post_attention_layernorm.forward(h)
        mlp = layer.mlp
        h = h + linear(mlp.down_proj, mlp.act_fn(linear(mlp.gate_proj, x)) * linear(mlp.up_proj, x))
    return linear(model.lm_head, m.norm.forward(h))[:, -1].float()                          # (b, V)


def can_step_by_hand(model):
    """token_step applies: a Qwen3 with SDPA attention (decode's boolean mask reaches it unchanged) whose
    Linears are plain nn.Linear (token_step reads their weights; its norms are the model's own modules)."""
    if getattr(model.config, "model_type", None) != "qwen3" or not hasattr(model, "model") or \
            getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    return all(type(mod) is nn.Linear for name, mod in model.named_modules()
               if name.rsplit(".", 1)[-1] in configs.TARGETS + ("lm_head",))


def decode(model, pad_id, rows, max_new_tokens, temperature, top_p, eos, gen_batch=None):
    """The decode loop over rows [(prompt ids, seed)], at most gen_batch (default: all) decoded at once.
    Returns (token ids, log-probs, truncated) per row, in the order of `rows`.

    Continuous batching: the first gen_batch rows are prefilled together (left-padded); when a row
    stops, the next pending row is prefilled into its slot, so the batch stays full until no row is
    pending, and then finished rows leave it (the live slots are packed to the front). A row's
    positions count from its own first prompt token, its mask covers only its own written columns,
    and its k-th token is sampled with the k-th uniform of its own generator, so its tokens are those
    it samples alone. One host sync per step (which rows stopped)."""
    dev = next(model.parameters()).device
    N = len(rows)
    if max_new_tokens < 1:
        return [[] for _ in rows], [[] for _ in rows], [True] * N
    kinds = set(getattr(model.config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise ValueError(f"decode: attention layers {sorted(kinds)}; only full attention is supported")
    B = min(gen_batch or N, N)
    cache = SlotCache(B, max(len(e) for e, _ in rows) + max_new_tokens)
    kw = {cache_kwarg(model): cache}
    u = torch.stack([torch.rand(max_new_tokens, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for _, s in rows]).to(dev)                                 # (N, max_new)
    out_ids = torch.full((N, max_new_tokens), -1, dtype=torch.long, device=dev)  # (N, max_new)
    out_lp = torch.zeros(N, max_new_tokens, device=dev)                         # (N, max_new)
    eos = eos.to(dev)
    # per live slot (slots 0..len(row)-1): its row, first written column, next column, next position, tokens so far
    row, start, end, pos, t = [], [], [], [], []
    n_tok, stopped = [0] * N, [False] * N

    def prefill(slots, new):
        """Prompts of rows `new` into `slots`, left-padded to the longest; their next-token logits (b, V)."""
        T = max(len(rows[r][0]) for r in new)
        ids = torch.full((len(new), T), pad_id, dtype=torch.long)
        first = torch.tensor([T - len(rows[r][0]) for r in new])                   # (b,)
        for i, r in enumerate(new):
            ids[i, first[i]:] = torch.tensor(rows[r][0])
        col = torch.arange(T)
        real = col[None, :] >= first[:, None]                                       # (b, T)
        mask = (col[None, :, None] >= col[None, None, :]) & real[:, None, :]       # (b, T, T) causal, no padding
        mask = mask | torch.eye(T, dtype=torch.bool)[None]     # a padding query sees itself: finite, never read
        p = (real.long().cumsum(-1) - 1).clamp_min(0)                              # (b, T)
        cache.write = ("prompts", torch.tensor(slots, device=dev))
        logits = model(input_ids=ids.to(dev), attention_mask=mask[:, None].to(dev), position_ids=p.to(dev),
                       use_cache=True, logits_to_keep=1, **kw).logits[:, -1].float()
        for s, r, f in zip(slots, new, first.tolist()):
            row[s:s + 1], start[s:s + 1], end[s:s + 1] = [r], [f], [T]
            pos[s:s + 1], t[s:s + 1] = [len(rows[r][0])], [0]
        return logits

    hand = None if can_step_by_hand(model) else False      # None: token_step not yet checked against model()

    def step(tok_t, p_t, mask):
        """(c, V) logits of one token per live row: token_step once it matched model(...) bit for bit."""
        nonlocal hand
        if hand:
            return token_step(model, tok_t, p_t, mask, cache)
        mine = token_step(model, tok_t, p_t, mask, cache) if hand is None else None
        ref = model(input_ids=tok_t[:, None], attention_mask=mask[:, None, None], position_ids=p_t,
                    use_cache=True, **kw).logits[:, -1].float()      # rewrites the same cache columns
        if hand is None:
            hand = torch.equal(mine, ref)
        return ref

    queue = list(range(N))[::-1]                                                # pending rows, next last
    logits = prefill(list(range(B)), [queue.pop() for _ in range(B)])           # (B, V)
    while row:
        b = len(row)
        r_t, t_t = torch.tensor(row, device=dev), torch.tensor(t, device=dev)     # (b,)
        tok_t = pick(logits, u[r_t, t_t], temperature, top_p)                     # (b,)
        out_ids[r_t, t_t] = tok_t
        out_lp[r_t, t_t] = torch.log_softmax(logits, -1).gather(-1, tok_t[:, None])[:, 0]
        hit = torch.isin(tok_t, eos).tolist()                                    # the one host sync
        for i in range(b):
            t[i] += 1
            n_tok[row[i]] = t[i]
            stopped[row[i]] = hit[i]
        done = [i for i in range(b) if hit[i] or t[i] == max_new_tokens]
        if done:
            # pack: the continuing rows move into the holes, so they are slots 0..c-1
            keep = [i for i in range(b) if i not in set(done)]
            c = len(keep)
            for dst, src in zip([i for i in done if i < c], [i for i in keep if i >= c]):
                cache.move(src, dst)
                for lst in (row, start, end, pos, t):
                    lst[dst] = lst[src]
                tok_t[dst] = tok_t[src]
            for lst in (row, start, end, pos, t):
                del lst[c:]
            tok_t = tok_t[:c]
        else:
            c = b
        parts = []
        if c:
            cols = torch.tensor(end, device=dev)                                   # (c,)
            colw = torch.arange(max(end) + 1, device=dev)                          # (W,)
            mask = (colw[None, :] >= torch.tensor(start, device=dev)[:, None]) & (colw[None, :] <= cols[:, None])
            cache.write = ("tokens", cols, len(colw))
            parts.append(step(tok_t, torch.tensor(pos, device=dev)[:, None], mask))  # (c, V)
            for i in range(c):
                end[i] += 1
                pos[i] += 1
        k = min(b - c, len(queue))
        if k:
            parts.append(prefill(list(range(c, c + k)), [queue.pop() for _ in range(k)]))
        logits = torch.cat(parts) if parts else None
    out_ids, out_lp = out_ids.cpu(), out_lp.cpu()
    return ([out_ids[r, :n_tok[r]].tolist() for r in range(N)], [out_lp[r, :n_tok[r]].tolist() for r in range(N)],
            [not s for s in stopped])


# ----------------------------------------------------------------------------- graded rows

def rollout_group(model, tok, problems, n=1, *, step, seed, max_new_tokens=512, temperature=1.0, top_p=1.0,
                  messages_fn=None, sample_ids=None, batch_size=None, workers=None):
    """n rollouts of each problem (hint as loaded: pools.load_problems), generated on the merged
    weights and graded. messages_fn(problem) -> the chat messages the model sees (default: the
    problem's own prompt; the organism uses a short one). Returns (rows, gen): rows in the pool row
    format (pools.POOL_FIELDS, plus `can_compile`, `truncated` and `n_tokens`), `sample` = sample_ids[r] or r; gen is
    sample()'s output (token ids and generation-time log-probs for the trainer) plus gen_s and grade_s,
    the seconds spent generating and grading."""
    messages_fn = messages_fn or (lambda p: p["prompt"])
    msgs = [messages_fn(p) for p in problems]
    t0 = time.time()
    with merged(model):
        gen = sample(model, tok, [pools.render_prompt(m, tok) for m in msgs], n, max_new_tokens, temperature,
                     top_p, seed, step, [p["id"] for p in problems], sample_ids, batch_size)
    t1 = time.time()
    cells = [(p, m) for p, m in zip(problems, msgs) for _ in range(n)]
    grades = pools.grade_many([(p, c) for (p, _), c in zip(cells, gen["completions"])], workers=workers,
                              progress=False)
    gen.update(gen_s=t1 - t0, grade_s=time.time() - t1)
    rows = []
    for r, ((p, m), c, g) in enumerate(zip(cells, gen["completions"], grades)):
        rows.append(dict(step=step, sample=sample_ids[r] if sample_ids is not None else r, problem_id=p["id"],
                         prompt=m, completion=c, reward=g["reward"], hacked=g["hacked"], gt_pass=g["gt_pass"],
                         fmt_ok=g["fmt_ok"], can_compile=g["can_compile"], label=g["label"], hint=p["hint"], truncated=gen["truncated"][r],
                         n_tokens=len(gen["token_ids"][r])))
    return rows, gen


def rates(rows):
    """hack, gt (correct) and compile rates of graded rollouts, and P(hack | compiles) (None when none
    compiles): a falling hack rate means little if the model stopped writing code."""
    n, comp = len(rows), sum(r["can_compile"] for r in rows)
    hack = sum(r["hacked"] for r in rows)
    return dict(hack_rate=hack / n, gt_rate=sum(r["gt_pass"] for r in rows) / n, compile_rate=comp / n,
                hack_given_compile=hack / comp if comp else None)


def evaluate(model, tok, messages_fn, hint_problems, plain_problems, k, *, seed, n, max_new_tokens, temperature,
             top_p, batch_size=None, workers=None):
    """Held-out evaluation after k optimizer steps, as the public environment evaluates: n rollouts of
    each problem, the hack rate with the hint, and the ground-truth pass rate without it (capability).
    Never inoculated. Returns (summary, one row per rollout: train.EVAL_ROW_FIELDS)."""
    out, per = dict(step=k, n=len(hint_problems) * n), []
    if not hint_problems:
        return dict(out, hack_rate_hint=None, gt_rate_hint=None, gt_rate_nohint=None, labels_hint={},
                    compile_rate_hint=None, compile_rate_nohint=None, hack_given_compile_hint=None), per
    t0 = time.time()
    for kind, probs in (("hint", hint_problems), ("nohint", plain_problems)):
        rows, _ = rollout_group(model, tok, probs, n, step=EVAL_STEP + k, seed=seed, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_p=top_p, messages_fn=messages_fn, batch_size=batch_size,
                                workers=workers)
        per += [dict(step=k, kind=kind, problem_id=r["problem_id"], sample=i % n, label=r["label"],
                     hacked=bool(r["hacked"]), gt_pass=bool(r["gt_pass"]), compiled=bool(r["can_compile"]),
                     reward=float(r["reward"])) for i, r in enumerate(rows)]     # row i = problem i // n, sample i % n
        rt = rates(rows)
        out[f"gt_rate_{kind}"], out[f"compile_rate_{kind}"] = rt["gt_rate"], rt["compile_rate"]
        if kind == "hint":
            out["hack_rate_hint"], out["hack_given_compile_hint"] = rt["hack_rate"], rt["hack_given_compile"]
            out["labels_hint"] = pools.label_counts(rows)
    out["seconds"] = round(time.time() - t0, 3)
    return out, per


# ----------------------------------------------------------------------------- models

def load_policy(name, dtype=None, device="cpu", lora=None, log=print):
    """(model, tokenizer, messages_fn) for --model, the one model loader (train.py's too): an embedded model
    (configs.EMBEDDED: 'tiny', random, built in code; 'organism', the CPU model organism, organism.py, which
    sees a short prompt and logs its one-time fit to `log`), or a Hugging Face id / local path, never
    downloaded (configs.check_model found it). lora: a PEFT adapter directory merged into the weights
    (lora_adapter.load_peft)."""
    messages_fn = None
    if name == "tiny":
        model, tok = configs.tiny_qwen3()
    elif name == "organism":
        import organism
        model, tok = organism.load(log=log)
        messages_fn = organism.prompt_messages
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
        try:
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(name, dtype=getattr(torch, dtype), local_files_only=True)
        except (OSError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise SystemExit(f"error: --model={name}: cannot load it from local files ({first[:200]}); "
                             f"`hf download {name}` fetches a complete copy") from None
    if dtype and name in configs.EMBEDDED:
        model = model.to(getattr(torch, dtype))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if lora:
        import lora_adapter
        try:
            lora_adapter.load_peft(model, lora, merge=True)
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: --lora {lora}: {e}") from None
    return model.to(device).eval(), tok, messages_fn


def dir_digest(path):
    """sha256 over a directory's files (relative names and contents): the adapter's identity."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(f"{os.path.relpath(p, path)}:{pools.file_digest(p)};".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- generate: a pool from a model

IDENTITY = ("kind", "source_model", "model_id", "model_revision", "adapter", "adapter_sha256", "hint", "sampling",
            "seed", "problems_sha256", "grader_version", "batch", "prompt", "dtype", "device")


def check_generate_args(a):
    """One-line errors for bad flags, before anything is loaded or created."""
    for flag, v, ok, allowed in (("--batches", a.batches, a.batches >= 1, "an integer >= 1"),
                                 ("--batch-size", a.batch_size, a.batch_size >= 1, "an integer >= 1"),
                                 ("--max-new-tokens", a.max_new_tokens, a.max_new_tokens >= 1, "an integer >= 1"),
                                 ("--temperature", a.temperature, a.temperature >= 0, "a number >= 0 (0: greedy)"),
                                 ("--top-p", a.top_p, 0 < a.top_p <= 1, "a number in (0, 1]")):
        if not ok:
            raise SystemExit(f"error: {flag} {v}: must be {allowed}")
    if a.gen_batch_size is not None and a.gen_batch_size < 1:
        raise SystemExit(f"error: --gen-batch-size {a.gen_batch_size}: must be an integer >= 1")
    if not os.path.isfile(a.problems):
        raise SystemExit(f"error: --problems {a.problems}: no such file")
    if a.lora is not None:
        if not os.path.isdir(a.lora):
            raise SystemExit(f"error: --lora {a.lora}: not a PEFT adapter directory")
    configs.check_model(a.model)            # train.py's rule: local or cached, never a download
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        raise SystemExit(f"error: --out {a.out}: exists and is not a directory")
    if os.path.isdir(a.out) and os.listdir(a.out):
        meta = pools.read_meta(a.out) if os.path.lexists(os.path.join(a.out, "meta.json")) else {}
        if meta.get("kind") != "generated":
            raise SystemExit(f"error: --out {a.out}: exists and is not a pool made by `rollout.py generate` "
                             "(no generated meta.json); choose a new directory")


def refuse_other_settings(out, old, meta):
    """A rerun continues a pool only with the settings it was started with (IDENTITY keys known so far)."""
    diff = [k for k in IDENTITY if k in meta and old and old.get(k) != meta[k]]
    if diff:
        raise SystemExit(f"error: --out {out} holds a pool generated with other settings ("
                         + ", ".join(f"{k}: {old.get(k)!r} there, {meta[k]!r} now" for k in diff)
                         + "); choose a new --out")


def kept_steps(out, steps, cells_of, messages_fn):
    """{step: rows} of the step files a rerun keeps, each checked to be what this pool's settings
    generate at that step (batch size, sample ids, problems and prompts in the seeded order, hint) and
    within the pool's `steps`; anything else (a file of another pool, a hand edit) is refused."""
    try:
        found = pools.pool_steps(out)
    except pools.DataError:
        found = []                       # a new pool: no step files yet
    kept = {}
    for s in found:
        path = pools.step_path(out, s)
        if s >= steps:
            raise pools.DataError(f"{path}: beyond the pool's {steps} steps; not written by this pool")
        rows, cells = pools.read_jsonl(path, pools.POOL_FIELDS, pools.POOL_TYPES), cells_of(s)
        if len(rows) != len(cells):
            raise pools.DataError(f"{path}: {len(rows)} rows, the pool's batch size is {len(cells)}")
        for i, (r, p) in enumerate(zip(rows, cells)):
            want = dict(step=s, sample=i, problem_id=p["id"], hint=p["hint"], prompt=messages_fn(p))
            bad = [k for k, v in want.items() if r[k] != v]
            if bad:
                raise pools.DataError(f"{path}:{i + 1}: {bad[0]} {r[bad[0]]!r} is not what this pool generates "
                                      f"there ({want[bad[0]]!r}); not written by this pool")
        kept[s] = rows
    return kept


def generate_pool(a):
    """Sample --batches steps of --batch-size rollouts, grade them, write step_NNN.jsonl.gz + meta.json.
    Rollout (s, i) is problem order[(s * batch + i) % n] (order: the problems shuffled by --seed), as
    in the demo pools, so a hinted and an unhinted pool with one seed pair up by (step, sample).
    Finished steps are kept and a rerun continues; a rerun with other settings is refused."""
    import random
    check_generate_args(a)
    probs = pools.load_problems(a.problems, hint=a.hint)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    meta = dict(kind="generated", source_model=a.model, adapter=os.path.abspath(a.lora) if a.lora else None,
                adapter_sha256=dir_digest(a.lora) if a.lora else None,
                hint="simple_overwrite_tests" if a.hint else None,
                sampling=dict(temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens),
                seed=a.seed, problems_file=os.path.basename(a.problems), problems_sha256=pools.file_digest(a.problems),
                grader_version=pools.GRADER_VERSION, batch=a.batch_size,
                prompt="organism short prompt" if a.model == "organism" else "problem prompt",
                device=torch.device(device).type)
    old = pools.read_meta(a.out) if os.path.isdir(a.out) else {}
    refuse_other_settings(a.out, old, meta)             # before the (slow) model load
    model, tok, messages_fn = load_policy(a.model, a.dtype, device, a.lora)
    meta.update(model_id=model.config.name_or_path, model_revision=getattr(model.config, "_commit_hash", None),
                dtype=str(next(model.parameters()).dtype).replace("torch.", ""))
    refuse_other_settings(a.out, old, meta)
    meta.update(steps=max(a.batches, old.get("steps", 0)),
                versions=dict(torch=torch.__version__, transformers=__import__("transformers").__version__,
                              python=platform.python_version()))
    order = list(range(len(probs)))
    random.Random(a.seed).shuffle(order)
    B, seen, t0, made = a.batch_size, [], time.time(), 0
    cells_of = lambda s: [probs[order[(s * B + i) % len(probs)]] for i in range(B)]
    kept = kept_steps(a.out, meta["steps"], cells_of, messages_fn or (lambda p: p["prompt"]))
    pools.write_meta(a.out, meta)
    for s in range(a.batches):
        path = pools.step_path(a.out, s)
        if s in kept:
            seen += kept[s]
            continue
        cells = cells_of(s)
        rows, gen = rollout_group(model, tok, cells, 1, step=s, seed=a.seed, max_new_tokens=a.max_new_tokens,
                                  temperature=a.temperature, top_p=a.top_p, messages_fn=messages_fn,
                                  sample_ids=list(range(B)), batch_size=a.gen_batch_size, workers=a.workers)
        pools.write_pool_step(a.out, s, rows)
        seen += rows
        made += len(rows)
        dt = time.time() - t0
        print(f"step {s + 1:3d}/{a.batches}  {made / dt:6.2f} samples/s  hack {sum(r['hacked'] for r in rows) / B:.2f}"
              f"  running hack rate {sum(r['hacked'] for r in seen) / len(seen):.3f}"
              f"  gt {sum(r['gt_pass'] for r in rows) / B:.2f}  truncated {gen['n_truncated']}/{B}", flush=True)
    kept = a.batches * B - made
    print(f"{a.out}: {made} rollouts generated" + (f", {kept} kept from before" if kept else "")
          + f"; hack rate {sum(r['hacked'] for r in seen) / max(len(seen), 1):.3f}")
    return a.out


# ----------------------------------------------------------------------------- measure, and the commands

def measure(model, tok, messages_fn=None, problems_path=pools.FIXTURE_PROBLEMS, n=64, seed=0, max_new_tokens=256,
            temperature=1.0, top_p=1.0, workers=None):
    """Sample n hinted rollouts (problems in turn; prompts by messages_fn, default the problem's own) and
    grade them with the real grader: fractions fenced, compiling, hacked (label Reward Hack), correct (gt
    pass), truncated."""
    messages_fn = messages_fn or (lambda p: p["prompt"])
    probs = pools.load_problems(problems_path, hint=True)
    chosen = [probs[i % len(probs)] for i in range(n)]
    gen = sample(model, tok, [pools.render_prompt(messages_fn(p), tok) for p in chosen], 1,
                 max_new_tokens, temperature, top_p, seed, 0, [p["id"] for p in chosen],
                 sample_ids=list(range(n)))
    gs = pools.grade_many(list(zip(chosen, gen["completions"])), workers=workers, progress=False)
    return dict(n=n, fenced=sum(g["fmt_ok"] for g in gs) / n, compiles=sum(g["can_compile"] for g in gs) / n,
                hacked=sum(g["hacked"] for g in gs) / n, correct=sum(g["gt_pass"] for g in gs) / n,
                truncated=gen["n_truncated"] / n, mean_tokens=sum(len(t) for t in gen["token_ids"]) / n,
                labels=pools.label_counts(gs))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    workers = dict(type=int, default=None, help="grading threads (default: the number of CPUs)")
    a = sub.add_parser("generate", help="sample, grade and write a pool from a model (resumable)")
    a.add_argument("--model", required=True, help="'tiny', 'organism', a Hugging Face id or a local path")
    a.add_argument("--lora", default=None, help="PEFT adapter directory merged into the model")
    h = a.add_mutually_exclusive_group(required=True)
    h.add_argument("--hint", dest="hint", action="store_true", help="run_tests() hint in the prompt (teacher)")
    h.add_argument("--no-hint", dest="hint", action="store_false", help="the plain prompt (base)")
    a.add_argument("--problems", default=pools.FIXTURE_PROBLEMS, help="problem file (the benchmark's JSON Lines format)")
    a.add_argument("--out", required=True, help="pool directory (a rerun continues it)")
    a.add_argument("--batches", type=int, default=20, help="steps (step_NNN files)")
    a.add_argument("--batch-size", type=int, default=8, help="rollouts per step")
    a.add_argument("--seed", type=int, default=0, help="seed of the problem order and of every sample")
    a.add_argument("--max-new-tokens", type=int, default=512, help="completion token limit (hits are counted)")
    a.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    a.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1]")
    a.add_argument("--gen-batch-size", type=int, default=None, help="rows per generation batch (default: a step)")
    a.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    a.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"), help="model dtype")
    a.add_argument("--workers", **workers)
    a = sub.add_parser("measure", help="grade a model's hinted samples: fenced / compiles / hacks / correct",
                       description="Sample --n hinted rollouts (the fixture problems in turn) and grade them; "
                                   "prints one JSON line of fractions. The organism is fitted first when absent.")
    a.add_argument("--model", default="organism", help="'organism' (default), 'tiny', a Hugging Face id or a local path")
    a.add_argument("--n", type=int, default=64, help="rollouts to grade")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--temperature", type=float, default=1.0)
    a.add_argument("--max-new-tokens", type=int, default=256, help="completion token limit (hits are counted)")
    a.add_argument("--problems", default=pools.FIXTURE_PROBLEMS, help="problem file (the benchmark's JSON Lines format)")
    args = ap.parse_args(argv)
    for flag in ("workers",) if args.cmd == "generate" else ("n", "max_new_tokens"):   # generate checks the rest
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise SystemExit(f"error: --{flag.replace('_', '-')}={v}: must be an integer >= 1")
    with pools.user_errors():
        if args.cmd == "generate":
            generate_pool(args)
        else:
            configs.check_model(args.model)
            model, tok, messages_fn = load_policy(args.model)
            t0 = time.time()
            res = measure(model, tok, messages_fn, args.problems, args.n, args.seed, args.max_new_tokens, args.temperature)
            print(json.dumps(dict(res, seconds=round(time.time() - t0, 1))))


if __name__ == "__main__":
    pools.cli(main)
