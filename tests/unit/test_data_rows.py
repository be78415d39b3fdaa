"""core/data_rows.py: reference answers as text, and DataError as it crosses processes."""

import pickle

import pytest

from core import data_rows
from core.data_rows import DataError


def test_clean_answer():
    assert data_rows.clean_answer("<answer> 42 </answer>") == "42"
    assert data_rows.clean_answer("\\boxed{\\sqrt{2}}") == "\\sqrt{2}"
    assert data_rows.clean_answer("\\boxed{1} + \\boxed{2}") == "\\boxed{1} + \\boxed{2}"  # not one outer wrapper
    assert data_rows.clean_answer(2.5) == "2.5" and data_rows.clean_answer(7) == "7"
    for bad, kind in [(None, "missing_field"), ("  ", "missing_field"), ("<answer></answer>", "missing_field"),
                      (True, "bad_type"), ({"a": 1}, "bad_type")]:
        with pytest.raises(DataError) as e:
            data_rows.clean_answer(bad)
        assert e.value.kind == kind


def test_data_error_pickles_and_is_a_value_error():
    err = DataError("bad_image", "broken", "f.parquet", 3)
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError)
    assert (again.kind, again.file, again.row, str(again)) == ("bad_image", "f.parquet", 3, str(err))
    assert str(err) == "f.parquet: row 3: bad_image: broken"
    assert set(data_rows.SKIP_KINDS) >= {"bad_json", "bad_type", "missing_field", "no_image", "missing_image_file",
                                    "empty_image", "bad_image", "image_too_large", "problem_too_long"}
