"""The held-out votes on training labels: exact values, scikit-learn as the head's oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from exigo.analyses.examples import ExampleSummaries, Votes, rescore, summarise
from exigo.analyses.label_votes import head_log_probabilities, neighbour_agreement, vote_order


def blobs(seed: int, classes: int, per_class: int, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping Gaussian blobs, one per class, with uneven scales per dimension."""
    generator = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(classes, dims, generator=generator)
    labels = torch.arange(classes).repeat_interleave(per_class)
    points = centres[labels] + 1.5 * torch.randn(len(labels), dims, generator=generator)
    return points * torch.linspace(0.5, 20.0, dims), labels


@pytest.mark.parametrize("c", [1.0, 0.05])
def test_head_matches_scikit_learn_logistic_regression(c):
    reference, reference_labels = blobs(0, classes=4, per_class=30, dims=6)
    judged, _ = blobs(1, classes=4, per_class=5, dims=6)
    given = torch.arange(20) % 4  # any given label, right or wrong
    ours = head_log_probabilities(
        judged, given, reference, reference_labels, 4, inverse_regularisation=c
    )
    data = reference.double().numpy()
    mean, scale = data.mean(0), data.std(0) + 1e-6
    # scikit-learn run to the minimum (its default tol=1e-4 stops short of it)
    oracle = LogisticRegression(C=c, tol=1e-10, max_iter=10_000)
    oracle.fit((data - mean) / scale, reference_labels)
    expected = oracle.predict_log_proba((judged.double().numpy() - mean) / scale)
    assert ours.dtype == torch.float32 and ours.shape == (20,)
    # stopped, as scikit-learn's default, at a gradient of 1e-4: near its minimum, which a wrong
    # C, a missing standardisation or a penalised intercept would move by far more
    np.testing.assert_allclose(ours.numpy(), expected[np.arange(20), given], atol=0.05)


def test_a_class_missing_from_the_held_out_set_gets_no_probability():
    reference, reference_labels = blobs(2, classes=3, per_class=20, dims=3)
    judged, _ = blobs(3, classes=3, per_class=2, dims=3)
    given = torch.tensor([0, 1, 2, 0, 3, 3])  # class 3 has no held-out example
    ours = head_log_probabilities(judged, given, reference, reference_labels, 4)
    data = reference.double().numpy()
    mean, scale = data.mean(0), data.std(0) + 1e-6
    # the same fit as scikit-learn's on the three classes present
    oracle = LogisticRegression(tol=1e-10, max_iter=10_000).fit(
        (data - mean) / scale, reference_labels
    )
    expected = oracle.predict_log_proba((judged[:4].double().numpy() - mean) / scale)
    np.testing.assert_allclose(ours[:4].numpy(), expected[range(4), given[:4]], atol=0.05)
    assert ours[4:].tolist() == [-math.inf, -math.inf]


def test_neighbour_agreement_counts_the_nearest_held_out_labels():
    # held-out points 0..9 on a line, labels 0 for 0..4 and 1 for 5..9
    reference = torch.arange(10.0)[:, None]
    reference_labels = (torch.arange(10) >= 5).long()
    judged = torch.tensor([[2.0], [4.6], [7.0], [7.0]])
    given = torch.tensor([0, 1, 0, 1])
    # 2: neighbours 2, 1, 3, then 0 or 4, all class 0; 4.6: 5, 4, 6, 3 -> labels 1, 0, 1, 0;
    # 7: 7, 6, 8, then 5 or 9, all class 1
    agreement = neighbour_agreement(judged, given, reference, reference_labels, k=4, block=3)
    assert agreement.tolist() == [1.0, 0.5, 0.0, 1.0]
    # k above the held-out size: all ten vote
    everyone = neighbour_agreement(judged, given, reference, reference_labels, k=50)
    assert everyone.tolist() == [0.5, 0.5, 0.5, 0.5]


def test_vote_order_sums_the_three_ranks_ties_sharing_their_mean():
    margins = torch.tensor([-1.0, -3.0, -2.0, -0.5])
    head = torch.tensor([-0.5, -0.1, -2.0, -0.4])
    agreement = torch.tensor([0.5, 0.0, 0.0, 0.9])
    # ranks: margin 3 1 2 4; head 2 4 1 3; agreement 3 1.5 1.5 4 -> sums 8, 6.5, 4.5, 11
    assert vote_order(margins, head, agreement).tolist() == [2, 1, 0, 3]
    # equal sums: the lower margin first
    tied = vote_order(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -1.0]), torch.ones(2))
    assert tied.tolist() == [1, 0]
    assert vote_order(torch.zeros(0), torch.zeros(0), torch.zeros(0)).tolist() == []


def test_rescore_with_votes_puts_the_re_scored_suspects_first_in_vote_order():
    # six examples, one epoch; training margins: 0 -> -4, 1 -> -3, 2 -> -2, 3 -> -1, 4 -> 1,
    # 5 never recorded
    margins = torch.tensor([[-4.0, -3.0, -2.0, -1.0, 1.0, math.nan]])
    summary = summarise(torch.full_like(margins, 0.5), margins)
    # the end-of-epoch model re-scores 0..2: 0 stays suspected (-0.2), 1 is learned (+2),
    # 2 stays suspected (-1.5); 3 was not re-scored (the cap) and keeps -1
    indices = torch.tensor([0, 1, 2])
    votes = Votes(
        head_log_probability=torch.tensor([-5.0, -0.1, -0.2]),
        neighbour_agreement=torch.tensor([0.0, 1.0, 0.9]),
    )
    new = rescore(summary, indices, torch.tensor([-0.2, 2.0, -1.5]), votes)
    assert isinstance(new, ExampleSummaries)
    # suspects 0 and 2 re-scored: margin ranks 2 1, head 1 2, agreement 1 2 -> 0 first;
    # then by score: 3 (-1), 4 (1), 1 (2), 5 (never recorded)
    assert new.rank.tolist() == [1, 5, 2, 3, 4, 6]
    assert new.suspected.tolist() == [True, False, True, True, False, False]
    assert new.rescored.tolist() == [True, True, True, False, False, False]
    assert new.head_log_probability[:3].tolist() == pytest.approx([-5.0, -0.1, -0.2])
    assert new.neighbour_agreement[:3].tolist() == pytest.approx([0.0, 1.0, 0.9])
    assert new.head_log_probability[3:].isnan().all() and new.neighbour_agreement[3:].isnan().all()
    # without votes the ranks follow the scores: 2 (-1.5), 3 (-1), 0 (-0.2), 4, 1, 5
    plain = rescore(summary, indices, torch.tensor([-0.2, 2.0, -1.5]))
    assert plain.rank.tolist() == [3, 5, 1, 2, 4, 6]


def test_two_classes_give_scikit_learns_binomial_fit_with_c_doubled():
    reference, reference_labels = blobs(4, classes=2, per_class=25, dims=4)
    judged, _ = blobs(5, classes=2, per_class=3, dims=4)
    given = torch.tensor([0, 1, 0, 1, 0, 1])
    ours = head_log_probabilities(judged, given, reference, reference_labels, 2, tolerance=1e-6)
    data = reference.double().numpy()
    mean, scale = data.mean(0), data.std(0)
    oracle = LogisticRegression(C=2.0, tol=1e-10, max_iter=10_000)
    oracle.fit((data - mean) / scale, reference_labels)
    expected = oracle.predict_log_proba((judged.double().numpy() - mean) / scale)
    np.testing.assert_allclose(ours.numpy(), expected[range(6), given], atol=5e-3)


def test_a_fit_stopped_short_says_so_and_a_constant_dimension_stays_finite():
    reference, reference_labels = blobs(6, classes=3, per_class=10, dims=3)
    reference[:, 2] = 5.0  # no spread: scaled by 1, as scikit-learn's StandardScaler
    judged = torch.tensor([[0.0, 0.0, 1e30]])
    said: list[str] = []
    value = head_log_probabilities(
        judged, torch.tensor([1]), reference, reference_labels, 3, max_iterations=2, log=said.append
    )
    # two iterations allow 2.5 evaluations, which the first iteration's line search uses up
    assert len(said) == 1 and said[0].startswith("the held-out head stopped after 1 L-BFGS ")
    assert torch.isfinite(value).all()
    said.clear()
    head_log_probabilities(
        judged, torch.tensor([1]), reference, reference_labels, 3, log=said.append
    )
    assert said == []  # converged: nothing to say


def test_an_abstaining_vote_counts_as_the_middle_rank():
    margins = torch.tensor([-1.0, -3.0, -2.0])
    head = torch.tensor([-0.5, math.nan, -2.0])  # suspect 1 has no head vote
    agreement = torch.tensor([0.5, math.nan, 0.0])
    # margin ranks 3 1 2; head 3 (2 middle) 1 over the two present stretched to 1..3; same for
    # agreement -> sums 9, 5, 4
    assert vote_order(margins, head, agreement).tolist() == [2, 1, 0]
