"""Tucker Decomposed Query-Key Retrieval (TDQKR, UltraMem §2.2) with Multi-Core Scoring (MCS, §2.4).

For one head, with per-rank row/column scores S_row, S_col in R^{r x n'} and Tucker cores C_1..C_h in R^{r x r},
the grid score of virtual slot (i, j) is  sum_c S_row[:, i]^T C_c S_col[:, j]  (paper: S_grid = S_row^T C S_col).
The full n' x n' grid is never built. As in the official v1 code (`TuckerDecomposedQueryKeyRetrieval`):

  stage 1: u, t = leading left/right singular vectors of sum_c C_c (cached buffers, refreshed by SVD after every
           optimizer step, detached, sign-aligned); keep the top-m rows by u^T S_row and the top-m columns by
           t^T S_col (the paper's I_TopM(u^T S_row) filter);
  stage 2: score the m x m survivors with the full cores, rank by the sum over cores, keep the top m;
  output:  per-core raw scores of the winners (no softmax: "rm softmax") and virtual index row * n' + col.

Shapes: H heads in Hq = H / query_share query groups of s = query_share heads (head i uses query group i // s),
keys [H, 2, n', D_k, r] RMS-normalised over D_k, cores [h, H, r, r]. Internally tensors are laid out
[Hq, T, s, ...] so that every step is one batched matmul/topk over all heads, with no loop over heads or cores.

How it is computed (exactly the selection above, arranged for speed; docs/performance.md has the measurements):
  - Rank bases. With orthonormal B_row = [u, u_perp], B_col = [t, t_perp] (`rank1_basis`), the keys are rotated
    once per forward (K B, [r, n', D_k] per side: cheap) and the cores with them (B_row^T C_c B_col, [r, r]). Rank 0
    of the one query x key matmul is then u^T S_row / t^T S_col itself, stage 1 reads it directly, and every grid
    score S_row^T C_c S_col is unchanged (B B^T = I). The remaining ranks of the same matmul are what stage 2 needs.
    Computing only rank 0 densely and the other ranks for the m survivors (r x fewer matmul FLOPs) was measured
    and dropped: gathering the survivors' keys moves as many bytes as the dense matmul takes time on a CPU.
  - The score matmul, both top-m and the m x m grid run under no_grad (indices only); the winners' per-rank scores
    are gathered from the score tensor and get their gradient from `ultramem.kernels.sampled.sampled_dot`, whose
    backward visits only the winners' keys (an embedding_bag each way) instead of zero-filling a score-sized
    gradient and running the score matmul's backward densely (docs/performance.md, issue 23). With the balance
    loss on, S needs its own gradient and the dense path is kept.
  - Both top-m calls return their m entries unsorted (which m are kept is what matters; their order only changes
    the order of the summation in the value pooling).

Departures from the official code, each deliberate:
  - Ranking uses S_row^T (sum_c C_c) S_col, which equals the official sum over per-core grids; the per-core
    scores are then computed only for the m winners instead of for all m^2 candidates.
  - u, t are computed from the cores at construction (the official buffers start at zero, which makes the very
    first step's stage-1 selection arbitrary), with the sign chosen so that u and t sum to >= 0: for the U(0, 1)
    cores of the init the leading singular vectors are then the non-negative Perron vectors. Later refreshes keep
    the official sign alignment (flip when -u, -t is closer in L1 to the previous vectors).
  - The Tucker-core penalty alpha/(r-1) sum_{i>=2} relu(lambda_i - tau)^2 (paper Eq. 11-12) is applied when
    `tucker_penalty` (alpha) > 0; the official code computes it on sum_c C_c but leaves it commented out, so the
    default is alpha = 0 and the value is still reported (unweighted) for logging.
  - `balance_loss_weight` (beta, default 0: the v1 paper has no such loss) adds UltraMemV2's key-balance loss
    (V2 Eq. 18-20, `balance_loss` below) on the stage-1 rank-1 scores: an opt-in against top-m selection
    concentrating on few rows (docs/results/README.md "Seed distributions" measures what it does).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.kernels.sampled import sampled_dot
from ultramem.memory.query import NORM_EPS, ProductQuery
from ultramem.precision import at_least_fp32

if TYPE_CHECKING:  # annotations only: ultramem.config imports the family registry, which builds these layers
    from ultramem.config import MemoryConfig


class TDQKR(nn.Module):
    def __init__(self, d_model: int, cfg: MemoryConfig):
        super().__init__()
        self.cfg = cfg
        H, s, r, h = cfg.heads, cfg.query_share, cfg.tucker_rank, cfg.num_cores
        self.n_side = cfg.keys_per_side  # n' = num_keys * sqrt(E)
        self.query = ProductQuery(d_model, H // s, cfg.key_dim, cfg.query_conv, cfg.qk_norm)
        self.keys = nn.Parameter(torch.empty(H, 2, self.n_side, cfg.key_dim, r))
        self.key_norm = nn.RMSNorm(cfg.key_dim, eps=NORM_EPS) if cfg.qk_norm else None
        self.cores = nn.Parameter(torch.empty(h, H, r, r))
        # Rank-1 approximation of sum_c C_c per head, used only to pick stage-1 candidates (no gradient).
        self.register_buffer("u", torch.zeros(H, r))
        self.register_buffer("t", torch.zeros(H, r))

    # ---- scores --------------------------------------------------------------------------------------------------

    def rank_scores(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        """Per-rank row/column scores for every key: [Hq, 2, BT, s, r, n'] (S_row = [:, 0], S_col = [:, 1])."""
        return self._scores(self.query(x, state), None)

    def _scores(self, q: torch.Tensor, bases: torch.Tensor | None) -> torch.Tensor:
        """q [BT, Hq, 2, Dk] -> scores against every key [Hq, 2, BT, s, r, n'], in the rank bases `bases`
        ([H, 2, r, r], orthonormal; None = the keys' own ranks). Keys come last so that top-m runs on contiguous rows.
        """
        qg, keys = self._operands(q, bases)
        return self._matmul(qg, keys)

    def _operands(self, q: torch.Tensor, bases: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [BT, Hq, 2, Dk] -> the score matmul's operands: queries [Hq*2, BT, Dk], keys [Hq*2, s*r*n', Dk]."""
        H, s, r, Dk = self.cfg.heads, self.cfg.query_share, self.cfg.tucker_rank, self.cfg.key_dim
        Hq, n, BT = H // s, self.n_side, q.shape[0]
        keys = self.keys.permute(0, 1, 4, 2, 3)  # [H, 2, r, n', Dk]: one [n', Dk] matrix per rank
        if self.key_norm is not None:
            keys = self.key_norm(keys)
        if bases is not None:  # rotated keys: rank i of the result is sum_r B[r, i] K_r
            keys = bases.to(keys.dtype).transpose(-1, -2) @ keys.reshape(H, 2, r, n * Dk)
        keys = keys.reshape(Hq, s, 2, r * n, Dk).transpose(1, 2).reshape(Hq * 2, s * r * n, Dk)
        return q.permute(1, 2, 0, 3).reshape(Hq * 2, BT, Dk), keys

    def _matmul(self, qg: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """[Hq*2, BT, Dk] x [Hq*2, s*r*n', Dk] -> [Hq, 2, BT, s, r, n']."""
        Hq2, BT = qg.shape[:2]
        s, r = self.cfg.query_share, self.cfg.tucker_rank
        return torch.bmm(qg, keys.transpose(1, 2)).view(Hq2 // 2, 2, BT, s, r, self.n_side)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, d] -> (virtual index [BT, H*m] long in [0, n'^2), per-core scores [BT, H*m, h])."""
        H, s, r, m = self.cfg.heads, self.cfg.query_share, self.cfg.tucker_rank, self.cfg.top_m
        Hq, n, h = H // s, self.n_side, self.cfg.num_cores
        # Work in the orthonormal rank bases whose first vectors are u (rows) and t (columns): rank 0 of the rotated
        # scores is then u^T S_row / t^T S_col itself, and the cores rotate with them (B_row^T C_c B_col), so every
        # grid score is unchanged.
        bases = torch.stack([rank1_basis(self.u), rank1_basis(self.t)], 1)  # [H, 2, r, r]
        qg, kg = self._operands(self.query(x, state), bases)  # [Hq*2, BT, Dk], [Hq*2, s*r*n', Dk]
        # S needs a gradient only for the balance loss; the winners' scores get theirs from `sampled_dot`.
        dense_grad = self.cfg.balance_loss_weight > 0
        with torch.set_grad_enabled(dense_grad and torch.is_grad_enabled()):
            S = self._matmul(qg, kg)  # [Hq, 2, BT, s, r, n']
        BT = S.shape[2]
        cores = (bases[:, 0].transpose(-1, -2) @ self.cores @ bases[:, 1]).to(S.dtype)  # [h, H, r, r]
        cores = cores.view(h, Hq, 1, s, r, r)

        with torch.no_grad():  # indices only
            # stage 1: top-m rows by u^T S_row and columns by t^T S_col, both sides in one call
            kept = S[:, :, :, :, 0].topk(m, dim=-1, sorted=False).indices  # [Hq, 2, BT, s, m]
            sel = S.gather(5, kept.unsqueeze(4).expand(-1, -1, -1, -1, r, -1))  # [Hq, 2, BT, s, r, m]
            # stage 2: rank the m x m survivors by S_row^T (sum_c C_c) S_col
            grid = sel[:, 0].transpose(-1, -2) @ (cores.sum(0) @ sel[:, 1])  # [Hq, BT, s, m, m]
            best = grid.flatten(-2).topk(m, dim=-1, sorted=False).indices  # [Hq, BT, s, m] into the m*m grid
            winners = torch.stack([kept[:, 0].gather(3, best // m), kept[:, 1].gather(3, best % m)], 1)
        if self.cfg.balance_loss_weight > 0:  # V2's key-balance loss on the stage-1 scores, heads as [H = Hq*s]
            s1 = S[:, :, :, :, 0].permute(0, 3, 1, 2, 4).reshape(H, 2, BT, n)  # [H, 2, BT, n']
            self._balance = balance_loss(s1, kept.permute(0, 3, 1, 2, 4).reshape(H, 2, BT, m))
        W = self._winner_scores(qg, kg, S, winners, dense_grad)  # [Hq, 2, BT, s, r, m]
        # per-core score of winner k: sum_{i,j} R[i,k] C'_c[i,j] Cc[j,k]
        scores = (W[:, 0].unsqueeze(0) * (cores @ W[:, 1].unsqueeze(0))).sum(-2)  # [h, Hq, BT, s, m]
        scores = activate(scores, self.cfg.score, dim=-1)

        virtual = winners[:, 0] * n + winners[:, 1]  # [Hq, BT, s, m]
        virtual = virtual.permute(1, 0, 2, 3).reshape(BT, H * m)
        scores = scores.permute(2, 1, 3, 4, 0).reshape(BT, H * m, h)
        return virtual, scores

    def _winner_scores(self, qg: torch.Tensor, kg: torch.Tensor, S: torch.Tensor, winners: torch.Tensor,
                       dense_grad: bool) -> torch.Tensor:
        """Per-rank scores of the winners [Hq, 2, BT, s, r, m]: the values gathered from S; their gradient reaches
        the queries and keys through `sampled_dot`, which visits only the winners (no S-sized zero-filled gradient,
        no dense matmul backward). With a differentiable S (balance loss) the plain gather."""
        Hq, _, BT, s, m = winners.shape
        r, n = self.cfg.tucker_rank, self.n_side
        pos = winners.unsqueeze(4).expand(-1, -1, -1, -1, r, -1)  # [Hq, 2, BT, s, r, m]
        if dense_grad or not torch.is_grad_enabled():
            return S.gather(5, pos)
        with torch.no_grad():
            values = S.gather(5, pos)
            block = torch.arange(s * r, device=S.device).view(1, 1, 1, s, r, 1) * n  # key row of (head, rank, 0)
            idx = pos + block + torch.arange(Hq * 2, device=S.device).view(Hq, 2, 1, 1, 1, 1) * (s * r * n)
        K = s * r * m
        W = sampled_dot(qg.reshape(Hq * 2 * BT, -1), kg.reshape(-1, kg.shape[-1]), idx.view(Hq * 2 * BT, K),
                        values.view(Hq * 2 * BT, K))
        return W.view(Hq, 2, BT, s, r, m)

    # ---- rank-1 cache and Tucker penalty -------------------------------------------------------------------------

    @torch.no_grad()
    def refresh_rank1(self) -> None:
        """Recompute u, t from the SVD of sum_c C_c (official `_online_update_tucker_approx`)."""
        if self.cores.is_meta:
            return
        u, t = rank1_vectors(self.cores, self.u, self.t)
        self.u.copy_(u)
        self.t.copy_(t)

    def tucker_penalty(self) -> torch.Tensor:
        """mean over heads of 1/(r-1) sum_{i>=2} relu(lambda_i - tau)^2, lambda = singular values of sum_c C_c."""
        return tucker_penalty(self.cores, self.cfg.tucker_margin)

    def aux(self) -> dict[str, torch.Tensor]:
        """{"aux_loss": alpha * penalty + beta * balance (weighted, trains), "tucker_penalty": penalty and, when
        balance_loss_weight (beta) > 0, "balance_loss": the key-balance loss of the last forward (for logging)}."""
        alpha, beta = self.cfg.tucker_penalty, self.cfg.balance_loss_weight
        with torch.set_grad_enabled(alpha > 0 and torch.is_grad_enabled()):
            penalty = self.tucker_penalty()
        out = {"aux_loss": alpha * penalty if alpha > 0 else penalty.new_zeros(()), "tucker_penalty": penalty.detach()}
        if beta > 0:
            out["aux_loss"] = out["aux_loss"] + beta * self._balance
            out["balance_loss"] = self._balance.detach()
        return out


@torch.no_grad()
def rank1_vectors(cores: torch.Tensor, prev_u: torch.Tensor, prev_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cores [h, H, r, r] -> leading left / right singular vectors (u, t) [H, r] of sum_c C_c per head, signed:
    on the first call (prev_u all zero) so that u and t sum to >= 0 (the Perron vectors of U(0, 1) cores), after
    that as the official code, flipped when -u, -t is closer in L1 to the previous vectors. Shared by TDQKR and
    UltraMemV2's retrieval."""
    U, _, Vh = torch.linalg.svd(at_least_fp32(cores.detach()).sum(0))  # [H, r, r]
    u, t = U[..., 0], Vh[..., 0, :]  # [H, r]
    prev_u, prev_t = prev_u.to(u.dtype), prev_t.to(t.dtype)
    if bool((prev_u == 0).all()):
        sign = torch.where(u.sum(-1) + t.sum(-1) >= 0, 1.0, -1.0)
    else:
        keep = (u - prev_u).abs().sum(-1) + (t - prev_t).abs().sum(-1)
        flip = (u + prev_u).abs().sum(-1) + (t + prev_t).abs().sum(-1)
        sign = torch.where(flip < keep, -1.0, 1.0)
    return u * sign[:, None], t * sign[:, None]


def tucker_penalty(cores: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over heads and i >= 2 of relu(lambda_i - margin)^2, lambda = singular values of sum_c C_c (cores
    [h, H, r, r]); 0 at rank 1."""
    if cores.shape[-1] == 1:
        return cores.new_zeros(())
    lam = singular_values(at_least_fp32(cores).sum(0))  # [H, r] descending
    return F.relu(lam[:, 1:] - margin).pow(2).mean()


def rank1_basis(v: torch.Tensor) -> torch.Tensor:
    """Unit vectors v [..., r] -> orthonormal bases [..., r, r] whose first column is v.

    A Householder reflection: with w = v + sign(v_0) e_1, I - 2 w w^T / w^T w maps e_1 to -sign(v_0) v, so flipping
    the sign of that first column gives v; |w|^2 >= 1 keeps it stable. (v = 0 gives the identity.)
    """
    r = v.shape[-1]
    eye = torch.eye(r, dtype=v.dtype, device=v.device)
    sign = torch.where(v[..., :1] >= 0, 1.0, -1.0).to(v.dtype)  # [..., 1]
    w = v + sign * eye[0]  # [..., r]
    basis = eye - 2 * w.unsqueeze(-1) * w.unsqueeze(-2) / (w * w).sum(-1, keepdim=True).unsqueeze(-1)
    return torch.cat([-sign.unsqueeze(-1) * basis[..., :1], basis[..., 1:]], dim=-1)


def singular_values(C: torch.Tensor) -> torch.Tensor:
    """Singular values of [..., r, r] in descending order.

    r = 2 (the paper's rank) uses the closed form sigma^2 = (|C|_F^2 +- sqrt(|C|_F^4 - 4 det^2)) / 2, which is
    differentiable and avoids a batched LAPACK/cuSOLVER call (and its host sync on GPU) in every forward.
    """
    if C.shape[-1] != 2:
        return torch.linalg.svdvals(C)
    fro2 = C.pow(2).sum((-2, -1))
    det = C[..., 0, 0] * C[..., 1, 1] - C[..., 0, 1] * C[..., 1, 0]
    # The clamps keep sqrt away from 0, where its infinite slope would turn a zero upstream gradient into NaN.
    disc = (fro2.pow(2) - 4 * det.pow(2)).clamp_min(1e-24).sqrt()
    big = ((fro2 + disc) / 2).clamp_min(1e-24).sqrt()
    small = ((fro2 - disc) / 2).clamp_min(1e-24).sqrt()
    return torch.stack([big, small], dim=-1)


def activate(scores: torch.Tensor, kind: str, dim: int) -> torch.Tensor:
    """Score activation on the selected slots: raw (UltraMem), relu, or softmax over the m selected (PKM)."""
    if kind == "none":
        return scores
    if kind == "relu":
        return F.relu(scores)
    return scores.softmax(dim=dim, dtype=torch.promote_types(scores.dtype, torch.float32)).to(scores.dtype)


def balance_loss(s1: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Key-balance loss (Eq. 18-20, V2:380-396): sum over sides of n * sum_j f_j p_j, pooled over heads and tokens.

    s1 [H, 2, BT, n] rank-1 scores, kept [H, 2, BT, m] the stage-1 top-m; p_j = mean softmax probability of key j,
    f_j = its share of the top-m hits (no gradient).
    """
    n = s1.shape[-1]
    p = at_least_fp32(s1).softmax(-1).mean((0, 2))  # [2, n]
    hits = kept.transpose(0, 1).reshape(2, -1)  # [2, H*BT*m]
    counts = torch.zeros(2, n, device=s1.device, dtype=torch.float32).scatter_add_(
        1, hits, torch.ones_like(hits, dtype=torch.float32))
    f = counts / counts.sum(-1, keepdim=True)
    return n * (f * p).sum()
