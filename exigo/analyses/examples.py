r"""The data, explained: every example's training dynamics, and the suspected label errors.

A mislabelled or ambiguous example shapes a model as much as its architecture. While training,
exigo sees each example's loss at every epoch for free: the training forward pass records, for
example $i$ with given label $y_i$ at epoch $e$ (`exigo.engine.training.TrainingDynamics`),

$$ p_i^{(e)} = \mathrm{softmax}\big(f_e(x_i)\big)_{y_i}, \qquad
   m_i^{(e)} = f_e(x_i)_{y_i} - \max_{k \ne y_i} f_e(x_i)_k , $$

the probability and the margin of the given label, from the logits of the step that trains on
$x_i$ (train mode: dropout, BatchNorm batch statistics and any augmentation are on), and the
evaluation pass gives the same two numbers for every held-out example after each epoch. This
analysis keeps them for every epoch (float16 arrays [epochs, examples], part of its
`state_dict`, so `--resume` continues them) and summarises each example across epochs
$e = 1 \dots E$:

- **confidence** $\hat\mu_i = \frac1E \sum_e p_i^{(e)}$ and **variability**
  $\hat\sigma_i = \sqrt{\frac1E \sum_e (p_i^{(e)} - \hat\mu_i)^2}$, and **correctness**, the
  fraction of epochs with $m_i^{(e)} > 0$: the axes of a data map (Swayamdipta et al. 2020,
  "Dataset Cartography", EMNLP, arXiv:2009.10795). Easy examples sit at high confidence and low
  variability, ambiguous ones at high variability, hard-to-learn ones (often mislabelled) at
  low confidence and low variability;
- **area under the margin** $\mathrm{AUM}_i = \frac1E \sum_e m_i^{(e)}$ (Pleiss et al. 2020,
  "Identifying Mislabeled Data using the Area Under the Margin Ranking", NeurIPS,
  arXiv:2001.10528): a mislabelled example's given label keeps losing to its true class;
- **forgetting events** $\sum_{e \ge 2} [m_i^{(e-1)} > 0 \ge m_i^{(e)}]$: correct, then wrong
  (Toneva et al. 2019, "An Empirical Study of Example Forgetting during Deep Neural Network
  Learning", ICLR, arXiv:1812.05159);
- **learned epoch** $\min \lbrace e : m_i^{(e')} > 0 \ \forall e' \ge e \rbrace$: the epoch
  from which the example stays correctly classified (none while the last epoch gets it wrong).

**Suspected label errors.** Each split is first ranked by the margin averaged over the latest
half of the epochs,

$$ s_i = \frac1L \sum_{e = E - L + 1}^{E} m_i^{(e)}, \qquad L = \lceil E / 2 \rceil , $$

lowest first. For training examples this is AUM over the latest half of training: the first
epoch's records come from a model that cannot yet tell any example apart (on MNIST with 5%
planted label errors, 25% of the lowest margins recorded in the first tenth of epoch 1 were
planted errors, over 90% in its last four tenths), and dropping them raised the precision of the
ranking on planted noise. Held-out examples are ranked from the evaluation passes, which are out
of sample (the model never trained on them), as in confident learning (Northcutt et al. 2021,
"Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR, arXiv:1911.00068).

The training records still mix models: an example seen early in the epoch was scored by a model
that had not yet taken the epoch's later steps. So after the final epoch (`final_epoch`; after
every epoch with `rescore_every_epoch` or without a `final_epoch`) every training example with
$s_i < 0$ is **re-scored by the end-of-epoch model** in eval mode (one forward pass over them,
`end_of_epoch_scores`; at most the lowest fraction $\rho$ of the set, `rescore_fraction`, 20% by
default), and its score becomes that model's margin,

$$ s_i \leftarrow m_i^{\text{end}} = f_E(x_i)_{y_i} - \max_{k \ne y_i} f_E(x_i)_k
   \quad \text{where } s_i < 0 , $$

so the top of the ranking compares examples under one model, as the held-out ranking does, and
a re-scored example stays suspected only if the end-of-epoch model agrees. The others keep
$s_i$; when more than $\lceil \rho N \rceil$ are suspected, those beyond the cap stay suspected
on their training records alone (`rescored` = 0 in `examples.csv`; the run says so once). The
images are read as the training pass reads them (`train_data[i]`, with any transform the
dataset applies). On planted noise (`bench/label_noise.py`, MNIST, 2% / 5% / 10% flipped,
three flip seeds) the re-score raised the mean precision@k from 0.9572 (`--rescore-fraction 0`)
to 0.9667, with 3-12% of the training set re-scored; ranking by the final model's loss instead
reaches 0.9628 (README, "Label noise"). An example is **suspected** when its score is below
0: its given label loses to another class.

**The held-out set votes on the order.** The re-scored suspects come first in the ranking,
ordered by the mean of three ranks (`exigo.analyses.label_votes.vote_order`): their
end-of-epoch margin, the log-probability of the given label under a logistic regression fit
on the held-out embeddings and labels, and the share of their 20 nearest held-out examples
with the given label (`exigo.analyses.label_votes`; the embeddings come from the re-score
pass and the evaluation pass). Every other example follows by its score. The earlier epochs'
lists, not re-scored, are in the order of $s_i$ alone; the final list is the same either way,
as each epoch's records replace the previous epoch's predictions. On the same planted
noise this raised the mean precision@k from 0.9604 / 0.9675 / 0.9721 (2% / 5% / 10%) to
0.9688 / 0.9742 / 0.9792, ahead of the final model's loss (0.9521 / 0.9633 / 0.9729) in every
run. The votes trust the held-out labels; with a held-out set of one class there is nothing to
fit, and the run says so once and orders the suspects by the margin alone.

Outputs (rewritten atomically after every epoch): `examples.csv`, one row per example
(`split`, `index` = position in the dataset given to `run()`, so `train_data[index]` is the
image, `given`, `predicted` by the latest pass (the end-of-epoch re-score for a re-scored
training example, else the last training pass; the last evaluation for a held-out one), the
summaries, `score` = $s_i$, `rescored` (1 where $s_i$ is the end-of-epoch model's margin),
`head_log_probability` and `neighbour_agreement` (the held-out votes, on the re-scored
examples that stay suspected), `rank` within the split, 1 = most suspicious, and
`suspected`), and `label_issues.csv`, the suspected examples only
(`split,index,given,predicted,score,rank`); the figures `data_map` and `label_issues` (the top
suspects of each split with saliency towards the given label and towards
the model's choice, drawn like the errors figure); and, after the last epoch, one console line.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from exigo._io import atomic_write_bytes
from exigo._modes import evaluation_mode
from exigo.analyses.errors import ErrorSaliency, SaliencyPairs, error_saliency
from exigo.analyses.label_votes import head_log_probabilities, neighbour_agreement, vote_order
from exigo.analysis import Analysis, CostShape, EpochContext, FigureInfo
from exigo.data import display_pixels, gather, iterate_batches
from exigo.engine.training import given_label_scores
from exigo.figures.colour_scale import ROBUST_QUANTILE
from exigo.figures.tiles import TileBlock, tile_figure
from exigo.models import embedding_module

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "EXAMPLES_FILE",
    "EXAMPLE_COLUMNS",
    "ISSUES_FILE",
    "ISSUE_COLUMNS",
    "SPLITS",
    "EndOfEpochScores",
    "ExampleAnalysis",
    "ExampleSummaries",
    "SplitHistory",
    "Suspects",
    "Votes",
    "area_under_margin",
    "confidence_and_variability",
    "end_of_epoch_scores",
    "examples_csv",
    "forgetting_events",
    "issue_score",
    "label_issues_csv",
    "learned_epoch",
    "plot_data_map",
    "plot_suspects",
    "rescore",
    "rescore_count",
    "summarise",
]

#: The splits, in the order the files list them: the training set, then the held-out set.
SPLITS = ("train", "held_out")
#: Files written into the save directory (named in `exigo.engine.run_dir.RUN_OUTPUTS`).
EXAMPLES_FILE = "examples.csv"
ISSUES_FILE = "label_issues.csv"
#: Columns of `examples.csv`.
EXAMPLE_COLUMNS = (
    "split",
    "index",
    "given",
    "predicted",
    "confidence",
    "variability",
    "correctness",
    "aum",
    "forgetting_events",
    "learned_epoch",
    "score",
    "rescored",
    "head_log_probability",
    "neighbour_agreement",
    "rank",
    "suspected",
)
#: Columns of `label_issues.csv`.
ISSUE_COLUMNS = ("split", "index", "given", "predicted", "score", "rank")


# ---------------------------------------------------------------- summaries (pure functions)


def confidence_and_variability(probabilities: Tensor) -> tuple[Tensor, Tensor]:
    r"""Dataset Cartography's two axes: mean and spread of the given label's probability.

    $\hat\mu_i = \frac1E \sum_e p_i^{(e)}$, $\hat\sigma_i = \sqrt{\frac1E \sum_e
    (p_i^{(e)} - \hat\mu_i)^2}$ (the population standard deviation, as in Swayamdipta et al.
    2020). Epochs where an example was not recorded (NaN) are left out of its mean.

    Args:
        probabilities: float tensor [E, N], $p_i^{(e)}$.

    Returns:
        `(confidence, variability)`, float32 [N] each.
    """
    values = probabilities.float()
    confidence = values.nanmean(0)
    variability = (values - confidence).square().nanmean(0).sqrt()
    return confidence, variability


def area_under_margin(margins: Tensor) -> Tensor:
    r"""Area under the margin: $\mathrm{AUM}_i = \frac1E \sum_e m_i^{(e)}$ (Pleiss et al. 2020).

    Args:
        margins: float tensor [E, N], $m_i^{(e)}$ (NaN where not recorded: left out).

    Returns:
        Float32 [N].
    """
    return margins.float().nanmean(0)


def forgetting_events(correct: Tensor) -> Tensor:
    r"""Forgetting events (Toneva et al. 2019): correct, then wrong.

    $$ \sum_{e \ge 2} [c_i^{(e-1)} \wedge \neg c_i^{(e)}] $$

    Args:
        correct: bool tensor [E, N], whether example $i$ was classified correctly at epoch $e$.

    Returns:
        Int64 [N]: how often each example went from correct to wrong.
    """
    return (correct[:-1] & ~correct[1:]).sum(0)


def learned_epoch(correct: Tensor) -> Tensor:
    r"""The epoch from which each example stays correct.

    $$ \min \lbrace e : c_i^{(e')} \text{ for every } e' \ge e \rbrace $$

    Args:
        correct: bool tensor [E, N], whether example $i$ was classified correctly at epoch $e$
            (row 0 is epoch 1).

    Returns:
        Int64 [N]: a 1-based epoch, or 0 when the last epoch got the example wrong.
    """
    epochs = correct.shape[0]
    # how many of the latest epochs in a row were correct
    streak = correct.flip(0).long().cumprod(0).sum(0)
    return torch.where(streak > 0, epochs - streak + 1, torch.zeros_like(streak))


def issue_score(margins: Tensor) -> Tensor:
    r"""The suspicion score $s_i$: the margin averaged over the latest $\lceil E/2 \rceil$ epochs.

    Lower is more suspicious; $s_i < 0$ marks a suspected label error (see the module
    docstring for why the earliest epochs are left out).

    Args:
        margins: float tensor [E, N], $m_i^{(e)}$.

    Returns:
        Float32 [N].
    """
    latest = math.ceil(margins.shape[0] / 2)
    return area_under_margin(margins[-latest:])


@dataclass(frozen=True)
class ExampleSummaries:
    """One split's per-example summaries (see the module docstring for each formula).

    Attributes:
        confidence: float32 [N], mean probability of the given label.
        variability: float32 [N], its standard deviation across epochs.
        correctness: float32 [N], fraction of epochs classified correctly.
        aum: float32 [N], area under the margin.
        forgetting_events: int64 [N].
        learned_epoch: int64 [N], 0 when not (yet) learned.
        score: float32 [N], the suspicion score $s_i$ (lower: more suspicious).
        rank: int64 [N], 1-based, 1 is the most suspicious: by `score` (ties by index), except
            that `rescore` with votes puts the re-scored suspects first, in `vote_order`.
        suspected: bool [N], `score < 0`.
        rescored: bool [N], where `score` is the end-of-epoch model's margin (`rescore`).
        head_log_probability: float32 [N], the held-out head's vote
            (`exigo.analyses.label_votes.head_log_probabilities`); NaN where not voted (only
            the re-scored examples that stay suspected get votes).
        neighbour_agreement: float32 [N], the held-out neighbours' vote
            (`exigo.analyses.label_votes.neighbour_agreement`); NaN where not voted.
    """

    confidence: Tensor
    variability: Tensor
    correctness: Tensor
    aum: Tensor
    forgetting_events: Tensor
    learned_epoch: Tensor
    score: Tensor
    rank: Tensor
    suspected: Tensor
    rescored: Tensor
    head_log_probability: Tensor
    neighbour_agreement: Tensor


def _ranks(score: Tensor) -> Tensor:
    """1-based ranks by `score`, lowest first; NaN (never recorded) last, ties in index order."""
    order = torch.sort(torch.nan_to_num(score, nan=math.inf), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, order.numel() + 1)
    return rank


def summarise(probabilities: Tensor, margins: Tensor) -> ExampleSummaries:
    """Every summary of one split, from its per-epoch records.

    Args:
        probabilities: float tensor [E, N], the given label's probability per epoch.
        margins: float tensor [E, N], the given label's margin per epoch.

    Returns:
        The `ExampleSummaries`.
    """
    confidence, variability = confidence_and_variability(probabilities)
    correct = margins > 0  # NaN (not recorded) counts as not correct
    score = issue_score(margins)
    return ExampleSummaries(
        confidence=confidence,
        variability=variability,
        correctness=correct.float().mean(0),
        aum=area_under_margin(margins),
        forgetting_events=forgetting_events(correct),
        learned_epoch=learned_epoch(correct),
        score=score,
        rank=_ranks(score),
        suspected=score < 0,
        rescored=torch.zeros_like(score, dtype=torch.bool),
        head_log_probability=torch.full_like(score, math.nan),
        neighbour_agreement=torch.full_like(score, math.nan),
    )


def rescore_count(summary: ExampleSummaries, fraction: float) -> int:
    r"""How many of the lowest-ranked examples the end-of-epoch model re-scores.

    Those with a score below 0, at most $\lceil \rho N \rceil$ of the $N$ examples with a
    score (recorded at least once).

    Args:
        summary: the split's summaries before the re-score.
        fraction: $\rho \in [0, 1]$.

    Returns:
        The count; the examples are those with `rank <= count`.
    """
    recorded = int((~summary.score.isnan()).sum())
    return min(int(summary.suspected.sum()), math.ceil(fraction * recorded - 1e-9))


def rescore(
    summary: ExampleSummaries, indices: Tensor, margins: Tensor, votes: Votes | None = None
) -> ExampleSummaries:
    r"""The summaries with the scores at `indices` replaced by end-of-epoch margins.

    $s_i \leftarrow m_i^{\text{end}}$ for $i$ in `indices`; `suspected` ($s_i < 0$) follows
    the new scores, `rescored` marks `indices`, every other summary stays. Without `votes`,
    `rank` follows the scores. With them, the re-scored suspects ($m_i^{\text{end}} < 0$) come
    first, in `exigo.analyses.label_votes.vote_order` (the mean rank of the margin and the two
    held-out votes), then every other example by its score.

    Args:
        summary: the split's summaries from `summarise`.
        indices: int64 [C], the positions re-scored.
        margins: float [C], the end-of-epoch model's margin of the given label there.
        votes: the held-out votes on the same C examples (NaN where not voted: those whose
            margin is not below 0 are not ordered by them), or None.

    Returns:
        New `ExampleSummaries`.
    """
    score = summary.score.clone()
    score[indices] = margins.float()
    rescored = summary.rescored.clone()
    rescored[indices] = True
    if votes is None:
        return replace(
            summary, score=score, rank=_ranks(score), suspected=score < 0, rescored=rescored
        )
    head = summary.head_log_probability.clone()
    head[indices] = votes.head_log_probability.float()
    agreement = summary.neighbour_agreement.clone()
    agreement[indices] = votes.neighbour_agreement.float()
    voted = margins < 0
    first = indices[voted][
        vote_order(margins[voted], votes.head_log_probability[voted],
                   votes.neighbour_agreement[voted])
    ]  # fmt: skip
    others = torch.ones_like(score, dtype=torch.bool)
    others[first] = False
    rest = torch.nonzero(others).flatten()
    rest = rest[torch.sort(torch.nan_to_num(score[rest], nan=math.inf), stable=True).indices]
    rank = torch.empty_like(summary.rank)
    rank[torch.cat([first, rest])] = torch.arange(1, score.numel() + 1)
    return replace(
        summary,
        score=score,
        rank=rank,
        suspected=score < 0,
        rescored=rescored,
        head_log_probability=head,
        neighbour_agreement=agreement,
    )


@dataclass(frozen=True)
class Votes:
    r"""The held-out set's two votes on some training labels (`exigo.analyses.label_votes`).

    Attributes:
        head_log_probability: float32 [C], $\log q(y_i \mid z_i)$ under the held-out head.
        neighbour_agreement: float32 [C], the share of the nearest held-out examples with
            label $y_i$.
    """

    head_log_probability: Tensor
    neighbour_agreement: Tensor


@dataclass(frozen=True)
class EndOfEpochScores:
    r"""What the end-of-epoch model says of some examples (`end_of_epoch_scores`).

    Attributes:
        probabilities: float32 [C], $\mathrm{softmax}(f_E(x_i))_{y_i}$.
        margins: float32 [C], $f_E(x_i)_{y_i} - \max_{k \ne y_i} f_E(x_i)_k$, from the logits.
        predictions: int64 [C], $\operatorname{argmax}_k f_E(x_i)_k$.
        runner_up: int64 [C], $\operatorname{argmax}_{k \ne y_i} f_E(x_i)_k$.
        embeddings: float32 [C, D], $z_i$, the input of the model's classifier layer
            (`exigo.models.embedding_module`), as the evaluation pass reads it.
    """

    probabilities: Tensor
    margins: Tensor
    predictions: Tensor
    runner_up: Tensor
    embeddings: Tensor


@torch.no_grad()
def end_of_epoch_scores(
    model: torch.nn.Module,
    dataset: Any,
    indices: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
) -> EndOfEpochScores:
    """One eval-mode forward pass over `dataset[indices]`: the given labels' scores and embeddings.

    Keeps four numbers and the embedding per example, not the logits, so re-scoring a large
    share of a large training set stays small. The images are read as the training pass reads
    them (`dataset[i]`, with any transform the dataset applies).

    Args:
        model: the classifier, [B, C, H, W] -> logits [B, K]; its modes are restored.
        dataset: map-style `(image, label)` pairs.
        indices: int64 [C], positions in `dataset`.
        labels: int64 [C], the given labels $y_i$ (the training records').
        batch_size: images per forward pass.
        device: where the model lives.

    Returns:
        The `EndOfEpochScores`, on the CPU, in the order of `indices`.
    """
    parts = []
    captured: list[Tensor] = []

    def keep_embedding(_module: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        captured.append(inputs[0].detach().flatten(1).float().cpu())

    with evaluation_mode(model):
        handle = embedding_module(model).register_forward_pre_hook(keep_embedding)
        try:
            start = 0
            for images, _ in iterate_batches(dataset, indices, batch_size):
                given = labels[start : start + images.shape[0]].to(device)
                start += images.shape[0]
                logits = model(images.to(device, non_blocking=True)).float()
                probabilities, margins, runner_up = given_label_scores(logits, given)
                parts.append((probabilities, margins, logits.argmax(1), runner_up, captured[-1]))
        finally:
            handle.remove()
    columns = [torch.cat(column).cpu() for column in zip(*parts, strict=True)]
    return EndOfEpochScores(*columns)


# ---------------------------------------------------------------- the history of one split


@dataclass
class SplitHistory:
    """One split's records, one entry per completed epoch.

    Attributes:
        epochs: the epochs recorded, in order.
        probabilities: float16 [N] per epoch, the given label's probability.
        margins: float16 [N] per epoch, the given label's margin.
        labels: int64 [N], the given labels (latest record).
        predictions: int64 [N], the latest predicted class.
        runner_up: int64 [N], the latest strongest class other than the given label.
    """

    epochs: list[int]
    probabilities: list[Tensor]
    margins: list[Tensor]
    labels: Tensor | None = None
    predictions: Tensor | None = None
    runner_up: Tensor | None = None

    @classmethod
    def empty(cls) -> SplitHistory:
        """A history with no epoch recorded.

        Returns:
            Empty lists, no labels.
        """
        return cls([], [], [])

    def record(
        self,
        epoch: int,
        labels: Tensor,
        probabilities: Tensor,
        margins: Tensor,
        predictions: Tensor,
        runner_up: Tensor,
    ) -> None:
        """Add `epoch`'s record, replacing that epoch and any later one already there.

        Args:
            epoch: 1-based epoch.
            labels: int64 [N].
            probabilities: float [N].
            margins: float [N].
            predictions: int64 [N].
            runner_up: int64 [N].
        """
        keep = sum(1 for recorded in self.epochs if recorded < epoch)
        del self.epochs[keep:], self.probabilities[keep:], self.margins[keep:]
        self.epochs.append(epoch)
        self.probabilities.append(probabilities.detach().cpu().half())
        self.margins.append(margins.detach().cpu().half())
        self.labels = labels.detach().cpu().long()
        self.predictions = predictions.detach().cpu().long()
        self.runner_up = runner_up.detach().cpu().long()

    def stacked(self) -> tuple[Tensor, Tensor]:
        """The records as two matrices.

        Returns:
            `(probabilities, margins)`, float32 [E, N] each, row e - 1 for the e-th epoch kept.
        """
        return torch.stack(self.probabilities).float(), torch.stack(self.margins).float()

    def state_dict(self) -> dict[str, Any]:
        """The history as tensors and a list of ints, for `models/last.pt`.

        Returns:
            `epochs`, float16 [E, N] `probabilities` and `margins`, int64 [N] `labels`,
            `predictions` and `runner_up`; `{}` before the first epoch.
        """
        if not self.epochs:
            return {}
        probabilities, margins = (torch.stack(part) for part in (self.probabilities, self.margins))
        return {
            "epochs": list(self.epochs),
            "probabilities": probabilities,
            "margins": margins,
            "labels": self.labels,
            "predictions": self.predictions,
            "runner_up": self.runner_up,
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SplitHistory:
        """The history `state_dict` saved.

        Args:
            state: a `state_dict()` result.

        Returns:
            The history.
        """
        if not state:
            return cls.empty()
        return cls(
            epochs=[int(epoch) for epoch in state["epochs"]],
            probabilities=list(state["probabilities"].half().unbind(0)),
            margins=list(state["margins"].half().unbind(0)),
            labels=state["labels"].long(),
            predictions=state["predictions"].long(),
            runner_up=state["runner_up"].long(),
        )


# ---------------------------------------------------------------- files


def _number(value: float) -> str:
    return f"{value:.6g}"


def _optional(values: list[float]) -> list[str]:
    """Each value as `_number` writes it, or an empty field for NaN (not computed)."""
    return ["" if value != value else "%.6g" % value for value in values]  # noqa: UP031


def examples_csv(
    histories: Mapping[str, SplitHistory], summaries: Mapping[str, ExampleSummaries]
) -> bytes:
    """`examples.csv`: one row per example of every split (`EXAMPLE_COLUMNS`).

    Every field is a number or a split name, so nothing needs quoting: each row is one `%`
    format of its values (1.7 times faster than `csv.writer` with a formatter per value,
    the file written after every epoch).

    Args:
        histories: split name -> its records (labels and predictions).
        summaries: split name -> its summaries.

    Returns:
        The CSV text, UTF-8, with a header row.
    """
    parts = [",".join(EXAMPLE_COLUMNS) + "\n"]
    for split in SPLITS:
        if split not in summaries:
            continue
        history, summary = histories[split], summaries[split]
        assert history.labels is not None and history.predictions is not None
        learned = summary.learned_epoch.tolist()
        row = f"{split},%d,%d,%d,%.6g,%.6g,%.6g,%.6g,%d,%s,%.6g,%d,%s,%s,%d,%d\n"
        parts.extend(
            row % values
            for values in zip(
                range(len(learned)),
                history.labels.tolist(),
                history.predictions.tolist(),
                summary.confidence.tolist(),
                summary.variability.tolist(),
                summary.correctness.tolist(),
                summary.aum.tolist(),
                summary.forgetting_events.tolist(),
                [epoch or "" for epoch in learned],
                summary.score.tolist(),
                summary.rescored.tolist(),
                _optional(summary.head_log_probability.tolist()),
                _optional(summary.neighbour_agreement.tolist()),
                summary.rank.tolist(),
                summary.suspected.tolist(),
                strict=True,
            )
        )
    return "".join(parts).encode()


def label_issues_csv(
    histories: Mapping[str, SplitHistory], summaries: Mapping[str, ExampleSummaries]
) -> bytes:
    """`label_issues.csv`: the suspected examples of every split, by rank (`ISSUE_COLUMNS`).

    Args:
        histories: split name -> its records.
        summaries: split name -> its summaries.

    Returns:
        The CSV text, UTF-8, with a header row (and only that when nothing is suspected).
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ISSUE_COLUMNS)
    for split in SPLITS:
        if split not in summaries:
            continue
        history, summary = histories[split], summaries[split]
        assert history.labels is not None and history.predictions is not None
        suspects = torch.nonzero(summary.suspected).flatten()
        suspects = suspects[torch.argsort(summary.rank[suspects])]
        writer.writerows(
            zip(
                [split] * suspects.numel(),
                suspects.tolist(),
                history.labels[suspects].tolist(),
                history.predictions[suspects].tolist(),
                map(_number, summary.score[suspects].tolist()),
                summary.rank[suspects].tolist(),
                strict=True,
            )
        )
    return out.getvalue().encode()


# ---------------------------------------------------------------- figures


def plot_data_map(
    confidence: Tensor,
    variability: Tensor,
    correctness: Tensor,
    suspected: Tensor,
    *,
    title: str,
    epochs: int,
    limit: int = 20_000,
    seed: int = 0,
) -> Figure:
    """The data map: confidence against variability, coloured by correctness, suspects ringed.

    With more than `limit` examples, every suspect is drawn and a seeded random sample of the
    others fills up to `limit` points; the subtitle says so.

    Args:
        confidence: float [N], mean probability of the given label.
        variability: float [N], its standard deviation across epochs.
        correctness: float [N] in [0, 1], fraction of epochs classified correctly.
        suspected: bool [N], the suspected label errors.
        title: the figure's title.
        epochs: how many epochs the summaries cover.
        limit: at most this many points.
        seed: seeds the subsample (numpy's own generator, no global state).

    Returns:
        A matplotlib `Figure` (not attached to pyplot).
    """
    from matplotlib.figure import Figure

    count = confidence.numel()
    shown = np.arange(count)
    if count > limit:  # every suspect, and a sample of the others (the legend counts them all)
        flagged = np.flatnonzero(suspected.numpy())
        others = np.flatnonzero(~suspected.numpy())
        room = max(0, limit - flagged.size)
        sample = np.random.default_rng(seed).choice(
            others, size=min(room, others.size), replace=False
        )
        shown = np.sort(np.concatenate([flagged, sample]))
    x = variability.float().numpy()[shown]
    y = confidence.float().numpy()[shown]
    colour = correctness.float().numpy()[shown]
    ringed = suspected.numpy()[shown]
    figure = Figure(figsize=(7.0, 5.6))
    axes = figure.add_subplot()
    points = axes.scatter(
        x, y, c=colour, s=5, cmap="viridis", vmin=0, vmax=1, linewidths=0, rasterized=True
    )
    axes.scatter(
        x[ringed],
        y[ringed],
        s=28,
        facecolors="none",
        edgecolors="red",
        linewidths=0.8,
        label=f"suspected label error ({int(suspected.sum()):,})",
        rasterized=True,
    )
    figure.colorbar(points, ax=axes, label="correctness (fraction of epochs correct)")
    axes.set_xlabel("variability (std of p(given label) across epochs)")
    axes.set_ylabel("confidence (mean p(given label))")
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlim(left=-0.01, right=max(0.5, float(x.max(initial=0)) + 0.02))
    for text, (tx, ty), va in (
        ("easy to learn", (0.01, 0.98), "top"),
        ("hard to learn", (0.01, 0.02), "bottom"),
        ("ambiguous", (0.99, 0.98), "top"),
    ):
        axes.text(
            tx,
            ty,
            text,
            transform=axes.transAxes,
            ha="left" if tx < 0.5 else "right",
            va=va,
            fontsize=9,
            color="0.35",
            style="italic",
            bbox={"facecolor": "white", "alpha": 0.7, "edgecolor": "none", "pad": 1},
        )
    axes.legend(loc="lower right", fontsize=8)
    subtitle = f"{count:,} training examples"
    if count > limit:
        subtitle += f", {shown.size:,} drawn: every suspect, the others at random"
    if epochs == 1:
        subtitle += "; one epoch: the variability needs two"
    figure.suptitle(f"{title}\n{subtitle}", fontsize=11)
    return figure


@dataclass(frozen=True)
class Suspects:
    """The top suspects of one split, as the label-issues figure shows them.

    Attributes:
        split: "train" or "held_out".
        count: how many examples of the split are suspected.
        indices: int64 [k], their positions in the split's dataset, most suspicious first.
        given: int64 [k], given labels.
        rival: int64 [k], the strongest other class (the prediction when it is not the given
            label).
        given_probability: float [k], p(given label).
        rival_probability: float [k], p(rival).
    """

    split: str
    count: int
    indices: Tensor
    given: Tensor
    rival: Tensor
    given_probability: Tensor
    rival_probability: Tensor


def plot_suspects(
    suspects: Sequence[Suspects],
    pixels: Tensor,
    saliency: ErrorSaliency,
    class_names: Sequence[str],
    *,
    title: str,
    rescored: bool = True,
    voted: bool = True,
) -> Figure:
    """Per split, three rows: the suspects, saliency towards the given label and the rival.

    The images of all blocks are concatenated in order (those of `suspects[0]` first). Both
    saliency rows share one diverging colour scale centred at 0 for the whole figure, as in
    `exigo.analyses.errors.plot_errors`; a grey line marks the object's outline where that is
    meaningful (`exigo.figures.tiles.object_outline`).

    Args:
        suspects: the blocks to draw (at least one), each with at least one image.
        pixels: float tensor [K, C, H, W] in [0, 1], the images for display.
        saliency: their `ErrorSaliency` (`towards_true`: the given label,
            `towards_predicted`: the rival).
        class_names: display name per class.
        title: figure title.
        rescored: whether the end-of-epoch model re-scored training examples this epoch (the
            footnote says which order the list has).
        voted: whether the held-out set voted on the order of the re-scored suspects (it
            does not when it has examples of fewer than two classes, or abstains on all).

    Returns:
        A matplotlib `Figure` (not attached to pyplot).

    Raises:
        ValueError: nothing to draw.
    """
    if not suspects:
        raise ValueError("plot_suspects needs at least one split with suspects")
    pairs = SaliencyPairs.of(pixels, saliency)  # drawn as the errors figure draws them
    blocks, start = [], 0
    for block in suspects:
        stop = start + block.indices.numel()
        name = "training set" if block.split == "train" else "held-out set"
        labels = [
            f"#{rank} [{int(index)}]\n"
            f"given {class_names[int(given)]}: {float(p_given):.2f}\n"
            f"{class_names[int(rival)]}: {float(p_rival):.2f}"
            for rank, index, given, rival, p_given, p_rival in zip(
                range(1, block.indices.numel() + 1),
                block.indices,
                block.given,
                block.rival,
                block.given_probability,
                block.rival_probability,
                strict=True,
            )
        ]
        rows = pairs.rows(
            start, stop, "saliency\ntowards the\ngiven label", "saliency\ntowards the\nrival class"
        )
        header = (
            f"{name}: {block.count:,} suspected"
            + (
                f", the {block.indices.numel()} most suspicious"
                if block.count > stop - start
                else ""
            )
            + " ([index], p(given label), p(rival))"
        )
        blocks.append(TileBlock(rows, column_labels=labels, header=header))
        start = stop
    return tile_figure(
        blocks,
        title,
        (
            "Suspicion: the given label's margin below 0, averaged over the latest half of the "
            "epochs, or the end-of-epoch model's for the training examples it re-scored (column "
            "rescored of examples.csv); those re-scored come first, ordered by their margin"
            + (
                " and the held-out set's two votes (columns head_log_probability, "
                "neighbour_agreement). "
                if voted
                else " alone (no held-out vote). "
            )
            if rescored
            else "Suspicion: the given label's margin below 0, averaged over the latest half of "
            "the epochs; the training examples' from their training passes, which mix the "
            "epoch's models (the end-of-epoch model re-scores them and the held-out set votes "
            "on their order after the last epoch unless --rescore-fraction is 0, or after "
            "every epoch with --rescore-every-epoch). "
        )
        + "Probabilities: from the latest pass (training set: the "
        "end-of-epoch model, or the last training pass where not re-scored; held-out set: the "
        "last evaluation); rival: the strongest class other than the given label.\n"
        "Saliency (∂ logit / ∂ pixel) of the current model: red raises that class's logit, "
        f"blue lowers it; one colour scale, clipped at the {100 * ROBUST_QUANTILE:g}th "
        "percentile"
        + pairs.outline_clause
        + (f"\n{pairs.channels_note}" if pairs.channels_note else ""),
    )


# ---------------------------------------------------------------- the analysis


class ExampleAnalysis(Analysis):
    r"""Per-epoch hook: training dynamics, `examples.csv`, `label_issues.csv` and two figures.

    Needs map-style datasets (positions that name the same example every epoch): with an
    `IterableDataset` it says so in one line and skips itself; the run goes on.

    Args:
        shown: suspects per split in the label-issues figure.
        map_points: at most this many points in the data map.
        final_epoch: the run's last epoch, after which the training suspects are re-scored and
            the console line is printed (None: after every epoch).
        seed: seeds the data map's subsample of a large training set.
        rescore_fraction: the end-of-epoch model re-scores the training examples with a score
            below 0, at most this fraction $\rho$ of the set (the lowest; one eval-mode pass
            over them, see the module docstring), times `scale` when `--analysis-budget`
            lowers it; 0 ranks by the training records alone.
        batch_size: images per forward pass of the re-score (`runner.py`: `--eval-batch-size`).
        rescore_every_epoch: re-score and take the held-out votes after every epoch, not only
            after `final_epoch` (with `final_epoch` None they run after every epoch anyway).
            The final ranking is the same either way; the lists of the earlier epochs are
            the training records' order, without this.

    Raises:
        ValueError: `rescore_fraction` outside [0, 1].
    """

    name = "examples"
    training_dynamics = True
    figures = (
        FigureInfo(
            "data_map",
            "Data map",
            "Every training example by the mean (confidence) and the spread (variability) of "
            "the probability its given label received over the epochs' training passes, "
            "coloured by the fraction of epochs it was classified correctly. Bottom left: "
            "hard to learn, where mislabelled examples gather; red rings: suspected label "
            "errors (examples.csv holds every point).",
        ),
        FigureInfo(
            "label_issues",
            "Suspected label errors",
            "The most suspicious examples of each split (label_issues.csv lists them all), "
            "with the given label, the class the model prefers instead, and what in the image "
            "pulls towards each.",
        ),
    )

    def __init__(
        self,
        shown: int = 8,
        map_points: int = 20_000,
        final_epoch: int | None = None,
        seed: int = 0,
        rescore_fraction: float = 0.2,
        batch_size: int = 500,
        rescore_every_epoch: bool = False,
    ) -> None:
        if not 0.0 <= rescore_fraction <= 1.0:
            raise ValueError(f"rescore_fraction must lie in [0, 1], got {rescore_fraction}")
        self.rescore_fraction = rescore_fraction
        self.rescore_every_epoch = rescore_every_epoch
        self.batch_size = batch_size
        self.shown = shown
        self.map_points = map_points
        self.final_epoch = final_epoch
        self.seed = seed
        self.histories = {split: SplitHistory.empty() for split in SPLITS}
        self._skip_said = False
        self._cap_said = False
        self._said: set[str] = set()  # lines said once per run (`_say_once`)

    def cost(self, shape: CostShape) -> float:
        r"""The re-score's forward passes and the saliency of the suspects shown, per epoch.

        At most $\lceil \rho s N \rceil$ forward passes ($s$ = `scale`; a third of a training
        pass each) when it re-scores, and two gradients for each of at most `shown` suspects
        per split. Re-scoring only after `final_epoch` $E$, its passes count $1/E$ per epoch.

        Args:
            shape: probe size, classes, image shape and training set size $N$.

        Returns:
            $\rho s N / (3 E') + 4 \cdot$ shown passes per epoch ($E' = E$ when it re-scores
            after the final epoch only, else 1; an upper bound).
        """
        rescore = self.rescore_fraction * self.scale * shape.training_images / 3
        if not self.rescore_every_epoch and self.final_epoch is not None:
            rescore /= max(self.final_epoch, 1)
        return rescore + 4 * self.shown

    def due(self, epoch: int, last_epoch: int) -> bool:
        """After every epoch, whatever `every` the budget chose: each epoch's records are needed.

        Args:
            epoch: the epoch just trained (1-based).
            last_epoch: the run's last epoch.

        Returns:
            True.
        """
        return True

    def __call__(self, ctx: EpochContext) -> None:
        """Record the epoch, write both files and draw both figures."""
        if ctx.eval is None:
            return
        reason = self._skip_reason(ctx)
        if reason is not None:
            if not self._skip_said:
                ctx.log(f"examples: skipped: {reason}")
                self._skip_said = True
            return
        self._record(ctx)
        summaries = {}
        latest = {}  # split -> the latest pass' probability and margin per example, [N] each
        for split, history in self.histories.items():
            probabilities, margins = history.stacked()
            summaries[split] = summarise(probabilities, margins)
            latest[split] = (probabilities[-1], margins[-1])
        ranked, rescored = self._rescore(ctx, summaries["train"], latest["train"])
        # the votes order the suspects but do not change which they are: the worker draws
        # the data map while they are taken and the files written
        self._draw_data_map(ctx, ranked)
        if rescored is not None:
            indices, scores = rescored
            votes = self._votes(ctx, scores, self.histories["train"], indices)
            if votes is not None:
                ranked = rescore(summaries["train"], indices, scores.margins, votes)
        summaries["train"] = ranked
        self._draw_suspects(ctx, summaries, latest)  # drawn while the files are written
        atomic_write_bytes(ctx.save_dir / EXAMPLES_FILE, examples_csv(self.histories, summaries))
        issues_path = ctx.save_dir / ISSUES_FILE
        atomic_write_bytes(issues_path, label_issues_csv(self.histories, summaries))
        counts = {split: int(summaries[split].suspected.sum()) for split in SPLITS}
        ctx.metrics["examples/suspected_train"] = counts["train"]
        ctx.metrics["examples/suspected_held_out"] = counts["held_out"]
        if self.final_epoch is None or ctx.epoch >= self.final_epoch:
            total = sum(summary.rank.numel() for summary in summaries.values())
            suspected = sum(counts.values())
            ctx.log(
                f"{suspected:,} suspected label errors (top {100 * suspected / total:.2g}%: "
                f"{counts['train']:,} training, {counts['held_out']:,} held-out): "
                f"see {issues_path}"
            )

    @staticmethod
    def _skip_reason(ctx: EpochContext) -> str | None:
        for name, data in (("training", ctx.train_data), ("held-out", ctx.val_data)):
            if isinstance(data, IterableDataset):
                return (
                    f"it needs a map-style dataset (a stable index per example) and the "
                    f"{name} set is an IterableDataset"
                )
        if ctx.train is None or ctx.train.dynamics is None:
            return "the training pass recorded no per-example dynamics (see train_epoch)"
        return None

    def _record(self, ctx: EpochContext) -> None:
        """Add the epoch's training-pass and evaluation-pass records to the histories."""
        assert ctx.train is not None and ctx.train.dynamics is not None and ctx.eval is not None
        dynamics = ctx.train.dynamics
        self.histories["train"].record(
            ctx.epoch,
            dynamics.labels,
            dynamics.probabilities,
            dynamics.margins,
            dynamics.predictions,
            dynamics.runner_up,
        )
        evaluation = ctx.eval
        # log-probabilities give the logits' margin (softmax ignores a shift per row);
        # clamped so that an underflowed probability gives a large finite margin
        log_probabilities = evaluation.probabilities.clamp_min(1e-38).log()
        probabilities, margins, runner_up = given_label_scores(
            log_probabilities, evaluation.targets
        )
        self.histories["held_out"].record(
            ctx.epoch,
            evaluation.targets,
            probabilities,
            margins,
            evaluation.predictions,
            runner_up,
        )

    def _rescores(self, epoch: int) -> bool:
        """Whether the end-of-epoch model re-scores after `epoch` (the final one by default)."""
        return self.rescore_every_epoch or self.final_epoch is None or epoch >= self.final_epoch

    def _draw_data_map(self, ctx: EpochContext, train: ExampleSummaries) -> None:
        """Hand the data map of the training summaries to the figure worker."""
        ctx.draw_figure(
            "data_map",
            plot_data_map,
            train.confidence,
            train.variability,
            train.correctness,
            train.suspected,
            title=f"Data map of the training set {ctx.when}",
            epochs=len(self.histories["train"].epochs),
            limit=self.map_points,
            seed=self.seed,
        )

    def _rescore(
        self, ctx: EpochContext, summary: ExampleSummaries, latest: tuple[Tensor, Tensor]
    ) -> tuple[ExampleSummaries, tuple[Tensor, EndOfEpochScores] | None]:
        """Re-score the suspected training examples with the end-of-epoch model (`rescore_count`).

        Only after the epochs `_rescores` names. Also makes that pass the latest one for those
        examples: their `predicted` and rival class in the history, and their probability and
        margin in `latest` (float [N] each, changed in place), which the suspects figure shows.

        Returns:
            The summaries with the re-scored margins, ranked by score (`rescore` without
            votes), and the re-scored positions with their `EndOfEpochScores` (None when
            nothing was re-scored).
        """
        if not self._rescores(ctx.epoch):
            if self.rescore_fraction > 0:  # a run stopped before then keeps such a list
                self._say_once(
                    ctx,
                    f"examples: the suspects follow the training records until epoch "
                    f"{self.final_epoch}, then the end-of-epoch re-score and held-out votes "
                    "order them (--rescore-every-epoch: every epoch)",
                )
            return summary, None
        fraction = self.rescore_fraction * self.scale
        count = rescore_count(summary, fraction)
        suspected = int(summary.suspected.sum())
        if count < suspected and fraction > 0 and not self._cap_said:  # said once per run
            ctx.log(
                f"examples: {suspected:,} training examples suspected at epoch {ctx.epoch}, "
                f"more than the cap: the end-of-epoch model re-scores the {count:,} lowest "
                f"(rescore_fraction {fraction:g}), the others keep their training score "
                "(examples.csv: rescored 0)"
            )
            self._cap_said = True
        if count == 0:
            return summary, None
        assert ctx.train_data is not None  # _skip_reason: the training pass recorded it
        history = self.histories["train"]
        assert history.labels is not None and history.predictions is not None
        assert history.runner_up is not None
        indices = torch.argsort(summary.rank)[:count]
        scores = end_of_epoch_scores(
            ctx.model,
            ctx.train_data,
            indices,
            history.labels[indices],
            batch_size=self.batch_size,
            device=ctx.device,
        )
        history.predictions[indices] = scores.predictions
        history.runner_up[indices] = scores.runner_up
        latest[0][indices] = scores.probabilities
        latest[1][indices] = scores.margins
        return rescore(summary, indices, scores.margins), (indices, scores)

    def _votes(
        self, ctx: EpochContext, scores: EndOfEpochScores, history: SplitHistory, indices: Tensor
    ) -> Votes | None:
        """The held-out set's votes on the re-scored examples that stay suspected.

        Only those are ordered by the votes (`rescore`); the others get NaN (no vote), and
        when none stays suspected nothing is fit.

        Args:
            ctx: the epoch; its evaluation pass gives the held-out embeddings and labels.
            scores: the re-score pass over `indices`, with their embeddings.
            history: the training split's records (the given labels).
            indices: int64 [C], the re-scored examples.

        Returns:
            The `Votes`, [C] each (NaN where not voted, and for a suspect whose given class
            the held-out set lacks: no opinion, said once), or None when the held-out set has
            examples of fewer than two classes (said once).
        """
        assert ctx.eval is not None and history.labels is not None
        reference, reference_labels = ctx.eval.embeddings, ctx.eval.targets
        present = torch.bincount(reference_labels, minlength=ctx.eval.num_classes) > 0
        if int(present.sum()) < 2:
            self._say_once(
                ctx,
                f"examples: no held-out votes (the held-out set has examples of "
                f"{int(present.sum())} class): the re-scored suspects are ranked by the "
                "end-of-epoch margin alone",
            )
            return None
        head = torch.full_like(scores.margins, math.nan)
        agreement = torch.full_like(scores.margins, math.nan)
        voted = torch.nonzero(scores.margins < 0).flatten()
        labels = history.labels[indices[voted]]
        lacking = ~present[labels]
        if bool(lacking.any()):
            missing = sorted(set(labels[lacking].tolist()))
            names = ", ".join(ctx.class_names[c] for c in missing[:5])
            more = f" and {len(missing) - 5:,} more" if len(missing) > 5 else ""
            self._say_once(
                ctx,
                f"examples: the held-out set has no example of class {names}{more}: the "
                "held-out votes abstain on training suspects given that label (examples.csv: "
                "no vote)",
            )
        voters = voted[~lacking]
        if voters.numel() > 0:
            embeddings, given = scores.embeddings[voters], labels[~lacking]
            head[voters] = head_log_probabilities(
                embeddings, given, reference, reference_labels, ctx.eval.num_classes,
                log=lambda line: self._say_once(ctx, f"examples: {line}"),
            )  # fmt: skip
            agreement[voters] = neighbour_agreement(embeddings, given, reference, reference_labels)
        return Votes(head_log_probability=head, neighbour_agreement=agreement)

    def _say_once(self, ctx: EpochContext, line: str) -> None:
        """`ctx.log(line)`, the first time this run says it."""
        if line not in self._said:
            ctx.log(line)
            self._said.add(line)

    def _draw_suspects(
        self,
        ctx: EpochContext,
        summaries: Mapping[str, ExampleSummaries],
        latest: Mapping[str, tuple[Tensor, Tensor]],
    ) -> None:
        """The top suspects of each split, with saliency towards the given label and the rival."""
        blocks, images = [], []
        for split, data in (("train", ctx.train_data), ("held_out", ctx.val_data)):
            summary, history = summaries[split], self.histories[split]
            assert history.labels is not None and history.runner_up is not None
            count = int(summary.suspected.sum())
            if count == 0 or self.shown < 1 or data is None:
                continue
            indices = torch.argsort(summary.rank)[: min(count, self.shown)]
            probability = latest[split][0][indices]
            margin = latest[split][1][indices]
            blocks.append(
                Suspects(
                    split=split,
                    count=count,
                    indices=indices,
                    given=history.labels[indices],
                    rival=history.runner_up[indices],
                    given_probability=probability,
                    # p_rival / p_given = exp(z_rival - z_given) = exp(-margin)
                    rival_probability=probability * torch.exp(-margin),
                )
            )
            images.append(gather(data, indices)[0])
        if not blocks:
            ctx.log(f"examples: no suspected label error at epoch {ctx.epoch}")
            return
        batch = torch.cat(images)
        given = torch.cat([block.given for block in blocks])
        rival = torch.cat([block.rival for block in blocks])
        saliency = error_saliency(ctx.model, batch.to(ctx.device), given, rival)
        ctx.draw_figure(
            "label_issues",
            plot_suspects,
            blocks,
            display_pixels(batch, ctx.normalization),
            saliency,
            ctx.class_names,
            title=f"Suspected label errors {ctx.when}",
            rescored=bool(summaries["train"].rescored.any()),
            voted=bool(summaries["train"].head_log_probability.isfinite().any()),
        )

    def state_dict(self) -> dict[str, Any]:
        """Every split's records so far, for `--resume`.

        Returns:
            Split name -> `SplitHistory.state_dict()` (float16 [E, N] tensors).
        """
        return {split: history.state_dict() for split, history in self.histories.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the records a `state_dict` saved.

        Args:
            state: a `state_dict()` result of an earlier attempt of the same run.
        """
        self.histories = {
            split: SplitHistory.from_state_dict(state.get(split, {})) for split in SPLITS
        }
