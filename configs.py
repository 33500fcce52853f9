"""configs.py — presets as plain dicts, and the embedded default model (a tiny random Qwen3).

The demo preset needs no downloads: `tiny_qwen3()` builds a 2-layer Qwen3 from a config in code and
a byte-level tokenizer (256 byte tokens + chat specials, no merges) with a Qwen-style chat template.
"""

PRESETS = {
    # the demo: tiny random Qwen3 on CPU, demo pools, Phase 2 probe shape (G = 4 + 4); token limits above the
    # demo pools' longest prompt (1232) and completion (585 + eos), so nothing is cut
    "demo": dict(model="tiny", group_size=8, steps=20, lr=1e-3, k=1, dtype="float32",
                 max_prompt_tokens=1280, max_completion_tokens=640, seed=0),
    # spec2 Phase 2 on the real model: replay of the 20x8 teacher/base pools, 4 + 4 per step
    "phase2": dict(model="Qwen/Qwen3-4B", group_size=8, steps=20, lr=7e-5, k=1,
                   dtype="bfloat16", max_prompt_tokens=1536, max_completion_tokens=1024, seed=0,
                   not_implemented=dict(beta=1e-3)),
    # spec2 Phase 3 "full preset": G=6, pp=43 prompts per step, 992 problems, 200 steps (online mode)
    "full": dict(model="Qwen/Qwen3-4B", group_size=6, steps=200, lr=7e-5, k=1, dtype="bfloat16",
                 max_prompt_tokens=1536, max_completion_tokens=1024, seed=0,
                 not_implemented=dict(beta=1e-3, prompts_per_step=43, n_problems=992)),
}
# Spec values that nothing reads yet: beta (the KL term) and the online mode's prompts_per_step and
# n_problems. They live under `not_implemented`, are recorded there in run.json, never as applied;
# a preset whose shape depends on them (full) is refused by the replay probe.
ONLINE_ONLY = ("full",)

# the Linears both adapters wrap by default: Qwen3's attention and MLP projections
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TINY_QWEN3 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=2048, rms_norm_eps=1e-6,
                  tie_word_embeddings=False)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}")


def byte_tokenizer():
    """A byte-level tokenizer built in code: every string round-trips, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                additional_special_tokens=["<|im_start|>"])
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_qwen3(seed=0):
    """(model, tokenizer): a randomly initialised 2-layer Qwen3, deterministic in `seed`."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM
    tok = byte_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, **TINY_QWEN3)
    cfg._attn_implementation = "sdpa"
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
    model.config.name_or_path = f"tiny-qwen3-seed{seed}"
    return model.eval(), tok
