"""
What model.py leaves to its users to count: a model.GPT's parameters by role (N of the scaling law), its
training FLOPs per token, and MFU.
"""

def param_report(model):
    """Parameter counts of a model.GPT by role. non_embedding is the N of the scaling law (arXiv
    2505.10475, section 3), ParScale's prefixes and aggregator included; the tied lm_head / wte
    count once, as embedding."""
    r = dict(embedding=0, backbone=0, prefixes=0, aggregator=0)
    for name, p in model.named_parameters():
        role = ("embedding" if name.startswith(("transformer.wte", "transformer.wpe")) else
                "prefixes" if ".prefix_" in name else
                "aggregator" if name.startswith("aggregator.") else "backbone")
        r[role] += p.numel()
    r["non_embedding"] = r["backbone"] + r["prefixes"] + r["aggregator"]
    r["total"] = r["non_embedding"] + r["embedding"]
    return r


def flops_per_token(model, seq_len):
    """Training FLOPs per token (forward + backward) of a model.GPT: the backbone runs P times, the LM
    head once (PaLM, arXiv 2204.02311, appendix B: 6N + attention, counted per stream)."""
    cfg, r = model.config, param_report(model)
    P, L, H, Q = cfg.n_streams, cfg.n_layer, cfg.n_head, cfg.head_dim
    body = 6 * (r["backbone"] + r["prefixes"]) * P
    attn = 12 * L * H * Q * (seq_len + cfg.n_prefix_slots) * P  # each query against prefix + context
    head = 6 * (cfg.vocab_size * cfg.n_embd + r["aggregator"])
    return body + attn + head


def estimate_mfu(model, tokens_per_second, seq_len, peak):
    """Model FLOPs utilisation: achieved training FLOP/s over `peak` FLOP/s (None if peak unknown)."""
    return flops_per_token(model, seq_len) * tokens_per_second / peak if peak else None
