"""Tiny timm-registered ViTs for CLI tests (32x32 RGB, 64 patches + CLS, 2 blocks). Imported by tests only."""
from timm.models import register_model
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer


@register_model
def test_tiny_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    args = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=3)
    args.update(kwargs)
    model = VisionTransformer(**args)
    model.pretrained_cfg = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                            "interpolation": "bilinear", "crop_pct": 1.0, "crop_mode": "center", "num_classes": 3}
    return model


@register_model
def test_tiny_parallel_vit(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """:func:`test_tiny_vit` with parallel attention + MLP blocks (as ``vit_base_patch16_xp_224``): a timm ViT that
    token reducers cannot patch."""
    return test_tiny_vit(pretrained, block_fn=ParallelScalingBlock, **kwargs)
