"""GPTDataset, its index caches, blending and split strings, on tiny .bin/.idx corpora."""

import os

import numpy as np
import pytest

from megatron.data import gpt_dataset
from megatron.data.blendable_dataset import BlendableDataset
from megatron.data.dataset_utils import (
    cache_prefix,
    get_datasets_weights_and_num_samples,
    get_samples_mapping,
    get_train_valid_test_split_,
    index_cache_dir,
)
from megatron.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets
from megatron.data.indexed_dataset import (
    data_file_path,
    index_file_path,
    make_builder,
    make_dataset,
)
from tests.dist_utils import run_distributed


def write_corpus(prefix, documents, vocab_size=1000):
    """Write documents (each a list of sentences, each a list of ids) with the real builder."""
    builder = make_builder(data_file_path(prefix), "mmap", vocab_size=vocab_size)
    for doc in documents:
        for sentence in doc:
            builder.add_item(np.asarray(sentence, dtype=np.int64))
        builder.end_document()
    builder.finalize(index_file_path(prefix))
    return make_dataset(prefix, "mmap", skip_warmup=True)


def random_docs(num_docs, seed, low=0, high=1000, max_len=30):
    rng = np.random.RandomState(seed)
    return [
        [rng.randint(low, high, size=rng.randint(1, max_len)).tolist()] for _ in range(num_docs)
    ]


@pytest.fixture
def corpus(tmp_path):
    docs = random_docs(12, seed=0)
    prefix = str(tmp_path / "corpus_text_document")
    return prefix, docs, write_corpus(prefix, docs)


def expected_window(docs, doc_idx, k, seq_length):
    stream = np.concatenate([docs[d][0] for d in doc_idx])
    return stream[k * seq_length : k * seq_length + seq_length + 1]


def cache_files(prefix, name, num_samples, seq_length, seed):
    return gpt_dataset.index_cache_paths(prefix, name, num_samples, seq_length, seed)


def test_samples_are_windows_of_the_document_stream(corpus):
    prefix, docs, indexed = corpus
    seq_length, num_samples = 7, 60  # > 1 epoch of ~170 tokens
    ds = GPTDataset("train", prefix, np.arange(12, dtype=np.int32), indexed, num_samples,
                    seq_length, seed=1234)  # fmt: skip
    tokens_per_epoch = sum(len(d[0]) for d in docs)
    num_epochs = len(ds.doc_idx) // 12
    assert num_epochs >= 2 and len(ds) == (num_epochs * tokens_per_epoch - 1) // seq_length
    assert len(ds) >= num_samples
    # every document appears once per epoch
    assert np.array_equal(np.bincount(ds.doc_idx, minlength=12), np.full(12, num_epochs))
    stream = np.concatenate([docs[d][0] for d in ds.doc_idx])
    seen = np.zeros(len(stream), dtype=bool)
    assert sorted(ds.shuffle_idx.tolist()) == list(range(len(ds)))
    for i in range(len(ds)):
        k = int(ds.shuffle_idx[i])
        text = ds[i]["text"]
        assert text.dtype == np.int64 and text.shape == (seq_length + 1,)
        assert np.array_equal(text, stream[k * seq_length : (k + 1) * seq_length + 1])
        seen[k * seq_length : (k + 1) * seq_length + 1] = True
    # consecutive windows overlap by one token and together cover all but < seq_length
    # tokens at the very end of the last epoch
    assert seen[: len(stream) - seq_length + 1].all()


def test_separate_last_epoch_and_determinism(tmp_path, corpus):
    prefix, docs, indexed = corpus
    tokens_per_epoch = sum(len(d[0]) for d in docs)
    seq_length = 5
    per_epoch = (tokens_per_epoch - 1) // seq_length
    num_samples = per_epoch + 3  # the second epoch is barely used: shuffled apart
    docs_arr = np.arange(12, dtype=np.int32)
    ds = GPTDataset("train", prefix, docs_arr, indexed, num_samples, seq_length, seed=7)
    assert len(ds.doc_idx) == 24
    assert sorted(ds.doc_idx[:12].tolist()) == list(range(12))
    assert sorted(ds.doc_idx[12:].tolist()) == list(range(12))
    first = (tokens_per_epoch - 1) // seq_length
    assert sorted(ds.shuffle_idx[:first].tolist()) == list(range(first))
    assert sorted(ds.shuffle_idx[first:].tolist()) == list(range(first, len(ds)))

    other = str(tmp_path / "copy")
    copy = write_corpus(other, docs)
    same = GPTDataset("train", other, docs_arr, copy, num_samples, seq_length, seed=7)
    reseeded = GPTDataset("train", other, docs_arr, copy, num_samples, seq_length, seed=8)
    for a, b in zip((ds.doc_idx, ds.sample_idx, ds.shuffle_idx),
                    (same.doc_idx, same.sample_idx, same.shuffle_idx)):  # fmt: skip
        assert np.array_equal(a, b)
    assert not np.array_equal(ds.shuffle_idx, reseeded.shuffle_idx)


def test_caches_are_reused_and_rebuilt_when_corrupt(corpus, monkeypatch, capsys):
    prefix, docs, indexed = corpus
    docs_arr = np.arange(12, dtype=np.int32)
    ds = GPTDataset("valid", prefix, docs_arr, indexed, 30, 8, seed=3)
    paths = cache_files(prefix, "valid", 30, 8, 3)
    assert all(os.path.exists(p) for p in paths)
    assert [os.path.basename(p) for p in paths] == [
        "corpus_text_document_valid_indexmap_30ns_8sl_3s_doc_idx.npy",
        "corpus_text_document_valid_indexmap_30ns_8sl_3s_sample_idx.npy",
        "corpus_text_document_valid_indexmap_30ns_8sl_3s_shuffle_idx.npy",
    ]
    original = [np.array(a) for a in (ds.doc_idx, ds.sample_idx, ds.shuffle_idx)]

    def no_build(*args):
        raise AssertionError("index caches were rebuilt although they are valid")

    with monkeypatch.context() as m:
        m.setattr(gpt_dataset, "_build_doc_idx", no_build)
        again = GPTDataset("valid", prefix, docs_arr, indexed, 30, 8, seed=3)
    assert np.array_equal(again.sample_idx, original[1])

    with open(paths[1], "r+b") as f:  # truncate the sample index
        f.truncate(os.path.getsize(paths[1]) // 2)
    capsys.readouterr()
    rebuilt = GPTDataset("valid", prefix, docs_arr, indexed, 30, 8, seed=3)
    out = capsys.readouterr().out
    assert paths[1] in out and "rebuilding" in out
    for a, b in zip(original, (rebuilt.doc_idx, rebuilt.sample_idx, rebuilt.shuffle_idx)):
        assert np.array_equal(a, b)
    assert not [f for f in os.listdir(os.path.dirname(prefix)) if ".tmp" in f]


def test_index_cache_dir_moves_the_caches(corpus, tmp_path):
    """--data-cache-path: GPT and BERT/T5 index caches go to that folder (created when
    missing) under the corpus name and a hash of its path; beside the data otherwise."""
    prefix, _, indexed = corpus
    cache = tmp_path / "caches" / "nested"
    with index_cache_dir(str(cache)):
        ds = GPTDataset("train", prefix, np.arange(12, dtype=np.int32), indexed, 20, 8, seed=3)
        mapping = get_samples_mapping(indexed, prefix, None, 10, 16, 0.1, 3, "train", False)
        moved = cache_files(prefix, "train", 20, 8, 3)
        same_name = cache_prefix(str(tmp_path / "elsewhere" / os.path.basename(prefix)))
        here = cache_prefix(prefix)
    assert len(ds) >= 20 and mapping.shape[1] == 3
    assert all(os.path.dirname(p) == str(cache) and os.path.exists(p) for p in moved)
    assert len(os.listdir(cache)) == 4  # doc, sample, shuffle + the samples mapping
    assert same_name != here and os.path.dirname(same_name) == os.path.dirname(here)
    assert not [f for f in os.listdir(os.path.dirname(prefix)) if f.endswith(".npy")]
    assert cache_prefix(prefix) == prefix  # outside the block: beside the data


def _two_rank_build(rank, world_size, tmp_dir):
    import torch

    prefix = os.path.join(tmp_dir, "shared_text_document")
    docs = random_docs(10, seed=1)
    if rank == 0:
        write_corpus(prefix, docs)
    torch.distributed.barrier()
    indexed = make_dataset(prefix, "mmap", skip_warmup=True)
    if rank == 1:
        # only rank 0 may build; rank 1 must find the files rank 0 wrote
        gpt_dataset._build_doc_idx = None
    ds = GPTDataset("train", prefix, np.arange(10, dtype=np.int32), indexed, 40, 6, seed=5)
    mapping = get_samples_mapping(indexed, prefix, None, 20, 16, 0.1, 5, "train", False)
    out = [np.array(a) for a in (ds.doc_idx, ds.sample_idx, ds.shuffle_idx, mapping)]

    # with tensor parallelism only tensor-parallel rank 0 builds datasets: no hang
    from megatron import mpu

    mpu.initialize_model_parallel(tensor_model_parallel_size=2)
    try:
        if mpu.get_tensor_model_parallel_rank() == 0:
            tp_ds = GPTDataset("valid", prefix, np.arange(10, dtype=np.int32), indexed, 9, 6, 5)
            assert len(tp_ds) >= 9
    finally:
        mpu.destroy_model_parallel()
    return out


def test_rank_0_builds_while_rank_1_waits(tmp_path):
    r0, r1 = run_distributed(_two_rank_build, world_size=2, args=(str(tmp_path),), timeout=120)
    for a, b in zip(r0, r1):
        assert np.array_equal(a, b)
    assert r0[3].shape[1] == 3 and len(r0[3]) > 0


def test_blending_follows_weights(tmp_path):
    # corpus a uses ids < 500, corpus b ids >= 500: every sample names its source
    a = write_corpus(str(tmp_path / "a"), random_docs(20, seed=2, high=500))
    b = write_corpus(str(tmp_path / "b"), random_docs(20, seed=3, low=500))
    ds_a = GPTDataset("train", str(tmp_path / "a"), np.arange(20, dtype=np.int32), a, 400, 4, 1)
    ds_b = GPTDataset("train", str(tmp_path / "b"), np.arange(20, dtype=np.int32), b, 800, 4, 1)
    blend = BlendableDataset([ds_a, ds_b], [1.0, 3.0], size=1000)
    assert len(blend) == 1000
    for n in (10, 100, 1000):  # every prefix is within a sample of the target mix
        assert abs(np.sum(blend.dataset_index[:n] == 0) - 0.25 * n) <= 1
    from_a = [int(blend[i]["text"].max() < 500) for i in range(200)]
    assert from_a == (blend.dataset_index[:200] == 0).astype(int).tolist()
    # each dataset is read in order, each of its samples at most once
    assert np.array_equal(blend.dataset_sample_index[blend.dataset_index == 0], np.arange(250))
    with pytest.raises(ValueError, match="needs .* from dataset 0"):
        BlendableDataset([ds_a, ds_b], [0.9, 0.1], size=2000)


def test_build_train_valid_test_datasets_weighted_and_separate(tmp_path):
    pa, pb = str(tmp_path / "a"), str(tmp_path / "b")
    write_corpus(pa, random_docs(40, seed=4, high=500))
    write_corpus(pb, random_docs(40, seed=5, low=500))
    train, valid, test = build_train_valid_test_datasets(
        ["0.3", pa, "0.7", pb], "mmap", "90,10,0", [200, 20, 0], 8, 1234, True
    )
    assert test is None and len(train) == 200 and len(valid) == 20
    frac_a = np.mean([train[i]["text"].max() < 500 for i in range(200)])
    assert abs(frac_a - 0.3) < 0.01
    # a dataset asked for ceil(200 * 0.3 * 1.005) = 61 samples caches that name
    assert os.path.exists(pa + "_train_indexmap_61ns_8sl_1234s_doc_idx.npy")

    single, _, _ = build_train_valid_test_datasets([pa], "mmap", "949,50,1", [30, 5, 1], 8, 1, True)
    assert isinstance(single, GPTDataset) and single.doc_idx.max() < 38

    tr, va, te = build_train_valid_test_datasets(
        None, "mmap", "", [30, 10, 0], 8, 1, True, train_data_prefix=[pa], valid_data_prefix=[pb]
    )
    assert te is None and sorted(set(tr.doc_idx.tolist())) == list(range(40))
    assert va[0]["text"].min() >= 500

    group = gpt_dataset.build_dataset_group(
        "mix", [pa, pb], [1, 3], ["50,50,0", "50,50,0"], "mmap", [40, 40, 0], 8, 1, True,
        "valid",
    )  # fmt: skip
    assert isinstance(group, BlendableDataset) and len(group) == 40
    assert [d.name for d in group.datasets] == ["mix_valid", "mix_valid"]
    assert all(d.doc_idx.min() >= 20 for d in group.datasets)


def test_split_strings_and_weights():
    assert get_train_valid_test_split_("949,50,1", 1000) == [0, 949, 999, 1000]
    assert get_train_valid_test_split_("90/10", 100) == [0, 90, 100, 100]
    assert get_train_valid_test_split_("1", 7) == [0, 7, 7, 7]
    assert get_train_valid_test_split_("1,1,1", 10)[-1] == 10
    for bad in ("a,b", "1,-1", "0,0", "1,1,1,1"):
        with pytest.raises(ValueError, match="--split"):
            get_train_valid_test_split_(bad, 10)
    prefixes, weights, counts = get_datasets_weights_and_num_samples(
        ["3", "a", "1", " b "], [1000, 100, 10]
    )
    assert prefixes == ["a", "b"] and weights == [0.75, 0.25]
    assert counts == [[754, 76, 8], [252, 26, 3]]
    with pytest.raises(ValueError, match="--data-path"):
        get_datasets_weights_and_num_samples(["0.5", "a", "b"], [1, 1, 1])
