"""parallel.py and moe.dispatch_ep on CPU with gloo: every distributed result equals the single process.

Workers are forked from the pytest process (tests/dist_utils.py), tiny fp64 models, a few steps."""
import os

import pytest
import torch
import torch.distributed as dist

import parallel
from dist_utils import run_workers

pytestmark = pytest.mark.slow


# -- layout -------------------------------------------------------------------------------------------------------
def _layout_worker(rank, world, ep, pp):
    lay = parallel.init(ep=ep, pp=pp, device="cpu")
    groups = {name: dist.get_process_group_ranks(lay.group(name)) for name in ("pp", "dp", "efsdp", "ep")}
    return lay.describe(), lay.pp_rank, lay.dp_rank, lay.ep_rank, groups


def test_layout_of_8_ranks():
    """The picture in parallel.py's header: pp 2 × dp 4 with ep 2 on 8 ranks."""
    out = run_workers(_layout_worker, 8, 2, 2, init=False)
    for rank, (text, pp_rank, dp_rank, ep_rank, groups) in enumerate(out):
        assert text == "dp 4 × ep 2 × pp 2 on 8 ranks, gloo"
        assert (pp_rank, dp_rank, ep_rank) == (rank // 4, rank % 4, rank % 2)
        stage = 4 * (rank // 4)
        assert groups["dp"] == [stage, stage + 1, stage + 2, stage + 3]
        assert groups["ep"] == [rank - rank % 2, rank - rank % 2 + 1]
        assert groups["efsdp"] == [stage + rank % 2, stage + rank % 2 + 2]
        assert groups["pp"] == [rank % 4, rank % 4 + 4]


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by ep × pp"):
        parallel.check_sizes(6, 4, 1)
    with pytest.raises(ValueError, match="do not split evenly"):
        parallel.check_sizes(4, 4, 1, n_experts=6)
    assert parallel.check_sizes(8, 2, 2, n_experts=8) == 4


def test_ep_without_torchrun_raises(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        parallel.init(ep=2, device="cpu")
    assert not parallel.init(device="cpu").distributed


def test_dp_slices_cover_the_global_batch():
    batch = torch.arange(12).view(6, 2)
    lays = [parallel.Layout(rank=r, world=3, dp=3) for r in range(3)]
    assert torch.equal(torch.cat([parallel.dp_slice(batch, lay) for lay in lays]), batch)
