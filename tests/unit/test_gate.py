"""The promotion gate's five cases, as a pure decision."""

import pytest

from pipelines.steps.evaluate import Metrics
from pipelines.steps.register import GatePolicy, decide

pytestmark = pytest.mark.unit

POLICY = GatePolicy(min_auc=0.70, margin=0.005, slice_tolerance=0.03)


def m(auc: float, **slices: float) -> Metrics:
    return Metrics(auc=auc, average_precision=0.3, logloss=0.2, brier=0.05, rows=1000,
                   slices=slices or {"pos": auc, "online": auc})


def test_first_model_above_the_floor_is_promoted():
    promoted, failed, reason = decide(m(0.80), None, POLICY)
    assert promoted and not failed and "no champion yet" in reason


def test_shuffled_labels_are_blocked_by_the_floor():
    promoted, failed, reason = decide(m(0.51), None, POLICY)
    assert not promoted and len(failed) == 1 and "below the floor" in reason


def test_worse_model_is_blocked():
    promoted, _, reason = decide(m(0.78), m(0.82), POLICY)
    assert not promoted and "does not beat" in reason


def test_better_model_is_promoted():
    promoted, failed, reason = decide(m(0.85), m(0.82), POLICY)
    assert promoted and not failed and "beats" in reason


def test_within_margin_is_blocked():
    promoted, _, reason = decide(m(0.823), m(0.82), POLICY)
    assert not promoted and "margin" in reason


def test_slice_regression_is_blocked_even_when_overall_improves():
    candidate = m(0.86, pos=0.90, online=0.78, atm=0.9)
    champion = m(0.82, pos=0.82, online=0.84, atm=0.85)
    promoted, failed, reason = decide(candidate, champion, POLICY)
    assert not promoted
    assert failed == [f for f in failed if "online" in f] and "slice online regresses" in reason


def test_nan_auc_is_never_promoted():
    promoted, _, _ = decide(m(float("nan")), None, POLICY)
    assert not promoted


def sliced(auc: float, atm: float, positives: int, negatives: int) -> Metrics:
    return Metrics(auc=auc, average_precision=0.3, logloss=0.2, brier=0.05, rows=positives + negatives,
                   slices={"atm": atm}, slice_counts={"atm": [positives, negatives]})


def test_a_slice_drop_within_chance_on_few_positives_does_not_block():
    # 10 frauds in the slice: its AUC moves by about 0.18 by chance alone (Hanley and McNeil)
    promoted, failed, _ = decide(sliced(0.86, 0.85, 10, 400), sliced(0.83, 0.947, 10, 400), POLICY)
    assert promoted and not failed


def test_the_same_slice_drop_on_many_positives_blocks_and_says_why():
    promoted, failed, reason = decide(sliced(0.86, 0.85, 2000, 8000), sliced(0.83, 0.947, 2000, 8000), POLICY)
    assert not promoted and failed == [reason]
    assert reason == "slice atm regresses: AUC 0.8500 vs the champion's 0.9470 (tolerance 0.0300)"


def test_a_small_slice_regression_beyond_chance_still_blocks():
    promoted, _, reason = decide(sliced(0.86, 0.55, 10, 400), sliced(0.83, 0.95, 10, 400), POLICY)
    assert not promoted and "chance at 10 positives" in reason
