"""adamw_bf16.py: with FP32 moments it is torch.optim.AdamW exactly; with BF16 moments it tracks it closely; its
state round-trips through state_dict; bad hyperparameters raise ValueError."""
import copy

import pytest
import torch

from adamw_bf16 import AdamWBF16


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(64, 32, generator=g)), torch.nn.Parameter(torch.randn(32, generator=g))]


def _run(opt_cls, steps=30, **kw):
    """A few steps on fixed pseudo-random gradients; returns the parameters and the optimizer."""
    ps = _params()
    opt = opt_cls([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                  lr=1e-2, betas=(0.9, 0.95), eps=1e-8, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g) * 1e-2
        opt.step()
    return ps, opt


def test_fp32_moments_are_torch_adamw():
    """The reference: with fp32 moments the update is torch.optim.AdamW's (single-tensor path), bit for bit."""
    ours, _ = _run(AdamWBF16, moment_dtype=torch.float32)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_bf16_moments_track_fp32_adamw():
    """BF16 moments (the report's choice): state in bf16, and the weights stay close to fp32 AdamW's."""
    ours, opt = _run(AdamWBF16)
    ref, _ = _run(torch.optim.AdamW, foreach=False)
    start = _params()
    for p, r, p0 in zip(ours, ref, start):
        st = opt.state[p]
        assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
        moved = (r - p0).abs().mean()                          # how far 30 steps moved the weights
        assert (p - r).abs().mean() < 0.02 * moved             # bf16 moments: within 2% of that
        assert not torch.equal(p, r)                           # and not fp32 in disguise
    nbytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"]))
    assert nbytes == sum(p.numel() for p in ours) * 2 * 2      # 2 moments × 2 bytes per parameter


def test_state_dict_round_trip_keeps_bf16_and_continues_identically():
    ps, opt = _run(AdamWBF16, steps=10)
    ps2 = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt2 = AdamWBF16([{"params": ps2[:1], "weight_decay": 0.1}, {"params": ps2[1:], "weight_decay": 0.0}], lr=1e-2,
                     betas=(0.9, 0.95))
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt2.state.values())
    g = torch.Generator().manual_seed(5)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g) for p in ps]
        for p, p2, gr in zip(ps, ps2, grads):
            p.grad, p2.grad = gr.clone(), gr.clone()
        opt.step()
        opt2.step()
    for p, p2 in zip(ps, ps2):
        assert torch.equal(p, p2)


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="lr > 0"):
        AdamWBF16(_params(), lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        AdamWBF16(_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="floating-point"):
        AdamWBF16(_params(), moment_dtype=torch.int32)


def test_bf16_moments_are_rounded_only_where_they_are_stored():
    """The moments are rounded to bf16 only as they are stored for the next step; this step's update uses them in
    fp32. So the first step, from zero moments, is torch's AdamW bit for bit (an update from the rounded m and v
    is not)."""
    ours, opt = _run(AdamWBF16, steps=1)
    ref, _ = _run(torch.optim.AdamW, steps=1, foreach=False)
    assert all(s["exp_avg"].dtype == torch.bfloat16 for s in opt.state.values())
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
