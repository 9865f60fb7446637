"""Fine-tuning data without process groups: BERT pair packing, the epoch batches at any
data-parallel size, GLUE TSV and RACE JSON reading and their errors."""

from __future__ import annotations

import json

import pytest

from tasks.data_utils import TaskDataError, clean_text, pack_pair
from tasks.eval_utils import shard_batches
from tasks.finetune_utils import epoch_batches, steps_per_epoch
from tasks.glue.data import dataset_name_from_path, read_tsv
from tasks.race.data import dataset_name_from_path as race_name
from tasks.race.data import question_with_option, read_race_file

CLS, SEP, PAD = 101, 102, 0


def test_pack_pair_layout_and_truncation():
    ids, types, pad = pack_pair([5, 6], [7], 8, CLS, SEP, PAD)
    assert ids == [CLS, 5, 6, SEP, 7, SEP, PAD, PAD]
    assert types == [0, 0, 0, 0, 1, 1, 0, 0]
    assert pad == [1, 1, 1, 1, 1, 1, 0, 0]
    # too long: cut at s - 1, a closing [SEP] of the segment it ends
    ids, types, pad = pack_pair([5, 6], [7, 8, 9, 10], 6, CLS, SEP, PAD)
    assert ids == [CLS, 5, 6, SEP, 7, SEP] and types == [0, 0, 0, 0, 1, 1]
    ids, types, _ = pack_pair([5, 6, 7, 8], None, 4, CLS, SEP, PAD)
    assert ids == [CLS, 5, 6, SEP] and types == [0, 0, 0, 0]
    ids, _, pad = pack_pair([5], None, 4, CLS, SEP, PAD)
    assert ids == [CLS, 5, SEP, PAD] and pad == [1, 1, 1, 0]
    assert clean_text("a  b\n c . d") == "a b c. d"


def _flatten(steps):
    return [[i for mb in step for i in mb] for step in steps]


@pytest.mark.parametrize("keep_last", [False, True])
def test_epoch_batches_do_not_depend_on_data_parallel_size(keep_last):
    """DP=1 x 2 micro-batches and DP=2 x 1 see the same micro-batches in each step."""
    n, mbs = 21, 3
    serial = epoch_batches(n, 2, 1234, mbs, 1, 0, 2, keep_last)
    ranks = [epoch_batches(n, 2, 1234, mbs, 2, r, 1, keep_last) for r in range(2)]
    assert len(serial) == steps_per_epoch(n, 6, keep_last) == (4 if keep_last else 3)
    for step, micro_batches in enumerate(serial):
        assert sorted(micro_batches) == sorted(r[step][0] for r in ranks)
    seen = [i for step in _flatten(serial) for i in step]
    if keep_last:  # 21 = 3 x 6 + 3: the last step pads 3 to 4 with the epoch's first
        assert set(seen) == set(range(n)) and len(seen) == 22
        assert [len(mb) for mb in serial[-1]] == [2, 2]
    else:
        assert len(set(seen)) == len(seen) == 18
    assert serial == epoch_batches(n, 2, 1234, mbs, 1, 0, 2, keep_last)  # seeded
    assert _flatten(serial) != _flatten(epoch_batches(n, 3, 1234, mbs, 1, 0, 2, keep_last))


def test_eval_shards_cover_every_example_once():
    shards = [shard_batches(10, 4, r, 2) for r in range(2)]
    assert shards == [[[0, 1, 2, 3], [8, 9]], [[4, 5, 6, 7]]]


def test_dataset_names():
    assert dataset_name_from_path("data/glue_data/MNLI/dev_matched.tsv", "MNLI") == "dev-matched"
    assert dataset_name_from_path("/x/QQP/test.tsv", "QQP") == "test"
    assert dataset_name_from_path("/x/other/train.tsv", "QQP") == "train"
    assert race_name("data/RACE/dev/middle") == "dev-middle"
    assert race_name("/x/race_dev/high") == "race_dev-high"


def test_read_tsv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("id\tquestion1\tquestion2\n1\ta\tb\n\n2\ta\n")
    with pytest.raises(TaskDataError, match=rf"{path}:4: expected 3 tab-separated columns"):
        read_tsv(str(path))
    path.write_text("id\tquestion1\tquestion2\r\n1\ta\tb\r\n")
    assert read_tsv(str(path)) == (["id", "question1", "question2"], [(2, ["1", "a", "b"])])


def test_race_json_reading(tmp_path):
    doc = {"article": "a b", "questions": ["q _ ?"], "options": [["w", "x", "y", "z"]],
           "answers": ["B"]}
    path = tmp_path / "1.txt"
    path.write_text(json.dumps(doc) + "\n" + json.dumps(doc) + "\n")
    assert [line for line, _ in read_race_file(str(path))] == [1, 2]
    path.write_text(json.dumps(dict(doc, options=[["w", "x", "y"]])))
    with pytest.raises(TaskDataError, match=rf"{path}:1: question 0: expected 4 options"):
        read_race_file(str(path))
    path.write_text(json.dumps(doc) + "\n{\"article\": \n")
    with pytest.raises(TaskDataError, match=rf"{path}:3: not valid JSON"):
        read_race_file(str(path))
    assert question_with_option("the _ is red", "sky") == "the sky is red"
    assert question_with_option("why ?", "because") == "why ? because"
