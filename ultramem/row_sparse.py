"""Row-sparse value-table updates (`train.value_updates: rows_read`): gradients and AdamW steps that touch only the
value rows read in a step, so that the optimizer's cost does not grow with the table.

Lample et al. (2019, "Large Memory Layers with Product Keys", §3.2 and their XLM code's `mem_sparse`) train the
memory values with sparse updates; the UltraMem and Memory+ papers use dense AdamW. What changes against dense
AdamW, exactly (and only for the rows no token read in a step):

    dense AdamW, gradient 0:   m <- b1 m,  v <- b2 v,  p <- (1 - lr wd) p - lr m_hat / (sqrt(v_hat) + eps)
    rows_read:                 nothing (m, v and p of the row keep their values until the row is read again)

A row that is read gets exactly AdamW's update, with the bias corrections of the optimizer's step count (as
LazyAdam / torch.optim.SparseAdam: the step counts optimizer steps, not the row's own reads). So an unread row
neither decays nor keeps moving on its momentum. The effect on loss is measured in docs/performance.md.

Pieces:
  - `mark_row_sparse(model)` marks every value table whose lookup can produce a row-sparse gradient
    (`ultramem.kernels.retrieval.gather_pool`: PKM, UltraMem, Memory+, UltraMemV2's `values`); their `.grad` is then
    a sparse COO tensor of the rows read (micro-batches add theirs up; `clip_grad_norm_` coalesces them).
  - `RowSparseAdamW`: torch's AdamW for every dense gradient (its fused / foreach / for-loop kernel as chosen), and
    the per-row AdamW update above for every sparse one (with the group's fused or for-loop kernel). Its state is
    AdamW's (step, exp_avg, exp_avg_sq), so its state_dict is one torch.optim.AdamW reads and writes.
  - `clip_grad_norm_`: torch.nn.utils.clip_grad_norm_ over dense and sparse gradients together (torch's own refuses
    sparse ones).
  - `dense_grads_from_rows(model)` (`value_updates: dense`, one process on the CPU): the same tables' backward
    produces the sparse gradient of the rows read, and a hook turns it into the dense `.grad` once per backward
    (one zero-filled table and one index_add of the rows read) instead of every layer writing a whole zero-filled
    table gradient and autograd adding those up (a table several layers read: Memory+). The gradient is the dense
    path's, bitwise where a row's terms are at most two (one or two readers per step, or two micro-batches) and up
    to the order of a sum otherwise; the update is dense AdamW, unchanged. Measured in docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.adamw import adamw


def mark_row_sparse(model: nn.Module) -> list[str]:
    """Mark the value tables of `model` read through gather_pool (`row_sparse_grad = True`); returns their names.
    Tables read another way (UltraMemV2's pre_values, through sampled_dot) keep dense gradients and updates."""
    from ultramem.families import value_tables

    marked = []
    for mod_name, mod in model.named_modules():
        for kind, names in value_tables():
            if not isinstance(mod, kind):
                continue
            for name in names:
                p = getattr(mod, name, None)
                if isinstance(p, nn.Parameter) and name in ROW_SPARSE_TABLES:
                    p.row_sparse_grad = True
                    marked.append(f"{mod_name}.{name}" if mod_name else name)
    return sorted(set(marked))


# Tables whose every read goes through gather_pool (so their gradient can be row-sparse).
ROW_SPARSE_TABLES = ("values",)


class RowSparseAdamW(torch.optim.AdamW):
    """AdamW whose sparse gradients (rows of a value table) update only those rows: see the module docstring."""

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sparse = [(group, p, p.grad) for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.grad.is_sparse]
        for _, p, _ in sparse:  # hidden from torch's AdamW, which refuses sparse gradients (and skips grad None)
            p.grad = None
        try:
            super().step()
        finally:
            for _, p, grad in sparse:
                p.grad = grad
        for group, p, grad in sparse:
            self._rows_step(group, p, grad.coalesce())
        return loss

    def _rows_step(self, group: dict, p: torch.Tensor, grad: torch.Tensor) -> None:
        """AdamW (decoupled weight decay) on the rows of `grad` only: the rows of the weights and moments are
        gathered, stepped by the group's own AdamW kernel (fused under the trainer's `adamw: auto`: one pass
        instead of ~8 elementwise ones; one tensor at a time under `for_loop`), and written back."""
        if group.get("amsgrad") or group.get("maximize"):
            raise ValueError("RowSparseAdamW: amsgrad and maximize are not supported for row-sparse gradients")
        state = self.state[p]
        fused = bool(group.get("fused"))
        if not state:  # AdamW's own state layout: a float32 step, on the parameter's device for the fused kernel
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device if fused else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        rows, g = grad._indices()[0], grad._values()  # [U], [U, D]
        if rows.numel() == 0:
            state["step"] += 1
            return
        param, m, v = (t.index_select(0, rows) for t in (p.detach(), state["exp_avg"], state["exp_avg_sq"]))
        b1, b2 = group["betas"]
        adamw([param], [g.to(p.dtype)], [m], [v], [], [state["step"]], fused=fused, foreach=False, amsgrad=False,
              beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
              maximize=False)  # increments the step, then uses it for the bias corrections
        p.detach().index_copy_(0, rows, param)
        state["exp_avg"].index_copy_(0, rows, m)
        state["exp_avg_sq"].index_copy_(0, rows, v)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ (L2, total over all gradients) that also takes sparse gradients: they are
    coalesced in place (a micro-batched step sums several) and enter the norm through their values."""
    params = [p for p in parameters if p.grad is not None]
    for p in params:
        if p.grad.is_sparse and not p.grad.is_coalesced():
            p.grad = p.grad.coalesce()
    grads = [p.grad._values() if p.grad.is_sparse else p.grad for p in params]
    if not grads:
        return torch.tensor(0.0)
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # torch's clip_grads_with_norm_
    torch._foreach_mul_(grads, coef.to(grads[0].device))  # a coalesced sparse gradient's _values() is its storage
    return total


def dense_grads_from_rows(model: nn.Module) -> list[str]:
    """Mark the tables of `model` as `mark_row_sparse` does, CPU tables only (on CUDA a sparse gradient would take
    gather_pool off its Triton kernel), and give each a hook that densifies its sparse `.grad` as soon as a
    backward has accumulated it: every consumer (clip, AdamW, checkpoints) sees an ordinary dense gradient. A
    later micro-batch's sparse gradient is added into the dense one by autograd itself. Returns the names."""
    names = []
    for name in mark_row_sparse(model):
        p = model.get_parameter(name)
        if p.device.type != "cpu":
            del p.row_sparse_grad
            continue
        p.register_post_accumulate_grad_hook(_densify)
        names.append(name)
    return names


def _densify(p: torch.Tensor) -> None:
    """p.grad sparse COO [N, D] (rows read, possibly repeated: several readers) -> the dense [N, D] sum, written
    into a buffer kept on the parameter between steps: zeroing a warm table-sized tensor costs a memset, a fresh
    one its page faults too (44 vs 398 ms for [2^20, 192] fp32 on the development VM). The trainer drops `.grad`
    after every step (zero_grad(set_to_none=True)), so nothing holds the previous step's gradient."""
    g = p.grad
    if g is not None and g.is_sparse:
        dense = getattr(p, "_dense_grad", None)
        if dense is None:
            dense = p._dense_grad = torch.zeros_like(p)
        else:
            dense.zero_()
        dense.index_add_(0, g._indices()[0], g._values().to(p.dtype))  # in entry order: reader 1, then reader 2
        p.grad = dense


__all__ = ["ROW_SPARSE_TABLES", "RowSparseAdamW", "clip_grad_norm_", "dense_grads_from_rows", "mark_row_sparse"]
