"""Tests of the FP8 kernels as PyTorch operators (torch.library operators in fp8.py and fp8_experts.py): each
passes torch.library.opcheck (schema, the fake implementation against the real one, AOT tracing), on the CPU
(where the operators run the references) and on a Hopper GPU (the kernels); a compiled FP8Linear, expert FFN and
whole FP8 model are one graph that calls the operators, with the eager values; eager mode calls the functions
behind the operators directly. (The operators have no autograd formula, and opcheck's autograd test is not run:
they are called inside FP8Linear's and the experts' autograd functions, whose backward calls them again; asked
for gradients through one, it fails.)"""
import pytest
import torch

import fp8
import fp8_experts
import fp8_linear

FP8 = torch.float8_e4m3fn
LINEAR_OPS = ("quant_rows_cols", "quant_blocks", "gemm")         # FP8Linear's forward and backward (act_cache bf16)
EXPERT_OPS = ("quant_rows", "quant_rows_cols", "quant_blocks", "gemm_grouped", "quant_cols",  # fp8_expert_ffn's
              "gemm_kgrouped")
CACHE_OPS = ("quant_rows", "quant_cols")  # FP8Linear with act_cache fp8 or e5m6: x along K, then its cached values
hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                            reason="needs a Hopper (sm_90) GPU")


def _op_samples(device):
    """(name, operator, args) for every operator, shapes that take the edge paths: rows not a multiple of 128
    (padded M-major scales, Wgrad's token padding), a partial last weight block, a stack of experts, the
    rowwise (Wgrad) GEMM, idle experts and an unused tail tile in the grouped GEMMs."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(200, 256, generator=g, device=device)
    xq, xs = fp8.quantize_act(x)
    w = torch.randn(300, 256, generator=g, device=device)
    wq, ws = fp8.quantize_weight(w)
    tq, ts = fp8.quantize_act_t(x)                                     # (256, 256), (256, 2): tokens padded
    e_w = torch.randn(3, 256, 128, generator=g, device=device)         # (E, N, K)
    ewq, ews = fp8.quantize_weight(e_w)
    ap = torch.randn(512, 128, generator=g, device=device)             # 4 tiles
    apq, aps = fp8.quantize_act(ap)
    # An unused tail tile (-1) on the CPU, where the reference writes zeros there; the kernel leaves those rows as
    # the allocation held them (never read), which differs from call to call, so on the GPU every tile is used.
    groups = torch.tensor([0, 2, 2, -1 if device == "cpu" else 1], dtype=torch.int32, device=device)
    kq, ks = fp8.quantize_act_t(torch.randn(384, 256, generator=g, device=device))   # (256, 384) along tokens
    sizes = torch.tensor([128, 0, 256], device=device)
    return [
        ("quant_rows", fp8._quant_rows.op, (x, False)),
        ("quant_rows 3-D bf16", fp8._quant_rows.op, (x.bfloat16().reshape(2, 100, 256), False)),
        ("quant_rows mmajor", fp8._quant_rows.op, (x, True)),
        ("quant_cols", fp8._quant_cols.op, (x,)),
        ("quant_rows_cols", fp8._quant_rows_cols.op, (x, False)),
        ("quant_rows_cols bf16 mmajor", fp8._quant_rows_cols.op, (x.bfloat16(), True)),
        ("quant_blocks", fp8._quant_blocks.op, (w, False)),
        ("quant_blocks transpose", fp8._quant_blocks.op, (w, True)),
        ("quant_blocks experts", fp8._quant_blocks.op, (e_w, True)),
        ("gemm", fp8._gemm.op, (xq, xs, wq, ws, torch.bfloat16)),
        ("gemm fp32 out", fp8._gemm.op, (xq, fp8.mmajor_scales(xs), wq, ws, torch.float32)),
        ("gemm rowwise", fp8._gemm.op, (tq, ts, tq[:136], ts[:136], torch.float32)),
        ("gemm_grouped", fp8_experts._gemm_grouped.op, (apq, aps, ewq, ews, groups, torch.bfloat16)),
        ("gemm_kgrouped", fp8_experts._gemm_kgrouped.op, (kq, ks, kq[:128], ks[:128], sizes, torch.float32)),
    ]


def _unchanged(before, after) -> bool:
    """Each tensor equals its copy taken before, float8 compared by its bytes (it has no arithmetic)."""
    bits = lambda t: t.view(torch.uint8) if t.dtype == FP8 else t  # noqa: E731
    return all(torch.equal(bits(b), bits(a)) for b, a in zip(before, after))


def _opcheck_all(device):
    for name, op, args in _op_samples(device):
        fp8_inputs = any(torch.is_tensor(a) and a.dtype == FP8 for a in args)
        # opcheck's schema test compares inputs before and after with arithmetic that float8 does not have; for
        # the GEMMs the same check (no input changed, no output aliasing one) is done on their bytes below.
        tests = ("test_faketensor", "test_aot_dispatch_dynamic")
        result = torch.library.opcheck(op, args, test_utils=tests if fp8_inputs else ("test_schema", *tests))
        assert all(v == "SUCCESS" for v in result.values()), (name, result)
        before = [a.clone() for a in args if torch.is_tensor(a)]
        out = op(*args)
        after = [a for a in args if torch.is_tensor(a)]
        assert _unchanged(before, after), name
        outs = out if isinstance(out, tuple) else (out,)
        ptrs = {a.untyped_storage().data_ptr() for a in after}
        assert not any(o.numel() and o.untyped_storage().data_ptr() in ptrs for o in outs), name


def _opcheck_into(device):
    """The two operators that add into their output (out += the Wgrad product): opcheck, and the sum they leave is
    the non-mutating operator's product added to what out held, bit for bit, every other input unchanged."""
    g = torch.Generator(device=device).manual_seed(0)
    tq, ts = fp8.quantize_act_t(torch.randn(200, 256, generator=g, device=device))        # (256, 256), tokens padded
    kq, ks = fp8.quantize_act_t(torch.randn(384, 256, generator=g, device=device))        # (256, 384)
    sizes = torch.tensor([128, 0, 256], device=device)
    samples = [
        ("gemm_into", fp8._gemm_into.op, (tq, ts, tq[:136], ts[:136]),
         torch.randn(256, 136, generator=g, device=device),
         lambda: fp8._gemm.op(tq, ts, tq[:136], ts[:136], torch.float32)),
        ("gemm_kgrouped_into", fp8_experts._gemm_kgrouped_into.op, (kq, ks, kq[:128], ks[:128], sizes),
         torch.randn(3, 256, 128, generator=g, device=device),
         lambda: fp8_experts._gemm_kgrouped.op(kq, ks, kq[:128], ks[:128], sizes, torch.float32)),
    ]
    for name, op, args, prior, product in samples:
        result = torch.library.opcheck(op, (*args, prior.clone()),
                                       test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
        assert all(v == "SUCCESS" for v in result.values()), (name, result)
        before = [a.clone() for a in args if torch.is_tensor(a)]
        out = prior.clone()
        assert op(*args, out) is None
        assert torch.equal(out, prior + product()), name
        assert _unchanged(before, [a for a in args if torch.is_tensor(a)]), name


def test_operators_pass_opcheck_on_cpu():
    """On the CPU each operator runs its reference; opcheck compares the fake (shape-only) implementation that
    torch.compile traces with against it, strides included."""
    _opcheck_all("cpu")
    _opcheck_into("cpu")


@pytest.mark.gpu
@hopper
def test_operators_pass_opcheck_on_gpu():
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    _opcheck_all("cuda")
    _opcheck_into("cuda")
    # a list of segment sizes is checked on the host before it goes to the GPU (where the kernel cannot check it)
    kq, ks = fp8.quantize_act_t(torch.randn(256, 256, device="cuda"))
    for bad in ([100, 28, 128], [128, 256]):                           # not multiples of 128; more rows than K
        with pytest.raises(ValueError, match="segment sizes"):
            fp8_experts.fp8_gemm_kgrouped(kq, ks, kq[:128], ks[:128], bad)


def _grads(fn, tensors):
    """fn(*tensors) summed against a fixed random weighting, backward: the output and every tensor's gradient."""
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*tensors)
    y.backward(torch.randn(y.shape, generator=torch.Generator(y.device).manual_seed(1), device=y.device))
    return [y.detach()] + [t.grad for t in tensors]


def _recording(backend, ops):
    """A torch.compile backend that adds the v3fp8 operators of each graph dynamo hands over (and of its
    subgraphs: the autograd functions' forward and backward) to `ops`, then compiles it with `backend`."""
    def compile_graph(gm, example_inputs):
        ops.update(str(n.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes if "v3fp8" in str(n.target))
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    return compile_graph


def _compiled_equals_eager(fn, tensors, backend, exact, exact_output=False, ops=()):
    """fn compiled with fullgraph (a graph break is an error), its forward and backward calling the operators `ops`.
    exact: every value bit for bit; else the output bit for bit if exact_output, and the rest within 3e-4
    (calc_diff): inductor's elementwise code (bias gradient sum, SiLU) rounds differently before the FP8 kernels,
    and one bf16 step of difference can move a value to the next E4M3 step (1.1e-4 seen on an H200 for the
    expert FFN's dx); FP8's own error against fp32 is ~1e-3 here."""
    torch._dynamo.reset()
    want = _grads(fn, tensors)
    seen = set()
    compiled = torch.compile(fn, fullgraph=True, backend=_recording(backend, seen))
    for _ in range(2):                                              # the first trace, then the cached graph
        got = _grads(compiled, tensors)
        assert seen >= {f"v3fp8.{op}.default" for op in ops}, seen
        for i, (a, b) in enumerate(zip(got, want)):
            if exact or (exact_output and i == 0):
                assert torch.equal(a, b), i
            else:
                assert fp8.calc_diff(a, b) < 3e-4, i


@pytest.mark.parametrize("act_cache", fp8_linear.ACT_CACHES)
def test_compiled_fp8_linear_is_one_graph_with_the_eager_values(act_cache):
    """FP8Linear's forward and backward (quantizations and the three GEMMs) trace into one graph, no break, and the
    traced graph gives the eager values bit for bit (aot_eager: the same ops, run by the AOT autograd graph)."""
    lin = fp8_linear.FP8Linear(256, 200, bias=True)
    lin.act_cache = act_cache
    x = torch.randn(3, 50, 256)

    def fn(x, w, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(lin, {"weight": w, "bias": b}, (x,)).float()
    _compiled_equals_eager(fn, [x, lin.weight, lin.bias], "aot_eager", exact=True,
                           ops=LINEAR_OPS + (CACHE_OPS if act_cache != "bf16" else ()))


@pytest.mark.parametrize("act_cache", fp8_linear.ACT_CACHES)
def test_compiled_fp8_expert_ffn_is_one_graph_with_the_eager_values(act_cache):
    """The routed experts' FP8 FFN (tile layout, grouped GEMMs, K-grouped Wgrad, recomputed SwiGLU) likewise,
    with an idle expert."""
    g = torch.Generator().manual_seed(0)
    E, dim, inter = 4, 256, 128
    w1, w3 = (torch.randn(E, inter, dim, generator=g) / 16 for _ in range(2))
    w2 = torch.randn(E, dim, inter, generator=g) / 11
    x = torch.randn(40, dim, generator=g)

    def fn(x, w1, w3, w2):
        return fp8_experts.fp8_expert_ffn(x, w1, w3, w2, [10, 0, 25, 5], act_cache)
    _compiled_equals_eager(fn, [x, w1, w3, w2], "aot_eager", exact=True,
                           ops=EXPERT_OPS)


def test_operators_refuse_to_be_differentiated():
    """The operators have no autograd formula: asked for gradients through one (an input that requires grad, grad
    mode on), the call fails, eagerly and while torch.compile traces, instead of giving no gradient or zeros.
    Without gradients (inside the autograd functions, or under no_grad) the same call runs."""
    x = torch.randn(4, 256, requires_grad=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        fp8._quant_rows.op(x, False)
    with pytest.raises(Exception, match="no autograd formula"):
        torch.compile(lambda t: fp8.quantize_act(t)[1].sum(), backend="aot_eager", fullgraph=True)(x)
    with torch.no_grad():
        q, s = fp8._quant_rows.op(x, False)
    assert q.shape == x.shape and s.shape == (4, 2)
    assert torch.Tag.pt2_compliant_tag in fp8._quant_rows.op.tags


def test_eager_mode_calls_the_functions_not_the_operators():
    """Outside torch.compile FP8Linear calls the functions behind the operators (an operator call would only add
    dispatch time); the profiler sees an operator call where there is one."""
    lin = fp8_linear.FP8Linear(256, 128)
    x = torch.randn(40, 256, requires_grad=True)
    with torch.profiler.profile() as prof:
        lin(x).sum().backward()
    assert not [e.name for e in prof.events() if "v3fp8" in e.name]
    with torch.profiler.profile() as prof:
        fp8._quant_rows.op(x.detach(), False)
    assert "v3fp8::quant_rows" in {e.name for e in prof.events()}


def _fp8_model(device):
    from config import ModelConfig
    from model import Transformer
    cfg = ModelConfig(dim=128, inter_dim=256, moe_inter_dim=128, n_layers=2, n_dense_layers=1, n_mtp=1,
                      n_routed_experts=4, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
                      q_lora_rank=128, kv_lora_rank=128, n_heads=2, qk_nope_head_dim=64, qk_rope_head_dim=64,
                      v_head_dim=64, vocab_size=512, max_seq_len=64)
    torch.manual_seed(0)
    model = Transformer(cfg, fp8_linear.FP8Linear, fp8_experts.FP8Experts).to(device)
    idx, tgt = (torch.randint(0, 512, (2, 64), device=device) for _ in range(2))
    return model, idx, tgt


def _model_graphs_and_values(device, backend):
    """A whole FP8 model (MLA, dense FFN, MoE with FP8 experts, MTP) under bf16 autocast: dynamo's graph and break
    counts, the v3fp8 operators the compiled graphs call, and the eager and compiled training objective and
    gradients."""
    model, idx, tgt = _fp8_model(device)
    torch._dynamo.reset()
    seen = set()
    with torch.autocast(device, dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(idx, tgt)
        out = []
        for fwd in (model, torch.compile(model, backend=_recording(backend, seen))):
            model.zero_grad(set_to_none=True)
            _, losses = fwd(idx, tgt)
            loss = losses["main"] + 0.3 * losses["mtp"] + 1e-4 * losses["balance"]
            loss.backward()
            out.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()
                                                 if p.grad is not None}))
    assert seen >= {f"v3fp8.{op}.default" for op in LINEAR_OPS + EXPERT_OPS}, seen
    return explained, out


@pytest.mark.slow
def test_compiled_fp8_model_is_one_graph():
    """The FP8 model traces into one graph: no FP8 kernel call splits it (before the operators, every one did),
    and the traced graph gives the eager objective and gradients bit for bit, but for the output head's: the main
    and the MTP module's contributions are summed in another order."""
    explained, ((loss, grads), (loss_c, grads_c)) = _model_graphs_and_values("cpu", "aot_eager")
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys() and len(grads) > 20
    assert all(torch.equal(grads[n], grads_c[n]) for n in grads if n != "head.weight")
    assert fp8.calc_diff(grads["head.weight"], grads_c["head.weight"]) < 1e-5


@pytest.mark.gpu
@hopper
def test_compiled_fp8_model_on_gpu_is_one_graph():
    """On the GPU (the kernels, inductor's code around them): one graph, and the compiled objective and gradients
    within bf16's rounding of the eager ones (inductor fuses the elementwise work around the FP8 operators)."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    explained, ((loss, grads), (loss_c, grads_c)) = _model_graphs_and_values("cuda", "inductor")
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch.testing.assert_close(loss_c, loss, rtol=2e-2, atol=2e-3)
    flat = [torch.cat([d[n].flatten() for n in grads]) for d in (grads_c, grads)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("act_cache", fp8_linear.ACT_CACHES)
def test_compiled_fp8_linear_and_experts_on_gpu(act_cache):
    """Inductor around the kernels: the compiled FP8Linear and expert FFN give the eager values (the kernels are
    the same calls, activation quantization included; only inductor's fused elementwise code around them differs,
    so FP8Linear's output is bit for bit the eager one)."""
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    lin = fp8_linear.FP8Linear(512, 1000, bias=True).cuda()
    lin.act_cache = act_cache

    def lin_fn(x, w, b):  # the bf16 output as it is: inductor would fuse away a bf16 → fp32 round trip after it
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return torch.func.functional_call(lin, {"weight": w, "bias": b}, (x,))
    _compiled_equals_eager(lin_fn, [torch.randn(3, 300, 512, device="cuda"), lin.weight, lin.bias], "inductor",
                           exact=False, exact_output=True, ops=LINEAR_OPS + (CACHE_OPS if act_cache != "bf16" else ()))
    g = torch.Generator("cuda").manual_seed(0)
    E, dim, inter = 8, 512, 256
    w1, w3 = (torch.randn(E, inter, dim, generator=g, device="cuda") / 22 for _ in range(2))
    w2 = torch.randn(E, dim, inter, generator=g, device="cuda") / 16
    counts = torch.tensor([300, 0, 7, 128, 129, 1, 0, 435], device="cuda")

    def ffn(x, w1, w3, w2):
        return fp8_experts.fp8_expert_ffn(x, w1, w3, w2, counts, act_cache).float()
    _compiled_equals_eager(ffn, [torch.randn(1000, dim, device="cuda").bfloat16(), w1, w3, w2], "inductor",
                           exact=False, ops=EXPERT_OPS)


def _accumulated_grads(model, idx, tgt, ctx, fwd=None, keep=False):
    """Gradients of two micro-batches accumulated (as train.forward_backward does), inside `ctx`; keep: added to
    the gradients the model holds (else they start from None)."""
    if not keep:
        model.zero_grad(set_to_none=True)
    with ctx, torch.autocast(idx.device.type, dtype=torch.bfloat16):
        for _ in range(2):
            _, losses = (model if fwd is None else fwd)(idx, tgt)
            (losses["main"] + 0.3 * losses["mtp"] + 1e-4 * losses["balance"]).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_weights_quantized_once_gives_the_same_gradients_with_one_quantization_per_weight(monkeypatch):
    """Inside fp8_linear.weights_quantized_once the FP8 projections and experts use the weights quantized on entering:
    over two optimizer steps (a block per step, the optimizer stepping between them) the accumulated gradients of
    two micro-batches are the ones of quantizing in every forward, bit for bit (a copy kept from the first block
    would change the second step's), and each weight is quantized once per block instead of once per micro-batch."""
    import contextlib
    import copy
    from moe import Experts
    model, idx, tgt = _fp8_model("cpu")
    twin = copy.deepcopy(model)
    calls = []

    def counting(fn):
        return lambda w, transpose=False: calls.append(tuple(w.shape)) or fn(w, transpose)
    monkeypatch.setattr(fp8_linear, "quantize_weight", counting(fp8_linear.quantize_weight))
    monkeypatch.setattr(fp8_experts, "quantize_weight", counting(fp8_experts.quantize_weight))
    n_weights = sum(isinstance(m, fp8_linear.FP8Linear) + 3 * isinstance(m, Experts) for m in model.modules())
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, twin)]
    for step in range(2):
        calls[:] = []
        want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext())
        per_forward, calls[:] = len(calls), []
        got = _accumulated_grads(twin, idx, tgt, fp8_linear.weights_quantized_once(twin))
        assert per_forward == 2 * n_weights and len(calls) == n_weights > 10
        assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), step
        assert all(getattr(m, "quantized", None) is None for m in twin.modules())   # released on leaving
        for opt in opts:
            opt.step()


def test_weights_quantized_once_serves_only_its_own_weights(monkeypatch):
    """Inside the block, a layer called with another weight (torch.func.functional_call) quantizes that one, and a
    block whose quantization fails part-way leaves no copy behind."""
    lin = fp8_linear.FP8Linear(128, 256)
    x, other = torch.randn(4, 128), torch.randn(256, 128)
    want = torch.func.functional_call(lin, {"weight": other}, (x,))
    with fp8_linear.weights_quantized_once(lin):
        assert torch.equal(torch.func.functional_call(lin, {"weight": other}, (x,)), want)
    model, _, _ = _fp8_model("cpu")
    real, calls = fp8.quantize_weight, []

    def failing(w, transpose=False):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("out of memory")
        return real(w, transpose)
    monkeypatch.setattr(fp8_linear, "quantize_weight", failing)
    with pytest.raises(MemoryError):
        with fp8_linear.weights_quantized_once(model):
            pass
    assert len(calls) == 5 and all(getattr(m, "quantized", None) is None for m in model.modules())


def test_train_quantizes_fp8_weights_once_only_where_it_pays():
    """train.fp8_micro_batches: with --fp8, more than one micro-batch and one process, the block that quantizes
    each FP8 weight once and has Wgrad sum its gradient in place; else nothing."""
    import contextlib
    from types import SimpleNamespace
    import train
    lin = fp8_linear.FP8Linear(128, 128)

    def run(fp8_on=True, distributed=False):
        return SimpleNamespace(args=SimpleNamespace(fp8=fp8_on), model=lin, layout=SimpleNamespace(
            distributed=distributed))
    for off, n_micro in ((run(fp8_on=False), 2), (run(), 1), (run(distributed=True), 2)):
        assert isinstance(train.fp8_micro_batches(off, n_micro), contextlib.nullcontext)
    with train.fp8_micro_batches(run(), 2):
        assert lin.quantized is not None and lin.quantized[0] is lin.weight
        assert lin.grad_into is not None and lin.grad_into[1] is lin.weight.grad
    assert lin.quantized is None and lin.grad_into is None


def test_weights_quantized_once_refuses_a_weight_changed_inside():
    """A weight stepped inside the block would leave a stale FP8 copy in use: leaving the block raises."""
    lin = fp8_linear.FP8Linear(128, 128)
    with pytest.raises(RuntimeError, match="changed inside the block"):
        with fp8_linear.weights_quantized_once(lin):
            assert lin.quantized is not None
            with torch.no_grad():
                lin.weight.mul_(2)
    assert lin.quantized is None


def test_grads_accumulated_in_wgrad_gives_autograds_sums(monkeypatch):
    """Inside fp8_linear.grads_accumulated_in_wgrad (alone, and with weights_quantized_once, as train.py runs them)
    every gradient of two optimizer steps of two micro-batches is autograd's sum bit for bit; the FP8 weights'
    Wgrads are added into .grad in place (fp8_gemm_into, fp8_gemm_kgrouped_into: one call per weight and
    micro-batch, into the buffer that stays .grad) and autograd adds no gradient of its own for them."""
    import contextlib
    import copy
    from moe import Experts
    model, idx, tgt = _fp8_model("cpu")
    twins = [copy.deepcopy(model) for _ in range(2)]
    calls = []

    def counting(fn):
        def call(*args):
            calls.append(args[-1].data_ptr())
            return fn(*args)
        return call
    monkeypatch.setattr(fp8_linear, "fp8_gemm_into", counting(fp8_linear.fp8_gemm_into))
    monkeypatch.setattr(fp8_experts, "fp8_gemm_kgrouped_into", counting(fp8_experts.fp8_gemm_kgrouped_into))
    fp8_weights = {id(p) for m in model.modules() for p in
                   ((m.weight,) if isinstance(m, fp8_linear.FP8Linear) else (m.w1, m.w3, m.w2) if isinstance(m, Experts)
                    else ())}
    n_weights = len(fp8_weights)

    @contextlib.contextmanager
    def both(m):
        with fp8_linear.weights_quantized_once(m), fp8_linear.grads_accumulated_in_wgrad(m):
            yield
    opts = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, *twins)]
    for step in range(2):
        want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext())
        for twin, block in zip(twins, (fp8_linear.grads_accumulated_in_wgrad, both)):
            calls[:] = []
            got = _accumulated_grads(twin, idx, tgt, block(twin))
            grads = {p.grad.data_ptr() for m, ws in fp8_linear._fp8_weights(twin) for p in ws}
            assert len(calls) == 2 * n_weights > 20 and set(calls) == grads, step
            assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want), step
            assert all(getattr(m, "grad_into", None) is None for m in twin.modules())   # released on leaving
        for opt in opts:
            opt.step()


def test_grads_accumulated_in_wgrad_refuses_what_would_lose_a_gradient():
    """Hooks on a weight would not run (refused on entering); a .grad cleared inside the block would lose the sums
    (leaving raises); a frozen weight and a layer called with another weight are left to autograd."""
    lin = fp8_linear.FP8Linear(128, 128)
    handle = lin.weight.register_hook(lambda g: g)
    with pytest.raises(ValueError, match="hooks"):
        with fp8_linear.grads_accumulated_in_wgrad(lin):
            pass
    handle.remove()
    assert lin.grad_into is None and lin.weight.grad is None
    with pytest.raises(RuntimeError, match="replaced or cleared inside the block"):
        with fp8_linear.grads_accumulated_in_wgrad(lin):
            lin(torch.randn(4, 128)).sum().backward()
            lin.zero_grad(set_to_none=True)
    assert lin.grad_into is None
    x, other = torch.randn(4, 128), torch.randn(128, 128, requires_grad=True)
    lin.weight.grad = None
    with fp8_linear.grads_accumulated_in_wgrad(lin):
        torch.func.functional_call(lin, {"weight": other}, (x,)).sum().backward()
        assert other.grad is not None and not lin.weight.grad.any()      # the buffer was not its gradient
    lin.weight.requires_grad_(False)
    lin.weight.grad = None
    with fp8_linear.grads_accumulated_in_wgrad(lin):
        assert lin.grad_into is None and lin.weight.grad is None


def test_grads_accumulated_in_wgrad_adds_to_a_gradient_already_there():
    """A .grad that holds a sum already (here a micro-batch run before the block) is added to: autograd's sums bit
    for bit."""
    import contextlib
    import copy
    model, idx, tgt = _fp8_model("cpu")
    twin = copy.deepcopy(model)
    for m in (model, twin):
        _accumulated_grads(m, idx[:1], tgt[:1], contextlib.nullcontext())          # plain autograd, outside
    want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext(), keep=True)
    got = _accumulated_grads(twin, idx, tgt, fp8_linear.grads_accumulated_in_wgrad(twin), keep=True)
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)


def test_grads_accumulated_in_wgrad_refuses_nesting_and_shared_weights():
    """A block inside another (whose leaving would switch the outer one off) and a weight shared by two FP8 layers
    (two adds into one buffer, in another order than autograd's) are refused on entering, with nothing changed."""
    lin = fp8_linear.FP8Linear(128, 128)
    with fp8_linear.grads_accumulated_in_wgrad(lin):
        held = lin.grad_into
        with pytest.raises(ValueError, match="already inside"):
            with fp8_linear.grads_accumulated_in_wgrad(lin):
                pass
        assert lin.grad_into is held
    tied = torch.nn.Sequential(fp8_linear.FP8Linear(128, 128), fp8_linear.FP8Linear(128, 128))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shared by two FP8 layers"):
        with fp8_linear.grads_accumulated_in_wgrad(tied):
            pass
    assert tied[0].grad_into is None and tied[0].weight.grad is None


def _compiled_in_block_is_the_eager_block(block):
    """The FP8 model compiled (aot_eager) inside `block` (a function of the model giving the context manager): one
    graph, and the eager block's accumulated gradients (bit for bit but the output head's, as
    test_compiled_fp8_model_is_one_graph)."""
    model, idx, tgt = _fp8_model("cpu")
    want = _accumulated_grads(model, idx, tgt, block(model))
    torch._dynamo.reset()
    with block(model), torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(idx, tgt)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    got = _accumulated_grads(model, idx, tgt, block(model), torch.compile(model, backend="aot_eager"))
    assert all(torch.equal(want[n], got[n]) for n in want if n != "head.weight")
    assert fp8.calc_diff(want["head.weight"], got["head.weight"]) < 1e-5


@pytest.mark.slow
def test_compiled_fp8_model_with_weights_quantized_once_is_one_graph():
    """Compiled inside the block the weights quantized once are graph inputs, not a graph break."""
    _compiled_in_block_is_the_eager_block(fp8_linear.weights_quantized_once)


@pytest.mark.slow
def test_compiled_fp8_model_sums_wgrad_in_place():
    """Compiled inside grads_accumulated_in_wgrad, the backward graph adds into the gradients, which are forward
    inputs (the operators mutate them)."""
    _compiled_in_block_is_the_eager_block(fp8_linear.grads_accumulated_in_wgrad)


@pytest.mark.gpu
@hopper
def test_grads_accumulated_in_wgrad_on_gpu():
    """With the kernels adding into .grad: eager inside the block (with weights_quantized_once, as train.py runs
    it) gives autograd's sums bit for bit; compiled (inductor) inside the block gives the compiled gradients of
    autograd's sums (the backward graph mutates the gradients, forward inputs)."""
    import contextlib

    @contextlib.contextmanager
    def both(m):
        with fp8_linear.weights_quantized_once(m), fp8_linear.grads_accumulated_in_wgrad(m):
            yield
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    model, idx, tgt = _fp8_model("cuda")
    want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext())
    got = _accumulated_grads(model, idx, tgt, both(model))
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
    torch._dynamo.reset()
    with both(model), torch.autocast("cuda", dtype=torch.bfloat16):   # one graph with this torch, as on the CPU
        explained = torch._dynamo.explain(model)(idx, tgt)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model)
    want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext(), compiled)
    got = _accumulated_grads(model, idx, tgt, both(model), compiled)
    assert want.keys() == got.keys() and all(fp8.calc_diff(want[n], got[n]) < 1e-5 for n in want)


@pytest.mark.gpu
@hopper
def test_weights_quantized_once_on_gpu():
    """With the kernels: eager inside the block gives the per-forward gradients bit for bit; inside the block the
    model is one graph (torch 2.11 split it at every FP8 layer before copies_for stopped calling bool() on a
    tuple); compiled (inductor) inside the block stays within bf16's rounding of them."""
    import contextlib
    assert fp8.load_kernel() is not None, fp8.why_no_kernel()
    model, idx, tgt = _fp8_model("cuda")
    want = _accumulated_grads(model, idx, tgt, contextlib.nullcontext())
    got = _accumulated_grads(model, idx, tgt, fp8_linear.weights_quantized_once(model))
    assert all(torch.equal(want[n], got[n]) for n in want)
    torch._dynamo.reset()
    with fp8_linear.weights_quantized_once(model), torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model)(idx, tgt)   # one graph with the GPU machine's torch too
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    comp = _accumulated_grads(model, idx, tgt, fp8_linear.weights_quantized_once(model), torch.compile(model))
    flat = [torch.cat([d[n].flatten().float() for n in want]) for d in (comp, want)]
    assert torch.nn.functional.cosine_similarity(*flat, dim=0) > 0.99


def test_weights_quantized_once_keeps_dgrad_for_a_frozen_weight():
    """A frozen FP8 weight (no dW wanted) inside weights_quantized_once still passes dX back to its input: the
    block's Wᵀ serves Dgrad whenever the input wants a gradient. The same dX as outside the block, and fp32's."""
    torch.manual_seed(0)
    lin = fp8_linear.FP8Linear(256, 384)
    lin.weight.requires_grad_(False)
    x, g = torch.randn(64, 256), torch.randn(64, 384)
    x_out, x_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    lin(x_out).backward(g)
    with fp8_linear.weights_quantized_once(lin):
        lin(x_in).backward(g)
    grads = [x_out.grad, x_in.grad]
    assert grads[1] is not None and torch.equal(grads[0], grads[1])
    assert fp8.calc_diff(grads[1], g @ lin.weight) < 1e-3
