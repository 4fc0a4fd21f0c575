from __future__ import annotations

import numpy as np
import pytest

from safeclip.runtime.contract import Category, ImageSpec, Manifest
from safeclip.runtime.decision import Policy

CATS = ("neutral", "gun", "knife", "alcohol")


def manifest(thresholds=None) -> Manifest:
    return Manifest(
        model_id="m",
        model_hash="h",
        cls="final",
        image=ImageSpec(56, (0.5,) * 3, (0.5,) * 3),
        categories=tuple(Category(c, (c,), c == "neutral") for c in CATS),
        logit_scale=100.0,
        thresholds=thresholds or {"gun": 0.6, "knife": 0.6, "alcohol": 0.6},
        artifacts=(),
        outputs=("probs",),
        versions={},
        created="now",
    )


P = np.array(
    [
        [0.9, 0.05, 0.03, 0.02],  # neutral
        [0.1, 0.7, 0.1, 0.1],  # gun over 0.6
        [0.3, 0.55, 0.1, 0.05],  # gun under 0.6
        [0.0, 0.0, 0.0, 1.0],  # alcohol at 1.0
    ],
    dtype=np.float32,
)


def test_paper_rule():
    verdicts = Policy.from_manifest(manifest()).verdicts(P, ["a", "b", "c", "d"])
    assert [v.flagged for v in verdicts] == [False, True, False, True]
    assert verdicts[1].category == "gun" and verdicts[1].probability == pytest.approx(0.7)
    assert verdicts[1].flagged_categories == ("gun",)
    assert verdicts[2].category == "gun" and not verdicts[2].flagged
    assert verdicts[0].probabilities == pytest.approx(dict(zip(CATS, P[0].tolist(), strict=True)))
    assert [v.sha256 for v in verdicts] == ["a", "b", "c", "d"]


def test_flagged_is_the_verdicts_rule():
    for policy in (
        Policy.from_manifest(manifest()),
        Policy.from_manifest(manifest(), thresholds={"gun": 0.5}),
        Policy.from_manifest(manifest(), threshold=0.0),
    ):
        assert policy.flagged(P).tolist() == [v.flagged for v in policy.verdicts(P, list("abcd"))]


def test_thresholds_zero_and_one_flag_all_and_none():
    assert all(v.flagged for v in Policy.from_manifest(manifest(), threshold=0.0).verdicts(P, list("abcd")))
    assert not any(v.flagged for v in Policy.from_manifest(manifest(), threshold=1.0).verdicts(P, list("abcd")))


def test_threshold_zero_flags_a_probability_that_underflowed_to_zero():
    underflowed = np.array([[1.0, 0.0, 0.0, 0.0]], np.float32)
    assert Policy.from_manifest(manifest(), threshold=0.0).flagged(underflowed).tolist() == [True]
    [verdict] = Policy.from_manifest(manifest(), thresholds={"gun": 0.0}).verdicts(underflowed, ["a"])
    assert verdict.flagged_categories == ("gun",)


def test_per_category_override_and_disable():
    policy = Policy.from_manifest(manifest(), thresholds={"gun": 0.5}, disabled=("alcohol",))
    assert [v.flagged for v in policy.verdicts(P, list("abcd"))] == [False, True, True, False]
    assert "alcohol" not in policy.thresholds


def test_equals_authors_argmax_rule_for_thresholds_over_half():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4) * 0.3, size=2000).astype(np.float32)
    policy = Policy.from_manifest(manifest())
    ours = np.array([v.flagged for v in policy.verdicts(probs, ["x"] * len(probs))])
    top = probs.argmax(axis=1)
    authors = (top != 0) & (probs.max(axis=1) > 0.6)
    assert np.array_equal(ours, authors)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(thresholds={"cat": 0.5}), "unknown category 'cat'"),
        (dict(thresholds={"neutral": 0.5}), "neutral category"),
        (dict(threshold=1.5), "must be in \\[0, 1\\]"),
        (dict(disabled=("gun", "knife", "alcohol")), "every category is disabled"),
    ],
)
def test_bad_policies(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Policy.from_manifest(manifest(), **kwargs)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"expected probs \[N, 4\]"):
        Policy.from_manifest(manifest()).verdicts(np.zeros((2, 3), np.float32), ["a", "b"])
