"""Memory layers: PKM (Lample et al. 2019) and UltraMem v1 (Huang et al. 2025), their retrieval and placement.

Modules:
  placement    which blocks a memory layer reads from and writes to ("a:b/c:d" skip-layer spec or "every")
  query        the shared query path: optional causal depthwise conv -> Linear(d, 2*D_k per query) -> RMSNorm
  tdqkr        Tucker Decomposed Query-Key Retrieval (UltraMem's two-stage top-m)
  pkm          the PKM layer (additive product keys, softmax weights)
  ultramem     the UltraMem v1 layer (TDQKR + MCS + IVE + half value dim and projection)
  init         the paper's value/score initialisation
  memory_plus  the Memory+ layer and its shared value table (Meta, arXiv 2412.09764)
  ultramem_v2  the UltraMemV2 layer and its global value / pre-value table (ByteDance, arXiv 2508.18756)
  ffn_memory   a block's FFN slot holding an MLP, a memory layer or both (memory_plus, ultramem_v2)
  usage        which value rows the layers read: fraction of the table touched, row-usage entropy (a diagnostic)

This package's __init__ imports nothing, so `ultramem.config` can use `placement` without importing torch.
"""
