"""BatchLoader: (x, y) shapes and contents, determinism, exact resume, disjoint ranks, validation."""
import numpy as np
import pytest
import torch

from fastlm.data import BatchLoader, ShardDataset
from fastlm.data.shards import write_shard


@pytest.fixture
def dataset(tmp_path):
    # Three shards of different lengths; token i of shard s is (s * 10000 + i) % 60000, so every
    # window is identifiable by its first token.
    sizes = [1000, 777, 1500]
    for s, n in enumerate(sizes):
        write_shard(tmp_path / f"train_{s:06d}.bin", (s * 10000 + np.arange(n)) % 60000, np.uint16)
    return ShardDataset(tmp_path, "train")


def test_batches_are_shifted_windows(dataset):
    loader = BatchLoader(dataset, batch_size=4, seq_len=16, seed=0, prefetch=0)
    x, y = loader.next()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all(y[:, -1] == x[:, -1] + 1)  # windows are contiguous runs of one shard
    assert loader.num_windows == 999 // 16 + 776 // 16 + 1499 // 16


def _take(loader, n):
    return [tuple(t.clone() for t in loader.next()) for _ in range(n)]


def test_deterministic_and_prefetch_invariant(dataset):
    a = _take(BatchLoader(dataset, 8, 16, seed=3, prefetch=0), 30)
    b = _take(BatchLoader(dataset, 8, 16, seed=3, prefetch=3), 30)
    c = _take(BatchLoader(dataset, 8, 16, seed=4, prefetch=2), 30)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c))


def test_resume_equality(dataset):
    full = _take(BatchLoader(dataset, 8, 16, seed=1), 40)  # crosses several epochs (171 windows)
    first = BatchLoader(dataset, 8, 16, seed=1)
    _take(first, 17)
    state = first.state_dict()
    first.close()
    resumed = BatchLoader(dataset, 8, 16, seed=1)
    resumed.next()  # a started prefetcher must be reset by load_state_dict
    resumed.load_state_dict(state)
    rest = _take(resumed, 23)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(full[17:], rest))
    with pytest.raises(ValueError, match="seq_len"):
        BatchLoader(dataset, 8, 32, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="global batch"):
        BatchLoader(dataset, 4, 16, seed=1).load_state_dict(state)


def test_epoch_visits_every_window_once(dataset):
    loader = BatchLoader(dataset, 9, 16, seed=0, prefetch=0)
    steps = loader.num_windows // 9
    firsts = [int(v) for _ in range(steps) for v in loader.next()[0][:, 0]]
    assert len(set(firsts)) == len(firsts) == steps * 9


def test_ranks_never_overlap(dataset):
    world, steps = 4, 4  # 4 ranks x 10 windows x 4 steps = 160 of 171 windows: one epoch
    seen = []
    for rank in range(world):
        loader = BatchLoader(dataset, 10, 16, seed=7, rank=rank, world_size=world)
        seen.append({int(v) for _ in range(steps) for v in loader.next()[0][:, 0]})
        assert len(seen[-1]) == 10 * steps
    for i in range(world):
        for j in range(i + 1, world):
            assert not seen[i] & seen[j], (i, j)
    # the global batch is the same whatever the world size
    single = BatchLoader(dataset, 40, 16, seed=7, world_size=1)
    assert {int(v) for _ in range(steps) for v in single.next()[0][:, 0]} == set().union(*seen)


def test_validation_iterates_a_fixed_set(dataset):
    val = BatchLoader(dataset, 5, 32, shuffle=False, max_batches=6)
    one, two = list(val), list(val)
    assert len(one) == len(val) == 6
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, two))
    firsts = [int(v) for x, _ in one for v in x[:, 0]]
    assert firsts == sorted(firsts)  # in order: windows 0, 1, 2, ...


def test_too_little_data_is_a_clear_error(dataset):
    with pytest.raises(ValueError, match=r"windows of seq_len \+ 1 = 1501 tokens"):
        BatchLoader(dataset, 2, 1500)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(dataset, 2, 16, rank=2, world_size=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_pinned_prefetch(dataset):
    loader = BatchLoader(dataset, 8, 16, seed=0, device="cuda")
    x, y = loader.next()
    assert x.is_cuda and loader.pin_memory
    ref = BatchLoader(dataset, 8, 16, seed=0, prefetch=0).next()
    assert torch.equal(x.cpu(), ref[0]) and torch.equal(y.cpu(), ref[1])
