"""Metrics on hand-made embeddings where the answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from edgec.verify.metrics import agreement, cosine, recall_at_k, top1_accuracy, zero_shot_predictions


def test_recall_at_k_counts_own_captions_in_the_top_k():
    images = np.eye(3)
    captions = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1], [0, 1, 0.2]], float)
    # image 0 ranks captions 0, 1 first; image 1 ranks caption 3 first; image 2 ranks caption 2 first
    assert recall_at_k(images, captions, np.array([0, 2, 2, 1]), ks=(1, 2)) == {1: 1.0, 2: 1.0}
    r = recall_at_k(images, captions, np.array([1, 0, 2, 0]), ks=(1, 2))
    assert r[1] == pytest.approx(1 / 3) and r[2] == pytest.approx(2 / 3)


def test_cosine_agreement_accuracy():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(cosine(a, np.array([[2.0, 0.0], [1.0, 1.0]])), [1.0, np.sqrt(0.5)])
    text = np.array([[1.0, 0.0], [0.0, 1.0]])
    pred = zero_shot_predictions(a, text)
    assert pred.tolist() == [0, 1] and agreement(pred, np.array([0, 0])) == 0.5
    assert top1_accuracy(pred, np.array([0, -1])) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        cosine(a, text[:1])
