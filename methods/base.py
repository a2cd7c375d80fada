"""The ``TokenReducer`` plug-in interface, knob declarations and the registry.

A plug-in is one class in one file::

    @register_reducer("tome")
    class ToMe(TokenReducer):
        knobs = (Knob("r", int, default=8, low=0, sweep=(8, 13, 16)),)
        needs = frozenset({"keys"})
        def reduce(self, layer, x, ctx): ...

``methods.create("tome", r=13)`` validates the knobs; ``reducer.apply(model)`` patches a timm
``VisionTransformer`` in place through the shared layer in :mod:`methods.blocks` (no plug-in re-implements
attention or the block). Two kinds of plug-ins fit without special cases:

* **mid-block reducers** override :meth:`TokenReducer.reduce`, called between attention (+ residual) and the
  MLP with ``x: (B, N, C)``; they return fewer tokens or change ``ctx.alive`` (masked simulation). One that
  drops tokens image by image may also implement :meth:`TokenReducer.reduce_packed`, the same step on the alive
  tokens of a padded batch as a flat ``(T, C)`` sequence (LTMP's inference form), so the padding is never built;
* **block-wrapping reducers** override :meth:`TokenReducer.block_forward` and may call
  :func:`methods.blocks.run_block` on whatever token set they want the block to see.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator

import torch

from bench.errors import BenchError

if TYPE_CHECKING:
    from timm.models.vision_transformer import Block, VisionTransformer

    from methods.blocks import ModelDims, ReductionContext
    from methods.ragged import Packing

REGISTRY: dict[str, type["TokenReducer"]] = {}


class KnobValueError(BenchError):
    """A value a knob's declaration refuses; ``problem`` says what is wrong, without the advice to the user."""

    def __init__(self, problem: str, advice: str = "") -> None:
        super().__init__(f"{problem}: {advice}" if advice else problem)
        self.problem = problem


@dataclass(frozen=True)
class Knob:
    """One tunable setting: its type, default, valid closed range ``[low, high]`` and default sweep."""

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    sweep: tuple = ()
    help: str = ""
    choices: tuple = ()

    def check(self, method: str, value: Any) -> Any:
        """Return ``value`` converted to the knob's type, or raise a one-line :class:`KnobValueError`."""
        if self.type is bool and isinstance(value, str):
            value = value.lower() in ("1", "true", "yes", "on")
        if isinstance(value, (list, tuple)) and self.type is not tuple:
            return [self.check(method, v) for v in value]
        try:
            value = self.type(value)
        except (TypeError, ValueError):
            raise KnobValueError(f"knob {method}.{self.name}={value!r} is not a {self.type.__name__}",
                                 self.help or "see run_bench.py list") from None
        if self.choices and value not in self.choices:
            raise KnobValueError(f"knob {method}.{self.name}={value!r} is not one of {list(self.choices)}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise KnobValueError(f"knob {method}.{self.name}={value} is outside [{self.low}, {self.high}]",
                                 "pick a value in range")
        return value

    def check_declaration(self, method: str) -> None:
        """Raise a one-line :class:`BenchError` naming the fix when the plug-in's own default or sweep fails
        :meth:`check` (caught when the plug-in registers, not when a run reaches it)."""
        for what, value in (("default", self.default), *(("sweep value", v) for v in self.sweep)):
            try:
                self.check(method, value)
            except KnobValueError as exc:  # its problem, without the advice to a user, which does not apply
                raise BenchError(f"plug-in {method!r} declares knob {self.name!r} with {what} {value!r}, which its own "
                                 f"declaration refuses ({exc.problem}): fix the Knob(...) in the plug-in") from None


@dataclass
class FitReport:
    """What fitting a method cost (zero for off-the-shelf methods)."""

    images_seen: int = 0
    epochs: float = 0.0
    wall_time_s: float = 0.0
    device: str = "cpu"
    steps: int = 0
    skipped_steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def budgeted_batches(train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                     budget_images: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(x, y)`` batches of ``train_batches()``, epoch after epoch, until ``budget_images`` images were yielded (the
    last batch whole). An epoch that yields no image raises :class:`BenchError` instead of looping forever."""
    seen = 0
    while seen < budget_images:
        epoch_start = seen
        for x, y in train_batches():
            yield x, y
            seen += len(y)
            if seen >= budget_images:
                return
        if seen == epoch_start:
            raise BenchError("the training data gave no images: check --train-data (or the Fashion-MNIST train split)")


class TokenReducer:
    """Base class of every plug-in. Subclasses set the class attributes and override one hook."""

    name: ClassVar[str] = ""
    knobs: ClassVar[tuple[Knob, ...]] = ()
    #: attention statistics the plug-in reads: "keys" (B, N, head_dim mean over heads),
    #: "importance" (B, N attention received, mean over heads and alive queries), "cls_attn" (B, N),
    #: "probs" (every block's (B, H, N, N) softmax attention kept in ``ctx.attention_maps``, in the autograd graph).
    needs: ClassVar[frozenset[str]] = frozenset()
    #: the knob values that turn the method off (the conformance suite checks they reproduce the logits)
    off: ClassVar[dict[str, Any]] = {}
    #: (knob, values) along which GMACs must change monotonically (conformance suite); None = first swept knob
    monotone_knob: ClassVar[tuple[str, tuple] | None] = None
    trains: ClassVar[bool] = False
    input_dependent: ClassVar[bool] = False
    proportional_attention: bool = False
    trace_source: bool = False

    def __init__(self, **values: Any) -> None:
        declared = {knob.name: knob for knob in self.knobs}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise BenchError(f"method {self.name!r} has no knob {unknown[0]!r}: its knobs are {sorted(declared) or 'none'}")
        self.values = {k.name: k.check(self.name, values.get(k.name, k.default)) for k in self.knobs}
        self.model: "VisionTransformer | None" = None

    def __getattr__(self, item: str) -> Any:
        values = self.__dict__.get("values", {})
        if item in values:
            return values[item]
        raise AttributeError(item)

    # --- life cycle -------------------------------------------------------------------------------
    def apply(self, model: "VisionTransformer") -> "VisionTransformer":
        """Patch ``model`` in place (class swap, weights untouched) and return it. An unsupported architecture is
        refused before :meth:`check_model` reads the model's shapes."""
        from methods.blocks import check_supported, patch_model

        check_supported(model)
        self.check_model(model)
        patch_model(model, self)
        self.model = model
        return model

    def check_model(self, model: "VisionTransformer") -> None:
        """Reject knob values impossible for this model (override; raise BenchError)."""

    def fit(self, model: "VisionTransformer", train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            budget: dict[str, Any], progress: bool = True) -> FitReport:
        """Learn what the method needs (thresholds, matrices) on the patched ``model``.

        ``train_batches()`` yields ``(x: (B, C, H, W), y: (B,))`` from the training split; ``budget`` holds
        ``budget_images``, ``batch_size``, ``precision`` (and method-specific keys). Off-the-shelf: free."""
        return FitReport()

    def prepare_for_test(self, model: "VisionTransformer") -> None:
        """Make the plug-in usable on ``model`` without its data (e.g. a calibration on random images).
        Used by the conformance suite; off-the-shelf plug-ins need nothing."""

    def learned_state(self) -> dict[str, torch.Tensor]:
        """Tensors learned by :meth:`fit`, saved with the results so nothing retrains on re-plot."""
        return {}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise BenchError(f"method {self.name!r} learns nothing but a learned state was given")

    # --- hooks called from the shared block ------------------------------------------------------
    def needs_at(self, layer: int) -> frozenset[str]:
        """What block ``layer`` reads of :attr:`needs` in this forward pass (default: all of it). A plug-in whose
        settings switch a block off returns less, and that block's attention then skips computing it."""
        return self.needs

    def begin(self, ctx: "ReductionContext", x: torch.Tensor) -> None:
        """Called once per forward after position embedding, ``x: (B, N, C)``. Default: nothing."""

    def finish(self, x: torch.Tensor, ctx: "ReductionContext") -> torch.Tensor:
        """Called after the last block, before the final norm. Default: identity."""
        return x

    def block_forward(self, layer: int, block: "Block", x: torch.Tensor, ctx: "ReductionContext") -> torch.Tensor:
        """One transformer block. Default: attention, :meth:`reduce`, MLP. ``x: (B, N, C)``."""
        from methods.blocks import run_block

        mid_packed = (lambda tokens, packing: self.reduce_packed(layer, tokens, packing, ctx)) if self.reduces_packed() else None
        return run_block(block, x, ctx, layer, mid=lambda y: self.reduce(layer, y, ctx), mid_packed=mid_packed)

    def reduce(self, layer: int, x: torch.Tensor, ctx: "ReductionContext") -> torch.Tensor:
        """Mid-block hook: ``x: (B, N, C)`` after attention + residual -> ``(B, N', C)``. Default: identity."""
        return x

    def reduces_packed(self) -> bool:
        """Whether :meth:`reduce_packed` replaces :meth:`reduce` now (where the batch's mask is hard or absent)."""
        return False

    def reduce_packed(self, layer: int, tokens: torch.Tensor, packing: "Packing",
                      ctx: "ReductionContext") -> tuple[torch.Tensor, "Packing"]:
        """Optional mid-block hook on the alive tokens ``tokens: (T, C)`` of ``packing``'s padded (B, N) batch ->
        the kept tokens ``(T', C)`` and their Packing (see :func:`methods.blocks.run_block`)."""
        raise NotImplementedError(f"{type(self).__name__} sets reduces_packed() but has no reduce_packed")

    def token_groups(self, layer: int, ctx: "ReductionContext") -> torch.Tensor | None:
        """(B, tokens, N) 0/1 map of which input positions each token of block ``layer`` holds, for plots;
        None = the shared source map (``ctx.source``) describes it. Block-wrapping plug-ins override this."""
        return None

    def extra_macs(self, layer: int, n_attn: torch.Tensor, n_mlp: torch.Tensor, dims: "ModelDims") -> torch.Tensor:
        """The method's own multiply-adds in block ``layer`` per image (similarity matmuls, M/R, ...)."""
        return torch.zeros_like(n_attn, dtype=torch.float64)

    @classmethod
    def is_mid_block(cls) -> bool:
        """True unless the plug-in replaces the whole block (block-wrapping reducers give all tokens back)."""
        return cls.block_forward is TokenReducer.block_forward

    @classmethod
    def knob_defaults(cls) -> dict[str, Any]:
        """Each knob's declared default, by name."""
        return {k.name: k.default for k in cls.knobs}

    @classmethod
    def swept_knobs(cls) -> tuple[str, ...]:
        """Names of the knobs with a declared default sweep (the cost knobs: ToMe's r, LTMP's r_target)."""
        return tuple(k.name for k in cls.knobs if k.sweep)

    @classmethod
    def monotone_sweep(cls) -> tuple[str, tuple] | None:
        if cls.monotone_knob is not None:
            return cls.monotone_knob
        return next(((k.name, k.sweep) for k in cls.knobs if len(k.sweep) > 1), None)

    @classmethod
    def summarise(cls, values: dict[str, Any]) -> str:
        """``r_target=0.7, lr_merge=0.05``: of ``values``, the knobs the plug-in sweeps (at any value, its default
        included) and the others where they differ from its declared defaults; ``-`` for none."""
        defaults = cls.knob_defaults()
        shown = {k: v for k, v in values.items() if k in cls.swept_knobs() or defaults.get(k, object()) != v}
        return ", ".join(f"{k}={v}" for k, v in shown.items()) or "-"

    def describe(self) -> str:
        """This instance's knobs as :meth:`summarise` shows them (progress lines, tables)."""
        return self.summarise(self.values)


def register_reducer(name: str) -> Callable[[type[TokenReducer]], type[TokenReducer]]:
    """Class decorator: make a plug-in available as ``methods.create(name, ...)``."""

    def decorate(cls: type[TokenReducer]) -> type[TokenReducer]:
        if name in REGISTRY and REGISTRY[name] is not cls:
            taken = REGISTRY[name]
            raise BenchError(f"method name {name!r} is taken by {taken.__module__}.{taken.__qualname__}: register "
                             f"{cls.__module__}.{cls.__qualname__} under another name")
        for knob in cls.knobs:
            knob.check_declaration(name)
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return decorate


def swept_values(method: str, values: dict[str, Any]) -> dict[str, Any]:
    """Of a cell's knob ``values``, those its plug-in sweeps (what a figure or a paper labels the cell by); every
    knob for a plug-in that is not loaded."""
    if method not in REGISTRY:
        return dict(values)
    swept = REGISTRY[method].swept_knobs()
    return {k: v for k, v in values.items() if k in swept}


def create(name: str, **values: Any) -> TokenReducer:
    """Instantiate a registered plug-in with validated knob values."""
    if name not in REGISTRY:
        raise BenchError(f"unknown method {name!r}: choose one of {sorted(REGISTRY)} (see `python run_bench.py list`)")
    return REGISTRY[name](**values)


def list_reducers() -> dict[str, type[TokenReducer]]:
    return dict(sorted(REGISTRY.items()))
