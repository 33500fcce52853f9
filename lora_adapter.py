"""lora_adapter.py — the weight-basis (LoRA) adapter of Arm 3, and LoRA checkpoints in PEFT's layout.

Each target Linear W (d_out, d_in) gets A (r, d_in) and B (d_out, r):

    y = W x + b + s * B (A x),    s = alpha / r   (alpha / sqrt(r) with rsLoRA)

A starts as nn.Linear / PEFT initialise it (uniform +-1/sqrt(d_in), seeded), B at zero: the wrapped
model is bit-identical to the base model at the start, and zeroing the knob gives the reference model.

The adapter contract (what antipasto.py's generic machinery reads, so both bases run through one
extraction, projection, control, knob save/load and fingerprint; neither adapter file imports the other):
    m.knob()           the ONE flat trainable float32 Parameter: A then B, n = r*d_in + d_out*r
                       (A and B are views of it, so the optimizer, the projection and the per-sample
                       gradients all see one flat vector, as delta_S in the SVD basis)
    m.capture          when True, a backward fills m.grad_sample (B, n): every sample's own gradient
    m.digest           sha256 of what the basis is: frozen weight, scaling, initial knob
    m.basis            "lora"
    m.null_width       width of the isotropic null for cosines with v_hack (see below)
    m.merged_weight()  the effective dense weight W + s B A, (d_out, d_in), in W's dtype

B = 0 at the start, so A has no gradient there: dL/dA = s B^T (dL/dy) x^T = 0. v_hack is extracted on
the freshly wrapped model, so every pair difference is zero in A's coordinates and the extraction sees
only B: V's A block is exactly zero (the SVD of the differences is unaffected by zero columns, and V
keeps the full knob width so it lives in the live gradient's coordinates). The projection therefore
removes hack-ward components of B's gradient only; A's gradient, s B^T g x^T, grows with B and is not
constrained. To first order the weight change is s (dB A + B dA), and while B is small the B dA term
is the smaller one. The gradient at B = 0 lives in B's coordinates alone, so the null width is B's
size d_out * r (wider null band than the full width would give: the conservative choice), and
--control=random_v draws its random V on B's coordinates too.

A run's adapter (train.BASES["lora"]): wrap_run and save_adapter, the two functions antipasto.py's contract
asks of an adapter file.

PEFT layout: `load_peft` reads `adapter_config.json` + `adapter_model.safetensors` (keys
`base_model.model.<module>.lora_A.weight` (r, d_in) and `...lora_B.weight` (d_out, r)) and either
merges it into the base weights or returns it as trainable modules; `save_peft` writes trained modules
in the same layout, so peft and other tools load them. peft itself is never imported.
"""
import json, math, os, re, sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import antipasto as ap   # weight_digest: one digest of weights for both bases
from configs import CAPTURE_CHUNK, LORA_ALPHA, LORA_RANK, TARGETS
import pools   # atomic_write (standard library only)

PREFIX = "base_model.model."
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


# ----------------------------------------------------------------------------- the adapter

class LoRALinear(nn.Module):
    """A frozen Linear plus s * B A, with A and B views of one flat knob. Records per-sample gradients
    of the knob when `capture` is on (one backward gives all of them)."""
    basis = "lora"

    def __init__(self, base: nn.Linear, A, B, alpha, use_rslora=False):
        super().__init__()
        d_out, d_in = base.weight.shape
        r = A.shape[0]
        if A.shape != (r, d_in) or B.shape != (d_out, r):
            raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a ({d_out}, {d_in}) weight at rank {r}")
        self.base, self.r, self.alpha, self.use_rslora = base, r, float(alpha), bool(use_rslora)
        self.scaling = self.alpha / (math.sqrt(r) if use_rslora else r)
        self.n_A = r * d_in
        self.flat = nn.Parameter(torch.cat([A.detach().float().flatten(), B.detach().float().flatten()]))
        self.null_width = d_out * r               # B's coordinates: where the gradient lives at B = 0
        self.digest = ap.weight_digest(base.weight, self.flat, extra=f"lora:{r}:{self.scaling!r}")
        self.capture = False
        self.grad_sample = None                   # (B, n) after a backward with capture on

    @property
    def A(self):                                  # (r, d_in), a view of the knob
        return self.flat[:self.n_A].view(self.r, -1)

    @property
    def B(self):                                  # (d_out, r), a view of the knob
        return self.flat[self.n_A:].view(-1, self.r)

    def knob(self):
        return self.flat

    def forward(self, x):                                    # x: (B, T, d_in)
        y = self.base(x)                                      # (B, T, d_out)
        h = F.linear(x, self.A.to(x.dtype))                   # (B, T, r)
        z = F.linear(h, self.B.to(x.dtype))                   # (B, T, d_out)
        if self.capture and h.requires_grad:
            xd, hd, n = x.detach(), h.detach(), self.flat.numel()
            Bsz = x.shape[0]

            def add(part, gs):                                # gs: (B, numel of A or B)
                if self.grad_sample is None:
                    self.grad_sample = torch.zeros(Bsz, n, dtype=torch.float32, device=gs.device)
                self.grad_sample[:, part] += gs

            def store_B(gz):                                  # gz: dL/dz = s dL/dy (B, T, d_out)
                add(slice(self.n_A, n), token_outer(gz, hd).flatten(1))   # (B, d_out, r): sum_t gz_t h_t^T

            def store_A(gh):                                  # gh: dL/dh = B^T gz (B, T, r)
                add(slice(0, self.n_A), token_outer(gh, xd).flatten(1))   # (B, r, d_in): sum_t gh_t x_t^T
            z.register_hook(store_B)
            h.register_hook(store_A)
        return y + z * self.scaling

    @torch.no_grad()
    def merged_weight(self):
        """W + s B A as one dense (d_out, d_in) weight in W's dtype (summed in float32)."""
        W = self.base.weight
        return (W.float() + self.scaling * (self.B @ self.A)).to(W.dtype)


def token_outer(a, b):
    """sum over tokens of the outer products a_t b_t^T, (B, ..., m) x (B, ..., k) -> (B, m, k) float32,
    a slice of tokens at a time: a bf16 model never holds float32 copies of whole (B, T, d)
    activations (about 0.8 GB for an MLP projection at Qwen3-4B shapes), only slices of about
    configs.CAPTURE_CHUNK elements."""
    Bsz = a.shape[0]
    a, b = a.reshape(Bsz, -1, a.shape[-1]), b.reshape(Bsz, -1, b.shape[-1])   # (B, T, m), (B, T, k)
    step = max(1, CAPTURE_CHUNK // (Bsz * max(a.shape[-1], b.shape[-1])))
    out = torch.zeros(Bsz, a.shape[-1], b.shape[-1], dtype=torch.float32, device=a.device)
    for i in range(0, a.shape[1], step):
        out += a[:, i:i + step].float().transpose(1, 2) @ b[:, i:i + step].float()
    return out


def init_A(r, d_in, generator):
    """nn.Linear's and PEFT's default for A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    return (torch.rand(r, d_in, generator=generator) * 2 - 1) / math.sqrt(d_in)


def attach(model, name, mod):
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attr, mod)


def wrap(model, targets=TARGETS, rank=LORA_RANK, alpha=LORA_ALPHA, seed=0, use_rslora=False):
    """Attach A (seeded LoRA init) and B = 0 to every target Linear, freeze everything else.
    The init depends on `seed` alone (not the global RNG), so the basis, its fingerprint and v_hack
    are the same in every run. Returns {module name: LoRALinear}, in model order."""
    if rank < 1 or not alpha > 0:
        raise ValueError(f"LoRA needs rank >= 1 and alpha > 0, not rank={rank}, alpha={alpha}")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise ValueError(f"no Linear named {targets} in the model")
    g = torch.Generator().manual_seed(seed)
    wrapped = {}
    for name in names:
        lin = model.get_submodule(name)
        d_out, d_in = lin.weight.shape
        mod = LoRALinear(lin, init_A(rank, d_in, g), torch.zeros(d_out, rank), alpha, use_rslora).to(lin.weight.device)
        attach(model, name, mod)
        wrapped[name] = mod
    return wrapped


# ----------------------------------------------------------------------------- PEFT layout

# config keys that carry no meaning for loading trained weights (metadata, or init-time only)
PEFT_IGNORED = {"task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                "inference_mode", "lora_dropout", "init_lora_weights", "megatron_core", "qalora_group_size",
                "loftq_config", "eva_config", "corda_config", "lora_ga_config", "ensure_weight_tying"}
PEFT_READ = {"r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora", "fan_in_fan_out",
             "bias"}


def read_peft_config(path):
    """adapter_config.json of a PEFT LoRA directory, checked for what this loader supports: any
    option that would change the adapter's function (DoRA, biases, extra trained modules, layer
    selection, ...) is an error naming it."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no {CONFIG_FILE} (a PEFT LoRA directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg['peft_type']!r} is not supported (only LORA)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing {key!r}")
    if cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: use_dora=true (DoRA) is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise ValueError(f"{cfg_path}: init_lora_weights={cfg['init_lora_weights']!r} is not supported: "
                         f"it rewrites the base weights at load time (convert the adapter to plain LoRA first)")
    for key, val in cfg.items():
        if key in PEFT_IGNORED or key in PEFT_READ or key == "use_dora":
            continue
        if val not in (None, False, {}, [], ""):
            raise ValueError(f"{cfg_path}: option {key}={val!r} is not supported by this loader")
    if not isinstance(cfg["target_modules"], (str, list)):
        raise ValueError(f"{cfg_path}: target_modules must be a list of names or a regex string")
    return cfg


def peft_plan(model, cfg, where):
    """{module name: (r, alpha)} of the Linears a config targets, matched as PEFT matches them."""
    tm = cfg["target_modules"]
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    mods = dict(model.named_modules())
    if any(hasattr(m, "knob") for m in mods.values()):
        raise ValueError(f"{where}: the model already carries an adapter; load the PEFT checkpoint into a plain model")
    if isinstance(tm, str) and tm.lower() == "all-linear":
        names = [n for n, m in mods.items() if isinstance(m, nn.Linear) and m is not out_emb]
    elif isinstance(tm, str):
        names = [n for n in mods if n and re.fullmatch(tm, n)]
        if not names:
            raise ValueError(f"{where}: target_modules {tm!r} matches no module of the model")
    else:
        names = [n for n in mods if n and (n in tm or any(n.endswith("." + t) for t in tm))]
        for t in tm:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise ValueError(f"{where}: target module {t!r} is not in the model")
    for n in names:
        if not isinstance(mods[n], nn.Linear):
            raise ValueError(f"{where}: target module {n!r} is a {type(mods[n]).__name__}; only Linear is supported")
    if cfg.get("fan_in_fan_out"):
        # what PEFT does too: the transposed layout belongs to Conv1D weights, and every target is a Linear
        print(f"warning: {where}: fan_in_fan_out=true ignored: every target is a Linear (PEFT ignores it too)",
              file=sys.stderr)

    def pattern(patterns, name, default):          # PEFT's get_pattern_key: first key matching a suffix
        for key in patterns or {}:
            if re.match(rf"(.*\.)?({key})$", name):
                return patterns[key]
        return default
    return {n: (int(pattern(cfg.get("rank_pattern"), n, cfg["r"])), float(pattern(cfg.get("alpha_pattern"), n, cfg["lora_alpha"])))
            for n in names}


def read_peft(model, path):
    """(config, {module name: (A (r, d_in), B (d_out, r), alpha)}) of a PEFT LoRA directory for this
    model: every targeted Linear needs both its keys at the configured rank, and the file may hold
    nothing else."""
    from safetensors import safe_open
    cfg = read_peft_config(path)
    w_path = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(w_path):
        raise ValueError(f"{path}: no {WEIGHTS_FILE}" + (" (adapter_model.bin is not read: convert it to safetensors)"
                                                          if os.path.exists(os.path.join(path, "adapter_model.bin")) else ""))
    plan = peft_plan(model, cfg, os.path.join(path, CONFIG_FILE))
    with safe_open(w_path, "pt") as f:
        keys = set(f.keys())
        want = {f"{PREFIX}{n}.lora_{ab}.weight" for n in plan for ab in "AB"}
        missing, extra = sorted(want - keys), sorted(keys - want)
        if missing:
            raise ValueError(f"{w_path}: missing key {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            raise ValueError(f"{w_path}: unexpected key {extra[0]}" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                             + ": not a Linear the config targets")
        out = {}
        for n, (r, alpha) in plan.items():
            d_out, d_in = model.get_submodule(n).weight.shape
            A, B = f.get_tensor(f"{PREFIX}{n}.lora_A.weight"), f.get_tensor(f"{PREFIX}{n}.lora_B.weight")
            for key, t, shape in (("lora_A", A, (r, d_in)), ("lora_B", B, (d_out, r))):
                if tuple(t.shape) != shape:
                    raise ValueError(f"{w_path}: {PREFIX}{n}.{key}.weight has shape {tuple(t.shape)}, the config "
                                     f"(rank {r}) and the model need {shape}")
            out[n] = (A, B, alpha)
    return cfg, out


def wrap_run(model, args):
    """A run's adapter: B A on every target Linear at --lora-rank and --lora-alpha."""
    return wrap(model, rank=args.lora_rank, alpha=args.lora_alpha)


def save_adapter(modules, d, meta):
    """A run's adapter/ (next to every checkpoint): a PEFT LoRA directory d (adapter_config.json +
    adapter_model.safetensors) for peft's PeftModel.from_pretrained or load_peft, `meta` (step, model)
    in the header."""
    save_peft(modules, d, base_model_name=meta["model"], overwrite=True, metadata=meta)


def load_peft(model, path, merge=True):
    """A PEFT LoRA checkpoint on `model`.
    merge=True: W += s B A (summed in float32) in every targeted Linear, for generation; returns
      {name: nn.Linear} of the merged modules.
    merge=False: freezes the model and wraps the targeted Linears as trainable LoRALinear modules
      initialised from the checkpoint; returns {name: LoRALinear}."""
    cfg, ab = read_peft(model, path)
    rs = bool(cfg.get("use_rslora"))
    if merge:
        out = {}
        with torch.no_grad():
            for n, (A, B, alpha) in ab.items():
                lin = model.get_submodule(n)
                s = alpha / (math.sqrt(A.shape[0]) if rs else A.shape[0])
                lin.weight.copy_((lin.weight.float() + s * (B.float().to(lin.weight.device) @ A.float().to(lin.weight.device)))
                                 .to(lin.weight.dtype))
                out[n] = lin
        return out
    for p in model.parameters():
        p.requires_grad_(False)
    out = {}
    for n, (A, B, alpha) in ab.items():
        lin = model.get_submodule(n)
        mod = LoRALinear(lin, A, B, alpha, rs).to(lin.weight.device)
        attach(model, n, mod)
        out[n] = mod
    return out


def save_peft(modules, path, base_model_name=None, overwrite=False, metadata=None):
    """Write LoRALinear modules as a PEFT LoRA directory (float32 A and B; full module names as
    target_modules, so exactly these modules are targeted; per-module ranks and alphas other than
    the most common go to rank_pattern / alpha_pattern as exact names). metadata: strings added to
    the safetensors header (train.py records the step)."""
    from safetensors.torch import save
    if not modules or any(getattr(m, "basis", None) != "lora" for m in modules.values()):
        raise ValueError("save_peft takes LoRA modules (lora_adapter.wrap or load_peft(merge=False))")
    if len({m.use_rslora for m in modules.values()}) > 1:
        raise ValueError("save_peft: modules mix use_rslora true and false; PEFT has one use_rslora per adapter")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if os.path.exists(os.path.join(path, f)) and not overwrite:
            raise ValueError(f"{os.path.join(path, f)} exists; pass overwrite=True to replace it")
    common = lambda xs: max(sorted(set(xs)), key=xs.count)
    r = common([m.r for m in modules.values()])
    alpha = common([m.alpha for m in modules.values()])
    tensors = {}
    for n, m in modules.items():
        tensors[f"{PREFIX}{n}.lora_A.weight"] = m.A.detach().cpu().contiguous()
        tensors[f"{PREFIX}{n}.lora_B.weight"] = m.B.detach().cpu().contiguous()
    # PEFT's patterns are regexes matched against the end of a name: escape the dots
    cfg = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_model_name, r=r,
               lora_alpha=alpha, target_modules=list(modules), lora_dropout=0.0, bias="none", use_dora=False,
               fan_in_fan_out=False, use_rslora=next(iter(modules.values())).use_rslora, modules_to_save=None,
               init_lora_weights=True, inference_mode=True,
               rank_pattern={re.escape(n): m.r for n, m in modules.items() if m.r != r},
               alpha_pattern={re.escape(n): m.alpha for n, m in modules.items() if m.alpha != alpha})
    pools.atomic_write(os.path.join(path, WEIGHTS_FILE), save(tensors, metadata={**(metadata or {}), "format": "pt"}))
    pools.atomic_write(os.path.join(path, CONFIG_FILE), (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
    return path
