"""Dropless token-choice top-k mixture-of-experts FFN: the paper's MoE-<size>-2in<N> baseline.

Router (Switch / GShard token choice, computed in fp32 even under autocast):
    p = softmax(x W_r)                          [N, E]   W_r: Linear(d, E, bias=False)
    gates, experts = topk(p, k)                 [N, k]
    gates /= gates.sum(-1)                      (if cfg.normalize_gates)
    y = sum_j gates_j * Expert_{experts_j}(x)   Expert_e(x) = GELU(x W_in[e]) W_out[e]

Gate normalisation: by default the k selected probabilities are renormalised to sum to 1 (Mixtral, DBRX
`moe_normalize_expert_weights=1`), so the MoE output has the scale of one dense FFN whatever k and E are. The
official UltraMem code is an OLMoE fork whose MoE is MegaBlocks with `moe_normalize_expert_weights=None`, i.e. raw
softmax probabilities; `cfg.normalize_gates=False` reproduces that. With k=1 and normalisation every gate is 1, so the
router then learns only through the auxiliary losses.

Dropless: every token is processed by all k of its experts (no capacity, nothing dropped). Token-slots are sorted by
expert, each expert multiplies one contiguous slice, and the outputs are un-permuted and combined per token. The
combine is a gather through the inverse permutation followed by a k-term weighted sum, rather than a scatter-add:
same result, and deterministic on GPUs (no atomics).

Auxiliary losses (weighted sum returned as aux["aux_loss"], components unweighted):
    balance = E * sum_i f_i * P_i   (Switch eq. 4, GShard top-k form)
        f_i = (token-slots routed to i) / (N k)   no gradient;  P_i = mean_t p_{t,i}   carries the gradient.
        Normalising f by N k (not N) makes sum_i f_i = 1, so balance = 1 at perfect balance for any k, and
        balance = E when every token-slot and all router mass go to one expert. This equals Megatron's
        switch_load_balancing_loss_func: sum(probs.mean(0) * tokens_per_expert) * E / (N * topk).
    z = mean_t logsumexp(x_t W_r)^2   (ST-MoE router z-loss)
Both are per layer; MegaBlocks (the official code) averages them over MoE layers before weighting.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.kernels.grouped import grouped_mm, grouped_mm_unsupported_reason
from ultramem.precision import at_least_fp32

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MoEConfig


class MoEFFN(nn.Module):
    def __init__(self, d_model: int, ffn_hidden: int, cfg: MoEConfig, init_std: float, n_layers: int,
                 dropout: float):
        super().__init__()
        self.cfg = cfg
        E, h = cfg.num_experts, cfg.expert_hidden or ffn_hidden
        self.router = nn.Linear(d_model, E, bias=False)
        self.w_in = nn.Parameter(torch.empty(E, d_model, h))
        self.w_out = nn.Parameter(torch.empty(E, h, d_model))
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("last_load", torch.zeros(E), persistent=False)  # [E] slot fraction, last forward
        self.register_buffer("load_counts", torch.zeros(E), persistent=False)  # [E] slots since take_load()
        nn.init.normal_(self.router.weight, std=init_std)
        nn.init.normal_(self.w_in, std=init_std)
        # GPT-2 residual-projection scaling, as for the dense MLP's output matrix.
        nn.init.normal_(self.w_out, std=init_std / math.sqrt(2 * n_layers))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        B, T, d = x.shape
        k = self.cfg.top_k
        xf = x.reshape(B * T, d)  # [N, d]
        logits, probs, gates, experts = self.route(xf)  # [N, E], [N, E], [N, k], [N, k]
        counts = torch.bincount(experts.flatten(), minlength=self.cfg.num_experts)  # [E] token-slots per expert

        order = experts.flatten().argsort(stable=True)  # [N k] slot ids grouped by expert
        xs = xf[order // k]  # [N k, d] each slot's token, in expert order
        ys = self.run_experts(xs, counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y_slots = ys[inverse].view(B * T, k, d)  # [N, k, d] slot outputs back in (token, choice) order
        y = torch.einsum("nk,nkd->nd", gates.to(y_slots.dtype), y_slots)  # [N, d]

        balance = switch_balance_loss(probs, self.balance_counts(counts), k)
        z = router_z_loss(logits)
        self._record_load(counts)
        aux_loss = self.cfg.balance_loss_weight * balance + self.cfg.z_loss_weight * z
        return self.dropout(y.view(B, T, d)), {"aux_loss": aux_loss, "moe_balance": balance, "moe_z": z}

    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """xf [N, d] -> logits [N, E], probs [N, E], gates [N, k], experts [N, k] (long), all router maths in fp32."""
        with torch.autocast(xf.device.type, enabled=False):
            logits = F.linear(at_least_fp32(xf), at_least_fp32(self.router.weight))  # [N, E]
        probs = logits.softmax(dim=-1)  # [N, E]
        gates, experts = probs.topk(self.cfg.top_k, dim=-1)  # [N, k]
        if self.cfg.normalize_gates:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return logits, probs, gates, experts

    # ---- expert compute: two equal paths over the expert-sorted slots -----------------------------------------

    # Expert parallelism (ultramem.parallel.expert_parallel) replaces these two per instance: experts on other
    # ranks, and the balance loss over the global batch.
    def run_experts(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [S, d] sorted by expert, counts [E] -> [S, d]."""
        return self.experts_grouped(xs, counts) if self.use_grouped_mm(xs) else self.experts_loop(xs, counts)

    def balance_counts(self, counts: torch.Tensor) -> torch.Tensor:
        """Token-slot counts [E] that f_i of the balance loss is computed from: this forward's own."""
        return counts

    def experts_loop(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [S, d] sorted by expert -> [S, d]; one pair of matmuls per expert that received slots."""
        # unbind, not w_in[e]: its backward stacks the E gradients once instead of adding E full-size zero tensors
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        outs = []
        for e, xe in enumerate(xs.split(counts.tolist())):  # xe [c_e, d], contiguous
            if xe.shape[0]:
                outs.append(F.gelu(xe @ w_in[e]) @ w_out[e])  # [c_e, d]
        return torch.cat(outs)

    def experts_grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs [S, d] sorted by expert -> [S, d] with two torch._grouped_mm calls (offsets = cumsum(counts))."""
        dtype = _matmul_dtype(xs)  # _grouped_mm ignores autocast, so cast as autocast would
        offs = counts.cumsum(0).to(torch.int32)  # [E]
        h = F.gelu(grouped_mm(xs.to(dtype), self.w_in.to(dtype), offs))  # [S, h]
        return grouped_mm(h, self.w_out.to(dtype), offs)  # [S, d]

    def use_grouped_mm(self, xs: torch.Tensor) -> bool:
        """cfg.grouped_mm: off -> loop; on -> grouped or an error; auto -> grouped where supported.

        auto also takes the loop when there are fewer token-slots than experts (decoding): the loop then provably
        reads only the weights of the experts that received tokens, at most B k of them.
        """
        mode = self.cfg.grouped_mm
        if mode == "off":
            return False
        reason = grouped_mm_unsupported_reason(xs.device, _matmul_dtype(xs), tuple(self.w_in.shape[1:]))
        if mode == "on" and reason is not None:
            raise ConfigError(f"model.moe.grouped_mm: 'on' but {reason}; set model.moe.grouped_mm to auto or off")
        return reason is None and (mode == "on" or xs.shape[0] >= self.cfg.num_experts)

    # ---- per-expert load ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _record_load(self, counts: torch.Tensor) -> None:
        self.last_load.copy_(counts / counts.sum())
        if self.training:
            self.load_counts += counts

    def take_load(self) -> torch.Tensor:
        """[E] fraction of token-slots per expert over the training forwards since the previous call; resets."""
        total = self.load_counts.sum()
        load = self.load_counts / total if total > 0 else self.load_counts.clone()
        self.load_counts.zero_()
        return load

    def load_stats(self, load: torch.Tensor | None = None) -> dict[str, float]:
        """Summary of a [E] load vector (default: last forward). Ratios are relative to the uniform load 1/E."""
        f = (self.last_load if load is None else load).float()
        mean = 1.0 / f.numel()
        return {
            "load_max": f.max().item(),
            "load_mean": mean,
            "load_max_over_mean": f.max().item() / mean,
            "load_min_over_mean": f.min().item() / mean,
            "load_cv": (f.std(unbiased=False) / mean).item(),
            "experts_idle": int((f == 0).sum().item()),
        }


def switch_balance_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """probs [N, E], counts [E] -> E * sum_i f_i P_i with f_i = counts_i / (N k) (no grad), P_i = mean_t probs."""
    N, E = probs.shape
    f = counts.detach().to(probs.dtype) / (N * top_k)  # [E], sums to 1
    return E * (f * probs.mean(dim=0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """logits [N, E] -> mean_t logsumexp(logits_t)^2 (ST-MoE, eq. 5)."""
    return torch.logsumexp(at_least_fp32(logits), dim=-1).square().mean()


def _matmul_dtype(x: torch.Tensor) -> torch.dtype:
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
