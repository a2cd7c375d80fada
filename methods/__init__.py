"""Token-reduction plug-ins. Importing this package registers every shipped method.

>>> import methods
>>> reducer = methods.create("tome", r=13)
>>> model = reducer.apply(timm.create_model("deit_small_patch16_224"))
"""
from methods.base import REGISTRY, FitReport, Knob, TokenReducer, create, list_reducers, register_reducer
from methods.blocks import ModelDims, ReductionContext, patch_model, run_block, unpatch_model
from methods import ltmp, none, prune_and_merge, tome, topk  # noqa: F401  (registration)

__all__ = ["REGISTRY", "FitReport", "Knob", "TokenReducer", "create", "list_reducers", "register_reducer",
           "ModelDims", "ReductionContext", "patch_model", "run_block", "unpatch_model"]
