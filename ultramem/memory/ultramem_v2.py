"""The UltraMemV2 memory layer (ByteDance Seed 2025, arXiv 2508.18756; digest §2): per-rank Tucker retrieval,
PEER-style pre-values, one output projection, one global table read by every layer through a ring window.

    h [B, T, d] (the FFN's normalised input; the layer runs beside the FFN, its output is added to the residual)
      --query_proj, RMSNorm-->  q [BT, H, 2 (row/col), r or 1, Dk]          (r queries per side if query_per_rank)
      --keys [H, 2, n, Dk, r], RMSNorm-->  S [H, 2, r, BT, n]                S^(j) = K^(j) q^(j)          (Eq. 10)
      --rank-1 filter-->  top-m rows by u^T S_row, top-m columns by v^T S_col (u, v: SVD of sum_c C_c, cached)
      --Tucker grid-->    m x m candidates ranked by sum_c S_row^T C_c S_col, keep the top m per head;
                          per-core raw scores s [BT, H*m, C] (no softmax anywhere)                   (Eq. 7/11)
      --shuffle, ring-->  physical row (shuffle[i_row * n + i_col] + l * num_keys^2) mod Nall            (Eq. 8)
      --PEER read-->      a_k = <pre_values_proj(h), P[row_k]> (GELU if glu_act), w_kc = a_k s_kc,
                          o[chunk c] = sum over heads and k of w_kc V[row_k, chunk c]    [BT, Dv]        (Eq. 15)
      --values_proj-->    y [B, T, d] (one Linear(Dv, d) for all heads), dropout                         (Eq. 12)

Tables. `UltraMemV2Table` owns values [Nall, Dv] and pre_values [Nall, Dp], Nall = num_keys^2 * L; the model builds
it once and passes it to every layer, which registers it as its submodule `table` (its parameters are shared, so
`model.parameters()` yields them once). Layer l owns keys for n = cfg.keys_per_side(L) per side (official knum' =
floor(sqrt(Nall * share_ratio)); num_keys when share_ratio = 0) and reads the n^2 rows starting at l * num_keys^2,
wrapping mod Nall (`ring_rows`): share_ratio = 0 gives private slices, larger ratios overlapping ring windows
(the paper's "Sg-Ring"). As in the official code a fixed random permutation `shuffle` of the n^2 virtual slots comes
first; with E = 1 it only decides which slots of neighbouring layers' windows coincide.

Rank-1 cache. u, v are the leading singular vectors of sum_c C_c per head, detached. They are computed at
construction (sign: sum >= 0, the Perron vectors of the U(0, 1) init cores) and must be refreshed after every
optimizer step by `on_optimizer_step()`, which keeps the official sign alignment (flip when -u, -v is closer in L1
to the previous vectors); the same function as `ultramem.memory.tdqkr.TDQKR.refresh_rank1` (`tdqkr.rank1_vectors`).

Initialisation (`cfg.init`):
  official  the released code: values, pre_values ~ N(0, 0.02); query_proj, keys ~ N(0, Dk^-1/2); values_proj
            ~ N(0, Dv^-1/2); pre_values_proj ~ N(0, d^-1/2); cores ~ U(0, 1); both RMSNorm weights Dk^-0.4.
  paper     App. A: the same keys, queries, cores and norm weights (Dk^-0.4 is the code's form of "mean top score
            ~ 1"); every linear, pre_values_proj and values_proj included, ~ N(0, init_std) (the paper's "linear
            layers use sqrt(2/(5 h))", this project's init_std), no depth scaling; and one sigma_V for values and
            pre_values chosen so that the memory output variance at init equals the FFN output variance. Eq. 26
            as extracted is ambiguous (it reads as sigma_V^4), so sigma_V is solved from the variance itself,
            with the score statistics measured (the paper's Monte-Carlo sigma_s):
              FFN (this project's GELU MLP d -> f -> d, fc ~ N(0, init_std), proj ~ N(0, init_std^2 / (2L)), on a
              unit-variance input):  var_ffn = f * init_std^2 / (2L) * g2(sqrt(d) * init_std)
              memory, exactly in expectation over V, P ~ N(0, sigma_V^2) (rows selected by one token are distinct
              within a head):  var_mem = init_std^2 * (Dv / C) * sigma_V^2 * E_x[ g2(sigma_V |p|) sum_{k,c} s_kc^2 ]
            with g2(t) = E[act(t z)^2], z ~ N(0, 1) (t^2 without glu_act, which makes sigma_V^4 closed-form: this
            is Eq. 22 with (1 + sigma_s^2) -> the measured second moment of the selected scores). E_x[...] is
            measured on 8192 N(0, 1) inputs through 64 independent probe retrievals of the same init (seeded, own
            RNG, the global one untouched): one layer's score scale depends on its own cores and keys and varies by
            ~2x in variance between draws, so the probes estimate the expectation over layers, and every layer's
            output variance lies around var_ffn (the table is shared, so sigma_V cannot be per layer). Then
            var_mem = var_ffn is solved for sigma_V (closed form; a fixed-point iteration with glu_act).
            L = num_layers (the memory is in every block); f = ffn_hidden (default 4 d). With heads > 1 two heads
            can pick the same row, which the expectation ignores.
            tests/test_ultramem_v2.py measures the resulting output std against a real `ultramem.mlp.MLP`.

Departures from the official code (digest §2.7): with query_per_rank every (head, side, rank) has its own query,
and each head has its own queries (the official helper shares query slot i // 2 between heads and wires ranks to the
wrong halves); the pure-PyTorch path takes the pre-value dots with `sampled_dot` (fused, no [BT, H*m, Dp] gather, sparse
backward) and pools values with the fused `gather_pool` (one chunk weight per core). The key-balance loss follows V2:380-396: per side, over all heads and
tokens, Kn * sum_n f_n p_n on the rank-1 scores (p: mean softmax, f: share of the top-m hits), row + column.

Cost per token per layer (all heads): dense parameters query_proj d*H*2*r'*Dk, keys H*2*n*Dk*r (one matmul), cores
C*H*r^2, pre_values_proj d*Dp, values_proj Dv*d; H*m rows of values and pre_values read. Parameter-free arithmetic:
H * (4 n r [u^T S, v^T S] + 2 m r^2 + 2 m^2 r [grid] + C m (2 r^2 + 2 r) [winners' per-core scores] + C m [w = a s]).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.errors import ConfigError
from ultramem.kernels.retrieval import gather_pool
from ultramem.kernels.sampled import sampled_dot
from ultramem.memory.query import NORM_EPS
from ultramem.memory.tdqkr import balance_loss, rank1_vectors, tucker_penalty

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import UltraMemV2Config

CALIBRATION_SAMPLES = 8192  # inputs, split over CALIBRATION_PROBES independent probe retrievals
CALIBRATION_PROBES = 64
CALIBRATION_SEED = 0
OFFICIAL_VALUE_STD = 0.02


def ring_rows(slot: torch.Tensor, layer_index: int, cfg: UltraMemV2Config, num_layers: int) -> torch.Tensor:
    """Window slot in [0, n^2) of layer `layer_index` -> physical row of the global table (same shape)."""
    return (slot + layer_index * cfg.num_keys**2) % cfg.table_rows(num_layers)


# ---- retrieval ---------------------------------------------------------------------------------------------------


class V2Retrieval(nn.Module):
    """Tucker query-key retrieval with per-rank queries: x [BT, d] -> top-m slots per head and their core scores."""

    def __init__(self, d_model: int, cfg: UltraMemV2Config, n_side: int):
        super().__init__()
        self.cfg, self.n = cfg, n_side
        H, r, C, Dk = cfg.heads, cfg.tucker_rank, cfg.num_cores, cfg.key_dim
        self.rq = r if cfg.query_per_rank else 1  # queries per (head, side)
        self.query_proj = nn.Linear(d_model, H * 2 * self.rq * Dk, bias=False)  # viewed as [H, 2, rq, Dk]
        self.query_norm = nn.RMSNorm(Dk, eps=NORM_EPS)
        self.keys = nn.Parameter(torch.empty(H, 2, n_side, Dk, r))
        self.key_norm = nn.RMSNorm(Dk, eps=NORM_EPS)
        self.cores = nn.Parameter(torch.empty(C, H, r, r))
        self.register_buffer("u", torch.zeros(H, r))  # rank-1 row vector of sum_c C_c per head (no gradient)
        self.register_buffer("v", torch.zeros(H, r))  # rank-1 column vector

    def reset_parameters(self) -> None:
        """Init shared by both modes (digest §2.3): N(0, Dk^-1/2) query_proj and keys, U(0, 1) cores, norms Dk^-0.4."""
        Dk = self.cfg.key_dim
        nn.init.normal_(self.query_proj.weight, std=Dk**-0.5)
        nn.init.normal_(self.keys, std=Dk**-0.5)
        nn.init.constant_(self.query_norm.weight, Dk**-0.4)
        nn.init.constant_(self.key_norm.weight, Dk**-0.4)
        nn.init.uniform_(self.cores, 0.0, 1.0)
        self.u.zero_()
        self.v.zero_()
        self.refresh_rank1()

    def rank_scores(self, x: torch.Tensor) -> torch.Tensor:
        """x [BT, d] -> per-rank scores of every key S [H, 2, r, BT, n] (S[:, 0] rows, S[:, 1] columns)."""
        return self._matmul(*self._operands(x))

    def _operands(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [BT, d] -> normalised queries [H*2*rq, BT, Dk] and keys [H*2*rq, r*n/rq, Dk] of the score matmul."""
        H, r, Dk, n = self.cfg.heads, self.cfg.tucker_rank, self.cfg.key_dim, self.n
        q = self.query_norm(self.query_proj(x).view(-1, H, 2, self.rq, Dk))  # [BT, H, 2, rq, Dk]
        keys = self.key_norm(self.keys.permute(0, 1, 4, 2, 3))  # [H, 2, r, n, Dk]
        BT = q.shape[0]
        q = q.permute(1, 2, 3, 0, 4).reshape(H * 2 * self.rq, BT, Dk)
        return q, keys.reshape(H * 2 * self.rq, r * n // self.rq, Dk)

    def _matmul(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """The operands of `_operands` -> S [H, 2, r, BT, n]: with rq == r one [BT, Dk] x [Dk, n] product per
        (head, side, rank), S^(j) = K^(j) q^(j); with one query per (head, side) one product for all ranks."""
        H, r, n, BT = self.cfg.heads, self.cfg.tucker_rank, self.n, q.shape[1]
        S = torch.bmm(q, keys.transpose(1, 2))  # [H*2*rq, BT, r*n/rq]
        return S.view(H, 2, r, BT, n) if self.rq == r else S.view(H, 2, BT, r, n).transpose(2, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [BT, d] -> (virtual slot [BT, H*m] long in [0, n^2), per-core scores [BT, H*m, C], balance loss [])."""
        H, r, m = self.cfg.heads, self.cfg.tucker_rank, self.cfg.top_m
        balance_grad = self.cfg.balance_loss_weight > 0
        # S needs a gradient only for the balance loss or with one query for all ranks (the winners' scores get
        # theirs from `sampled_dot`, which visits only the winners' keys; ultramem/kernels/sampled.py).
        sparse = not balance_grad and self.rq == r and torch.is_grad_enabled()
        q, keys = self._operands(x)
        with torch.set_grad_enabled(not sparse and torch.is_grad_enabled()):
            S = self._matmul(q, keys)  # [H, 2, r, BT, n]
        BT = S.shape[3]
        uv = torch.stack([self.u, self.v], 1).to(S.dtype)  # [H, 2, r]
        s1 = torch.einsum("hsr,hsrtn->hstn", uv, S if balance_grad else S.detach())  # [H, 2, BT, n] rank-1 scores
        with torch.no_grad():  # indices only
            kept = s1.topk(m, dim=-1, sorted=False).indices  # [H, 2, BT, m]: stage 1, rows and columns
            sel = S.gather(4, kept.unsqueeze(2).expand(H, 2, r, BT, m))  # [H, 2, r, BT, m]
            csum = self.cores.sum(0).to(S.dtype).unsqueeze(1)  # [H, 1, r, r]
            grid = sel[:, 0].permute(0, 2, 3, 1) @ csum @ sel[:, 1].transpose(1, 2)  # [H, BT, m, m]
            best = grid.flatten(-2).topk(m, dim=-1, sorted=False).indices  # [H, BT, m] into the m x m grid
            winners = torch.stack([kept[:, 0].gather(2, best // m), kept[:, 1].gather(2, best % m)], 1)  # [H,2,BT,m]
        pos = winners.unsqueeze(2).expand(H, 2, r, BT, m)
        if sparse:
            with torch.no_grad():
                values = S.gather(4, pos)  # [H, 2, r, BT, m]
                idx = pos + torch.arange(H * 2 * r, device=S.device).view(H, 2, r, 1, 1) * self.n  # rows of keys
            W = sampled_dot(q.reshape(H * 2 * r * BT, -1), keys.reshape(H * 2 * r * self.n, -1),
                            idx.reshape(-1, m), values.view(-1, m)).view(H, 2, r, BT, m)
        else:
            W = S.gather(4, pos)  # [H, 2, r, BT, m], differentiable
        scores = torch.einsum("hatk,chab,hbtk->thkc", W[:, 0], self.cores.to(S.dtype), W[:, 1])  # [BT, H, m, C]
        virtual = (winners[:, 0] * self.n + winners[:, 1]).permute(1, 0, 2).reshape(BT, H * m)
        with torch.set_grad_enabled(balance_grad and torch.is_grad_enabled()):
            balance = balance_loss(s1, kept)
        return virtual, scores.reshape(BT, H * m, -1), balance

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """u, v <- leading singular vectors of sum_c C_c per head, sign-aligned (official `_online_update_...`)."""
        if self.cores.is_meta:
            return
        u, v = rank1_vectors(self.cores, self.u, self.v)
        self.u.copy_(u)
        self.v.copy_(v)

    def tucker_penalty(self) -> torch.Tensor:
        """Eq. 17 (mean over heads and i >= 2): relu(lambda_i - tau)^2, lambda = singular values of sum_c C_c."""
        return tucker_penalty(self.cores, self.cfg.tucker_margin)


# ---- tables and init ---------------------------------------------------------------------------------------------


class UltraMemV2Table(nn.Module):
    """The global tables of all UltraMemV2 layers: values [Nall, Dv] and pre_values [Nall, Dp]; built once.

    `value_std` is the std they were drawn with; `calibration` what the paper init measured (None for official).
    """

    def __init__(self, d_model: int, cfg: UltraMemV2Config, num_layers: int, init_std: float = 0.02,
                 ffn_hidden: int | None = None):
        super().__init__()
        cfg.validate(num_layers=num_layers)
        self.cfg, self.num_layers, self.d_model, self.init_std = cfg, num_layers, d_model, init_std
        self.ffn_hidden = ffn_hidden or 4 * d_model
        N = cfg.table_rows(num_layers)
        self.values = nn.Parameter(torch.empty(N, cfg.value_dim))
        self.pre_values = nn.Parameter(torch.empty(N, cfg.pre_value_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.calibration: dict[str, float] | None = None
        if self.cfg.init == "official":
            self.value_std: float | None = OFFICIAL_VALUE_STD
        elif self.values.is_meta:
            self.value_std = None
        else:
            self.calibration = paper_value_std(self.d_model, self.cfg, self.num_layers, self.init_std, self.ffn_hidden)
            self.value_std = self.calibration["value_std"]
        std = self.value_std if self.value_std is not None else 1.0
        nn.init.normal_(self.values, std=std)
        nn.init.normal_(self.pre_values, std=std)


def gelu_second_moment(t: torch.Tensor) -> torch.Tensor:
    """E[gelu(t z)^2] for z ~ N(0, 1), elementwise in t (trapezoid rule on [-8, 8], float64)."""
    z = torch.linspace(-8.0, 8.0, 401, dtype=torch.float64)
    w = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    return (F.gelu(t.double().unsqueeze(-1) * z).pow(2) * w).sum(-1)


def ffn_output_var(d_model: int, ffn_hidden: int, init_std: float, num_layers: int) -> float:
    """Output variance at init of `ultramem.mlp.MLP` (GELU, fc N(0, init_std), proj N(0, init_std^2/(2L))) on a
    unit-variance input: f * init_std^2 / (2L) * E[gelu(z)^2], z ~ N(0, d init_std^2)."""
    g2 = gelu_second_moment(torch.tensor(math.sqrt(d_model) * init_std)).item()
    return ffn_hidden * init_std**2 / (2 * num_layers) * g2


@torch.no_grad()
def paper_value_std(d_model: int, cfg: UltraMemV2Config, num_layers: int, init_std: float,
                    ffn_hidden: int) -> dict[str, float]:
    """sigma_V of values and pre_values for the paper init (module docstring): memory output var = FFN output var.

    Returns {"value_std", "target_var" (the FFN's), "score_sq" (E sum_{k,c} s^2 per token), "pre_sq" (E |p|^2)}.
    """
    target = ffn_output_var(d_model, ffn_hidden, init_std, num_layers)
    s2, p2 = probe_statistics(d_model, cfg, num_layers, init_std)  # [S] each
    coef = init_std**2 * cfg.value_dim / cfg.num_cores  # values_proj ~ N(0, init_std) over Dv/C coords per core
    # var(sigma) = coef * sigma^4 * E[|p|^2 sum s^2] without glu_act (solved directly)
    sigma = (target / (coef * (p2 * s2).mean().item())) ** 0.25
    if cfg.glu_act:  # var(sigma) = coef * sigma^2 * E[g2(sigma |p|) sum s^2], locally ~ sigma^2..sigma^4: iterate
        for _ in range(30):
            var = coef * sigma**2 * (gelu_second_moment(sigma * p2.sqrt()) * s2).mean().item()
            if abs(var / target - 1) < 1e-6:
                break
            sigma *= (target / var) ** 0.25
    return {"value_std": sigma, "target_var": target, "score_sq": s2.mean().item(), "pre_sq": p2.mean().item()}


def probe_statistics(d_model: int, cfg: UltraMemV2Config, num_layers: int,
                     init_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: (sum_{k,c} s_kc^2, |pre_values_proj(x)|^2) [S] float64, on N(0, 1) inputs x through
    CALIBRATION_PROBES retrievals of the paper init (their own seeded RNG; the global one is untouched).

    Several independent probes average over the init draws: one layer's score scale depends on its own 2 x 2 cores
    and keys (its selected-score second moment varies by ~2x between draws), and the table is shared by all layers.
    """
    s2, p2 = [], []
    with torch.device("cpu"), torch.random.fork_rng(devices=[]):
        torch.manual_seed(CALIBRATION_SEED)
        for _ in range(CALIBRATION_PROBES):
            probe = V2Retrieval(d_model, cfg, cfg.keys_per_side(num_layers))
            probe.reset_parameters()
            pre_w = torch.randn(cfg.pre_value_dim, d_model) * init_std  # pre_values_proj of the paper init
            x = torch.randn(CALIBRATION_SAMPLES // CALIBRATION_PROBES, d_model)
            scores = probe(x)[1]
            s2.append(scores.double().pow(2).sum((1, 2)))
            p2.append((x @ pre_w.T).double().pow(2).sum(-1))
    return torch.cat(s2), torch.cat(p2)


# ---- the layer ---------------------------------------------------------------------------------------------------


def peer_read(values: torch.Tensor, pre_values: torch.Tensor, rows: torch.Tensor, scores: torch.Tensor,
              p: torch.Tensor, glu_act: bool = False) -> torch.Tensor:
    """The PEER read (Eq. 15): rows [BT, K], per-core scores [BT, K, C], pre-value input p [BT, Dp] -> pooled
    [BT, Dv], chunk c = sum_k act(<p, P[row_k]>) s_kc V[row_k, chunk c] (act: GELU with glu_act, else identity).
    ultramem.parallel.memory_parallel swaps in `ColumnParallelPeerRead` for column-split tables."""
    a = sampled_dot(p, pre_values, rows)  # [BT, K]: <p, P[row_k]>, no [BT, K, Dp] gather, sparse backward
    if glu_act:
        a = F.gelu(a)
    w = a.unsqueeze(-1) * scores  # [BT, K, C]: core c weights chunk c of the value row
    return gather_pool(values, rows, w.to(values.dtype))  # [BT, Dv], summed over heads and slots


class UltraMemV2Layer(nn.Module):
    def __init__(self, d_model: int, cfg: UltraMemV2Config, layer_index: int, num_layers: int, init_std: float,
                 table: UltraMemV2Table):
        super().__init__()
        cfg.validate(num_layers=num_layers)
        N = cfg.table_rows(num_layers)
        if not 0 <= layer_index < num_layers:
            raise ConfigError(f"UltraMemV2Layer: layer_index {layer_index} outside 0..{num_layers - 1}")
        if tuple(table.values.shape) != (N, cfg.value_dim) or tuple(table.pre_values.shape) != (N, cfg.pre_value_dim):
            raise ConfigError(f"UltraMemV2Layer: table shapes {tuple(table.values.shape)}, "
                              f"{tuple(table.pre_values.shape)}; expected ({N}, {cfg.value_dim}), "
                              f"({N}, {cfg.pre_value_dim}) for {num_layers} layers")
        self.cfg, self.layer_index, self.num_layers, self.init_std = cfg, layer_index, num_layers, init_std
        n = cfg.keys_per_side(num_layers)
        self.retrieval = V2Retrieval(d_model, cfg, n)
        self.pre_values_proj = nn.Linear(d_model, cfg.pre_value_dim, bias=False)
        self.values_proj = nn.Linear(cfg.value_dim, d_model, bias=False)
        self.table = table  # shared by every layer: a submodule of each
        self.register_buffer("shuffle", torch.randperm(n * n).to(torch.int32))  # virtual slot -> window slot
        self.dropout = nn.Dropout(cfg.dropout)
        self.peer_read = peer_read  # ultramem.parallel.memory_parallel swaps in the op for column-split tables
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Layer-owned parameters for `cfg.init` (module docstring); the table initialises itself."""
        d, cfg = self.values_proj.out_features, self.cfg
        self.retrieval.reset_parameters()
        paper = cfg.init == "paper"
        nn.init.normal_(self.pre_values_proj.weight, std=self.init_std if paper else d**-0.5)
        nn.init.normal_(self.values_proj.weight, std=self.init_std if paper else cfg.value_dim**-0.5)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [BT, d] -> (physical rows [BT, H*m] long, per-core scores [BT, H*m, C], balance loss [])."""
        virtual, scores, balance = self.retrieval(x)
        slot = self.shuffle[virtual].long()
        return ring_rows(slot, self.layer_index, self.cfg, self.num_layers), scores, balance

    def value_rows(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, T, d] -> rows of the global table read [BT, H*m] (memory/usage.py)."""
        return self.lookup(h.reshape(-1, h.shape[-1]))[0]

    def forward(self, h: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """h [B, T, d] -> (y [B, T, d], aux). Token-wise: decoding needs no state (`state` is accepted, unused)."""
        B, T, d = h.shape
        x = h.reshape(B * T, d)
        rows, scores, balance = self.lookup(x)  # [BT, K], [BT, K, C], K = H*m
        p = self.pre_values_proj(x)  # [BT, Dp]
        pooled = self.peer_read(self.table.values, self.table.pre_values, rows, scores, p, self.cfg.glu_act)  # [BT, Dv]
        y = self.values_proj(pooled)  # [BT, d]
        return self.dropout(y).view(B, T, d), self.aux(balance)

    def aux(self, balance: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"aux_loss": weighted sum (trains), "balance_loss", "tucker_penalty": unweighted values for logging}."""
        cfg = self.cfg
        with torch.set_grad_enabled(cfg.tucker_penalty > 0 and torch.is_grad_enabled()):
            penalty = self.retrieval.tucker_penalty()
        total = balance.new_zeros(())
        if cfg.balance_loss_weight > 0:
            total = total + cfg.balance_loss_weight * balance
        if cfg.tucker_penalty > 0:
            total = total + cfg.tucker_penalty * penalty
        return {"aux_loss": total, "balance_loss": balance.detach(), "tucker_penalty": penalty.detach()}

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """Call after every optimizer step: refreshes the rank-1 vectors u, v from the SVD of sum_c C_c."""
        self.retrieval.refresh_rank1()
