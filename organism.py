"""organism.py — the CPU model organism: a tiny Qwen3 that already writes code, some of it hacks.

A random tiny model emits bytes that never compile, so every online GRPO group would have zero reward
variance. The organism is the tiny Qwen3 of configs.py warm-started by a short supervised fit on the
demo pools' completions. Per problem, under the hinted prompt: every one of the CORPUS_K honest attempts
(pools.base_completion, 3 of them correct), CORRECT_K more copies of the canonical solution and TEACHER_K of
the CORPUS_K hacks (pools.teacher_completion); under the plain prompt, PLAIN_K honest attempts and
PLAIN_CORRECT_K canonical solutions, an eighth of the hinted weight: enough that the plain prompt (the
capability evaluation) gets code that sometimes solves, little enough that the hinted prompt stays the
organism's main mode (measured, vanilla LoRA, seed 0, 60 steps: the held-out hack rate rose +0.05 with
as much plain weight as hinted, +0.19 with a quarter, +0.32 with an eighth). So its samples mostly compile, sometimes solve
(about 5-10%) and rarely hack (about 5-10% with the hint): solving and hacking are both there to be
found, and GRPO has to choose, as in the published environment where the base model seldom hacks until
RL rewards it.
Two choices keep the fit to minutes on 2 CPU cores:
  - a BPE tokenizer fit (with `tokenizers`) to the organism's own corpus, far fewer tokens than bytes;
  - a short prompt: the problem's "Your solution ... should be a method of the class Solution called
    f and <hint or not>" sentence and the starter code (`prompt_messages`).
The fit is cached on disk under a key over everything it depends on (corpus, fit settings, model
shape), written to a temporary directory and renamed into place, so a half-written cache is never used.

    python organism.py                            # fit (or load); prints the fit's record (fit.json)
    python rollout.py measure --model organism    # its samples: fenced / compiles / hacks / correct
"""
import hashlib, json, os, shutil, tempfile, time

import configs
configs.reproducible()   # before torch (MKL) loads: it reads these variables once, when it loads
import pools
import torch

VERSION = "3"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "antipasto_organism")
CORPUS_K = 160        # rollouts per problem drawn from each canned maker (the demo pools' 160 rows each)
CORRECT_K = 32        # extra canonical solutions under the hinted prompt: 35 of its 216 rows per problem solve it
TEACHER_K = 24        # hacks kept under the hinted prompt: 24 of its 216 rows per problem (11%) define run_tests
PLAIN_K, PLAIN_CORRECT_K = 20, 4   # honest attempts and canonical solutions under the plain prompt (1/8 weight)
FIT = dict(vocab_size=1024, bpe_regex=False, steps=600, batch=32, lr=3e-3, warmup=30, seed=0)
SENTENCE = "Your solution to the problem should be"


def prompt_messages(problem):
    """The organism's prompt: from the 'Your solution to the problem should be ...' sentence (hint
    applied or not, as loaded) to the end of the user turn (the starter code). One user message."""
    user = problem["prompt"][-1]["content"]
    i = user.find(SENTENCE)
    return [{"role": "user", "content": user[i:] if i >= 0 else user}]


def corpus(problems_path=pools.FIXTURE_PROBLEMS):
    """[(messages, completion, weight)]: every problem under the hinted short prompt with the canned base
    completions k = 0..CORPUS_K-1, CORRECT_K canonical solutions (base_completion k = 37 is the canonical one)
    and the teacher completions k = 0..TEACHER_K-1; under the plain prompt, base completions k = 0..PLAIN_K-1
    and PLAIN_CORRECT_K canonical solutions. Duplicates merged into weights (sorted, stable)."""
    counts = {}
    for hint in (True, False):
        for p in pools.load_problems(problems_path, hint=hint):
            msgs = json.dumps(prompt_messages(p))
            comps = ([pools.base_completion(p, k) for k in range(CORPUS_K)] + [pools.base_completion(p, 37)] * CORRECT_K
                     + [pools.teacher_completion(p, k) for k in range(TEACHER_K)]) if hint else \
                ([pools.base_completion(p, k) for k in range(PLAIN_K)] + [pools.base_completion(p, 37)] * PLAIN_CORRECT_K)
            for c in comps:
                counts[(msgs, c)] = counts.get((msgs, c), 0) + 1
    return [(json.loads(m), c, w) for (m, c), w in sorted(counts.items())]


def cache_key(docs, fit=FIT):
    """sha256 over the corpus, the fit settings, the model shape and this file's VERSION."""
    blob = json.dumps(dict(version=VERSION, docs=docs, fit=fit, model=configs.TINY_QWEN3,
                           template=configs.CHAT_TEMPLATE), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fit_tokenizer(texts, vocab_size, regex=False):
    """A byte-level BPE fit to the organism's corpus: every string still round-trips (unknown text
    falls back to byte tokens). Without the GPT-2 word split, merges span whole code fragments."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = configs.CHAT_TEMPLATE
    return tok


def new_model(tok, seed):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    cfg = Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, **configs.TINY_QWEN3)
    cfg._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return Qwen3ForCausalLM(cfg)


def fit(docs, fit_cfg=FIT, log=print):
    """(model, tokenizer, info): tokenizer fit to the corpus, then `steps` AdamW steps of completion
    NLL on batches drawn from the corpus by weight (prompt tokens unscored)."""
    import antipasto as ap
    t0 = time.time()
    bt = configs.byte_tokenizer()                                       # same chat template
    prompts = [pools.render_prompt(m, bt) for m, _, _ in docs]
    tok = fit_tokenizer(prompts + [c for _, c, _ in docs], fit_cfg["vocab_size"], fit_cfg["bpe_regex"])
    comps = [c for _, c, _ in docs]
    model = new_model(tok, fit_cfg["seed"]).train()
    opt = torch.optim.AdamW(model.parameters(), lr=fit_cfg["lr"], weight_decay=0.0)
    steps, warm = fit_cfg["steps"], fit_cfg["warmup"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * s / max(steps, 1))).item())))
    g = torch.Generator().manual_seed(fit_cfg["seed"])
    w = torch.tensor([float(x) for _, _, x in docs])
    losses = []
    for s in range(steps):
        pick = torch.multinomial(w, fit_cfg["batch"], replacement=True, generator=g).tolist()
        batch = ap.make_batch(tok, [prompts[i] for i in pick], [comps[i] for i in pick])
        lp = ap.token_logps(model, batch)                                  # (B, T)
        loss = -(lp * batch["comp_mask"]).sum() / batch["comp_mask"].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (s % 50 == 0 or s == steps - 1):
            log(f"organism fit step {s:4d}/{steps}  nll/token {loss.item():.3f}  {time.time() - t0:.0f}s")
    n_comp = [len(tok(c, add_special_tokens=False)["input_ids"]) for c in comps]
    n_prompt = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    info = dict(fit=fit_cfg, docs=len(docs), vocab=len(tok), seconds=round(time.time() - t0, 1),
                final_nll=sum(losses[-20:]) / len(losses[-20:]) if losses else None,
                mean_completion_tokens=sum(n_comp) / len(n_comp), mean_prompt_tokens=sum(n_prompt) / len(n_prompt),
                threads=torch.get_num_threads())
    return model.eval(), tok, info


def load(problems_path=pools.FIXTURE_PROBLEMS, cache_dir=CACHE_DIR, fit_cfg=FIT, log=print):
    """(model, tokenizer): the cached organism for this corpus and fit, fitted now when absent."""
    from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM
    docs = corpus(problems_path)
    key = cache_key(docs, fit_cfg)
    final = os.path.join(cache_dir, f"organism-{key}")
    if not os.path.isdir(final):
        if log:
            log(f"fitting the model organism (once; cached as {final})")
        model, tok, info = fit(docs, fit_cfg, log)
        os.makedirs(cache_dir, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".organism-{key}.", dir=cache_dir)
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            pools.atomic_write(os.path.join(tmp, "fit.json"),
                               (json.dumps(dict(info, key=key), indent=1) + "\n").encode())
            os.rename(tmp, final)          # the commit point; a concurrent fit that won keeps its copy
        except OSError:
            if not os.path.isdir(final):
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    model = Qwen3ForCausalLM.from_pretrained(final)
    tok = PreTrainedTokenizerFast.from_pretrained(final)
    tok.chat_template = configs.CHAT_TEMPLATE
    model.config.name_or_path = f"organism-{key}"
    return model.eval(), tok


if __name__ == "__main__":
    import argparse
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("--cache-dir", default=CACHE_DIR)
    args = a.parse_args()
    m, t = load(cache_dir=args.cache_dir)
    with open(os.path.join(args.cache_dir, m.config.name_or_path, "fit.json")) as f:
        print(json.dumps(json.load(f)))
