"""GMACs per image (one multiply-add = one; what papers call "GFLOPs").

Analytic, from the per-layer token counts every patched forward records: a block whose attention sees
``n_a`` tokens and whose MLP sees ``n_m`` costs

    n_a * (qkv + proj Linear MACs per token) + 2 * n_a^2 * attn_dim + n_m * (MLP Linear MACs per token)

plus the method's own work (:meth:`methods.TokenReducer.extra_macs`: ToMe's similarity, Prune-and-Merge's
M and R matmuls, ...; the attention-received statistic, H * n_a^2, for plug-ins that read it), the patch embedding (counted once with ``FlopCounterMode``: it is static) and the
head. Norms, softmax, GELU and element-wise ops are not counted (as in the papers and in
``FlopCounterMode``). Tests cross-check these numbers against ``FlopCounterMode`` and fvcore.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from methods.base import TokenReducer
from methods.blocks import ModelDims


def _sdpa_flops(query: torch.Size, key: torch.Size, value: torch.Size, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of SDPA's CPU kernel (``query: (B, H, N_q, d)``, ``key``/``value: (B, H, N_k, d)``): torch's own count
    for the other SDPA kernels (``q @ k^T`` and ``p @ v``, 2 per multiply-add). Not ``flop_counter.sdpa_flop`` itself:
    it is registered already wrapped to take shapes, and ``custom_mapping`` would wrap it again (torch 2.14 fails)."""
    return flop_counter.sdpa_flop_count(query, key, value)


#: torch < 2.15's FlopCounterMode has no formula for SDPA's CPU flash kernel (timm's fused attention on a CPU) and
#: missed its MACs (14 % of DeiT-T); later ones count it themselves, and then this adds nothing.
_MISSING_FORMULAS = {op: _sdpa_flops for op in (torch.ops.aten._scaled_dot_product_flash_attention_for_cpu,)
                     if op not in flop_counter.flop_registry}


def counted_macs(module: torch.nn.Module, *inputs: torch.Tensor) -> int:
    """MACs of one call as ``FlopCounterMode`` counts them (it reports 2 FLOPs per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=_MISSING_FORMULAS) as counter, torch.no_grad():
        module(*inputs)
    return counter.get_total_flops() // 2


def embed_macs(model: torch.nn.Module, dims: ModelDims) -> int:
    """MACs of the patch embedding for one image (static, so counted once)."""
    param = next(model.parameters())
    image = torch.zeros(1, *dims.image_shape, dtype=param.dtype, device=param.device)
    return counted_macs(model.patch_embed, image)


def block_macs(n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: ModelDims) -> torch.Tensor:
    """MACs of one block per image; ``n_attn``, ``n_mlp``: (B,) token counts -> (B,) float64."""
    n_attn, n_mlp = n_attn.double(), n_mlp.double()
    return n_attn * dims.attn_linear_macs + 2 * n_attn ** 2 * dims.attn_dim + n_mlp * dims.mlp_macs


def image_macs(counts: torch.Tensor, dims: ModelDims, reducer: TokenReducer, embed: int) -> torch.Tensor:
    """Per-image MACs from recorded counts ``(B, depth, 2)`` -> ``(B,)`` float64."""
    total = torch.full((counts.shape[0],), float(embed + dims.head_macs), dtype=torch.float64)
    for layer in range(counts.shape[1]):
        n_attn, n_mlp = counts[:, layer, 0].cpu(), counts[:, layer, 1].cpu()
        total += block_macs(n_attn, n_mlp, dims) + reducer.extra_macs(layer, n_attn, n_mlp, dims).double()
        if "importance" in reducer.needs_at(layer):  # attention received: (1 x N) @ (N x N) per head
            total += dims.num_heads * n_attn.double() ** 2
    return total


def dense_macs(dims: ModelDims, embed: int) -> float:
    """MACs of the unreduced model for one image."""
    n = torch.tensor([dims.tokens])
    return float(embed + dims.head_macs + dims.depth * block_macs(n, n, dims)[0])
