"""POPE answer parsing and metrics (vlmfix.metrics.pope), on hand-computed fixtures."""

import pytest

from vlmfix.metrics import pope


@pytest.mark.parametrize("text, expected", [
    ("No.", "no"),
    ("No, there is not.", "no"),
    ("no", "no"),
    ("There is no dog", "no"),
    ("I do not see one", "no"),
    ("not,", "no"),                  # "," removed before splitting
    ("No\n", "no"),                  # stripped first, as LLaVA's answer files are
    ("Yes", "yes"),
    ("Yes. There is no cat.", "yes"),  # only the text before the first "." counts
    ("Not sure", "yes"),             # case-sensitive: "Not" is not "not"
    ("NO", "yes"),                   # case-sensitive
    ("Nope", "yes"),
    ("There isn't one", "yes"),      # "isn't" is not a listed word
    ("", "yes"),                     # the reference rule never leaves an answer unparsed
])
def test_reference_rule(text, expected):
    assert pope.parse_answer(text) == expected
    assert pope.parse_answer(text, rule="reference") == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes.", "yes"),
    ("yes, there is a dog", "yes"),
    ("NO", "no"),
    ('"No," it said', "no"),
    ("No.There is none", None),      # first word is "No.There"
    ("Not sure", None),
    ("There is a dog", None),
    ("", None),
    ("   ", None),
])
def test_strict_rule(text, expected):
    assert pope.parse_answer(text, rule="strict") == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), (" no \n", "no"), ("NO", "no"), ("Yes.", None), ("no dog", None), ("", None),
])
def test_exact_rule(text, expected):
    assert pope.parse_answer(text, rule="exact") == expected


def test_unknown_rule_names_the_valid_ones():
    with pytest.raises(ValueError, match="reference, strict, exact"):
        pope.parse_answer("yes", rule="lenient")
    with pytest.raises(ValueError, match="valid rules"):
        pope.format_table({"random": pope.pope_metrics(["yes"], ["yes"])}, rule="loose")


def test_metrics_hand_computed():
    preds = ["yes", "yes", "no", "no", "yes", None, None, "no"]
    labels = ["yes", "no", "no", "yes", "yes", "yes", "no", "no"]
    # TP: 0, 4 -> 2; FP: 1 -> 1; TN: 2, 7 -> 2; FN: 3 and the unparsed 5 -> 2;
    # the unparsed 6 (label "no") is in no cell but counts in N.
    m = pope.pope_metrics(preds, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"], m["unparsed"]) == (2, 1, 2, 2, 8, 2)
    assert m["accuracy"] == pytest.approx(4 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))  # = 4/7
    assert m["yes_ratio"] == pytest.approx(3 / 8)


def test_perfect_and_inverted():
    labels = ["yes", "no", "yes", "no"]
    assert pope.pope_metrics(labels, labels)["f1"] == 1.0
    inverted = pope.pope_metrics(["no", "yes", "no", "yes"], labels)
    assert (inverted["accuracy"], inverted["precision"], inverted["recall"]) == (0.0, 0.0, 0.0)
    assert inverted["yes_ratio"] == 0.5


def test_zero_divisions_are_zero():
    no_yes_pred = pope.pope_metrics(["no", "no"], ["yes", "no"])
    assert (no_yes_pred["precision"], no_yes_pred["recall"], no_yes_pred["f1"]) == (0.0, 0.0, 0.0)
    assert no_yes_pred["accuracy"] == 0.5
    no_yes_label = pope.pope_metrics(["no", "no"], ["no", "no"])
    assert (no_yes_label["recall"], no_yes_label["accuracy"]) == (0.0, 1.0)
    empty = pope.pope_metrics([], [])
    assert empty["n"] == 0 and all(empty[k] == 0.0 for k in pope.METRICS)
    all_unparsed = pope.pope_metrics([None, None], ["yes", "no"])
    assert (all_unparsed["accuracy"], all_unparsed["fn"], all_unparsed["unparsed"]) == (0.0, 1, 2)


@pytest.mark.parametrize("labels, match", [
    (["yes", "Yes"], "label 1 is 'Yes'"),
    ([True, "no"], "label 0 is True"),
    (["yes", None], "label 1 is None"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        pope.pope_metrics(["yes", "no"], labels)


def test_bad_predictions_and_lengths():
    with pytest.raises(ValueError, match="prediction 1 is 'No'"):
        pope.pope_metrics(["yes", "No"], ["yes", "no"])
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        pope.pope_metrics(["yes", "no", "no"], ["yes", "no"])


def test_mean_over_splits_and_table():
    per_split = {
        "random": pope.pope_metrics(["yes", "no", "no", "no"], ["yes", "no", "yes", "no"]),
        "adversarial": pope.pope_metrics(["yes", "yes", "yes", None], ["yes", "no", "yes", "no"]),
    }
    # random: acc 3/4, P 1, R 1/2, F1 2/3, yes 1/4; adversarial: acc 2/4, P 2/3, R 1, F1 4/5,
    # yes 3/4.
    mean = pope.mean_over_splits(per_split)
    assert mean["accuracy"] == pytest.approx((3 / 4 + 2 / 4) / 2)
    assert mean["precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert mean["recall"] == pytest.approx((1 / 2 + 1) / 2)
    assert mean["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert mean["yes_ratio"] == pytest.approx(0.5)
    table = pope.format_table(per_split, rule="strict")
    assert "'strict' rule" in table
    assert "| random | 75.0 | 100.0 | 50.0 | 66.7 | 25.0 | 4 | 0 |" in table
    assert "| adversarial | 50.0 | 66.7 | 100.0 | 80.0 | 75.0 | 4 | 1 |" in table
    assert "| mean | 62.5 | 83.3 | 75.0 | 73.3 | 50.0 |" in table
    with pytest.raises(ValueError, match="no POPE splits"):
        pope.mean_over_splits({})
