"""Decoder-only transformer for every family: dense MLP, MoE FFN, or a dense MLP plus PKM/UltraMem memory layers.
Each block's FFN and each memory layer come from the family's record (`Family.build_ffn`, `Family.build_memory`).

Pre-norm blocks (x += attn(norm(x)); h = norm(x); x += ffn(h)), RoPE (half rotation, as OLMo), causal attention via
F.scaled_dot_product_attention, optional weight tying, GPT-2 init (N(0, init_std), residual output projections
N(0, init_std / sqrt(2 n_layers))), and a KV cache for prefill + one-token decode steps.

Memory layers follow the skip-layer placement (memory/placement.py): memory j reads h = the pre-FFN normalised
state of block a_j and its output is added to the residual stream once block b_j has finished.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ultramem.config import ConfigError, ModelConfig
from ultramem.families import get_family
from ultramem.families.product_keys import memory_pairs
from ultramem.optim import param_groups
from ultramem.precision import at_least_fp32, compute_dtype

NORM_EPS = 1e-5
IGNORE_INDEX = -1  # targets equal to this are left out of the loss


# ---- rotary position embedding ----------------------------------------------------------------------------------


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_len, head_dim / 2] for RoPE (Su et al. 2021), computed in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + hd/2}) of x [B, nh, T, hd] by the angles of cos/sin [T, hd/2]."""
    x1, x2 = at_least_fp32(x).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=NORM_EPS)
    return nn.LayerNorm(dim, eps=NORM_EPS, bias=False)


# ---- cache and output -------------------------------------------------------------------------------------------


@dataclass
class KVCache:
    """Decode state: keys/values per block [B, nh, max_len, hd], query-conv history per memory layer, position."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    memory: list[dict] = field(default_factory=list)
    pos: int = 0

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    loss: torch.Tensor | None  # mean cross-entropy over targets != IGNORE_INDEX
    aux_loss: torch.Tensor  # weighted aux losses, mean or sum over layers (Family.aux_sum); add to loss to train
    aux: dict[str, torch.Tensor]  # unweighted components averaged over the layers that report them


# ---- blocks -----------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.n_heads, self.dropout = cfg.d_model, cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.qkv.weight, std=cfg.init_std)
        nn.init.normal_(self.proj.weight, std=cfg.init_std / math.sqrt(2 * cfg.n_layers))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0) -> torch.Tensor:
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # [B, nh, T, hd]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if kv is not None:
            k_buf, v_buf = kv
            k_buf[:, :, pos:pos + T] = k
            v_buf[:, :, pos:pos + T] = v
            k, v = k_buf[:, :, :pos + T], v_buf[:, :, :pos + T]
            causal = False
            if T > 1:  # prefill after earlier tokens: query i sees keys 0 .. pos + i
                mask = torch.arange(pos + T, device=x.device) <= (pos + torch.arange(T, device=x.device))[:, None]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, d)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, shared: nn.Module | None = None):
        super().__init__()
        family = get_family(cfg.family)
        self.norm1 = make_norm(cfg, cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = make_norm(cfg, cfg.d_model)
        # families with a module shared across blocks (Family.build_shared) get it as a third argument
        self.ffn = family.build_ffn(cfg, index, shared) if family.build_shared else family.build_ffn(cfg, index)
        self.ffn_aux = family.ffn_aux  # the FFN returns (y, aux)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor] | None = None, pos: int = 0):
        """-> (x after the block [B, T, d], h = pre-FFN normalised state [B, T, d], aux dict of the FFN)."""
        x = x + self.attn(self.norm1(x), cos, sin, kv, pos)
        h = self.norm2(x)
        y, aux = self.ffn(h) if self.ffn_aux else (self.ffn(h), {})
        return x + y, h, aux


# ---- the model --------------------------------------------------------------------------------------------------


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        family = get_family(cfg.family)
        self.aux_sum = family.aux_sum  # sum the layers' weighted aux losses (else their mean)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        # A module shared by the blocks' FFNs (Memory+'s value table, UltraMemV2's global tables), or None. Each
        # layer using it registers it too; parameters() yields it once and its gradient sums every reader's.
        self.shared = family.build_shared(cfg) if family.build_shared else None
        self.blocks = nn.ModuleList(Block(cfg, i, self.shared) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg, cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

        self.memory_pairs = memory_pairs(cfg) if family.build_memory is not None else []
        self.memories = nn.ModuleList(family.build_memory(cfg, j) for j in range(len(self.memory_pairs)))
        self._readers = [[j for j, (a, _) in enumerate(self.memory_pairs) if a == i] for i in range(cfg.n_layers)]

        cos, sin = rope_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None) -> ModelOutput:
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg.seq_len
        if pos + T > limit:
            raise ValueError(f"sequence of {pos + T} tokens exceeds {'the cache max_len' if cache else 'model.seq_len'}"
                             f" ({limit}); raise model.seq_len or shorten the input")
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.drop(self.wte(idx))  # [B, T, d]
        aux_terms: list[dict[str, torch.Tensor]] = []
        pending: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        for i, block in enumerate(self.blocks):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            x, h, aux = block(x, cos, sin, kv, pos)
            aux_terms.append(aux)
            for j in self._readers[i]:
                y, aux = self.memories[j](h, cache.memory[j] if cache is not None else None)
                pending[self.memory_pairs[j][1]].append(y)
                aux_terms.append(aux)
            for y in pending[i]:
                x = x + y
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.norm_f(x))  # [B, T, vocab]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(at_least_fp32(logits).view(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss, *_combine_aux(aux_terms, x, self.aux_sum))

    # ---- trainer hooks ------------------------------------------------------------------------------------------

    def param_groups(self, weight_decay: float) -> list[dict]:
        return param_groups(self, weight_decay)

    @torch.no_grad()
    def on_optimizer_step(self) -> None:
        """Call after every optimizer step: refreshes the TDQKR rank-1 vectors u, t (SVD of the summed cores) of
        the memory layers, those placed by model.memory.layers and those inside the blocks' FFNs."""
        for mem in self.memories:
            mem.on_optimizer_step()
        for block in self.blocks:
            hook = getattr(block.ffn, "on_optimizer_step", None)
            if hook is not None:
                hook()

    def expert_load(self) -> torch.Tensor | None:
        """Per-layer fraction of token-slots per expert [n_layers, E] over the training forwards since the last
        call (zeros if there were none); None for families without routed experts (`Family.parallel.expert_module`)."""
        if get_family(self.cfg.family).parallel.expert_module is None:
            return None
        return torch.stack([block.ffn.take_load() for block in self.blocks]).cpu()

    def init_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:  # noqa: ANN001
        """Empty decode cache for `batch_size` sequences of up to `max_len` (<= model.seq_len) tokens."""
        if max_len > self.cfg.seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.seq_len ({self.cfg.seq_len}), the RoPE table size")
        ref = self.wte.weight
        device, dtype = device or ref.device, dtype or ref.dtype
        shape = (batch_size, self.cfg.n_heads, max_len, self.cfg.head_dim)
        k = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        v = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.blocks]
        return KVCache(k, v, [{} for _ in self.memories])


def _combine_aux(terms: list[dict[str, torch.Tensor]], ref: torch.Tensor, summed: bool = False):
    """-> (the layers' weighted "aux_loss" combined, {component: mean over the layers reporting it, detached}).

    By default the weighted losses are averaged over the layers reporting one, as MegaBlocks/OLMoE (which the
    official code's MoE baseline uses) do, so the configured weights mean the same thing at any depth; `summed`
    (Family.aux_sum: UltraMemV2) adds them up, as ByteDance's layers each add coefficient x loss.
    """
    total = ref.new_zeros((), dtype=compute_dtype(ref.dtype))
    parts: dict[str, list[torch.Tensor]] = {}
    for term in terms:
        for key, value in term.items():
            if key == "aux_loss":
                total = total + at_least_fp32(value)
            else:
                parts.setdefault(key, []).append(at_least_fp32(value.detach()))
    if not summed:
        total = total / max(1, sum("aux_loss" in term for term in terms))
    return total, {key: torch.stack(values).mean() for key, values in parts.items()}


def build_model(cfg: ModelConfig, device=None) -> Transformer:  # noqa: ANN001
    """Build the model for `cfg` directly on `device` (default CPU); device='meta' allocates no weights."""
    if not isinstance(cfg, ModelConfig):
        raise ConfigError(f"build_model expects a ModelConfig, got {type(cfg).__name__}; use get_preset(name)")
    with torch.device(device or "cpu"):
        return Transformer(cfg)
