"""
Stream diagnostics: why P streams do or do not beat one (arXiv 2505.10475, Proposition 1). train.py's
evaluation logs them for every P > 1 model on the validation split: each stream's loss alone, the
mixture's, the gain of mixing, how correlated the streams' errors are (rho) and how far apart their
predictions lie (kl). Pure functions of a model and a batch; they change nothing.
"""

import torch
import torch.nn.functional as F


def diversity(nll, mix_nll):
    """
    nll: (P, N) per-token losses of each stream alone; mix_nll: (N,) of the aggregated model.
    Proposition 1's two premises, measured: each stream alone as good as P = 1 (stream_loss), and
    errors less than perfectly correlated (rho: the Pearson correlation over tokens of two streams'
    per-token losses, averaged over all pairs). gain = mean stream loss - mixture loss.
    """
    P = nll.size(0)
    stream = nll.mean(dim=1)
    rho = torch.corrcoef(nll.double())[torch.triu_indices(P, P, offset=1).unbind()].mean().item()
    return dict(stream_loss=[round(x, 4) for x in stream.tolist()], mix_loss=mix_nll.mean().item(),
                gain=stream.mean().item() - mix_nll.mean().item(), rho=rho)


@torch.no_grad()
def stream_losses(model, X, Y):
    """
    Per-token losses of each stream alone, (P, N): its hidden state through ln_f and the LM head, no
    aggregator; of the mixture, (N,); and the mean over ordered pairs i != j of KL(p_i || p_j), per token.
    The LM head runs on chunks of tokens, so P * chunk * vocab stays near 2^26 floats; that bound is why
    this does not call model(X, Y, streams=True), which makes all (P, B, T, vocab) logits at once.
    """
    P, V = model.config.n_streams, model.config.vocab_size
    seen = {}  # the aggregator's input and output: every stream's hidden states after ln_f, and their mix
    hook = model.aggregator.register_forward_hook(lambda module, inp, out: seen.update(h=inp[0], mixed=out))
    try:
        model(X)  # its LM head runs on the last position only; the losses are taken below, in chunks
    finally:
        hook.remove()
    h, mixed, y = seen["h"].view(P, -1, seen["h"].size(-1)), seen["mixed"].flatten(0, 1), Y.reshape(-1)
    # h (P, N, C), rows stream-major; mixed (N, C), N = B*T
    nlls, mixes, kl, chunk = [], [], 0.0, max(1, 2**26 // (P * V))
    for i in range(0, y.numel(), chunk):
        logp = F.log_softmax(model.lm_head(h[:, i:i + chunk]).float(), dim=-1)  # (P, n, V)
        nlls.append(-logp.gather(-1, y[i:i + chunk].view(1, -1, 1).expand(P, -1, 1)).squeeze(-1))
        mix_logits = model.lm_head(mixed[i:i + chunk]).float()
        mixes.append(F.cross_entropy(mix_logits, y[i:i + chunk], reduction="none"))
        # summed over ordered pairs, sum_x p_a (log p_a - log p_b)
        #   = P sum_a p_a log p_a - (sum_a p_a)(sum_b log p_b)
        p = logp.exp()
        kl += (P * (p * logp).sum() - (p.sum(0) * logp.sum(0)).sum()).item()
    return torch.cat(nlls, dim=1), torch.cat(mixes), kl / (P * (P - 1) * y.numel())
