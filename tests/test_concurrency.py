"""`predict` from a second thread while the main thread observes and adapts (the Session guarantee).

Two copies of one saved session see the same stream: one alone, one with a thread calling predict
in a loop. Every concurrent answer must be the answer the lone copy gives before or after some
round (never a half-adapted head), and both copies must end identical.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edge_runtime.session import Prediction, Session
from tests.classifier_fixture import digits_session

BATCH = 40
ROUNDS = 4
SETTINGS = {"detector.name": "grad_mahalanobis_ssl", "detector.pool_size": 200, "session.adapt_every": 120,
            "detector.pu_rounds": 1, "detector.pu_head.epochs": 4, "memory.budget": 60, "session.max_batch": 64}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(saved session path, stream batches, probe frames): a fresh session and digits to stream."""
    torch.set_num_threads(1)
    session, stream = digits_session(SETTINGS, epochs=2)
    order = np.random.default_rng(0).permutation(len(stream))
    frames = ROUNDS * SETTINGS["session.adapt_every"]
    batches = [stream.images[order[start:start + BATCH]] for start in range(0, frames, BATCH)]
    path = tmp_path_factory.mktemp("concurrency") / "fresh.state"
    session.save(path)
    return path, batches, stream.images[order[frames:frames + 64]]


def _key(prediction: Prediction) -> tuple[bytes, bytes, bytes]:
    return prediction.labels.tobytes(), prediction.novel.tobytes(), prediction.scores.tobytes()


def test_predict_from_a_second_thread_sees_only_whole_rounds(setup):
    path, batches, probe = setup
    alone = Session.load(path)
    snapshots = {_key(alone.predict(probe)): 0}
    for batch in batches:
        if alone.observe(batch):
            snapshots[_key(alone.predict(probe))] = alone.rounds
    assert alone.rounds == ROUNDS and len(snapshots) == ROUNDS + 1  # every round changes the answers

    shared = Session.load(path)
    answers: list[Prediction] = []
    failures: list[BaseException] = []
    first_answer, stop = threading.Event(), threading.Event()

    def predict_in_a_loop() -> None:
        torch.set_num_threads(1)
        try:
            while not stop.is_set():
                answers.append(shared.predict(probe))
                first_answer.set()
        except BaseException as exc:  # handed to the main thread, which fails the test with it
            failures.append(exc)
            first_answer.set()

    worker = threading.Thread(target=predict_in_a_loop, daemon=True)
    worker.start()
    assert first_answer.wait(timeout=60)
    for batch in batches:
        shared.observe(batch)
    seen_by_the_end = len(answers)
    while len(answers) == seen_by_the_end and worker.is_alive():
        first_answer.wait(timeout=0.01)  # one more answer, so the worker saw the last round too
    stop.set()
    worker.join(timeout=60)

    assert not failures, f"predict raised in the second thread: {failures[0]!r}"
    assert not worker.is_alive()
    for answer in answers:
        assert answer.labels.shape == (len(probe),) and answer.labels.dtype == np.int64
        assert answer.labels.min() >= 0 and answer.labels.max() < len(shared.classes)
    rounds_seen = {snapshots.get(_key(answer)) for answer in answers}
    assert None not in rounds_seen, "a concurrent prediction matched no whole round"
    assert {0, ROUNDS} <= rounds_seen
    assert _key(shared.predict(probe)) == _key(alone.predict(probe))
    assert (shared.rounds, shared.observed) == (alone.rounds, alone.observed)
