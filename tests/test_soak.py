"""A long unlabeled stream through one session: what it holds stays bounded, and it keeps working.

20,000 real digit frames (250 known training digits and every training 9, reshuffled on every
pass) go through observe and predict with adaptation on; benchmarks/soak.py runs the same loop
longer, on a GPU.
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from edge_runtime.session import Session
from tests.classifier_fixture import digits_session

FRAMES = 20_000
WARM_UP_FRAMES = 2_000
BATCH = 40
SETTINGS = {"detector.name": "grad_mahalanobis_ssl", "detector.pool_size": 300, "session.adapt_every": 400,
            "detector.pu_rounds": 1, "detector.pu_head.epochs": 10, "memory.budget": 100, "session.max_batch": 64}
RSS_GROWTH_LIMIT = 64 * 2**20  # generous: allocator noise is a few MiB; a leak of one frame per step is ~20 MiB


def resident_bytes() -> int:
    """This process's resident set size (VmRSS), after a collection."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


def shuffled_batches(images: np.ndarray, frames: int, seed: int):
    """`frames` frames of `images` in batches of BATCH, reshuffled on every pass."""
    rng = np.random.default_rng(seed)
    order = np.empty(0, dtype=np.int64)
    for _ in range(frames // BATCH):
        if len(order) < BATCH:
            order = np.concatenate([order, rng.permutation(len(images))])
        yield images[order[:BATCH]]
        order = order[BATCH:]


def check_bounds(session: Session) -> None:
    pool = session.learner.heads[-1].pool
    assert session.memory.size <= session.memory.budget == SETTINGS["memory.budget"]
    assert pool is None or len(pool) <= SETTINGS["detector.pool_size"]
    assert sum(len(batch) for batch in session._pending) < SETTINGS["session.adapt_every"]


def test_a_long_stream_keeps_the_session_bounded_and_working(record_property):
    torch.set_num_threads(1)
    session, stream = digits_session(SETTINGS)
    nines = stream.labels == 9
    stream = stream.subset(np.concatenate([np.flatnonzero(~nines)[:250], np.flatnonzero(nines)]))
    warm_up = shuffled_batches(stream.images, WARM_UP_FRAMES, seed=1)
    for frames in warm_up:
        session.observe(frames)
        session.predict(frames)
    footprint, rss_before = session.memory_footprint(), resident_bytes()

    rounds_before = session.rounds
    for frames in shuffled_batches(stream.images, FRAMES, seed=2):
        session.observe(frames)
        prediction = session.predict(frames)
        assert prediction.labels.shape == (BATCH,) and prediction.labels.max() <= 9 and prediction.labels.min() >= 0
        assert np.isfinite(prediction.scores).all()
        check_bounds(session)
    rss_growth = resident_bytes() - rss_before

    assert session.observed == WARM_UP_FRAMES + FRAMES
    assert session.rounds - rounds_before == FRAMES // SETTINGS["session.adapt_every"]
    assert session.memory_footprint() == footprint
    assert rss_growth < RSS_GROWTH_LIMIT, f"resident memory grew by {rss_growth / 2**20:.1f} MiB"
    # Still a detector after 55 rounds (measured: 0.91 of the 9s flagged, 0.06 of the rest).
    nines = stream.labels == 9
    flagged_nines = session.predict(stream.images[nines][:64]).novel.mean()
    flagged_rest = session.predict(stream.images[~nines][:64]).novel.mean()
    record_property("flagged_nines", flagged_nines)
    record_property("flagged_rest", flagged_rest)
    assert flagged_nines >= 0.6 and flagged_rest <= 0.2
