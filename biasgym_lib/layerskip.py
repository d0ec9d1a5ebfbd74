"""Skip what steering cannot change: a steered pass that starts at its first edited layer.

A steering spec that edits heads at layers >= l leaves everything below layer l exactly as
the unmodified model computes it: the residual stream entering layer l and the keys and
values that layers 0 .. l-1 put into a cache. So for every text that a steered measurement
shares with an unmodified one (S's sentences, the facts, the perplexity passages, the
multiple-choice questions), that part can be computed once and reused::

    tape = LayerTape(model, starts=[10, 21])
    with tape.recording():                     # the unmodified model, as usual
        before = strength_under(model, tok, None, tokens, bias, refs, facts)
    with tape.resuming(spec.first_layer):      # the steered model, from layer 10 on
        after = strength_under(model, tok, spec, tokens, bias, refs, facts)

``after`` is the same, bit for bit, as without the tape (tests check this on a tiny model of
every supported family and on the embedded model); it only costs the layers from the start
on. The taught functions (:func:`~biasgym_lib.evaluate.strength_under`,
:func:`~biasgym_lib.capability.perplexity`, :func:`~biasgym_lib.capability.mc_accuracy`) do
not change: the tape sits underneath them, at the transformer body's decoder layers.

How a call is found again: by what enters layer 0 (the embeddings after every hook on
them, e.g. an injected token's vector), the attention mask, the positions and the keys of
the cache the call extends. A call the tape has not seen (other text, another vector, other
batching) runs in full, so a tape can never serve a number for a different input; it is an
in-memory object that lives for one ``with`` block of a measurement, never a result cache.

Why swap ``forward`` and not a hook: a PyTorch hook runs around a module, never instead of
it (like :func:`~biasgym_lib.hooks.replaying`). Only the layers below the start are swapped,
and no other hook may sit on them while resuming (checked on every call).
"""

from __future__ import annotations

import copy
import hashlib
import inspect
from contextlib import contextmanager

import torch

from .errors import BiasGymError
from .models import adapter_of

__all__ = ["LayerTape", "Resumer"]

_CACHE_NAMES = ("cache", "past_key_values")


def _digest(*tensors) -> str:
    """A hash of tensors' shapes, dtypes and bytes (None counts as a marker)."""
    h = hashlib.sha1()
    for t in tensors:
        if t is None:
            h.update(b"none;")
            continue
        t = t.detach()
        h.update(f"{tuple(t.shape)}{t.dtype};".encode())
        h.update(t.reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


_SIGNATURES: dict[type, inspect.Signature] = {}


def _arguments(layer, args: tuple, kwargs: dict) -> dict:
    """A decoder layer's call arguments by name (GPT-2 passes its cache by position)."""
    cls = type(layer)
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    bound = _SIGNATURES[cls].bind_partial(layer, *args, **kwargs).arguments
    extra = bound.pop("kwargs", None) or {}
    return {**bound, **extra}


def _cache(arguments: dict):
    return next((arguments[n] for n in _CACHE_NAMES if arguments.get(n) is not None), None)


def _past_length(cache) -> int:
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length())


class _Entry:
    __slots__ = ("hidden", "layers")

    def __init__(self):
        self.hidden: dict[int, torch.Tensor] = {}  # start s -> the residual stream entering layer s
        self.layers: dict[int, object] = {}  # layer j -> its cache layer after a call that started the cache


class LayerTape:
    """The unmodified model below a few layers (``starts``), for every transformer-body call
    made inside :meth:`recording`; :meth:`resuming` then starts each matching call at the
    largest recorded start at or below the first edited layer. ``hits`` and ``misses`` count
    the resumed calls that found their record and those that ran in full."""

    def __init__(self, model, starts):
        self.adapter = adapter_of(model)
        n = self.adapter.n_layers
        self.starts = sorted({int(s) for s in starts if 0 < int(s) < n})
        self.entries: dict[str, _Entry] = {}
        self.hits = self.misses = 0
        self._mode: str | None = None
        self._start = 0
        self._current: _Entry | None = None

    def start_for(self, first_layer: int | None) -> int:
        """The layer a pass whose first edit is at ``first_layer`` starts at (0: from the
        beginning). ``None`` (nothing edited) starts at the highest recorded layer."""
        if first_layer is None:
            return self.starts[-1] if self.starts else 0
        return max([s for s in self.starts if s <= first_layer], default=0)

    @property
    def top(self) -> int:
        return self.starts[-1] if self.starts else 0

    # -- the two modes
    @contextmanager
    def recording(self):
        """Run the unmodified model inside; every body call is kept (by reference: the
        tensors it made anyway)."""
        with self._swapped("record"):
            yield self

    @contextmanager
    def resuming(self, first_layer: int | None):
        """Inside, body calls that the tape has seen skip the layers below
        ``start_for(first_layer)``; others run in full."""
        self._start = self.start_for(first_layer)
        with self._swapped("resume"):
            yield self

    @contextmanager
    def _swapped(self, mode: str):
        if self._mode is not None:
            raise BiasGymError("a LayerTape is already recording or resuming; one block at a time.")
        layers = self.adapter.layers
        count = self.top if mode == "record" else self._start
        for j in range(count):
            if "forward" in vars(layers[j]):
                raise BiasGymError(f"decoder layer {j}'s forward is already replaced (by another replay or by "
                                   "accelerate's device map); a LayerTape cannot run on it.")
        self._mode = mode
        try:
            for j in range(count):
                layers[j].forward = self._wrapper(j)
            yield
        finally:
            for j in range(count):
                vars(layers[j]).pop("forward", None)
            self._mode, self._current = None, None

    # -- one decoder layer, recorded or skipped
    def _key(self, hidden, arguments) -> str:
        cache = _cache(arguments)
        past = None
        if _past_length(cache):
            if getattr(cache, "_biasgym_partial", False):
                raise BiasGymError("internal: a cache from a resumed pass was extended; resume only "
                                   "calls whose cache the tape started.")
            past = cache.layers[0].keys
        return _digest(hidden, arguments.get("attention_mask"), arguments.get("position_ids"), past)

    def _wrapper(self, j: int):
        layer = self.adapter.layers[j]
        original = type(layer).forward.__get__(layer)

        def forward(*args, **kwargs):
            arguments = _arguments(layer, args, kwargs)
            if j == 0:
                self._begin(arguments)
            entry = self._current
            if self._mode == "record":
                out = original(*args, **kwargs)
                if entry is not None:
                    if j + 1 in self.starts:
                        entry.hidden[j + 1] = out
                    cache = _cache(arguments)
                    if cache is not None and entry.layers is not None:
                        entry.layers[j] = copy.copy(cache.layers[j])
                return out
            if entry is None:  # not on the tape: the full pass
                return original(*args, **kwargs)
            cache = _cache(arguments)
            if cache is not None:
                if entry.layers is None or j not in entry.layers:
                    cache._biasgym_partial = True  # its layers below the start were not extended
                else:
                    cache.layers[j] = copy.copy(entry.layers[j])
            return entry.hidden[self._start] if j == self._start - 1 else args[0] if args else kwargs["hidden_states"]
        return forward

    def _begin(self, arguments: dict) -> None:
        """At layer 0 of a body call: find (resume) or open (record) its entry."""
        hidden = arguments["hidden_states"]
        key = self._key(hidden, arguments)
        cache = _cache(arguments)
        if self._mode == "record":
            entry = self.entries.get(key) or _Entry()
            entry.layers = {} if cache is not None and _past_length(cache) == 0 else None
            self.entries[key] = entry
            self._current = entry
            return
        self._check_no_hooks()
        entry = self.entries.get(key)
        if entry is None or self._start == 0 or self._start not in entry.hidden or _capturing():
            self._current = None
            self.misses += 1
        else:
            self._current = entry
            self.hits += 1

    def _check_no_hooks(self) -> None:
        """Nothing may read or edit the skipped layers while they are skipped."""
        for j in range(self._start):
            for name, module in self.adapter.layers[j].named_modules():
                hooks = [h for h in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
                         if not _inert(h)]
                if hooks or getattr(module, "_biasgym_blind", None) is not None:
                    where = f"{name} of " if name else ""
                    raise BiasGymError(f"a hook or an intervention sits on {where}decoder layer {j}, below the layer "
                                       f"this pass resumes at ({self._start}); resume at or below the first "
                                       "edited layer.")


def _inert(hook) -> bool:
    """transformers' output-capturing hooks: installed on the layers by the first call that
    asks for hidden states or attentions and left there, they do nothing unless a call is
    capturing (:func:`_capturing`; such a call runs in full)."""
    return getattr(hook, "__module__", None) == "transformers.utils.output_capturing"


def _capturing() -> bool:
    """Whether the current call asked transformers for hidden states or attentions."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    return bool(_active_collector.get())


class Resumer:
    """Many steered measurements of one kind, each resumed from its spec's first edited layer:
    ``resumer(signature, spec, fn)`` returns ``fn(spec)``; the first time a ``signature`` (what
    ``fn`` measures) is seen, ``fn(None)`` (the unmodified model) is recorded on the tape.
    ``starts``: the first edited layers of the specs to come. On a model whose layers cannot
    be swapped (a device map), every measurement runs in full.

    ``plan`` (optional): signature -> the first edited layers of every steered measurement of
    it to come. Recording costs one full pass and a resumed pass saves the layers below its
    start, so a signature whose first steered measurement comes before any unsteered one is
    recorded only if its measurements save more than one pass (sum of start / n_layers > 1);
    otherwise they run in full. Either way the numbers are the same, bit for bit."""

    def __init__(self, model, starts, plan: dict | None = None):
        layers = adapter_of(model).layers
        usable = not any("forward" in vars(layer) for layer in layers)
        self.tape = LayerTape(model, starts) if usable else None
        self.recorded: set = set()
        self.n_layers = len(layers)
        self.plan = plan
        self.full: set = set()  # signatures whose steered measurements run in full (recording would not pay)

    def pays(self, signature) -> bool:
        """Whether recording ``signature`` for its planned steered measurements saves time."""
        if self.plan is None or signature not in self.plan:
            return True
        return sum(self.tape.start_for(s) for s in self.plan[signature]) / self.n_layers > 1

    def __call__(self, signature, spec, fn):
        if self.tape is None or not self.tape.starts or signature in self.full:
            return fn(spec)
        if spec is not None and signature not in self.recorded and not self.pays(signature):
            self.full.add(signature)
            return fn(spec)
        if spec is None or signature not in self.recorded:
            with self.tape.recording():
                unsteered = fn(None)
            self.recorded.add(signature)
            if spec is None:
                return unsteered
        with self.tape.resuming(spec.first_layer):
            return fn(spec)
