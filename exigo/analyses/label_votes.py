r"""Two votes from the held-out set on a training label: a linear head and the nearest neighbours.

The examples analysis (`exigo.analyses.examples`) suspects a training label when the
end-of-epoch model's margin is negative. The margin alone mixes two kinds of examples: a
mislabelled one (the image is a clear 7, labelled 1) and a clean one the model finds hard (a
1 that looks like a 7). The held-out set, out of sample for the model and labelled by the same
people, tells them apart from another angle. In the model's embedding space (the input of its
classifier layer, as the projection reads it):

- **head**: a multinomial logistic regression fit on the held-out embeddings and labels gives
  $\log q(y_i \mid z_i)$, the log-probability of the given label under a classifier that never
  saw a training label (`head_log_probabilities`);
- **neighbours**: the share of the $k$ held-out examples nearest to $z_i$ (Euclidean) that
  carry the given label, $a_i = \frac1k \sum_{j \in \mathcal N_k(z_i)} [y_j = y_i]$
  (`neighbour_agreement`; deep k-NN, Bahri, Jiang & Gupta 2020, "Deep k-NN for Noisy Labels",
  ICML, arXiv:2004.12289).

`vote_order` orders the suspects by the mean of their three ranks (margin, head, neighbours).
On planted noise (`bench/label_noise.py`, MNIST, six flip seeds) this raised the precision of
the top of the ranking over the margin alone at every noise level and seed; the margin with
only one of the two votes does worse at some noise level (README, "Label noise").

Both votes trust the held-out labels: a held-out set with many label errors of its own weakens
them. They cost one fit on the held-out embeddings per epoch and a distance matrix between the
suspects and the held-out set, computed in blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from exigo.analyses._ranks import average_ranks

__all__ = [
    "NEIGHBOURS",
    "head_log_probabilities",
    "neighbour_agreement",
    "vote_order",
]

#: $k$ of `neighbour_agreement` (50 gave the same precision on planted noise within 0.1 points).
NEIGHBOURS = 20


def head_log_probabilities(
    embeddings: Tensor,
    labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    num_classes: int,
    *,
    inverse_regularisation: float = 1.0,
    max_iterations: int = 1000,
    tolerance: float = 1e-4,
    log: Callable[[str], None] | None = None,
) -> Tensor:
    r"""$\log q(y_i \mid z_i)$ under a logistic regression fit on the held-out embeddings.

    The reference embeddings $r_j$ ($M$ of them) are standardised per dimension ($\mu$ and
    $\sigma$ of the reference; $\sigma = 1$ where it is 0, as scikit-learn's `StandardScaler`),
    and $W \in \mathbb R^{K \times D}$,
    $b \in \mathbb R^K$ minimise scikit-learn's `LogisticRegression(C=inverse_regularisation)`
    objective (multinomial, intercept not penalised),

    $$ \tfrac12 \lVert W \rVert^2 + C \sum_j -\log \mathrm{softmax}(W r_j + b)_{y_j} , $$

    divided by $C M$ and minimised in float32 by `torch.optim.LBFGS` (strong Wolfe line search,
    10 corrections as SciPy's L-BFGS-B) from zero until every gradient entry is below
    `tolerance`, scikit-learn's default tolerance (`tol=1e-4`). Like scikit-learn's, that fit
    stops short of the minimum of this strictly convex objective (on the blobs of the tests,
    log-probabilities within 0.05 of it; on MNIST embeddings 0.2-0.4, which moved at most one
    planted error per run in or out of the top k of the nine benchmark runs against a fit to
    $10^{-6}$ in float64). With exactly two classes present scikit-learn fits the binomial
    form instead: the same model as this one with C doubled. On 2,000 MNIST embeddings of 128
    values: about 25 evaluations, 0.05 s of one core (to $10^{-5}$: 0.1 s; in float64 to
    $10^{-6}$: 0.2 s).
    Then $q(\cdot \mid z_i) = \mathrm{softmax}(W (z_i - \mu) / \sigma + b)$. Classes with no
    reference example get no weight and lose to every other class.

    Args:
        embeddings: float [C, D], the examples judged.
        labels: int64 [C], their given labels.
        reference: float [M, D], the held-out embeddings.
        reference_labels: int64 [M], the held-out labels, in [0, num_classes).
        num_classes: K.
        inverse_regularisation: C, scikit-learn's convention.
        max_iterations: L-BFGS iterations at most.
        tolerance: the fit stops once no gradient entry is larger.
        log: told, in one line, when the fit stops short of `tolerance` (at `max_iterations`,
            or when the line search makes no progress; the votes then come from that fit);
            None: nothing is said.

    Returns:
        float32 [C], each example's log-probability of its given label; $-\infty$ for a label
        with no reference example.
    """
    data = reference.detach().to("cpu", torch.float32)
    mean, spread = data.mean(0), data.std(0, unbiased=False)
    scale = torch.where(spread > 0, spread, torch.ones_like(spread))
    data = (data - mean) / scale
    targets = reference_labels.detach().cpu().long()
    count, dims = data.shape
    absent = torch.bincount(targets, minlength=num_classes) == 0
    weight = torch.zeros(num_classes, dims, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    penalty = 1.0 / (inverse_regularisation * count)  # the objective divided by C M
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        max_iter=max_iterations,
        tolerance_grad=tolerance,
        tolerance_change=0.0,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def log_q_of(points: Tensor) -> Tensor:
        return (points @ weight.T + bias).masked_fill(absent, -torch.inf).log_softmax(1)

    def objective() -> Tensor:
        optimiser.zero_grad()
        log_q = log_q_of(data)
        loss = -log_q.gather(1, targets[:, None]).mean() + 0.5 * penalty * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimiser.step(objective)
        objective()  # the gradient where the fit stopped
    largest = max(float(weight.grad.abs().max()), float(bias.grad.abs().max()))
    if largest > tolerance and log is not None:
        iterations = optimiser.state[weight]["n_iter"]
        log(
            f"the held-out head stopped after {iterations} L-BFGS iterations with a gradient "
            f"of {largest:.2g} (tolerance {tolerance:g}); its votes come from that fit"
        )
    with torch.no_grad():
        log_q = log_q_of((embeddings.detach().to("cpu", torch.float32) - mean) / scale)
        return log_q.gather(1, labels.detach().cpu().long()[:, None])[:, 0].float()


def neighbour_agreement(
    embeddings: Tensor,
    labels: Tensor,
    reference: Tensor,
    reference_labels: Tensor,
    k: int = NEIGHBOURS,
    *,
    block: int = 1024,
) -> Tensor:
    r"""$a_i$: the share of the $k$ nearest reference examples that carry the given label.

    Nearest by Euclidean distance; $k$ is lowered to $M$ when the reference is smaller. Ties in
    distance are broken by `torch.topk`.

    Args:
        embeddings: float [C, D], the examples judged.
        labels: int64 [C], their given labels.
        reference: float [M, D], the held-out embeddings, M >= 1.
        reference_labels: int64 [M].
        k: neighbours.
        block: examples per distance block ([block, M] floats at a time).

    Returns:
        float32 [C] in [0, 1], multiples of 1/k.
    """
    points = embeddings.detach().float().cpu()
    base = reference.detach().float().cpu()
    base_labels = reference_labels.detach().cpu().long()
    k = min(k, base.shape[0])
    given = labels.detach().cpu().long()
    parts = []
    for start in range(0, points.shape[0], block):
        distances = torch.cdist(points[start : start + block], base)
        nearest = distances.topk(k, dim=1, largest=False).indices
        agree = base_labels[nearest] == given[start : start + block, None]
        parts.append(agree.float().mean(1))
    return torch.cat(parts) if parts else torch.zeros(0)


def _vote_ranks(values: Tensor) -> np.ndarray:
    """Average ranks 1..C of one vote (`exigo.analyses._ranks.average_ranks`); NaN: (C + 1) / 2.

    A NaN is no opinion (a class the held-out set lacks). The values present are ranked among
    themselves and their ranks stretched linearly onto 1..C, so that the middle means the
    same with and without abstentions.
    """
    row = values.detach().cpu().double().numpy()[None, :]
    present = ~np.isnan(row)
    count, voters = row.shape[1], int(present.sum())
    ranks = average_ranks(row, present)[0]
    if voters == count:
        return ranks
    stretched = 1 + (ranks - 1) * (count - 1) / max(voters - 1, 1)
    return np.where(present[0], stretched, (count + 1) / 2)


def vote_order(margins: Tensor, head: Tensor, agreement: Tensor) -> Tensor:
    r"""The suspects' order: by the mean of their three ranks, most suspicious first.

    Each vote ranks the $C$ suspects from the lowest value (rank 1, most suspicious) up, tied
    values sharing their mean rank (agreement takes only $k + 1$ values); a NaN vote (no
    opinion: a class the held-out set lacks) gets the middle rank $(C + 1) / 2$. The suspects
    are ordered by the mean of the three ranks, ties by the margin, then by position.

    Args:
        margins: float [C], the end-of-epoch margins.
        head: float [C], `head_log_probabilities`, NaN for no opinion.
        agreement: float [C], `neighbour_agreement`, NaN for no opinion.

    Returns:
        int64 [C], a permutation of `range(C)`.
    """
    total = sum(_vote_ranks(vote) for vote in (margins, head, agreement))
    keys = (np.arange(margins.numel()), margins.detach().cpu().double().numpy(), total)
    return torch.from_numpy(np.lexsort(keys).astype(np.int64))
