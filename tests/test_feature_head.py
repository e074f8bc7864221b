"""Stacked feature-head training against the one-head-at-a-time loop it replaces, on real digits pixels.

The reference below is the plain loop a lone head would run (its own seeded initialisation, its own
per-epoch shuffle, Adam on class-weighted BCE per mini-batch). The stacked trainer must give every
head the same weights, whatever the other heads' data sizes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_runtime.config import BinaryHeadConfig
from edge_runtime.data.digits import load_digits_split
from edge_runtime.data.transforms import to_tensor
from edge_runtime.detectors.base import Observations
from edge_runtime.detectors.binary_head import BinaryHead, fit_binary_heads
from edge_runtime.detectors.feature_head import (FalseAlarmConstraint, FeatureHead, HeadJob, HeadRecipe,
                                                 train_feature_heads)
from edge_runtime.errors import ConfigError, InputError

RECIPE = HeadRecipe(hidden=16, epochs=3, batch_size=32, lr=1e-3)


@pytest.fixture(scope="module")
def digits():
    """Flattened digits pixels [N, 64] and labels, train and test."""
    train, test = load_digits_split("train"), load_digits_split("test")
    flat = lambda split: to_tensor(split.images).flatten(1)  # noqa: E731
    return flat(train), torch.from_numpy(train.labels), flat(test)


def _job(inputs: torch.Tensor, targets: torch.Tensor, seed: int) -> HeadJob:
    ood_mass = float(targets.sum())
    return HeadJob(inputs, targets, inputs.mean(dim=0), inputs.std(dim=0).clamp_min(1e-6),
                   (len(targets) - ood_mass) / ood_mass, seed, torch.Generator().manual_seed(seed))


def _lone_head(job: HeadJob, recipe: HeadRecipe) -> FeatureHead:
    """One head trained on its own: the loop every stacked head must reproduce (with `recipe.constraint`,
    WOODS's augmented Lagrangian written out for one head: a scalar multiplier updated after each epoch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(job.init_seed)
        network = FeatureHead(job.inputs.shape[1], recipe.hidden)
    network.mean.copy_(job.mean)
    network.std.copy_(job.std)
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe.lr, betas=recipe.betas)
    order_source = torch.Generator().manual_seed(job.init_seed)
    pos_weight = torch.tensor(job.pos_weight)
    multiplier = 0.0
    for _ in range(recipe.epochs):
        order = torch.randperm(len(job.inputs), generator=order_source)
        violations = []
        for start in range(0, len(order), recipe.batch_size):
            index = order[start:start + recipe.batch_size]
            logits, targets = network(job.inputs[index]), job.targets[index]
            if recipe.constraint is None:
                loss = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
            else:
                novel, known = targets == 1, targets == 0
                loss = F.softplus(-logits[novel]).mean() if novel.any() else logits.sum() * 0
                violation = torch.sigmoid(logits[known]).mean() - recipe.constraint.alpha if known.any() else None
                if violation is not None:
                    penalty = recipe.constraint.penalty
                    if multiplier + penalty * violation.item() >= 0:
                        loss = loss + multiplier * violation + penalty / 2 * violation ** 2
                violations.append(0.0 if violation is None else violation.item())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if recipe.constraint is not None:
            multiplier = max(0.0, multiplier + recipe.constraint.penalty * sum(violations) / len(violations))
    return network.eval()


def test_stacked_heads_match_heads_trained_one_at_a_time(digits, single_thread):
    inputs, labels, test_inputs = digits
    # Different sizes (so different step counts, and a last mini-batch of one), targets and seeds.
    subsets = [(slice(0, 700), labels >= 5, 0), (slice(100, 433), labels % 2 == 1, 7), (slice(0, 1200), labels == 3, 3)]
    jobs = [_job(inputs[rows], target[rows].float(), seed) for rows, target, seed in subsets]
    assert (433 - 100) % RECIPE.batch_size == 13 and 700 % RECIPE.batch_size != 0
    stacked = train_feature_heads(jobs, RECIPE)
    for job, head in zip(jobs, stacked):
        reference = _lone_head(job, RECIPE)
        with torch.no_grad():
            expected, got = reference(test_inputs), head(test_inputs)
        assert not head.training
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
        # Shorter jobs finish before the longest: each keeps the weights of its own last step.
        assert torch.allclose(head.layers[0].weight, reference.layers[0].weight, atol=1e-5)


def test_constrained_stacked_heads_match_the_lone_augmented_lagrangian_loop(digits, single_thread):
    inputs, labels, test_inputs = digits
    recipe = HeadRecipe(hidden=16, epochs=4, batch_size=32, lr=1e-3, constraint=FalseAlarmConstraint(0.05, 10.0))
    subsets = [(slice(0, 700), labels >= 5, 0), (slice(100, 433), labels % 2 == 1, 7)]
    jobs = [_job(inputs[rows], target[rows].float(), seed) for rows, target, seed in subsets]
    for job, head in zip(jobs, train_feature_heads(jobs, recipe)):
        reference = _lone_head(job, recipe)
        with torch.no_grad():
            expected, got = reference(test_inputs), head(test_inputs)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()


def test_false_alarm_constraint_holds_the_known_rows_near_alpha(digits, single_thread):
    # Known = digits 0-4; the "stream" = other 0-4 images plus every 5-9, as in the wild-data setting.
    inputs, labels, _ = digits
    low = torch.nonzero(labels < 5).flatten()
    known, stream_known, novel = low[:300], low[300:], torch.nonzero(labels >= 5).flatten()
    rows = torch.cat([known, stream_known, novel])
    targets = torch.cat([torch.zeros(len(known)), torch.ones(len(stream_known) + len(novel))])
    job = _job(inputs[rows], targets, 0)
    plain = HeadRecipe(hidden=16, epochs=20, batch_size=64, lr=1e-3)
    constrained = HeadRecipe(hidden=16, epochs=20, batch_size=64, lr=1e-3, constraint=FalseAlarmConstraint(0.05, 10.0))
    rates = {}
    for name, recipe in (("plain", plain), ("constrained", constrained)):
        (head,) = train_feature_heads([job], recipe)
        with torch.no_grad():
            rates[name] = torch.sigmoid(head(inputs[known])).mean().item()
    # The class-weighted BCE puts the known rows near the stream's known images (those it must call
    # OOD); the constraint keeps their soft false-alarm rate at alpha (measured: plain 0.25, constrained 0.033).
    assert rates["constrained"] <= 2 * 0.05 < rates["plain"], rates


def test_constraint_is_for_feature_heads_only():
    split = load_digits_split("train")
    pixels = to_tensor(split.images[:100])
    samples = Observations(pixels, pixels.flatten(1), torch.zeros(100, 10))
    task = (samples, torch.from_numpy(split.labels[:100] >= 5).float(), 0)
    with pytest.raises(ConfigError, match="feature heads"):
        fit_binary_heads("paper_cnn", BinaryHeadConfig(epochs=1), [task], constraint=FalseAlarmConstraint(0.05, 1.0))


def test_heads_train_to_a_useful_split(digits, single_thread):
    inputs, labels, test_inputs = digits
    test_labels = torch.from_numpy(load_digits_split("test").labels)
    (head,) = train_feature_heads([_job(inputs, (labels >= 5).float(), 0)], RECIPE)
    with torch.no_grad():
        accuracy = ((head(test_inputs) > 0) == (test_labels >= 5)).float().mean()
    assert accuracy > 0.85


def test_jobs_of_another_width_or_mismatched_targets_are_refused(digits):
    inputs, labels, _ = digits
    targets = (labels >= 5).float()
    good = _job(inputs, targets, 0)
    with pytest.raises(InputError, match="inputs \\[N, 64\\]"):
        train_feature_heads([good, _job(inputs[:, :32], targets, 1)], RECIPE)
    with pytest.raises(InputError, match="targets \\[N\\]"):
        train_feature_heads([HeadJob(inputs, targets[:-1], good.mean, good.std, 1.0, 0, torch.Generator())], RECIPE)
    with pytest.raises(InputError, match="every head job needs"):  # a flat vector, not [N, D]
        train_feature_heads([HeadJob(inputs[:, 0], targets, good.mean[:1], good.std[:1], 1.0, 0, torch.Generator())],
                            RECIPE)
    assert train_feature_heads([], RECIPE) == []


@pytest.mark.parametrize("arch", ["feature_head", "paper_cnn"])
def test_fit_binary_heads_equals_fitting_each_head_alone(arch, digits, single_thread):
    split = load_digits_split("train")
    pixels = to_tensor(split.images[:300])
    samples = Observations(pixels, pixels.flatten(1), torch.zeros(300, 10))
    labels = torch.from_numpy(split.labels[:300])
    config = BinaryHeadConfig(epochs=2, width=8)
    tasks = [(samples, (labels >= 5).float(), 0), (samples.select(torch.arange(250)), (labels[:250] == 1).float(), 4)]
    together = fit_binary_heads(arch, config, tasks)
    for head, (task_samples, targets, seed) in zip(together, tasks):
        alone = BinaryHead(arch, config, seed).fit(task_samples, targets)
        assert torch.allclose(head.predict(samples), alone.predict(samples), atol=1e-5)
