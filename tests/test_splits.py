"""Folds by protocol and validation slides: no fold leaks a test slide or a test patient."""
from __future__ import annotations

import pytest

from hgc.data.splits import Fold, make_folds, validation_slides
from hgc.errors import InputError

HER2ST = {"B4": "B", "C2": "C", "C3": "C", "C4": "C", "C5": "C", "C6": "C"}


def test_patient_kfold_leaves_one_patient_out():
    folds = make_folds(HER2ST, "patient-kfold")
    assert [(f.name, f.train, f.test) for f in folds] == [
        ("patient-B", ["C2", "C3", "C4", "C5", "C6"], ["B4"]),
        ("patient-C", ["B4"], ["C2", "C3", "C4", "C5", "C6"]),
    ]
    with pytest.raises(InputError, match="two patients"):
        make_folds({"C2": "C", "C3": "C"}, "patient-kfold")


def test_slide_loso_leaves_one_slide_out():
    folds = make_folds(HER2ST, "slide-loso")
    assert len(folds) == 6
    for f, s in zip(folds, HER2ST):
        assert f.test == [s] and s not in f.train and len(f.train) == 5


def test_split_file(tmp_path):
    path = tmp_path / "split.tsv"
    path.write_text("slide\tfold\trole\nB4\tf1\ttest\nC2\tf1\ttrain\nC3\tf1\ttrain\nC3\tf2\ttest\nB4\tf2\ttrain\n")
    folds = make_folds(HER2ST, "split-file", path)
    assert [(f.name, f.train, f.test) for f in folds] == [("f1", ["C2", "C3"], ["B4"]), ("f2", ["B4"], ["C3"])]
    path.write_text("slide\tfold\trole\nB4\tf1\ttest\n")
    with pytest.raises(InputError, match="no training slide"):
        make_folds(HER2ST, "split-file", path)
    path.write_text("slide\tfold\trole\nZZ\tf1\ttest\n")
    with pytest.raises(InputError, match="ZZ"):
        make_folds(HER2ST, "split-file", path)
    path.write_text("slide\tfold\trole\nB4\tf1\tval\n")
    with pytest.raises(InputError, match="role"):
        make_folds(HER2ST, "split-file", path)
    with pytest.raises(InputError, match="--split-file"):
        make_folds(HER2ST, "split-file")
    with pytest.raises(InputError, match="protocol"):
        make_folds(HER2ST, "random")


def test_fold_validation():
    with pytest.raises(InputError, match="no training slide"):
        Fold("x", [], ["B4"])
    with pytest.raises(InputError, match="both training and test"):
        Fold("x", ["B4", "C2"], ["C2"])


def test_validation_slides_are_deterministic_training_slides():
    for f in make_folds(HER2ST, "slide-loso"):
        val = validation_slides(f, HER2ST, n=2, seed=3)
        assert len(val) == 2 and set(val) <= set(f.train)
        assert val == validation_slides(f, HER2ST, n=2, seed=3)
    # slide-loso fold of C2: C2's patient keeps training sections, so the validation slide is another
    # C section (one that leaves C sections in training), never B4, patient B's only section
    for seed in range(5):
        val = validation_slides(make_folds(HER2ST, "slide-loso")[1], HER2ST, seed=seed)
        assert len(val) == 1 and val[0].startswith("C") and val[0] != "C2"
    # slide-loso fold of B4: no training section is B's, so any C section is as good
    assert validation_slides(make_folds(HER2ST, "slide-loso")[0], HER2ST)[0].startswith("C")
    # a patient-level fold prefers a patient with a single training section (as unseen as the test)
    patients = {"a1": "a", "a2": "a", "b1": "b", "c1": "c"}
    fold = make_folds(patients, "patient-kfold")[2]  # test c1; training a1, a2, b1
    assert {validation_slides(fold, patients, seed=s)[0] for s in range(10)} == {"b1"}
    patients["a3"] = "a"  # slide-loso fold of a1: a2 or a3, each leaving a section of a in training
    assert {validation_slides(make_folds(patients, "slide-loso")[0], patients, seed=s)[0] for s in range(10)} == {"a2", "a3"}
    seeds = {tuple(validation_slides(make_folds(HER2ST, "patient-kfold")[0], HER2ST, seed=s)) for s in range(10)}
    assert len(seeds) > 1
    assert validation_slides(make_folds(HER2ST, "patient-kfold")[1], HER2ST) == []  # sole training slide stays
