"""
The parallel scaling law, pure: the paper's loss grid, the law, its fit and k at each model size. No I/O
and no printing, so every function here is tested on fixed numbers (tests/test_experiments.py).

The law (arXiv 2505.10475, eq. 5): L = E + (A / (N (k ln P + 1)))^alpha, N the non-embedding parameters,
ParScale's prefixes and aggregator included. It is fitted as the official script does: Huber loss
(delta 1e-3) on log L, several starting points, A in units of 1e9. Positivity comes from fitting log E,
log A, log alpha, log k with torch.optim.LBFGS (no SciPy): k -> 0 means P buys nothing.
"""
import itertools
import math

import torch

# -----------------------------------------------------------------------------
# the paper's grid (arXiv 2505.10475, the Stack-V2-Python loss grid): 42B tokens, depth 36, final training loss

PAPER_STREAMS = [1, 2, 4, 8]
PAPER_N = [  # one row per P; N counts ParScale's prefixes and aggregator
    [535813376, 693753856, 1088376320, 1571472384, 2774773760, 4353203200],
    [538195842, 696738818, 1092762882, 1577522690, 2784937986, 4368529922],
    [540577412, 699722756, 1097148164, 1583571460, 2795100164, 4383854084],
    [545340552, 705690632, 1105918728, 1595669000, 2815424520, 4414502408],
]
PAPER_LOSS = [
    [1.1722, 1.1496, 1.1131, 1.0817, 1.0451, 1.0213],
    [1.1507, 1.1262, 1.0940, 1.0623, 1.0244, 1.0025],
    [1.1354, 1.1124, 1.0808, 1.0490, 1.0126, 0.9906],
    [1.1231, 1.0997, 1.0688, 1.0383, 1.0016, 0.9794],
]
PAPER_FIT = dict(E=0.6912, A=1.131e7, alpha=0.1894, k=0.3935, r2=0.9978)


def paper_points():
    """The paper's grid as parallel lists (N, P, L)."""
    rows = [(n, P, l) for P, ns, ls in zip(PAPER_STREAMS, PAPER_N, PAPER_LOSS) for n, l in zip(ns, ls)]
    return [list(c) for c in zip(*rows)]


# -----------------------------------------------------------------------------
# the law and its fit

def law(N, P, E, A, alpha, k):
    """Predicted loss; N, P numbers or float64 tensors, natural log."""
    N, P = torch.as_tensor(N, dtype=torch.float64), torch.as_tensor(P, dtype=torch.float64)
    return E + (A / (N * (k * torch.log(P) + 1))) ** alpha


def fit_law(N, P, L, n_starts=27, delta=1e-3):
    """
    Fit L = E + (A / (N (k ln P + 1)))^alpha to points (N, P, L) as the paper does: minimise the
    Huber loss (delta) of log L_pred - log L, from a grid of starting points, keep the best.
    Parameters are optimised as logs (positive by construction); N is taken in billions so that
    log A sits near 0 for every scale (the official script's "A scaled by 1e9").
    n_starts: 27 = 3 E x 3 alpha x 3 k; fewer takes the first ones (1 is enough for clean data).
    Returns E, A (in raw parameter units), alpha, k, r2 (on L) and the Huber objective.
    """
    n = torch.tensor(N, dtype=torch.float64) / 1e9
    p = torch.tensor(P, dtype=torch.float64)
    y = torch.tensor(L, dtype=torch.float64)
    n_med, l_min, l_mean = n.median(), y.min(), y.mean()
    # bounds, as the official bounded L-BFGS-B has: outside them the gradient is zero and the search stops
    # (degenerate toy data otherwise drives k or alpha towards 0 for thousands of iterations)
    lo = torch.tensor([1e-3, 1e-12, 1e-3, 1e-4], dtype=torch.float64).log()
    hi = torch.tensor([1e2, 1e12, 3.0, 1e3], dtype=torch.float64).log()

    def objective(theta):
        E, A, alpha, k = torch.minimum(torch.maximum(theta, lo), hi).exp()
        r = (E + (A / (n * (k * p.log() + 1))) ** alpha).log() - y.log()
        a = r.abs()
        return torch.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum()

    best = None
    starts = itertools.product([0.5, 0.8, 0.2], [0.3, 0.15, 0.6], [0.4, 0.1, 1.0])  # (E / min L, alpha, k)
    for e_frac, alpha0, k0 in itertools.islice(starts, n_starts):
        E0 = e_frac * l_min
        A0 = n_med * (l_mean - E0) ** (1 / alpha0)  # the start passes through the mean loss at the median N
        theta = torch.tensor([E0, A0, alpha0, k0], dtype=torch.float64).log().requires_grad_()
        opt = torch.optim.LBFGS([theta], lr=1, max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                                history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            o = objective(theta)
            o.backward()
            return o
        opt.step(closure)
        with torch.no_grad():
            o = objective(theta).item()
        if math.isfinite(o) and (best is None or o < best[0]):
            best = (o, theta.detach().clone())
    if best is None:
        raise RuntimeError("the law fit diverged from every starting point")
    obj, theta = best
    E, A, alpha, k = torch.minimum(torch.maximum(theta, lo), hi).exp().tolist()
    pred = law(n, p, E, A, alpha, k)
    r2 = 1 - ((pred - y) ** 2).sum().item() / ((y - l_mean) ** 2).sum().item()
    return dict(E=E, A=A * 1e9, alpha=alpha, k=k, r2=r2, huber=obj)


def fit_line(fit):
    """A fit as one printed line, with what P = 2, 4, 8 are worth in parameters (k ln P + 1)."""
    mult = " / ".join(f"{1 + fit['k'] * math.log(P):.2f}" for P in (2, 4, 8))
    return (f"k {fit['k']:.4f}  E {fit['E']:.4f}  A {fit['A']:.4g}  alpha {fit['alpha']:.4f}  R^2 {fit['r2']:.4f}"
            f"  (P = 2/4/8 worth {mult} x parameters)")


# -----------------------------------------------------------------------------
# k at each model size: the paper's grid implies k grows with N

def anchored_law(N1, L1, E, alpha):
    """
    The law through one size's measured P = 1 point: A_N = N1 (L1 - E)^(1/alpha), so that
    E + (A_N / N1)^alpha = L1 exactly, and L_P = E + (A_N / (N_P (k ln P + 1)))^alpha.
    Returns (A_N, f) with f(N_P, P, k) the predicted loss.
    """
    A = N1 * (L1 - E) ** (1 / alpha)
    return A, lambda N, P, k: law(N, P, E, A, alpha, k)


def implied_k(N1, L1, N, P, L, E, alpha):
    """The k at which the anchored law passes exactly through (N, P, L): solve
    k ln P + 1 = (N1 / N) ((L1 - E) / (L - E))^(1/alpha) for k (P > 1, L > E)."""
    return ((N1 / N) * ((L1 - E) / (L - E)) ** (1 / alpha) - 1) / math.log(P)


def fit_k_anchored(N1, L1, N, P, L, E, alpha):
    """One k for one size: least squares on the loss over that size's P > 1 points (N, P, L: lists),
    the law anchored on (N1, L1) and E, alpha held fixed. Starts from the mean of the implied k's."""
    _, f = anchored_law(N1, L1, E, alpha)
    n, p, y = (torch.tensor(v, dtype=torch.float64) for v in (N, P, L))
    start = sum(implied_k(N1, L1, *pt, E, alpha) for pt in zip(N, P, L)) / len(L)
    k = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([k], lr=1, max_iter=100, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        o = ((f(n, p, k) - y) ** 2).sum()
        o.backward()
        return o
    opt.step(closure)
    return k.item()


def k_per_size(N_rows, L_rows, streams, E, alpha):
    """
    k fitted at each model size of a grid (rows: one per P in streams, streams[0] = 1; columns: sizes),
    anchored on that size's P = 1 loss, E and alpha from a global fit. Per size: k (least squares on
    the loss over P > 1), k_each (the k each P implies alone) and k_mean (their mean).
    """
    if streams[0] != 1:
        raise ValueError("k_per_size needs the P = 1 row first")
    out = []
    for j in range(len(N_rows[0])):
        N1, L1 = N_rows[0][j], L_rows[0][j]
        pts = [(N_rows[i][j], P, L_rows[i][j]) for i, P in enumerate(streams) if P > 1]
        each = {P: implied_k(N1, L1, n, P, l, E, alpha) for n, P, l in pts}
        out.append(dict(N=N1, L1=L1, A=anchored_law(N1, L1, E, alpha)[0],
                        k=fit_k_anchored(N1, L1, *zip(*pts), E, alpha),
                        k_each=each, k_mean=sum(each.values()) / len(each)))
    return out


def line_fit(x, y):
    """Least-squares slope and intercept of y against x."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)
    return slope, my - slope * mx


def extrapolate_k(N, k, at):
    """k at the sizes `at` under two forms fitted to (N, k): k linear in ln N, and a power law c N^b
    (a line in ln k against ln N). Beyond the fitted range both are guesses, and they disagree."""
    b_lin, a_lin = line_fit([math.log(n) for n in N], k)
    b_pow, a_pow = line_fit([math.log(n) for n in N], [math.log(v) for v in k])
    return dict(linear=dict(form="k = a + b ln N", a=a_lin, b=b_lin,
                            at={n: a_lin + b_lin * math.log(n) for n in at}),
                power=dict(form="k = c N^b", c=math.exp(a_pow), b=b_pow,
                           at={n: math.exp(a_pow) * n ** b_pow for n in at}))
