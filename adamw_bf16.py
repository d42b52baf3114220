"""AdamW with its moments stored in BF16 (DeepSeek-V3 report §3.3.3, "Low-Precision Optimizer States").

The report keeps AdamW's first and second moments in BF16 instead of FP32, "without incurring observable
performance degradation", while the master weights and the gradients stay in FP32. That halves the optimizer's
share of memory: 2 × 2 bytes instead of 2 × 4 per parameter.

`AdamWBF16` is torch.optim.AdamW's update, step by step:

    m_t = β1·m_{t-1} + (1 − β1)·g_t          v_t = β2·v_{t-1} + (1 − β2)·g_t²
    p_t = p_{t-1}·(1 − lr·λ) − lr · (m_t / (1 − β1^t)) / (sqrt(v_t / (1 − β2^t)) + ε)

The moments are read from storage into FP32, updated, used for this step's update in FP32, and written back
rounded to `moment_dtype`. So the rounding delays nothing and only what is carried to the next step is
rounded. With moment_dtype=torch.float32 it is AdamW exactly (the reference; the tests compare it with
torch.optim.AdamW).

A limit of bf16 storage: a decay step 1 − β must stay above half a bf16 ulp (2^-9 relative), or the stored
moment stops moving. With β2 = 0.999 (torch's default) v would no longer decay; the report's β2 = 0.95 (the
default here) decays 5% per step.

This is one plain loop over the tensors, written to be read. It is slower than torch's fused AdamW on a GPU, so
train.py uses it only with --bf16_moments.
"""
import torch


class AdamWBF16(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) whose exp_avg and exp_avg_sq are kept in `moment_dtype` (default bf16)."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 1e-2,
                 moment_dtype: torch.dtype = torch.bfloat16):
        if not lr > 0 or not eps > 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdamWBF16: need lr > 0, eps > 0, weight_decay >= 0 and 0 <= betas < 1; got lr={lr}, "
                             f"eps={eps}, weight_decay={weight_decay}, betas={tuple(betas)}")
        if not moment_dtype.is_floating_point:
            raise ValueError(f"AdamWBF16: moment_dtype must be a floating-point dtype, got {moment_dtype}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.moment_dtype = moment_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.moment_dtype,
                                                           memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                g = p.grad.float()
                # m_t and v_t in fp32 (with fp32 storage, .float() is the stored tensor itself, updated in place)
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)                 # = β1·m + (1 − β1)·g
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)                                                   # stored rounded
                state["exp_avg_sq"].copy_(v)
                p.mul_(1 - lr * wd)                                                         # decoupled decay
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
        return loss

    def load_state_dict(self, state_dict):
        # torch.optim.Optimizer casts loaded state to each parameter's dtype (fp32 here): cast the moments back.
        super().load_state_dict(state_dict)
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(self.moment_dtype)
