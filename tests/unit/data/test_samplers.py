"""Pretraining batch samplers: data-parallel coverage, exact resume, validation."""

from types import SimpleNamespace

import pytest

from megatron.data.data_samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)


def global_batches(sampler_cls, total, consumed, mbs, dp, epochs=1, **kw):
    """Per step, the micro-batches of every DP rank: [[rank0 batch, rank1 batch, ...], ...]."""
    per_rank = []
    for rank in range(dp):
        sampler = sampler_cls(total, consumed, mbs, rank, dp, **kw)
        batches = []
        for _ in range(epochs):
            batches += list(sampler)
        per_rank.append(batches)
    assert len({len(b) for b in per_rank}) == 1, "ranks disagree on the number of steps"
    return [list(step) for step in zip(*per_rank)]


@pytest.mark.parametrize("mbs,dp", [(2, 3), (4, 1), (1, 4)])
def test_single_sampler_covers_each_global_batch_once(mbs, dp):
    total = 50
    steps = global_batches(MegatronPretrainingSampler, total, 0, mbs, dp)
    gbs = mbs * dp
    assert len(steps) == total // gbs
    for t, step in enumerate(steps):
        assert all(len(b) == mbs for b in step)
        # the union over ranks is exactly the t-th global batch, in rank order
        assert [i for b in step for i in b] == list(range(t * gbs, (t + 1) * gbs))


def test_single_sampler_resume_and_tail():
    full = global_batches(MegatronPretrainingSampler, 50, 0, 2, 3)
    for consumed_steps in (1, 4, 7):
        resumed = global_batches(MegatronPretrainingSampler, 50, consumed_steps * 6, 2, 3)
        assert resumed == full[consumed_steps:]
    tail = [list(MegatronPretrainingSampler(50, 42, 2, r, 3, drop_last=False)) for r in range(3)]
    assert tail == [[[42, 43], [48, 49]], [[44, 45]], [[46, 47]]]


@pytest.mark.parametrize("mbs,dp", [(2, 3), (3, 2), (5, 1)])
def test_random_sampler_covers_each_sample_once_per_epoch(mbs, dp):
    total = 61  # not a multiple of the global batch: the remainder is never drawn
    gbs = mbs * dp
    active = total - total % gbs
    epochs = global_batches(MegatronPretrainingRandomSampler, total, 0, mbs, dp, epochs=2)
    per_epoch = active // gbs
    assert len(epochs) == 2 * per_epoch
    for e in range(2):
        steps = epochs[e * per_epoch : (e + 1) * per_epoch]
        drawn = [i for step in steps for b in step for i in b]
        assert sorted(drawn) == list(range(active))  # each sample once in the epoch
        for step in steps:
            assert all(len(b) == mbs for b in step)
    # epoch-seeded: the two epochs use different orders
    assert epochs[:per_epoch] != epochs[per_epoch:]


def test_random_sampler_resumes_exactly():
    total, mbs, dp = 60, 2, 3
    # uninterrupted: two epochs from the start
    full = global_batches(MegatronPretrainingRandomSampler, total, 0, mbs, dp, epochs=2)
    for steps_done in (1, 4, 10, 13):
        consumed = steps_done * mbs * dp
        epochs_left = 2 if steps_done < 10 else 1
        resumed = global_batches(
            MegatronPretrainingRandomSampler, total, consumed, mbs, dp, epochs=epochs_left
        )
        assert resumed == full[steps_done:]
    # the sampler counts what it hands out, so iterating again continues the sequence
    sampler = MegatronPretrainingRandomSampler(total, 0, mbs, 0, dp)
    first = list(sampler)
    assert sampler.consumed_samples == total
    assert list(sampler) == [s[0] for s in full[len(first) :]]


def test_samplers_validate_inputs():
    with pytest.raises(ValueError, match="consumed_samples 10"):
        MegatronPretrainingSampler(10, 10, 1, 0, 1)
    with pytest.raises(ValueError, match="data_parallel_rank 2"):
        MegatronPretrainingSampler(10, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="--micro-batch-size"):
        MegatronPretrainingRandomSampler(10, 0, 0, 0, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        MegatronPretrainingRandomSampler(10, 3, 2, 0, 1)
    with pytest.raises(ValueError, match="total_samples=0"):
        MegatronPretrainingRandomSampler(0, 0, 2, 0, 1)


def test_build_pretraining_data_loader(monkeypatch):
    import megatron
    from megatron import global_vars

    class FakeMpu:
        @staticmethod
        def get_data_parallel_rank():
            return 1

        @staticmethod
        def get_data_parallel_world_size():
            return 2

    monkeypatch.setattr(megatron, "mpu", FakeMpu, raising=False)
    dataset = [{"text": i} for i in range(20)]
    args = SimpleNamespace(dataloader_type="single", micro_batch_size=3, num_workers=0)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    loader = build_pretraining_data_loader(dataset, consumed_samples=6)
    assert [b["text"].tolist() for b in loader] == [[9, 10, 11], [15, 16, 17]]
    args.dataloader_type = "cyclic"
    loader = build_pretraining_data_loader(dataset, consumed_samples=6)
    batches = [b["text"].tolist() for b in loader]
    assert len(batches) == 2 and all(9 <= i < 18 for b in batches for i in b)
    args.dataloader_type = "bogus"
    with pytest.raises(ValueError, match="--dataloader-type"):
        build_pretraining_data_loader(dataset, 0)
    assert build_pretraining_data_loader(None, 0) is None


def test_repeated_dataloader_starts_over(monkeypatch):
    """--repeated-dataloader: after the last full batch the loader reads the dataset again
    from its first sample (in order) or its next epoch (cyclic); a resumed run continues
    inside the current pass."""
    import itertools

    import megatron
    from megatron import global_vars
    from megatron.data.data_samplers import RepeatingLoader

    class FakeMpu:
        @staticmethod
        def get_data_parallel_rank():
            return 0

        @staticmethod
        def get_data_parallel_world_size():
            return 2

    monkeypatch.setattr(megatron, "mpu", FakeMpu, raising=False)
    dataset = [{"text": i} for i in range(10)]  # a pass: 2 batches of 2 x 2 (2 dropped)
    args = SimpleNamespace(dataloader_type="single", micro_batch_size=2, num_workers=0,
                           repeated_dataloader=True)
    monkeypatch.setattr(global_vars, "_GLOBAL_ARGS", args)
    loader = build_pretraining_data_loader(dataset, consumed_samples=0)
    assert isinstance(loader, RepeatingLoader)
    got = [b["text"].tolist() for b in itertools.islice(loader, 5)]
    assert got == [[0, 1], [4, 5], [0, 1], [4, 5], [0, 1]]
    assert loader.passes == 2
    # 12 consumed = one pass of 8 and one batch of 4: the second batch of a pass is next
    resumed = build_pretraining_data_loader(dataset, consumed_samples=12)
    assert [b["text"].tolist() for b in itertools.islice(resumed, 2)] == [[4, 5], [0, 1]]
    args.dataloader_type = "cyclic"
    cyclic = build_pretraining_data_loader(dataset, consumed_samples=0)
    epochs = [b["text"].tolist() for b in itertools.islice(cyclic, 6)]
    assert all(0 <= i < 4 for b in epochs for i in b)  # rank 0's bucket, every epoch
    assert sorted(sum(epochs[:2], [])) == [0, 1, 2, 3] == sorted(sum(epochs[2:4], []))
    args.repeated_dataloader = False
    args.dataloader_type = "single"
    assert len(list(build_pretraining_data_loader(dataset, 0))) == 2  # ends after a pass
    args.repeated_dataloader = True
    with pytest.raises(ValueError, match="--repeated-dataloader: the dataset holds 3"):
        build_pretraining_data_loader(dataset[:3], 0)
