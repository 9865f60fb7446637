"""The compiled index builders against plain-Python versions of the same algorithms.

The BERT/ICT mappings draw from std::mt19937 (target lengths) and std::mt19937_64 (final
shuffle); the references below implement both generators and are first checked against
the C++ standard's published values, so the comparison is exact, shuffle included.
"""

import numpy as np
import pytest

from megatron.data import _helpers

helpers = _helpers.get_helpers()

_M32 = 0xFFFFFFFF
_M64 = 0xFFFFFFFFFFFFFFFF


class MT19937:
    """std::mt19937: 32-bit Mersenne Twister with the standard seeding."""

    def __init__(self, seed: int) -> None:
        mt = [seed & _M32]
        for i in range(1, 624):
            mt.append((1812433253 * (mt[-1] ^ (mt[-1] >> 30)) + i) & _M32)
        self.mt, self.pos = mt, 624

    def __call__(self) -> int:
        if self.pos == 624:
            mt = self.mt
            for i in range(624):
                y = (mt[i] & 0x80000000) | (mt[(i + 1) % 624] & 0x7FFFFFFF)
                mt[i] = mt[(i + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.pos = 0
        y = self.mt[self.pos]
        self.pos += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        return y ^ (y >> 18)


class MT19937_64:
    """std::mt19937_64."""

    def __init__(self, seed: int) -> None:
        mt = [seed & _M64]
        for i in range(1, 312):
            mt.append((6364136223846793005 * (mt[-1] ^ (mt[-1] >> 62)) + i) & _M64)
        self.mt, self.pos = mt, 312

    def __call__(self) -> int:
        if self.pos == 312:
            mt = self.mt
            for i in range(312):
                x = (mt[i] & 0xFFFFFFFF80000000) | (mt[(i + 1) % 312] & 0x7FFFFFFF)
                mt[i] = mt[(i + 156) % 312] ^ (x >> 1) ^ (0xB5026F5AA96619E9 if x & 1 else 0)
            self.pos = 0
        x = self.mt[self.pos]
        self.pos += 1
        x ^= (x >> 29) & 0x5555555555555555
        x ^= (x << 17) & 0x71D67FFFEDA60000 & _M64
        x ^= (x << 37) & 0xFFF7EEE000000000 & _M64
        return x ^ (x >> 43)


def test_reference_generators_match_the_cpp_standard():
    # [rand.predef]: the 10000th draw of a default-seeded (5489) engine.
    g32, g64 = MT19937(5489), MT19937_64(5489)
    for _ in range(9999):
        g32(), g64()
    assert g32() == 4123659995
    assert g64() == 9981545732273789042


# ------------------------------------------------------------------------------ references


def ref_sample_idx(sizes, doc_idx, seq_length, num_epochs, tokens_per_epoch):
    num_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    rows = [(0, 0)]
    pos, offset = 0, 0
    for _ in range(num_samples):
        remaining = seq_length + 1
        while remaining:
            left = int(sizes[doc_idx[pos]]) - offset
            if left >= remaining:  # sample ends here; next starts on its last token
                offset += remaining - 1
                remaining = 0
            else:
                remaining -= left
                pos, offset = pos + 1, 0
        rows.append((pos, offset))
    return np.array(rows, dtype=np.int32)


def ref_blending(weights, size):
    counts = [0] * len(weights)
    index, sample = [], []
    for i in range(size):
        errors = [w * max(i, 1) - c for w, c in zip(weights, counts)]
        best = int(np.argmax(errors))  # first maximum, as the strict '>' in the C++
        index.append(best)
        sample.append(counts[best])
        counts[best] += 1
    return np.array(index, np.uint8), np.array(sample, np.int64)


def ref_shuffle(rows, seed):
    gen = MT19937_64(seed + 1)
    for i in range(len(rows) - 1, 0, -1):
        j = gen() % (i + 1)
        rows[i], rows[j] = rows[j], rows[i]
    return rows


def ref_mapping(docs, sizes, num_epochs, max_num_samples, max_seq_length, prob, seed, min_sent):
    ratio = int(round(1.0 / prob)) if prob > 0 else 0
    gen = MT19937(seed)

    def target():
        if ratio == 0:
            return max_seq_length
        r = gen()
        return 2 + r % (max_seq_length - 1) if r % ratio == 0 else max_seq_length

    rows = []
    for _ in range(num_epochs):
        if len(rows) >= max_num_samples:
            break
        for d in range(len(docs) - 1):
            first, last = int(docs[d]), int(docs[d + 1])
            n = last - first
            if n > 1 and any(sizes[s] > 512 for s in range(first, last)):
                continue
            if n < min_sent:
                continue
            start, length, count, goal = first, 0, 0, target()
            for s in range(first, last):
                length, count, left = length + int(sizes[s]), count + 1, last - s - 1
                if (length >= goal and left > 1 and count >= min_sent) or left == 0:
                    rows.append((start, s + 1, goal))
                    start, length, count, goal = s + 1, 0, 0, target()
    return np.array(ref_shuffle(rows, seed), dtype=np.uint32).reshape(-1, 3)


def ref_blocks(docs, sizes, titles, num_epochs, max_num_samples, max_seq_length, seed, one_sent):
    min_sent = 1 if one_sent else 2
    rows = []
    for _ in range(num_epochs):
        if len(rows) >= max_num_samples:
            break
        block = 0
        for d in range(len(docs) - 1):
            first, last = int(docs[d]), int(docs[d + 1])
            goal = max_seq_length - int(titles[d])
            if last - first < min_sent or any(sizes[s] > 512 for s in range(first, last)):
                continue
            start, length, count = first, 0, 0
            for s in range(first, last):
                length, count, left = length + int(sizes[s]), count + 1, last - s - 1
                if (length >= goal and left >= min_sent and count >= min_sent) or left == 0:
                    rows.append((start, s + 1, d, block))
                    start, length, count, block = s + 1, 0, 0, block + 1
    return np.array(ref_shuffle(rows, seed), dtype=np.uint32).reshape(-1, 4)


def random_corpus(rng, num_docs, long_prob=0.03):
    """docs (sentence boundaries, int64) and sentence sizes (int32), a few empty/long docs."""
    per_doc = rng.integers(0, 9, size=num_docs)
    docs = np.concatenate([[0], np.cumsum(per_doc)]).astype(np.int64)
    sizes = rng.integers(1, 60, size=int(docs[-1])).astype(np.int32)
    long = rng.random(sizes.size) < long_prob
    sizes[long] = 600
    return docs, sizes


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("doc_dtype", [np.int32, np.int64])
def test_build_sample_idx_matches_reference(doc_dtype):
    rng = np.random.default_rng(0)
    for trial in range(5):
        sizes = rng.integers(1, 50, size=40).astype(np.int32)
        epochs = int(rng.integers(1, 4))
        doc_idx = np.concatenate([rng.permutation(40) for _ in range(epochs)]).astype(doc_dtype)
        tokens = int(sizes.sum())
        seq = int(rng.integers(2, 40)) if trial else 1000  # one sample spans many documents
        got = helpers.build_sample_idx(sizes, doc_idx, seq, epochs, tokens)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ref_sample_idx(sizes, doc_idx, seq, epochs, tokens))


def test_build_sample_idx_rejects_too_few_tokens():
    sizes = np.full(4, 10, np.int32)
    with pytest.raises(ValueError, match="fewer tokens"):
        helpers.build_sample_idx(sizes, np.arange(4, dtype=np.int32), 8, 2, 40)


def test_build_blending_indices_matches_reference():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5):
        weights = rng.random(n)
        weights /= weights.sum()
        index = np.zeros(997, np.uint8)
        sample = np.zeros(997, np.int64)
        helpers.build_blending_indices(index, sample, weights, n, 997, False)
        ref_index, ref_sample = ref_blending(list(weights), 997)
        np.testing.assert_array_equal(index, ref_index)
        np.testing.assert_array_equal(sample, ref_sample)
        assert np.abs(np.bincount(index, minlength=n) / 997 - weights).max() < 0.01


def test_build_blending_indices_rejects_wrong_output_dtype():
    with pytest.raises(ValueError, match="dataset_index has dtype int64"):
        helpers.build_blending_indices(
            np.zeros(4, np.int64), np.zeros(4, np.int64), np.array([0.5, 0.5]), 2, 4, False
        )


@pytest.mark.parametrize(
    "min_sent,prob,max_samples", [(2, 0.1, 10**9), (1, 0.3, 10**9), (2, 0.0, 50)]
)
def test_build_mapping_matches_reference(min_sent, prob, max_samples):
    rng = np.random.default_rng(2)
    docs, sizes = random_corpus(rng, 120)
    args = (3, max_samples, 64, prob, 1234, False, min_sent)
    got = helpers.build_mapping(docs, sizes, *args)
    assert got.dtype == np.uint32 and got.shape[1] == 3
    ref = ref_mapping(docs, sizes, 3, max_samples, 64, prob, 1234, min_sent)
    np.testing.assert_array_equal(got, ref)
    if max_samples == 50:  # the limit is checked at each epoch start
        assert 50 <= len(got) < len(ref_mapping(docs, sizes, 3, 10**9, 64, 0.0, 1234, 2))


@pytest.mark.parametrize("one_sent", [False, True])
def test_build_blocks_mapping_matches_reference(one_sent):
    rng = np.random.default_rng(3)
    docs, sizes = random_corpus(rng, 100)
    titles = rng.integers(1, 12, size=100).astype(np.int32)
    got = helpers.build_blocks_mapping(docs, sizes, titles, 2, 10**9, 80, 77, False, one_sent)
    assert got.dtype == np.uint32 and got.shape[1] == 4
    np.testing.assert_array_equal(got, ref_blocks(docs, sizes, titles, 2, 10**9, 80, 77, one_sent))


def test_mappings_stop_when_no_document_yields_a_sample():
    """A split whose documents all have one sentence (or a sentence over 512 tokens) gives no
    sample in any epoch; with no epoch limit (2**31 - 2 epochs, as get_samples_mapping asks)
    the builders must return an empty mapping at once instead of looping over every epoch."""
    docs = np.arange(0, 41, dtype=np.int64)  # 40 one-sentence documents
    sizes = np.full(40, 30, np.int32)
    unbounded = 2**31 - 2
    got = helpers.build_mapping(docs, sizes, unbounded, 64, 509, 0.1, 1234, False, 2)
    assert got.shape == (0, 3)
    long_docs = np.array([0, 3, 6], np.int64)  # two documents, each with a 600-token sentence
    long_sizes = np.array([10, 600, 10, 10, 600, 10], np.int32)
    got = helpers.build_mapping(long_docs, long_sizes, unbounded, 64, 509, 0.1, 1234, False, 1)
    assert got.shape == (0, 3)
    titles = np.ones(2, np.int32)
    got = helpers.build_blocks_mapping(
        long_docs, long_sizes, titles, unbounded, 64, 80, 7, False, False
    )
    assert got.shape == (0, 4)


def test_mapping_rejects_bad_docs():
    with pytest.raises(ValueError, match="docs holds a sentence index outside sizes"):
        helpers.build_mapping(
            np.array([0, 5], np.int64), np.ones(3, np.int32), 1, 10, 16, 0.1, 1, False, 2
        )


def test_get_helpers_builds_when_import_fails(monkeypatch):
    """Without an importable module, get_helpers compiles once (under the lock), then imports."""
    calls = []
    state = {"built": False}

    def fake_import():
        return helpers if state["built"] else None

    def fake_build():
        calls.append(1)
        state["built"] = True

    monkeypatch.setattr(_helpers, "_helpers", None)
    monkeypatch.setattr(_helpers, "_import", fake_import)
    monkeypatch.setattr(_helpers, "_build_in_place", fake_build)
    assert _helpers.get_helpers() is helpers
    assert _helpers.get_helpers() is helpers
    assert calls == [1]


def test_compile_command_targets_this_source():
    cmd = _helpers._compile_command("/tmp/out.so")
    assert cmd[-3:] == [_helpers._SOURCE, "-o", "/tmp/out.so"] and "-shared" in cmd


@pytest.mark.parametrize(
    "pybind11_version,numpy_version,broken",
    [("2.11.1", "2.0.0", True), ("2.10.4", "2.5.2", True), ("2.12.0", "2.0.0", False),
     ("3.0.1", "2.5.2", False), ("2.10.4", "1.26.4", False), ("2.13.6", "2.3.0rc1", False)],
)
def test_numpy2_needs_pybind11_2_12(pybind11_version, numpy_version, broken):
    """An extension built with pybind11 < 2.12 reads NumPy 2 arrays with NumPy 1's layout
    and crashes in the index builders (a segmentation fault while building the BERT samples
    mapping); the pair is refused with a message that says what to install."""
    problem = _helpers.numpy_abi_problem(pybind11_version, numpy_version)
    assert (problem is not None) == broken
    if broken:
        assert "pybind11>=2.12" in problem and pybind11_version in problem


def test_the_extension_records_its_pybind11_and_get_helpers_checks_it(monkeypatch):
    import pybind11

    built = helpers.pybind11_version
    assert built == ".".join(pybind11.__version__.split(".")[:2])
    monkeypatch.setattr(_helpers, "_helpers", None)
    monkeypatch.setattr(helpers, "pybind11_version", "2.10", raising=False)
    monkeypatch.setattr(np, "__version__", "2.1.0")
    with pytest.raises(RuntimeError, match="pybind11 2.10, which predates NumPy 2"):
        _helpers.get_helpers()
