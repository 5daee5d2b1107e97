"""The helpers the training scripts share (inference/training.py)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from inference.training import crop_with_padding, match_by_score, rng_stream, warmup_cosine


def test_a_crop_reaching_outside_the_image_is_padded():
    image = torch.arange(4 * 5 * 6, dtype=torch.float16).reshape(1, 4, 5, 6)
    crop = crop_with_padding(image, np.array([-1, 2, 3]), (3, 4, 4), pad_value=-7.0)
    assert crop.shape == (1, 3, 4, 4) and crop.dtype == torch.float32
    assert torch.equal(crop[0, 1:, :3, :3], image[0, 0:2, 2:5, 3:6].float())
    assert (crop[0, 0] == -7.0).all() and (crop[0, :, 3] == -7.0).all() and (crop[0, :, :, 3] == -7.0).all()
    assert (crop_with_padding(image, np.array([10, 10, 10]), (2, 2, 2), 0.5) == 0.5).all()


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine(step, warmup=10, total=110) for step in range(110)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0) and factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.02 + 0.98 * 0.5)
    assert warmup_cosine(110, warmup=10, total=110) == pytest.approx(0.02)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))


def test_matching_by_score_takes_each_lesion_once():
    lesions = [(0.0, 0.0, 0.0), (10.0, 0.0, 0.0)]
    findings = [(1.0, 0.0, 0.0), (0.5, 0.0, 0.0), (30.0, 0.0, 0.0)]
    matched, distances, false_positives = match_by_score(findings, [0.4, 0.9, 0.8], lesions, tolerance_mm=3.0)
    assert matched == [1, None] and distances == [0.5, None]  # the 0.9 finding takes the lesion first
    assert false_positives == 2  # the other near finding and the far one


def test_random_streams_are_independent_of_each_other():
    assert rng_stream(0, "val").random() == rng_stream(0, "val").random()
    assert rng_stream(0, "val").random() != rng_stream(0, "test").random()
    assert rng_stream(0, "val").random() != rng_stream(1, "val").random()
