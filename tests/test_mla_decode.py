"""The fused absorbed attention (mla_decode.py) against its references: latent_attention_ref is the attention part of
mla.MLA._attend_absorb with the mask given as positions; the "fused" MLA path gives the "absorb" path's outputs and
StaticDecoder's greedy tokens; the Triton kernel equals the reference on the GPU and, where Triton is installed,
in Triton's CPU interpreter (float32: the interpreter mishandles bf16)."""
import os
import subprocess
import sys

import pytest
import torch

import generate as G
import mla_decode as MD
import static_decode as SD
from helpers import tiny_config
from mla import MLA, cache_positions, precompute_freqs_cis
from model import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(B, T, H, C, DR, S, dtype=torch.float64, device="cpu", seed=0, first=None):
    """Random q^lat, q^R, cache and positions: row b's T queries sit at consecutive positions, at most S-1, from a
    random start or from `first` in every row."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    start = torch.randint(0, S - T + 1, (B,), generator=g) if first is None else torch.full((B,), first)
    at = start[:, None] + torch.arange(T)  # (B, T)
    return r(B, T, H, C), r(B, T, H, DR), r(B, S, C), r(B, S, DR), at.to(device)


@pytest.mark.parametrize("T", [1, 3])
def test_reference_is_the_absorbed_attention(T):
    """_attend_fused (the reference on a CPU) = _attend_absorb given the same mask as CachePositions.bias."""
    cfg = tiny_config(n_heads=3, kv_lora_rank=24, qk_rope_head_dim=6)
    torch.manual_seed(0)
    layer = MLA(cfg).double()
    B, S = 4, 11
    q_nope = torch.randn(B, T, 3, cfg.qk_nope_head_dim, dtype=torch.float64)
    _, q_pe, latent, k_pe, at = _inputs(B, T, 3, 24, 6, S)
    pos = cache_positions(at[:, 0], T, S, torch.float64)
    assert torch.equal(pos.at, at)
    want = layer._attend_absorb(q_nope, q_pe, latent, k_pe, 0, torch.float64, pos.bias)  # (B, T, H, dv)
    got = layer._attend_fused(q_nope, q_pe, latent, k_pe, at, torch.float64)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("start", ["none", "int", "tensor"])
def test_fused_layer_equals_absorb(start):
    """MLA.forward with attn_impl "fused" for the three kinds of start_pos gives the "absorb" outputs."""
    cfg = tiny_config(max_seq_len=16)
    torch.manual_seed(1)
    layer = MLA(cfg).double()
    x = torch.randn(2, 5, cfg.dim, dtype=torch.float64)
    freqs = precompute_freqs_cis(cfg)
    outs = []
    for impl in ("absorb", "fused"):
        layer.attn_impl = impl
        if start == "none":
            outs.append(layer(x, freqs[:5]))
            continue
        layer.setup_cache(2, 16)
        layer(torch.randn(2, 4, cfg.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64),
              freqs[:4], 0 if start == "int" else torch.zeros(2, dtype=torch.long))
        s = 4 if start == "int" else torch.tensor([4, 2])  # tensor: the rows at different positions
        f = freqs[4:9] if start == "int" else torch.stack([freqs[4:9], freqs[2:7]])
        outs.append(layer(x, f, s))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-12, rtol=0)


def test_static_decoder_fused_gives_the_reference_tokens():
    torch.manual_seed(0)
    model = Transformer(tiny_config(dict(vocab_size=61, max_seq_len=48, init_std=0.3))).double().eval()
    prompts = [[5, 9, 1], [7], [3, 3, 8, 20, 11]]
    ref = [G.generate(model, p, 10)[0] for p in prompts]
    dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=16, graphs=False, attn_impl="fused")
    assert dec.attn_impl == "fused" and model.layers[0].attn.attn_impl == "fused"
    out = [dec.generate(prompts, 10, speculative=s)[0] for s in (False, True)]
    dec.close()
    assert out[0] == ref and out[1] == ref


# (B, T, H, d_c, dr, S, (BLOCK_M, BLOCK_S, num_warps, num_stages, splits), first position or None): several
# ranges, ranges past the newest visible key, rows that fill no whole block, widths that are no power of two, a dr
# below the tl.dot minimum; the fifth: the second range [32, 64) starts between the two tokens' positions 31 and 32,
# so in that range the first token's rows see nothing (the −inf guard of the online softmax); the last: 64-row
# blocks, the path that splits the scores between two warpgroups on a GPU (80 rows: a full block and a part)
KERNEL_CASES = [(2, 1, 16, 64, 16, 40, (16, 16, 4, 2, 3), None), (3, 2, 8, 48, 16, 37, (16, 16, 4, 2, 2), None),
                (1, 3, 4, 32, 4, 20, (16, 16, 4, 2, 1), None), (2, 1, 20, 16, 8, 70, (16, 32, 4, 2, 4), None),
                (1, 2, 4, 16, 16, 64, (16, 16, 4, 2, 2), 31),
                (2, 2, 40, 32, 8, 45, (64, 16, 8, 2, 3), None)]

@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
def test_split_algorithm_is_the_softmax(case):
    """latent_attention_split (the kernel's ranges, tiles, online softmax and merge, in PyTorch) gives the reference
    in float64, for the kernel cases' ranges and tiles (the last one: a range with nothing visible to some rows)."""
    B, T, H, C, DR, S, (_, block, _, _, splits), first = KERNEL_CASES[case]
    q, qr, lat, pe, at = _inputs(B, T, H, C, DR, S, seed=case, first=first)
    want = MD.latent_attention_ref(q, qr, lat, pe, at, 0.3)
    got = MD.latent_attention_split(q, qr, lat, pe, at, 0.3, splits, block)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_demo_prints_true_numbers(capsys):
    import re
    MD._demo_main([])
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 100
    errs = [float(e) for e in re.findall(r"max \|difference\| (\S+)", out)]
    assert len(errs) == 4 and all(e < 1e-12 for e in errs), errs

    def row(label):
        return [float(v.replace(",", "")) for v in re.search(rf"^  {re.escape(label)}\s+(\S+)\s+(\S+)$", out,
                                                              re.M).groups()]

    assert row("latent cache read, bf16 (bytes)") == [(256 + 32) * 2, (512 + 64) * 2]
    assert row("one pass over fp32 scores (bytes)") == [16 * 4, 128 * 4]
    assert row("flops: scores and P·c^KV") == [2 * 16 * (256 + 32 + 256), 2 * 128 * (512 + 64 + 512)]
    assert row("flops per byte of cache") == [30, 242]
    need = [float(v.replace(",", "")) for v in re.findall(r"takes ([\d,]+) TFLOP/s", out)]
    assert need == [round(17408 / 576 * 4.8), round(278528 / 1152 * 4.8)]


_INTERPRET = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined: before mla_decode is imported
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import torch
import triton.runtime.interpreter as TI
_patch = getattr(TI, "_patch_lang_tensor", None)
if _patch is not None:  # Triton 3.6's interpreter converts a loop bound (a one-element array) with int(array),
    def _patch_index(tensor, scope):  # which NumPy 2.4 refuses: convert its one element instead
        _patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    TI._patch_lang_tensor = _patch_index
import mla_decode as MD
from test_mla_decode import KERNEL_CASES, _inputs
for i, (B, T, H, C, DR, S, config, first) in enumerate(KERNEL_CASES):
    q, qr, lat, pe, at = _inputs(B, T, H, C, DR, S, torch.float32, seed=i, first=first)
    want = MD.latent_attention_ref(q, qr, lat, pe, at, 0.3)
    got = MD._launch(q, qr, lat, pe, at, 0.3, torch.float32, config)
    print(i, (got - want).abs().max().item())
"""


@pytest.mark.skipif(MD.triton is None, reason="Triton is not installed (its CPU interpreter runs the kernel)")
def test_kernel_in_the_triton_interpreter():
    out = subprocess.run([sys.executable, "-c", _INTERPRET, ROOT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    errs = [float(line.split()[1]) for line in out.stdout.splitlines()]
    assert len(errs) == len(KERNEL_CASES) and all(e < 1e-5 for e in errs), errs  # NaN fails too


@pytest.mark.gpu
@pytest.mark.parametrize("case", range(len(KERNEL_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heuristic", [False, True])
def test_kernel_on_gpu_equals_the_reference(case, dtype, heuristic):
    """float32: IEEE products, equal to the reference to float32 rounding. bf16: no further from the float64 result
    than the reference run in bf16 is (P rounded to bf16 in both), twice that at most."""
    B, T, H, C, DR, S, config, first = KERNEL_CASES[case]
    q, qr, lat, pe, at = _inputs(B, T, H, C, DR, S, dtype, "cuda", seed=case, first=first)
    got = MD.latent_attention(q, qr, lat, pe, at, 0.3, torch.float32, config=None if heuristic else config)
    exact = MD.latent_attention_ref(q.double(), qr.double(), lat.double(), pe.double(), at, 0.3)
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, atol=2e-5, rtol=0)
    else:
        ref = MD.latent_attention_ref(q, qr, lat, pe, at, 0.3, torch.float32)
        err, ref_err = (got.double() - exact).abs().max(), (ref.double() - exact).abs().max()
        assert err <= 2 * ref_err + 1e-3, (err, ref_err)


def test_heuristic_keeps_to_the_shared_memory_and_picks_the_swept_configs(monkeypatch):
    """On an H200's limits (132 SMs, 227 KiB of shared memory per block): the configurations the sweep in
    BENCHMARKS.md found fastest for one new token, and every configuration fits in shared memory (a prefill of
    64 tokens over d_c 256 asked for 252 KiB before the heuristic shrank its stages)."""
    monkeypatch.setattr(MD, "_limits", lambda device: (132, 232448))
    cuda = torch.device("cuda", 0)  # only a key here: nothing runs on it
    assert MD._heuristic(16, 256, 32, 64, 4096, cuda, torch.bfloat16) == (16, 128, 4, 3, 2)  # small, batch 64
    assert MD._heuristic(128, 512, 64, 64, 4096, cuda, torch.bfloat16) == (64, 64, 8, 2, 3)  # V3, batch 64
    assert MD._heuristic(128, 512, 64, 128, 4096, cuda, torch.bfloat16) == (64, 64, 8, 2, 2)  # V3, batch 128
    for rows, C, DR, B, S in ((16, 256, 32, 1, 320), (1024, 256, 32, 64, 320), (256, 512, 64, 2, 4096),
                              (2, 16, 4, 3, 40), (16 * 2, 256, 32, 1, 100)):
        for dtype in (torch.bfloat16, torch.float32):
            bm, bs, warps, stages, splits = MD._heuristic(rows, C, DR, B, S, cuda, dtype)
            assert MD._shared_bytes(bm, bs, stages, C, DR, dtype.itemsize) <= 232448, (rows, C, dtype)
            assert 16 <= bm <= 64 and 32 <= bs and splits >= 1 and (splits - 1) * bs < S


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,H,C,DR,S,dtype", [(2, 64, 16, 256, 32, 320, torch.bfloat16),
                                                (1, 2, 128, 512, 64, 100, torch.float32)])
def test_kernel_on_gpu_with_many_rows(B, T, H, C, DR, S, dtype):
    """The heuristic's shrunken configurations run and agree: a prefill's 64 tokens of 16 heads, and V3's heads in
    float32."""
    q, qr, lat, pe, at = _inputs(B, T, H, C, DR, S, dtype, "cuda", seed=9)
    got = MD.latent_attention(q, qr, lat, pe, at, 0.1, torch.float32)
    ref = MD.latent_attention_ref(q, qr, lat, pe, at, 0.1, torch.float32)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("B,S", [(1, 300), (64, 4096)])
def test_kernel_on_gpu_at_v3_shapes(B, S):
    """V3's MLA: 128 heads, d_c 512, d^R_h 64, bf16, one and two new tokens per row."""
    for T in (1, 2):
        q, qr, lat, pe, at = _inputs(B, T, 128, 512, 64, S, torch.bfloat16, "cuda", seed=T)
        got = MD.latent_attention(q, qr, lat, pe, at, 0.07)
        ref = MD.latent_attention_ref(q, qr, lat, pe, at, 0.07, torch.float32)
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_kernel_refuses_autograd():
    q, qr, lat, pe, at = _inputs(1, 1, 4, 16, 16, 8, torch.float32, "cuda")
    with pytest.raises(ValueError, match="inference only"):
        MD.latent_attention(q.requires_grad_(), qr, lat, pe, at, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("speculative", [False, True])
def test_fused_static_decoder_on_gpu_gives_the_reference_tokens(speculative):
    """float32 on the GPU: StaticDecoder (fused by default there) gives generate()'s greedy tokens."""
    torch.manual_seed(4)
    model = Transformer(tiny_config(dict(vocab_size=61, max_seq_len=48, init_std=0.3), dim=64,
                                    moe_inter_dim=64)).cuda().float().eval()
    prompts = [[5, 9, 1], [7], [3, 3, 8, 20, 11], [2, 4]]
    ref = [G.generate(model, p, 16)[0] for p in prompts]
    dec = SD.StaticDecoder(model, max_batch=4, max_seq_len=24, graphs=False)
    assert dec.attn_impl == "fused"
    out, _ = dec.generate(prompts, 16, speculative=speculative)
    dec.close()
    assert out == ref


@pytest.mark.gpu
def test_fused_decode_step_traces_to_one_graph():
    """torch.compile traces the Triton kernels: a bf16 step with the fused attention is still one graph."""
    torch.manual_seed(7)
    model = Transformer(tiny_config(dict(vocab_size=61, max_seq_len=48, init_std=0.3))).cuda().bfloat16().eval()
    dec = SD.StaticDecoder(model, max_batch=3, max_seq_len=32, graphs=False)
    x, n = torch.tensor([1, 2, 3], device="cuda"), torch.tensor([4, 8, 2], device="cuda")
    explained = torch._dynamo.explain(lambda *a: SD._plain_step(model, *a))(x, n)
    dec.close()
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
