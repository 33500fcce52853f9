"""antipasto.py — the SVD-basis adapter, per-sample gradients, v_hack, and the one-sided projection.

Each target Linear W = U diag(S) Vh (d_out, d_in), r = min(d_in, d_out) gets a trainable knob delta_S (r,):

    y = W x + b + U (delta_S * (Vh x))

At delta_S = 0 the model is unchanged bit for bit, so zeroing the knobs gives the reference model.
Everything the spec measures lives in delta_S coordinates:
    v_hack   per module, V (k, r): top right singular vectors of per-pair (hack - clean) gradients
    cos_in   cosine of the gradient with the top hack axis, before projection
    cos_out  the same after one-sided removal g - relu(V g) @ V
    frac_fired  fraction of modules where something was removed

Everything below the adapter is generic over the adapter contract, so lora_adapter.py's weight basis
runs through the same code (neither adapter file imports the other). An adapter module provides:
    m.knob()           its one flat trainable Parameter (n,)  (here delta_S)
    m.capture          when True, a backward fills m.grad_sample (B, n), every sample's own gradient
    m.digest           sha256 identifying the frozen basis (the fingerprint is built from these)
    m.basis            the basis kind, "svd" or "lora" (v_hack and saved knobs record it)
    m.null_width       the width of the isotropic null for cosines with v_hack
    m.merged_weight()  the effective dense weight (d_out, d_in) in the base weight's dtype
and the adapter file provides two functions, so train.BASES (one entry per --basis) is its whole registration:
    wrap_run(model, args)           the run's {name: adapted module} from train.py's resolved flags
    save_adapter(modules, d, meta)  a run's adapter/ directory d, in a form other tools load
v_hack files are safetensors with their metadata (basis kind, base-model fingerprint, k, pair count, loss,
pair ids); loading one onto another basis or base model is an error, as is loading saved knobs onto
another model.
"""
import contextlib, hashlib, io, json, math, os

import torch
import torch.nn as nn
import torch.nn.functional as F

from configs import CAPTURE_CHUNK, CLIP_EPS, LOSS_TYPES, TARGETS
import pools   # atomic_write (standard library only)
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "antipasto_svd")


# ----------------------------------------------------------------------------- the adapter

class SVDLinear(nn.Module):
    """A frozen Linear plus the knob delta_S in its singular basis. Records per-sample gradients
    of delta_S when `capture` is on (one backward gives all of them)."""
    basis = "svd"

    def __init__(self, base: nn.Linear, U, S, Vh, digest):
        super().__init__()
        self.base = base
        self.register_buffer("U", U, persistent=False)    # (d_out, r), model dtype
        self.register_buffer("Vh", Vh, persistent=False)  # (r, d_in), model dtype
        self.register_buffer("S", S, persistent=False)    # (r,) float32, for reference
        self.delta_S = nn.Parameter(torch.zeros(S.shape[0], dtype=torch.float32))
        self.digest = digest          # sha256 of the frozen weight bytes
        self.null_width = S.shape[0]  # r: the gradient lives in all of delta_S
        self.capture = False
        self.grad_sample = None       # (B, r) after a backward with capture on

    def forward(self, x):                                   # x: (B, T, d_in)
        y = self.base(x)                                     # (B, T, d_out)
        h = F.linear(x, self.Vh)                             # (B, T, r)
        z = h * self.delta_S.to(h.dtype)                     # (B, T, r)
        if self.capture and z.requires_grad:
            hd = h.detach()
            def store(gz):                                   # gz: dL/dz (B, T, r)
                gs = token_sum(gz, hd)                       # (B, r)
                self.grad_sample = gs if self.grad_sample is None else self.grad_sample + gs
            z.register_hook(store)
        return y + F.linear(z, self.U)

    def knob(self):
        return self.delta_S

    @torch.no_grad()
    def merged_weight(self):
        """W + U diag(delta_S) Vh as one dense (d_out, d_in) weight in W's dtype (summed in float32)."""
        W = self.base.weight
        return (W.float() + (self.U.float() * self.delta_S) @ self.Vh.float()).to(W.dtype)


def token_sum(a, b):
    """sum over tokens of a * b, (B, ..., r) x2 -> (B, r), accumulated in float32 a slice of tokens at
    a time: a bf16 model never holds float32 copies of whole (B, T, r) activations (at Qwen3-4B shapes
    about 0.6 GB per large module), only slices of about configs.CAPTURE_CHUNK elements."""
    Bsz, r = a.shape[0], a.shape[-1]
    a, b = a.reshape(Bsz, -1, r), b.reshape(Bsz, -1, r)         # (B, T, r)
    step = max(1, CAPTURE_CHUNK // (Bsz * r))
    out = torch.zeros(Bsz, r, dtype=torch.float32, device=a.device)
    for i in range(0, a.shape[1], step):
        out += (a[:, i:i + step].float() * b[:, i:i + step].float()).sum(1)
    return out


def weight_digest(*tensors, extra=""):
    """sha256 over a tag and each tensor's dtype, shape and raw bytes: of one weight, the SVD cache key and
    the model fingerprint; of a LoRA module's weight, A and scaling, its basis' identity (lora_adapter)."""
    h = hashlib.sha256(extra.encode())
    for w in tensors:
        t = w.detach().contiguous().cpu()
        raw = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(raw.numpy().tobytes())
    return h.hexdigest()


def svd_of(w, cache_dir=CACHE_DIR, tol=1e-4):
    """(U, S, Vh, digest) of a weight, computed in float32 and cached on disk by the weight's digest
    (a changed weight has a new digest, so it can never hit a stale entry). The cache holds U and Vh
    in the weight's dtype (what the adapter uses; exact for float32 weights) and S in float32: for a
    (d_out, d_in) weight r (d_out + d_in) elements, about 1.35x the targeted weights of a Qwen3, so
    9.8 GB of disk for Qwen3-4B in bf16 (configs.memory_budget's adapter_basis)."""
    digest = weight_digest(w)
    path = os.path.join(cache_dir, digest + ".pt") if cache_dir else None
    if path and os.path.exists(path):
        U, S, Vh = (torch.load(path, map_location=w.device, weights_only=True)[k] for k in ("U", "S", "Vh"))
    else:
        W = w.detach().float()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)   # (d_out, r), (r,), (r, d_in)
        err = (torch.linalg.norm((U * S) @ Vh - W) / torch.linalg.norm(W).clamp_min(1e-30)).item()
        if err > tol:
            raise RuntimeError(f"SVD reconstruction error {err:.2e} > {tol:.0e}")
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            buf = io.BytesIO()
            torch.save({"U": U.to(w.dtype).cpu(), "S": S.cpu(), "Vh": Vh.to(w.dtype).cpu()}, buf)
            pools.atomic_write(path, buf.getvalue())
    return U.to(w.dtype), S.float(), Vh.to(w.dtype), digest


def wrap(model, targets=TARGETS, cache_dir=CACHE_DIR, factors=None):
    """Attach delta_S (zeros) to every target Linear, freeze everything else. factors(weight) ->
    (U, S, Vh, digest) replaces svd_of (bench.py's GPU check passes random orthonormal factors of the
    same shapes: same cost, without minutes of SVD). Returns {module name: SVDLinear}, in model order."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no Linear named {targets} in the model")
    wrapped = {}
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        U, S, Vh, digest = factors(lin.weight) if factors else svd_of(lin.weight, cache_dir)
        mod = SVDLinear(lin, U, S, Vh, digest).to(lin.weight.device)
        setattr(parent, attr, mod)
        wrapped[name] = mod
    return wrapped


# ----------------------------------------------------------------------------- the adapter contract

def knob(m):
    """The trainable flat vector of an adapter module (delta_S here, A and B in lora_adapter)."""
    return m.knob()


def basis_of(modules):
    """The one basis kind of a set of adapter modules ("svd", "lora"); mixing kinds is an error."""
    kinds = sorted({m.basis for m in modules.values()})
    if len(kinds) != 1:
        raise ValueError(f"adapter modules of {len(kinds)} basis kinds {kinds}; one run uses one basis")
    return kinds[0]


def fingerprint(modules):
    """One id for a basis: module names, basis kind, the digests of their frozen bases, knob widths."""
    h = hashlib.sha256()
    for name, m in modules.items():
        h.update(f"{name}:{m.basis}:{m.digest}:{tuple(knob(m).shape)};".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def zero_knobs(modules):
    """The reference model for free: knobs at zero inside the block, restored after."""
    saved = {n: knob(m).detach().clone() for n, m in modules.items()}
    with torch.no_grad():
        for m in modules.values():
            knob(m).zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, m in modules.items():
                knob(m).copy_(saved[n])


def save_knobs(modules, path, extra=None):
    from safetensors.torch import save
    meta = {"fingerprint": fingerprint(modules), "basis": basis_of(modules), **(extra or {})}
    pools.atomic_write(path, save({n: knob(m).detach().cpu().contiguous() for n, m in modules.items()},
                                  metadata={k: str(v) for k, v in meta.items()}))


def wrap_run(model, args):
    """A run's adapter (train.BASES["svd"]): delta_S on every target Linear."""
    return wrap(model)


def save_adapter(modules, d, meta):
    """A run's adapter/ (train.BASES["svd"], next to every checkpoint): the knobs delta_S in
    d/svd_knobs.safetensors with `meta` (step, model) in the header; wrap then load_knobs reads them back
    (another base model is refused) and rollout.merged then gives plain weights."""
    save_knobs(modules, os.path.join(d, "svd_knobs.safetensors"), extra=meta)


def load_knobs(modules, path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        fp, basis = fingerprint(modules), basis_of(modules)
        if meta.get("basis") != basis:
            raise ValueError(f"{path}: knobs were saved in the {meta.get('basis')!r} basis, these modules are {basis!r}")
        if meta.get("fingerprint") != fp:
            raise ValueError(f"{path}: knobs were saved for base model {meta.get('fingerprint')}, "
                             f"this model is {fp}; refusing to load them onto another model")
        with torch.no_grad():
            for n, m in modules.items():
                knob(m).copy_(f.get_tensor(n))


# ----------------------------------------------------------------------------- sequences and losses

def make_batch(tokenizer, prompts, completions, max_prompt=None, max_completion=None, device="cpu"):
    """Right-padded (prompt + completion) ids with a mask on completion tokens only.
    The prompt is cut from the left (its end is what the model answers), the completion from the right;
    nothing is cut silently: prompt_cut / comp_cut count the tokens each row lost.
    Returns dict(input_ids (B, T), attention_mask (B, T), comp_mask (B, T), comp_len (B,),
    prompt_cut [B ints], comp_cut [B ints])."""
    prompt_ids, comp_ids, p_cut, c_cut = [], [], [], []
    for p, c in zip(prompts, completions):
        pi = tokenizer(p, add_special_tokens=False)["input_ids"]
        ci = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        n_p, n_c = len(pi), len(ci)
        if max_prompt:
            pi = pi[-max_prompt:]
        if max_completion:
            ci = ci[:max_completion]
        p_cut.append(n_p - len(pi))
        c_cut.append(n_c - len(ci))
        prompt_ids.append(pi)
        comp_ids.append(ci)
    batch = batch_from_ids(prompt_ids, comp_ids, tokenizer.pad_token_id, device)
    return dict(batch, prompt_cut=p_cut, comp_cut=c_cut)


def token_logps(model, batch):
    """log p(token_t | tokens_<t) at every position, 0 where no completion token. (B, T)"""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)                                        # (B, T-1, V)
    tok = lp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)                               # (B, T-1)
    out = torch.zeros_like(batch["comp_mask"])
    out[:, 1:] = tok * batch["comp_mask"][:, 1:]
    return out


def batch_from_ids(prompt_ids, comp_ids, pad_id, device="cpu"):
    """make_batch's dict from token ids already in hand (the online trainer trains on the exact tokens
    it sampled, never on a re-tokenisation of their text; make_batch pads its tokenised rows here).
    comp_ids end with the stop token when the rollout stopped. Nothing is cut here: prompt_cut and
    comp_cut are all 0."""
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, comp_ids)]
    B, T = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros(B, T, dtype=torch.long)
    cm = torch.zeros(B, T, dtype=torch.float32)
    for i, (s, p, c) in enumerate(zip(seqs, prompt_ids, comp_ids)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        cm[i, len(p):len(p) + len(c)] = 1.0
    return dict(input_ids=ids.to(device), attention_mask=att.to(device), comp_mask=cm.to(device),
                comp_len=torch.tensor([len(c) for c in comp_ids], device=device), prompt_cut=[0] * B, comp_cut=[0] * B)


def slice_batch(batch, a, b):
    """Rows a:b of a batch dict (a micro-batch), trimmed to its own longest row."""
    T = int(batch["attention_mask"][a:b].sum(-1).max().item())
    return {k: (v[a:b, :T] if torch.is_tensor(v) and v.dim() == 2 else v[a:b]) for k, v in batch.items()}


def token_denoms(comp_len, loss_type="grpo", N=None, max_len=None):
    """Each row's token-sum divisor (B,), computed once over the whole step batch so that micro-batches
    add up to the same loss (TRL's names):
        grpo    (spec default) per-sequence mean:  |o_i| * N
        dr_grpo (Dr. GRPO) constant length:        N * max_len   (max_len: the completion token limit)
        bnpo    per-token mean over the batch:     sum_j |o_j|
    N: the rows of the step (default: all rows given)."""
    n_tok = torch.as_tensor(comp_len, dtype=torch.float32)                          # (B,)
    N = N or n_tok.shape[0]
    if loss_type == "grpo":
        return n_tok.clamp_min(1.0) * N
    if loss_type == "dr_grpo":
        if not max_len:
            raise ValueError("loss_type dr_grpo needs max_len (the completion token limit)")
        return torch.full_like(n_tok, float(N * max_len))
    if loss_type == "bnpo":
        return torch.full_like(n_tok, max(n_tok.sum().item(), 1.0))
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")


def group_advantages(rewards, group_ids):
    """Group-centred advantages without the std: adv_i = r_i - mean of r over i's group. (B,)
    A group whose rewards are all equal gets exactly 0 (float32 centring can leave 1e-7, which
    AdamW would turn into a full-size step)."""
    r = torch.as_tensor(rewards, dtype=torch.float32)
    adv = torch.empty_like(r)
    for g in set(group_ids):
        idx = torch.tensor([i for i, x in enumerate(group_ids) if x == g])
        same = len({float(rewards[i]) for i in idx.tolist()}) == 1
        adv[idx] = 0.0 if same else r[idx] - r[idx].mean()
    return adv


def policy_losses(logp_tok, comp_mask, adv, denom, old_logp=None, ref_logp=None, clip_eps=CLIP_EPS, beta=0.0):
    """Per-sample losses (B,), summed for the batch loss, and token statistics.
        adv None          the NLL probe:     loss_i = sum_t(-logp_it) / denom_i
        old_logp None     REINFORCE:         loss_i = -adv_i * sum_t(logp_it) / denom_i
        old_logp given    PPO-clip:          loss_i = -sum_t(min(rho_it adv_i, clip(rho_it, 1-eps, 1+eps) adv_i)) / denom_i
                          with rho = exp(logp - old_logp); rows whose old_logp is NaN (rows not sampled
                          from this policy, e.g. teacher rows) take old_logp = logp (rho = 1, gradient as REINFORCE)
        ref_logp, beta    plus beta * sum_t(K3_it) / denom_i, K3 = exp(ref - logp) - (ref - logp) - 1 >= 0,
                          the KL estimate to the reference policy (zero when logp == ref)
    logp_tok, comp_mask, old_logp, ref_logp: (B, T), zero off the completion. Returns (losses (B,), stats)
    with stats: kl_sum (sum of K3 over completion tokens, or None without ref_logp), n_clipped (tokens
    where the clip is active), ratio_min, ratio_max, n_tok."""
    m = comp_mask
    stats = dict(n_tok=m.sum().item(), kl_sum=None, n_clipped=0, ratio_min=1.0, ratio_max=1.0)
    if adv is None:
        obj = logp_tok                                                               # (B, T)
    elif old_logp is None:
        obj = adv.to(logp_tok.device)[:, None] * logp_tok
    else:
        a = adv.to(logp_tok.device)[:, None]                                         # (B, 1)
        old = torch.where(torch.isnan(old_logp), logp_tok.detach(), old_logp)
        rho = torch.exp((logp_tok - old) * m)                                        # (B, T), 1 off the completion
        clipped = torch.clamp(rho, 1 - clip_eps, 1 + clip_eps)
        obj = torch.minimum(rho * a, clipped * a)
        active = ((rho > 1 + clip_eps) & (a > 0)) | ((rho < 1 - clip_eps) & (a < 0))
        on = m > 0
        stats.update(n_clipped=int((active & on).sum().item()),
                     ratio_min=rho.detach()[on].min().item() if on.any() else 1.0,
                     ratio_max=rho.detach()[on].max().item() if on.any() else 1.0)
    if ref_logp is not None:
        d = (ref_logp - logp_tok) * m                                                # (B, T)
        k3 = (torch.exp(d) - d - 1) * m
        stats["kl_sum"] = k3.detach().sum().item()
        if beta:
            obj = obj - beta * k3
    losses = -(obj * m).sum(-1) / denom.to(logp_tok.device)                         # (B,)
    return losses, stats


def sample_losses(logp_tok, comp_mask, loss_mode, rewards=None, G=None, loss_type="grpo", max_len=None):
    """The replay probe's per-sample losses (B,): one group, advantage centred over the batch
    (adv_i = r_i - mean(r), no std; nll mode: the mean NLL probe), token reduction token_denoms(...)
    with N = G. Returns (losses (B,), adv (B,) or None)."""
    if loss_mode not in ("nll", "grpo"):
        raise ValueError(f"loss_mode must be nll or grpo, not {loss_mode!r}")
    denom = token_denoms(comp_mask.sum(-1), loss_type, G or logp_tok.shape[0], max_len)
    adv = group_advantages(rewards, [0] * len(rewards)) if loss_mode == "grpo" else None
    return policy_losses(logp_tok, comp_mask, adv, denom)[0], adv


@contextlib.contextmanager
def capture_per_sample(modules):
    """Inside the block every backward fills m.grad_sample (B, n) for each module."""
    for m in modules.values():
        m.capture, m.grad_sample = True, None
    try:
        yield
    finally:
        for m in modules.values():
            m.capture = False


def per_sample_grads(model, modules, batch, loss_mode="nll", rewards=None, G=None, loss_type="grpo", max_len=None):
    """One forward + one backward. Returns (losses (B,), adv, {name: (B, n)} per-sample knob grads).
    Their sum over B equals each knob's .grad (which is also set)."""
    for m in modules.values():
        knob(m).grad = None
    with capture_per_sample(modules):
        lp = token_logps(model, batch)
        losses, adv = sample_losses(lp, batch["comp_mask"], loss_mode, rewards, G, loss_type, max_len)
        losses.sum().backward()
    B = batch["input_ids"].shape[0]
    gs = {n: (m.grad_sample if m.grad_sample is not None else torch.zeros(B, knob(m).numel(), device=knob(m).device))
          for n, m in modules.items()}
    return losses.detach(), adv, gs


# ----------------------------------------------------------------------------- projection

def _cos(a, b):
    na, nb = a.norm(), b.norm()
    if na.item() == 0.0 or nb.item() == 0.0:
        return None   # undefined: never NaN, never a fake 0
    return (a @ b / (na * nb)).item()


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def project(grads, V, one_sided=True):
    """Remove the hack-ward component of each module's flat gradient.
        grads: {name: g (n,)};  V: {name: (k, n)} with orthonormal rows, row 0 the top hack axis
        one_sided: g - relu(V g) @ V   (only what points hack-ward; default)
        else:      g - (V g) @ V       (the whole span)
    Returns (new grads, stats). stats: per-module lists and their means: cos_in (signed cosine with
    the top axis), hackward (||relu(V g)|| / ||g||), cos_out, fired, over (cos_out < min(cos_in, 0)),
    and frac_fired."""
    out, per = {}, {"cos_in": [], "cos_out": [], "hackward": [], "fired": [], "over": []}
    for name, g in grads.items():
        v = V[name].to(g.dtype)                         # (k, n)
        c = v @ g                                       # (k,)
        rm = c.clamp_min(0) if one_sided else c
        g2 = g - rm @ v                                 # (n,)
        out[name] = g2
        gn = g.norm().item()
        ci = _cos(g, v[0])
        # nothing left (to rounding) after projection: the cosine is undefined, not a noise value
        co = _cos(g2, v[0]) if g2.norm().item() > 1e-6 * gn else None
        per["cos_in"].append(ci)
        per["cos_out"].append(co)
        per["hackward"].append(c.clamp_min(0).norm().item() / gn if gn > 0 else None)
        per["fired"].append(bool((rm != 0).any().item()))
        # over-projection: some axis lost more than its hack-ward part (only a bug can do that)
        per["over"].append(bool(((v @ g2) < torch.clamp(c, max=0.0) - 1e-5 * (gn + 1e-30)).any().item()))
    stats = dict(per_module=per, cos_in=_mean(per["cos_in"]), cos_out=_mean(per["cos_out"]),
                 hackward=_mean(per["hackward"]), frac_fired=sum(per["fired"]) / max(len(per["fired"]), 1),
                 n_over_projected=sum(per["over"]))
    return out, stats


def sample_cosines(per_sample, V):
    """Per-sample cos_S_contrib (mean over modules of cos(g_b, V[0])) and grad_norm_contrib
    (global norm over modules). per_sample: {name: (B, n)}. Returns two lists of length B."""
    names = list(per_sample)
    B = per_sample[names[0]].shape[0]
    cos, norms = [], []
    for b in range(B):
        cos.append(_mean([_cos(per_sample[n][b], V[n][0].to(per_sample[n].dtype)) for n in names]))
        norms.append(math.sqrt(sum(per_sample[n][b].double().pow(2).sum().item() for n in names)))
    return cos, norms


# ----------------------------------------------------------------------------- v_hack

def orient(Vk, D):
    """Sign each row of Vk (k, n) so most pair differences D (P, n) project positively (ties: the
    summed projection decides). Positive projection = descending that gradient moves toward the hack."""
    proj = D @ Vk.T                                     # (P, k)
    signs = torch.where((proj > 0).sum(0) > (proj < 0).sum(0), 1.0,
                        torch.where((proj > 0).sum(0) < (proj < 0).sum(0), -1.0,
                                    torch.where(proj.sum(0) >= 0, 1.0, -1.0)))
    return Vk * signs[:, None]


def directions_from_diffs(diffs, k=1):
    """{name: (P, n) per-pair hack-minus-clean gradients} -> {name: V (k, n)}, oriented hack-ward.
    Coordinates that no pair moves (zero in every difference: the LoRA basis' A block at B = 0) are
    left out of the SVD and are exactly zero in V, not rounding noise."""
    V = {}
    for name, D in diffs.items():
        D = D.double()
        keep = D.norm(dim=1) > 0
        if keep.sum() == 0:
            raise ValueError(f"{name}: every pair difference is zero; cannot extract a direction")
        D = D[keep]
        cols = D.abs().sum(0) > 0                                      # (n,) coordinates some pair moves
        _, _, Vh = torch.linalg.svd(D[:, cols], full_matrices=False)   # (min(P, n_cols), n_cols)
        Vk = torch.zeros(min(k, Vh.shape[0]), D.shape[1], dtype=D.dtype)
        Vk[:, cols] = Vh[:k]
        V[name] = orient(Vk, D).float()
    return V


def pair_diffs(model, modules, tokenizer, pairs, loss="nll", G=8, max_prompt=None, max_completion=None,
               batch_size=8):
    """Per-pair gradient contrasts in the modules' knob basis.
    pairs: [{"prompt": text, "hack": text, "clean": text, "r_hack": float, "r_clean": float}]; both sides
      are scored under "prompt" unless the pair has a "prompt_clean" for its clean side
      nll : d_i = grad NLL(hack_i) - grad NLL(clean_i)    (mean completion NLL, /G like the live loss)
      grpo: d_i = grad of the GRPO loss of the group {hack_i, clean_i} with its real rewards, /G
    Returns {name: (P, n)}."""
    diffs = {n: [] for n in modules}
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        P = len(chunk)
        batch = make_batch(tokenizer, [p["prompt"] for p in chunk] + [p.get("prompt_clean", p["prompt"]) for p in chunk],
                           [p["hack"] for p in chunk] + [p["clean"] for p in chunk], max_prompt, max_completion,
                           device=next(model.parameters()).device)
        _, _, gs = per_sample_grads(model, modules, batch, "nll", G=G)   # grad of -mean_lp/G per sample
        if loss == "nll":
            w_h, w_c = torch.ones(P), -torch.ones(P)
        elif loss == "grpo":
            r_h = torch.tensor([float(p["r_hack"]) for p in chunk])
            r_c = torch.tensor([float(p["r_clean"]) for p in chunk])
            w_h, w_c = (r_h - r_c) / 2, (r_c - r_h) / 2     # adv of each in its group of two
        else:
            raise ValueError(f"extraction loss must be nll or grpo, not {loss!r}")
        for n, g in gs.items():                             # g: (2P, n), rows = grad of NLL_i / G
            diffs[n].append(w_h[:, None] * g[:P] + w_c[:, None] * g[P:])
    return {n: torch.cat(d) for n, d in diffs.items()}


def label_free_pairs(pairs, seed=0):
    """The shuffled control's pairs: both sides carry the same label (hack vs another hack, clean vs
    another clean), each scored under the prompt it was scored under in its own pair, so the
    extraction runs unchanged with the hack contrast taken out and no answer is scored against
    another problem. (Swapping hack and clean inside a pair would be no control: it flips the sign of
    a row of D, which leaves its singular vectors, and so V, unchanged.) Extract these with
    loss="nll": equal labels carry no reward gap for the GRPO-style contrast."""
    import random
    rng = random.Random(seed)
    P = len(pairs)
    if P < 4:
        raise ValueError("the shuffled control needs at least 4 pairs")
    perm = list(range(P))
    while any(i == j for i, j in enumerate(perm)):      # a derangement: never a completion with itself
        rng.shuffle(perm)
    out = []
    for i, j in enumerate(perm):
        side = "hack" if i % 2 == 0 else "clean"
        out.append(dict(prompt=pairs[i]["prompt"], prompt_clean=pairs[j]["prompt"], hack=pairs[i][side], clean=pairs[j][side],
                        ids=[pairs[i]["ids"][i % 2], pairs[j]["ids"][i % 2]] if "ids" in pairs[i] else None))
    return out


def save_v(V, path, meta):
    """v_hack as safetensors plus metadata (basis kind, base fingerprint, k, pair count, loss, ...)."""
    from safetensors.torch import save
    pools.atomic_write(path, save({n: v.contiguous().cpu() for n, v in V.items()},
                                  metadata={"meta": json.dumps(meta, sort_keys=True)}))


def load_v(path, modules, basis=None):
    """Load v_hack; refuse it when it was built on another basis kind (default: the modules') or base model."""
    from safetensors import safe_open
    basis = basis or basis_of(modules)
    with safe_open(path, "pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        fp = fingerprint(modules)
        if meta.get("basis") != basis:
            raise ValueError(f"{path}: v_hack is in the {meta.get('basis')!r} basis, this run uses {basis!r}")
        if meta.get("fingerprint") != fp:
            raise ValueError(f"{path}: v_hack was extracted on base model {meta.get('fingerprint')}, "
                             f"this model is {fp}")
        V = {n: f.get_tensor(n) for n in modules}
    for n, m in modules.items():
        if V[n].shape[1] != knob(m).numel():
            raise ValueError(f"{path}: {n} has width {V[n].shape[1]}, knob has {knob(m).numel()}")
    return V, meta


# ----------------------------------------------------------------------------- controls and null

def random_v(like, seed=0):
    """Control: a random orthonormal V with the same k and width per module, seeded, on the
    coordinates the real V uses (all of them in the SVD basis; B's at B = 0 in the LoRA basis)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, v in like.items():
        k, w = v.shape
        cols = (v != 0).any(0)                                                        # (w,)
        Q, _ = torch.linalg.qr(torch.randn(int(cols.sum()), k, generator=g, dtype=torch.float64))
        R = torch.zeros(k, w)
        R[:, cols] = Q.T.float()
        out[n] = R
    return out


def null_cos_sd(widths):
    """sd of the mean over modules of independent null cosines, modules of widths r_m:
    sqrt(sum 1/r_m) / M."""
    return math.sqrt(sum(1.0 / r for r in widths)) / len(widths)
