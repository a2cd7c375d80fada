"""The one patched ViT that every plug-in shares: token state, attention statistics, token counts.

:func:`patch_model` swaps the classes of a timm ``VisionTransformer``, its ``Block`` s and their ``Attention``
(weights and state-dict keys untouched, like ToMe's reference patch) so that

* each forward pass carries a :class:`ReductionContext`: ``size`` (B, N) tokens merged into each token,
  ``alive`` (B, N) mask (masked simulation for training, padding for batched inference), optional
  ``source`` (B, N, P) patch -> token map, and the protected prefix count (CLS, distillation, registers);
* attention computes only what the plug-in ``needs``: mean keys, attention received ("importance") or
  prefix-token attention ("cls_attn") need explicit probabilities; otherwise timm's fused
  ``F.scaled_dot_product_attention`` runs with an additive bias (log size for proportional attention,
  -inf for dead keys). LayerScale (``ls1``/``ls2``), qk-norm, scale-norm and gating are timm's own modules;
* every block records the per-image token count its attention and its MLP saw (``tokens_attn``,
  ``tokens_mlp``: lists of (B,) tensors), from which FLOPs and plots are computed;
* a batch padded to its largest count (``alive`` a bool mask, the inference form of input-dependent
  reducers) runs its token-wise layers on the alive tokens only and its attention in groups of images with
  similar counts (:mod:`methods.ragged`), so a padded batch costs (almost) what its images cost;
* average pooling weights tokens by size and ignores dead tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, VisionTransformer
from torch import nn
from torch.nn.modules import module as module_hooks

from bench.errors import BenchError
from methods.ragged import Packing, attention_received, ragged_attention

if TYPE_CHECKING:
    from methods.base import TokenReducer

BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
PROBABILITY_STATS = frozenset({"importance", "cls_attn", "probs"})
RAGGED_STATS = frozenset({"keys", "importance"})  # statistics the ragged (grouped) attention can give


@dataclass(frozen=True)
class ModelDims:
    """Shapes of a ViT that FLOPs formulas and reducers need."""

    depth: int
    dim: int
    num_heads: int
    head_dim: int
    attn_dim: int
    attn_linear_macs: int  # per token: qkv + proj (+ gate)
    mlp_macs: int  # per token: all Linear layers of the MLP
    num_prefix: int
    num_patches: int
    grid: tuple[int, int]
    in_chans: int  # image channels: those of the patch embedding's first convolution
    img_size: tuple[int, int]  # the input images' (height, width)
    head_macs: int  # per image: the classifier head(s), DeiT's distillation head included

    @property
    def tokens(self) -> int:
        return self.num_prefix + self.num_patches

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """One input image's shape ``(C, H, W)``."""
        return (self.in_chans, *self.img_size)

    @classmethod
    def of(cls, model: VisionTransformer) -> "ModelDims":
        block = model.blocks[0]

        def linear_macs(module: nn.Module) -> int:
            return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))

        first_conv = next((m for m in model.patch_embed.modules() if isinstance(m, nn.Conv2d)), None)
        if first_conv is None:
            raise BenchError(f"{type(model.patch_embed).__name__} has no Conv2d: token reducers need a convolutional "
                             "patch embedding (timm's PatchEmbed, a conv stem or a HybridEmbed)")

        return cls(depth=len(model.blocks), dim=model.embed_dim, num_heads=block.attn.num_heads,
                   head_dim=block.attn.head_dim, attn_dim=block.attn.num_heads * block.attn.head_dim,
                   attn_linear_macs=linear_macs(block.attn), mlp_macs=linear_macs(block.mlp),
                   num_prefix=model.num_prefix_tokens, num_patches=model.patch_embed.num_patches,
                   grid=tuple(model.patch_embed.grid_size), in_chans=first_conv.in_channels,
                   img_size=tuple(model.patch_embed.img_size),
                   head_macs=sum(linear_macs(head) for head in (model.head, getattr(model, "head_dist", None))
                                 if head is not None))


class ReductionContext:
    """Token state of one forward pass, shared by the model, its blocks and their attention."""

    def __init__(self, reducer: "TokenReducer", dims: ModelDims) -> None:
        self.reducer = reducer
        self.dims = dims
        self.begin_shape: tuple[int, int] = (0, 0)
        self.reset()

    @property
    def needs(self) -> frozenset[str]:
        """What the reducer reads in the current block (a plug-in may change it, e.g. while calibrating)."""
        return frozenset(self.reducer.needs_at(self.layer))

    @property
    def needs_probabilities(self) -> bool:
        return bool(self.needs & PROBABILITY_STATS)

    @property
    def num_prefix(self) -> int:
        return self.dims.num_prefix

    def reset(self) -> None:
        self.size: torch.Tensor | None = None  # (B, N) float
        self.alive: torch.Tensor | None = None  # (B, N) bool (hard) or float 0/1 carrying a gradient
        self.source: torch.Tensor | None = None  # (B, N, P) float 0/1
        self.stats: dict[str, torch.Tensor] = {}
        self.tokens_attn: list[torch.Tensor] = []
        self.tokens_mlp: list[torch.Tensor] = []
        self.attention_maps: list[torch.Tensor] = []  # with "probs": every block's (B, H, N, N)
        self.layer = 0
        self._packing: Packing | None = None

    def begin(self, x: torch.Tensor) -> None:
        """Start a forward pass on ``x: (B, N, C)`` (after position embedding)."""
        self.reset()
        batch, tokens, _ = x.shape
        self.begin_shape = (batch, tokens)
        if self.reducer.trace_source:
            self.source = torch.eye(tokens, device=x.device).expand(batch, tokens, tokens).clone()
        self.reducer.begin(self, x)

    # --- token state ---------------------------------------------------------------------------------
    def count(self, x: torch.Tensor) -> torch.Tensor:
        """Alive tokens per image: (B,) int64."""
        if self.alive is None:
            return torch.full((x.shape[0],), x.shape[1], dtype=torch.int64, device=x.device)
        return (self.alive > 0).sum(1)

    def sizes(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N) float sizes, ones where no merge happened yet."""
        if self.size is None:
            return torch.ones(x.shape[:2], device=x.device, dtype=torch.float32)
        return self.size

    def soft_mask(self) -> bool:
        return self.alive is not None and self.alive.dtype != torch.bool and self.alive.requires_grad

    def attention_bias(self) -> torch.Tensor | None:
        """Additive key bias (B, 1, 1, N): log(size) for proportional attention, -inf for dead keys."""
        bias = None
        if self.size is not None and self.reducer.proportional_attention:
            bias = self.size.log()
        if self.alive is not None and not self.soft_mask():
            dead = torch.zeros(self.alive.shape, device=self.alive.device).masked_fill(~(self.alive > 0), float("-inf"))
            bias = dead if bias is None else bias + dead
        return None if bias is None else bias[:, None, None, :]

    def packing(self) -> Packing | None:
        """A :class:`Packing` when the batch holds hard padding; None when every token is alive or the mask is soft.
        The same object while ``alive`` is, so a block's MLP and the next block's attention share its indices and
        the packed tokens (:meth:`Packing.pack` of what :meth:`Packing.unpack` returned is free)."""
        if self.alive is None or self.alive.dtype != torch.bool:
            return None
        if self._packing is None or self._packing.alive is not self.alive:  # blocks reuse it until alive changes
            self._packing = Packing(self.alive)
        return self._packing

    def repack(self, packing: Packing) -> Packing:
        """Set ``alive`` to ``packing``'s mask after a compaction (None when every token is alive) and return
        ``packing``, which :meth:`packing` then keeps returning."""
        self._packing = packing
        self.alive = None if packing.dense else packing.alive
        return packing

    def record_attention(self, attn: torch.Tensor) -> None:
        """Keep the statistics the reducer asked for. ``attn: (B, H, N, N)`` softmax probabilities."""
        if "probs" in self.needs:
            self.attention_maps.append(attn)
        if "importance" in self.needs:
            alive = torch.ones(attn.shape[0], attn.shape[2], dtype=torch.bool, device=attn.device) if self.alive is None \
                else self.alive > 0
            self.stats["importance"] = attention_received(attn, alive)
        if "cls_attn" in self.needs:
            rows = attn[:, :, : self.num_prefix] if self.num_prefix else attn
            self.stats["cls_attn"] = rows.float().mean(dim=(1, 2))

    def counts(self) -> torch.Tensor:
        """(B, depth, 2) token counts of the last forward: [:, l, 0] seen by attention, [:, l, 1] by the MLP."""
        return torch.stack([torch.stack(self.tokens_attn, 1), torch.stack(self.tokens_mlp, 1)], -1)


def masked_softmax(logits: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Softmax over keys weighted by a (possibly soft) mask: exp(l_j) m_j / sum_k exp(l_k) m_k.

    ``logits: (B, H, N, N)``, ``alive: (B, N)``; gradients flow into ``alive`` (LTMP's masked training). The row
    maximum that keeps ``exp`` finite is a constant to autograd: the result does not depend on it, so its exact
    gradient is 0, and tracing it cost three more passes over the (B, H, N, N) logits in every backward.
    """
    weights = (logits - logits.detach().amax(-1, keepdim=True)).exp() * alive[:, None, None, :].to(logits.dtype)
    return weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def attention_forward(attn: Attention, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False, packing: Packing | None = None) -> torch.Tensor:
    """timm ``Attention.forward`` with the context's bias, mask and statistics.

    ``x: (B, N, C) -> (B, N, C)``, or with ``packing`` the alive tokens ``x: (T, C) -> (T, C)``: the linear
    layers then see the T alive tokens only, and attention runs image group by image group
    (:func:`methods.ragged.ragged_attention`) when the reducer needs no more than ``RAGGED_STATS``.
    """
    if attn_mask is not None or is_causal:
        raise NotImplementedError("token reduction does not support external attention masks")
    ctx: ReductionContext = attn._reduction_ctx
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x)
    needs = ctx.needs
    # grouped unless the batch is unpadded and no probabilities are needed (then the one fused call is the fastest)
    ragged = needs <= RAGGED_STATS and ("importance" in needs and ctx.alive is None
                                        or packing is not None and not packing.dense)
    if ragged:  # grouped attention: padding skipped, explicit probabilities kept small enough for the cache
        if packing is None:  # an unpadded batch (B, N, C)
            dense = Packing.full(qkv)
            out = dense.unpack(_ragged(attn, ctx, dense.pack(qkv), dense))
        else:
            out = _ragged(attn, ctx, qkv, packing)
    else:
        out = _padded(attn, ctx, qkv if packing is None else packing.unpack(qkv))
        out = out if packing is None else packing.pack(out)
    if getattr(attn, "norm", None) is not None:  # scale_norm: timm >= 1.0.16 (absent before)
        out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _padded(attn: Attention, ctx: ReductionContext, qkv: torch.Tensor) -> torch.Tensor:
    """Attention over a padded batch, dead keys masked: ``qkv: (B, N, 3 * C_attn) -> (B, N, C_attn)``."""
    batch, tokens, _ = qkv.shape
    q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if "keys" in ctx.needs:
        ctx.stats["keys"] = head_mean(k)
    bias = ctx.attention_bias()
    if ctx.needs_probabilities or ctx.soft_mask() or not attn.fused_attn:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        probs = masked_softmax(logits, ctx.alive) if ctx.soft_mask() else logits.softmax(-1)
        ctx.record_attention(probs)
        out = attn.attn_drop(probs) @ v
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                             dropout_p=attn.attn_drop.p if attn.training else 0.0)
    return out.transpose(1, 2).reshape(batch, tokens, ctx.dims.attn_dim)  # timm < 1.0.23 has no attn.attn_dim


def _ragged(attn: Attention, ctx: ReductionContext, qkv: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Attention of each image over its own alive tokens: ``qkv: (T, 3 * C_attn) -> (T, C_attn)``."""
    qkv = qkv.view(qkv.shape[0], 3, attn.num_heads, attn.head_dim)
    q, k, v = qkv.unbind(1)
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        q, k = attn.q_norm(q), attn.k_norm(k)
        qkv = torch.stack([q, k, v], 1)
    if "keys" in ctx.needs:
        ctx.stats["keys"] = packing.unpack(head_mean(k))
    log_size = None
    if ctx.size is not None and ctx.reducer.proportional_attention:
        log_size = packing.pack(ctx.size[..., None].log())[:, 0]
    out, importance = ragged_attention(qkv, packing, attn.num_heads, attn.scale, log_size,
                                       "importance" in ctx.needs, attn.attn_drop.p if attn.training else 0.0,
                                       "cuda" if qkv.is_cuda else "cpu")
    if importance is not None:
        ctx.stats["importance"] = importance
    return out


def head_mean(k: torch.Tensor) -> torch.Tensor:
    """``k.mean(1)``, the mean over the heads at dim 1: ``k: (T, H, d) -> (T, d)`` or ``(B, H, N, d) -> (B, N, d)``.

    Summed in fp32 by H - 1 in-place adds and rounded once to ``k``'s dtype, as ``mean`` does (on the CPU 2-3x
    faster than ``mean``'s reduction over a strided dimension of size H). Keeping the dtype matters: fp32 keys
    under bf16 autocast change which tokens merge, and moved LTMP's top-1 on the embedded default by up to 0.4
    points (within its 95 % interval, but not the same numbers)."""
    out = k[:, 0].to(torch.float32, copy=True)
    for head in range(1, k.shape[1]):
        out += k[:, head]
    return out.div_(k.shape[1]).to(k.dtype)


def run_block(block: nn.Module, x: torch.Tensor, ctx: ReductionContext, layer: int,
              mid: Callable[[torch.Tensor], torch.Tensor] | None = None,
              mid_packed: Callable[[torch.Tensor, Packing], tuple[torch.Tensor, Packing]] | None = None) -> torch.Tensor:
    """A timm pre-norm block with a mid-block hook; records the token counts. ``x: (B, N, C)``.

    Where ``ctx.alive`` holds hard padding, the two residual branches run on the alive tokens only
    (:class:`Packing`); padded positions come out as zeros. ``mid_packed``, if given, replaces ``mid`` whenever
    the mask is hard or absent: it maps the alive tokens ``(T, C)`` of a :class:`Packing` to the kept ones
    ``(T', C)`` and their Packing, so the padded batch is never built between attention and the MLP.
    """
    packing = ctx.packing()
    if mid_packed is not None and (packing is not None or ctx.alive is None):
        packing = packing or Packing.full(x)
        tokens, packing = run_block_packed(block, packing.pack(x), packing, ctx, layer, mid_packed)
        return packing.unpack(tokens)
    ctx.layer = layer
    ctx.tokens_attn.append(ctx.count(x))
    x = _residual(x, packing, lambda tokens, packing: _attention_branch(block, tokens, packing))
    if mid is not None:
        x = mid(x)
    ctx.tokens_mlp.append(ctx.count(x))
    x = _residual(x, ctx.packing(), lambda tokens, _: _mlp_branch(block, tokens))
    ctx.stats = {}
    return x


def run_block_packed(block: nn.Module, tokens: torch.Tensor, packing: Packing, ctx: ReductionContext, layer: int,
                     mid_packed: Callable[[torch.Tensor, Packing], tuple[torch.Tensor, Packing]]
                     ) -> tuple[torch.Tensor, Packing]:
    """:func:`run_block` on the alive tokens ``tokens: (T, C)`` of ``packing`` (``ctx.alive`` is its mask, or None
    when every token is alive): returns the block's output tokens ``(T', C)`` and their Packing, never padded."""
    ctx.layer = layer
    ctx.tokens_attn.append(packing.counts)
    tokens, packing = mid_packed(tokens + _attention_branch(block, tokens, packing), packing)
    ctx.tokens_mlp.append(packing.counts)
    tokens = tokens + _mlp_branch(block, tokens)
    ctx.stats = {}
    return tokens, packing


def _attention_branch(block: nn.Module, tokens: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    return block.drop_path1(block.ls1(attention_forward(block.attn, block.norm1(tokens), packing=packing)))


def _mlp_branch(block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return block.drop_path2(block.ls2(block.mlp(block.norm2(tokens))))


def _residual(x: torch.Tensor, packing: Packing | None,
              branch: Callable[[torch.Tensor, Packing | None], torch.Tensor]) -> torch.Tensor:
    """``x + branch(x)``, the branch on the alive tokens only when ``packing`` is given. ``x: (B, N, C)``;
    ``branch`` maps (B, N, C) or packed (T, C) tokens to the same shape."""
    if packing is None:
        return x + branch(x, None)
    packed = packing.pack(x)
    return packing.unpack(packed + branch(packed, packing))


class _ReducedAttention:
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return attention_forward(self, x, attn_mask, is_causal)


class _ReducedBlock:
    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise NotImplementedError("token reduction does not support external attention masks")
        ctx: ReductionContext = self._reduction_ctx
        return ctx.reducer.block_forward(self._reduction_layer, self, x, ctx)


class _ReducedVisionTransformer:
    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``x: (B, C, H, W) -> (B, N', D)``; N' depends on the reducer (and on the image if it adapts)."""
        ctx: ReductionContext = self._reduction_ctx
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        ctx.begin(x)
        reducer = ctx.reducer
        if reducer.reduces_packed() and reducer.is_mid_block() and ctx.alive is None and not _hooked(self.blocks):
            # the alive tokens go from block to block packed; the padded batch is built once, at the end (the same
            # result as calling the blocks, which each pad their output for the next one to pack again)
            packing = Packing.full(x)
            tokens = packing.pack(x)
            for layer, block in enumerate(self.blocks):
                tokens, packing = run_block_packed(block, tokens, packing, ctx, layer, lambda kept, kept_packing:
                                                   reducer.reduce_packed(layer, kept, kept_packing, ctx))
            x = packing.unpack(tokens)
        else:  # through the blocks' own forward, so that their hooks see every block's output
            for block in self.blocks:
                x = block(x)
        return self.norm(reducer.finish(x, ctx))

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """Token pooling reads position 0; average pooling is size-weighted over alive non-prefix tokens."""
        ctx: ReductionContext = self._reduction_ctx
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "avg" and (ctx.size is not None or ctx.alive is not None):
            weight = ctx.sizes(x)
            if ctx.alive is not None:
                weight = weight * (ctx.alive > 0).to(weight.dtype)
            weight = weight[:, self.num_prefix_tokens:, None].to(x.dtype)
            return (x[:, self.num_prefix_tokens:] * weight).sum(1) / weight.sum(1)
        return super().pool(x, pool_type)


def _hooked(blocks: nn.Module) -> bool:
    """Whether a forward hook (on a block or global, e.g. a module tracker) would read the blocks' outputs."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or any(block._forward_hooks or block._forward_pre_hooks for block in blocks))


def _swap_class(module: nn.Module, mixin: type) -> None:
    base = type(module)
    module._unreduced_class = base
    module.__class__ = type(f"Reduced{base.__name__}", (mixin, base), {})


def check_supported(model: nn.Module) -> None:
    """Refuse (BenchError) a model that token reducers cannot patch: not a timm ViT, already patched, attention
    pooling, a dynamic image size, or blocks other than timm's pre-norm Block with Attention."""
    if not isinstance(model, VisionTransformer):
        raise BenchError(f"{type(model).__name__} is not a timm VisionTransformer: token reducers patch ViTs only")
    if getattr(model, "_reduction_ctx", None) is not None:
        raise BenchError("model already carries a token reducer: call methods.blocks.unpatch_model first")
    if model.attn_pool is not None or model.global_pool not in ("token", "avg", ""):
        raise BenchError(f"global_pool={model.global_pool!r} is not supported with token reduction: use 'token' or 'avg'")
    if getattr(model, "dynamic_img_size", False):
        raise BenchError("dynamic_img_size models are not supported: create the model with a fixed img_size")
    for index, block in enumerate(model.blocks):
        missing = [part for part in BLOCK_PARTS if not hasattr(block, part)]
        if missing:
            raise BenchError(f"block {index} ({type(block).__name__}) is not a timm pre-norm Block with Attention: unsupported model")
        if not isinstance(block.attn, Attention):
            raise BenchError(f"block {index}'s attention is a {type(block.attn).__name__}, not timm's Attention: unsupported "
                             "model")


def patch_model(model: VisionTransformer, reducer: "TokenReducer") -> ReductionContext:
    """Make ``model`` run ``reducer``. Returns the shared context (also at ``model._reduction_ctx``)."""
    check_supported(model)
    ctx = ReductionContext(reducer, ModelDims.of(model))
    model._reduction_ctx = ctx
    _swap_class(model, _ReducedVisionTransformer)
    for index, block in enumerate(model.blocks):
        block._reduction_ctx, block._reduction_layer = ctx, index
        block.attn._reduction_ctx = ctx
        _swap_class(block, _ReducedBlock)
        _swap_class(block.attn, _ReducedAttention)
    return ctx


def unpatch_model(model: VisionTransformer) -> VisionTransformer:
    """Undo :func:`patch_model`: the plain timm model again."""
    modules = [model, *model.blocks, *(block.attn for block in model.blocks)]
    for module in modules:
        if hasattr(module, "_unreduced_class"):
            module.__class__ = module._unreduced_class
            del module._unreduced_class
        module.__dict__.pop("_reduction_ctx", None)
        module.__dict__.pop("_reduction_layer", None)
    return model
