"""`attach()` / `detach()` and the `Attached` handle.

attach binds each method config to the model (`config.bind(target)` gives its runtime), selects
vlmfix's attention function for the text decoder only (`model.set_attn_implementation({"text_config":
"vlmfix"})`, registered with `transformers.AttentionInterface`), gives each decoder attention module
a `Route` to this handle, and adds forward hooks on the model instance that build a fresh
`CallState` at each prefill. No model class is patched; `detach()` puts back the exact attention
implementation of every sub-config and removes the hooks and routes.

Prefill or decoding step: a forward starts a new call when it brings no cache, a cache this handle
has not seen, or new tokens on an empty cache. A forward running inside `torch.compile` is a
decoding step (transformers compiles only those), so a compiled step runs no Python bookkeeping.
The layer hooks that read the prefill's hidden states exist only during the prefill.

Threads: one call's state lives on the handle, so calls take turns. `fixed.generate(...)` and
`fixed(...)` wait for each other (a lock held for the whole call), so threads sharing the handle each
get their own correct result. A forward that reaches the attached model while another thread's
forward runs on it, or a decoding step of a call whose state another thread's prefill replaced (plain
`model.generate` from two threads at once), is refused with a `VlmfixError`: never a mixed state.
Compiled decoding steps run no Python hooks, so there only `fixed.generate` guards the turns.

Padding: a forward takes a batch padded on either side (each row's real tokens come from its
attention mask, see `vlmfix.core.state`). Generation continues every row after the prompt's last
column, so a prefill handed a KV cache (what `generate` does) refuses right-padded rows with a
`VlmfixError` naming `padding_side="left"`, before the decoder runs; `Attached.generate` refuses
them before generate starts.
"""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from vlmfix.core import attention, contrast
from vlmfix.adapters import Adapter, get_adapter
from vlmfix.adapters.base import sides
from vlmfix.core.eager import additive_bias
from vlmfix.core.protocol import (BiasesScores, CombinesLogits, EditsQueries, MethodConfig, MovesTokens,
                                  ObservesQueries, ReadsInputs, ReplacesMask, Runtime, Target)
from vlmfix.core.sinks import check_tau, find_sink_dims, scaled_tau, sink_scores
from vlmfix.core.errors import VlmfixError
from vlmfix.core.state import FIRST_SINK_LAYER, CallState, Phase
from vlmfix.core.vision import VisionHooks, vision_runtimes


def _implementations(config: Any) -> dict[str, Any]:
    """Nested {sub_config_name: implementation} for `set_attn_implementation`, "" being the config itself."""
    out: dict[str, Any] = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            out[key] = _implementations(sub)
    return out


def _text_config_key(config: Any, text_config: Any) -> str | None:
    for key in getattr(config, "sub_configs", {}) or {}:
        if getattr(config, key, None) is text_config:
            return key
    return None


class _Stop(Exception):
    """Ends a pre-pass after its last layer."""


def _refuse_right_padding(rows: list[int]) -> None:
    """Raise VlmfixError when batch rows `rows` are padded on the right of a prompt about to be generated from."""
    if rows:
        raise VlmfixError(
            f"batch rows {rows} are padded on the right, and generation (a prefill handed a KV cache) continues "
            "every row after the prompt's last column, i.e. after their padding: decoder-only generation needs "
            "left padding. Build the inputs with processor(..., padding=True, padding_side=\"left\") (or set "
            "processor.tokenizer.padding_side = \"left\"). A plain forward, model(**inputs), takes either side."
        )


def _refuse_dola(model: nn.Module, kwargs: dict) -> None:
    """Raise VlmfixError when a generate call asks for DoLa (`dola_layers`, in the call or a generation config)."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    if kwargs.get("dola_layers") is not None or getattr(config, "dola_layers", None) is not None:
        raise VlmfixError(
            "DoLa (dola_layers) is not part of transformers 5: generate loads it from the Hub repo "
            "transformers-community/dola as remote code (custom_generate, trust_remote_code=True), which vlmfix "
            "neither runs nor tests under its methods: its layer contrast reads the hidden states that the attention "
            "methods edit, and a contrast-branch method's combined logits are not those hidden states' logits. "
            "Generate DoLa with the plain model (detach first), or use vlmfix's own contrast methods (pai, vcd, icd, "
            "m3id, only)."
        )


def _cache_of(kwargs: dict) -> Any:
    """The KV cache a model forward was given (`cache`; `past_key_values` before transformers 5), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


class Attached:
    """A model with vlmfix attached. Use as a context manager, or call `detach()`.

    - `generate(...)` is the model's generate; plain `model.generate(...)` and `model(...)` run the
      methods too while attached, eager or compiled (static cache);
    - `last_state` is the `CallState` of the last call (spans, sink scores, `record(VAR)`, ...);
    - `methods` are the configs as given; `runtimes` what they were bound to (in run order);
    - `sink_dims` / `tau` are what sink detection uses (preset, argument or discovery).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any | None,
        methods: Sequence[MethodConfig],
        *,
        sink_dims: Sequence[int] | None = None,
        tau: float | str | None = None,
    ):
        self.model = model
        self.processor = processor
        self.adapter: Adapter = get_adapter(model, processor)
        if any(getattr(m, attention.ROUTE, None) is not None for m in self._attention_modules()):
            raise VlmfixError(
                "this model is already attached; call .detach() on the existing handle (or leave its "
                "`with` block) before attaching again."
            )
        for m in methods:
            if not isinstance(m, MethodConfig):
                raise TypeError(f"attach expects vlmfix methods (VAR(), GIFT(), ...), got {type(m).__name__}")
        self.methods: tuple[MethodConfig, ...] = tuple(methods)
        preset = self.adapter.preset
        if tau is None:
            tau = preset["tau"] if preset else scaled_tau(self.adapter.hidden_size)
        self.tau = check_tau(tau, self.adapter.hidden_size)
        target = Target(self.adapter, self.tau)
        bound = [m.bind(target) for m in self.methods]
        #: in ascending `order` (pruners first: they score the raw attention), else as given
        self.runtimes: tuple[Runtime, ...] = tuple(sorted(bound, key=lambda r: r.order))
        needy = [type(r.config).__name__ for r in self.runtimes if r.needs_tokenizer]
        if needy and self.adapter.tokenizer is None:
            raise VlmfixError(
                f"{', '.join(needy)} reads the user's question as words, which needs the tokenizer: pass the "
                "model's processor or its tokenizer as the second argument, vlmfix.attach(model, processor, "
                f"[...]) (got {'nothing' if processor is None else type(processor).__name__})."
            )
        for r in self.runtimes:
            r.check_combination([o for o in self.runtimes if o is not r])
        calls = [r.call for r in self.runtimes]
        #: the runtime whose calls combine logits with a contrast branch (`vlmfix.core.contrast`), or None
        self.brancher: Runtime | None = self._resolve_brancher()
        #: runtimes whose calls read the prefill's inputs
        self.readers = tuple(r for r in self.runtimes if issubclass(r.call, ReadsInputs))
        #: runtimes that move tokens in this configuration (a pruner in mask form moves none)
        self.movers = tuple(r for r in self.runtimes if issubclass(r.call, MovesTokens) and r.moved_layers())
        #: the vision-side hooks (ReadsVision / EditsFeatures calls; the family must support them), or None
        self._vision = VisionHooks(self, vision) if (vision := vision_runtimes(self.runtimes)) else None
        #: a runtime's own decoding loop (`Runtime.decoding`): (runtime, custom_generate callable, its settings), or None
        self.decoder = self._resolve_decoder()
        #: whether any layer call may leave the fast path
        self.active = any(issubclass(c, (ObservesQueries, EditsQueries, BiasesScores, ReplacesMask)) for c in calls) \
            or bool(self.movers)
        self.state: CallState | None = None
        self._last_state: CallState | None = None
        self.tracks_sinks = any(r.uses_sinks for r in self.runtimes) or sink_dims is not None
        self.sink_dims, self.sink_source = self._resolve_sink_dims(sink_dims)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._prefill_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._in_prepass = False
        #: whole calls through this handle (generate, __call__) take turns
        self._turn = threading.RLock()
        #: held by the thread whose forward runs on the attached model (`_busy_thread`), released after it
        self._busy = threading.Lock()
        self._busy_thread: int | None = None
        #: the thread whose prefill made `state`
        self._state_thread: int | None = None
        #: per thread: `cache` (a weakref to its call's KV cache), `pixels` (kept by the vision hook),
        #: `last_state` (its last call's state)
        self._local = threading.local()
        self._bias: tuple[Any, tuple, torch.Tensor | None] | None = None
        #: {(first row, end row): (the model's mask, the mask cut to those rows)} (`rows_mask`)
        self._rows_masks: dict[tuple[int, int], tuple[Any, torch.Tensor]] = {}
        self._attached = False
        self._unwrap: Any = None
        self._attach()

    def _resolve_brancher(self) -> Runtime | None:
        found = [r for r in self.runtimes if r.branches()]
        if not found:
            return None
        names = ", ".join(type(r.config).__name__ for r in found)
        if len(found) > 1:
            raise VlmfixError(f"{names} each ask for a contrast branch; attach at most one such method")
        runtime = found[0]
        if not issubclass(runtime.call, CombinesLogits):
            raise VlmfixError(f"{names} declares contrast branches but its calls do not combine logits (CombinesLogits)")
        kinds = runtime.branches()
        if len(kinds) != 1 or kinds[0] not in contrast.KINDS:
            raise VlmfixError(f"{names} asks for contrast branches {kinds}: one kind of {', '.join(contrast.KINDS)}")
        others = [type(r.config).__name__ for r in self.runtimes
                  if issubclass(r.call, (MovesTokens, ReplacesMask)) and r is not runtime]
        if others:
            raise VlmfixError(f"{names} runs a contrast branch (extra batch rows), which {', '.join(others)} "
                              "(token pruning) cannot run beside yet: attach them separately")
        return runtime

    def _resolve_decoder(self) -> tuple[Runtime, Any, dict] | None:
        found = [(r, *d) for r in self.runtimes if (d := r.decoding()) is not None]
        if len(found) > 1:
            names = ", ".join(type(r.config).__name__ for r, *_ in found)
            raise VlmfixError(f"{names} each bring their own decoding loop; attach at most one of them")
        return found[0] if found else None

    def _generate_with_decoder(self, *args: Any, **kwargs: Any) -> Any:
        """The model's generate running the attached decoding loop (the instance's `generate` while attached)."""
        _, loop, settings = self.decoder
        kwargs.setdefault("custom_generate", loop)
        return type(self.model).generate(self.model, *args, **settings(kwargs))

    def rows_mask(self, mask: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """`mask` cut to batch rows start..stop-1 (contrast branches: the real rows, or the branch rows), cut once
        per mask object and rows."""
        if torch.compiler.is_compiling():
            return mask[start:stop]
        cached = self._rows_masks.get((start, stop))
        if cached is None or cached[0] is not mask:
            cached = self._rows_masks[start, stop] = (mask, mask[start:stop])
        return cached[1]

    # -- sinks ------------------------------------------------------------------------------------
    def _resolve_sink_dims(self, dims: Sequence[int] | None) -> tuple[tuple[int, ...], str]:
        preset = self.adapter.preset
        if dims is not None:
            bad = [d for d in dims if not 0 <= int(d) < self.adapter.hidden_size]
            if bad:
                raise ValueError(f"sink dims {bad} are outside the hidden size {self.adapter.hidden_size}")
            return tuple(int(d) for d in dims), "argument"
        if preset:
            return tuple(preset["sink_dims"]), f"preset {preset['name']}"
        if not self.tracks_sinks:
            return (), "not needed"
        if self.adapter.tokenizer is None:
            raise VlmfixError(
                "sink dims are unknown for this model and discovery needs its tokenizer: pass the processor or "
                "its tokenizer to attach(), or pass sink_dims=[...]."
            )
        return find_sink_dims(self.model, self.adapter.tokenizer), "discovered"

    # -- attach / detach --------------------------------------------------------------------------
    def _attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.adapter.decoder_layers]

    def _attach(self) -> None:
        config = self.model.config
        text = self.adapter.text_config
        modules = self._attention_modules()
        key = _text_config_key(config, text)
        if key is None:
            raise VlmfixError(f"cannot find the text sub-config of {type(self.model).__name__}")
        self._previous = _implementations(config)
        self.previous_text_implementation = text._attn_implementation
        self.model.set_attn_implementation({key: attention.implementation_name(self.previous_text_implementation)})
        for idx, module in enumerate(modules):
            fallback = attention.previous_attention(self.previous_text_implementation, module)
            setattr(module, attention.ROUTE, attention.Route(self, idx, fallback))
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._post_forward, with_kwargs=True, always_call=True))
        tower = getattr(getattr(self.model, "model", self.model), "vision_tower", None)
        if tower is not None and self.readers:
            self._hooks.append(tower.register_forward_pre_hook(self._keep_pixels, with_kwargs=True))
        if self._vision is not None:
            self._hooks += self._vision.hooks()
        if self.decoder is not None:  # transformers' own pattern for custom generation strategies (an instance attribute)
            def generate(*args: Any, **kwargs: Any) -> Any:
                return self._generate_with_decoder(*args, **kwargs)

            self.model.generate = functools.wraps(type(self.model).generate)(generate)
        if self.brancher is not None and self.brancher.branches()[0] == "noised":
            self._wrap_image_features()
        self._attached = True

    def _wrap_image_features(self) -> None:
        """The noised branch (`vlmfix.core.contrast`) needs the noised images' features. `generate` encodes the
        images before the prefill's forward (`get_image_features`), and passes the features, not the pixels:
        while attached, the model instance's `get_image_features` (its base model's, an instance attribute that
        detach removes; the class is untouched) also encodes the noised pixels when called outside a forward,
        and keeps them for the prefill (per thread). Inside a forward the pixels are at hand (no extra work)."""
        base = getattr(self.model, "base_model", self.model)
        original = base.get_image_features
        signature = inspect.signature(original)
        settings = self.brancher.branch_settings()

        @functools.wraps(original)  # generate reads its signature
        def get_image_features(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            if self._busy_thread != threading.get_ident():  # generate's encoding before the prefill
                bound = signature.bind(*args, **kwargs)
                pixels = bound.arguments["pixel_values"]
                bound.arguments["pixel_values"] = contrast.noise_pixels(pixels, settings,
                                                                        bound.arguments.get("image_grid_thw"))
                self._local.noised = {"image": original(*bound.args, **bound.kwargs)}
            return out

        base.get_image_features = get_image_features
        self._unwrap = lambda: base.__dict__.pop("get_image_features", None)

    def detach(self) -> nn.Module:
        """Restore every sub-config's previous attention implementation and remove the hooks.
        Detaching twice is a no-op. Returns the model."""
        if not self._attached:
            return self.model
        self._drop_prefill_hooks()
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._unwrap is not None:
            self._unwrap()
            self._unwrap = None
        for module in self._attention_modules():
            if getattr(module, attention.ROUTE, None) is not None and getattr(module, attention.ROUTE).handle is self:
                delattr(module, attention.ROUTE)
        self.model.set_attn_implementation(self._previous)
        if self.decoder is not None:
            vars(self.model).pop("generate", None)
        self.state = None
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def last_state(self) -> CallState | None:
        """The `CallState` of this thread's last call (of the handle's last call, for a thread that made none)."""
        return getattr(self._local, "last_state", None) or self._last_state

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- calls ------------------------------------------------------------------------------------
    def _check_attached(self) -> None:
        if not self._attached:
            raise VlmfixError("this handle was detached; attach again with vlmfix.attach(model, processor, methods)")

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's `generate` with the methods; calls from several threads take turns. A batch padded on
        the right is refused before any work (generation needs left padding); a plain `model.generate` is
        refused at its prefill."""
        self._check_attached()
        _refuse_dola(self.model, kwargs)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            _refuse_right_padding(sides(mask.cpu())[:, 1].nonzero().flatten().tolist())
        with self._turn:
            return self.model.generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """One forward of the model with the methods; calls from several threads take turns."""
        self._check_attached()
        with self._turn:
            return self.model(*args, **kwargs)

    def bias(self, mask: torch.Tensor | None, batch: int, kv_heads: int, kv_len: int,
             dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """`eager.additive_bias` of a decoding step's mask, built once per step: every layer of the step
        gets the same mask object (eager; a compiled step builds it in the graph)."""
        if torch.compiler.is_compiling():
            return additive_bias(mask, batch, kv_heads, kv_len, dtype, device)
        key = (batch, kv_heads, kv_len, dtype, device)
        cached = self._bias
        if cached is None or cached[0] is not mask or cached[1] != key:
            cached = self._bias = (mask, key, additive_bias(mask, batch, kv_heads, kv_len, dtype, device))
        return cached[2]

    def _starts_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether this forward is a prefill (see the module docstring). Reads a cache length on the
        host only for a multi-token forward on a cache this call already used (assisted decoding, a
        reused static cache)."""
        cache = _cache_of(kwargs)
        own = getattr(self._local, "cache", None)
        if cache is None or self.state is None or own is None or own() is not cache:
            return True
        if kwargs.get("pixel_values") is not None:
            return True
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        if tokens is not None and tokens.shape[1] == 1:
            return False
        return int(cache.get_seq_length()) == 0

    # -- turns between threads ---------------------------------------------------------------------
    def _enter(self) -> bool:
        """Take the attached model for this thread's forward; False for a forward nested in it (the pre-pass)."""
        me = threading.get_ident()
        if self._busy_thread == me:
            return False
        if not self._busy.acquire(blocking=False):
            raise VlmfixError(
                "another thread is running a forward on this attached model; vlmfix keeps one call's state per "
                "attached model. Share it between threads through fixed.generate(...) / fixed(...), which take "
                "turns, or attach a separate copy of the model in each thread."
            )
        self._busy_thread = me
        return True

    def _leave(self) -> None:
        if self._busy_thread == threading.get_ident():
            self._busy_thread = None
            self._busy.release()

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if torch.compiler.is_compiling():  # a compiled decoding step: only the branch rows' inputs (tensor ops)
            state = self.state
            if state is not None and state.branch is not None:
                return contrast.step_inputs(args, kwargs, state.branch)
            return None
        if not self._enter():
            return None
        try:
            if self._starts_call(args, kwargs):
                brancher = self.brancher
                if brancher is None:
                    self._start_call(args, kwargs)
                    return None
                kind = brancher.branches()[0]
                settings = brancher.branch_settings()
                if kind == "disturbed":  # the branch rows are longer: widen the prompt before the call's state
                    args, kwargs = contrast.widen(args, kwargs, self.adapter, len(settings["prefix_ids"]))
                self._start_call(args, kwargs)
                state = self.state
                call = next(c for c in state.calls if c.runtime is brancher)
                encoded, self._local.noised = getattr(self._local, "noised", None), None
                args, kwargs, state.branch = contrast.prefill_inputs(args, kwargs, self.adapter, state.rows, call, kind,
                                                                     settings, encoded)
                state.branch_rows = state.branch.real
                return args, kwargs
            elif self._state_thread != threading.get_ident():
                raise VlmfixError(
                    "another thread started a call on this attached model while this thread's call was generating, "
                    "and its state replaced this call's. Share an attached model between threads through "
                    "fixed.generate(...), which takes turns, or attach a separate copy of the model in each thread."
                )
            elif self.state.branch is not None:
                return contrast.step_inputs(args, kwargs, self.state.branch)
        except BaseException:
            self._leave()
            raise

    def _start_call(self, args: tuple, kwargs: dict) -> None:
        """A prefill: build the call's state, let the runtimes begin, add the prefill-only hooks."""
        self._drop_prefill_hooks()  # a prefill that raised left them
        cache = _cache_of(kwargs)
        shorten = [r for r in self.movers if r.shortens_cache()]
        if shorten and cache is not None and getattr(cache, "is_compileable", False):
            names = ", ".join(type(r.config).__name__ for r in shorten)
            masked = [type(r.config).__name__ for r in shorten if hasattr(r.config, "form")]
            raise VlmfixError(
                f"{names} removes tokens in place from the KV cache of the layers it prunes, which a static cache "
                f"({type(cache).__name__}) cannot hold. Generate with the default dynamic cache"
                + (f", or use form='mask' ({', '.join(masked)}) for static-cache / compiled generation." if masked
                   else " (no cache_implementation=\"static\"); this pruner has no mask form.")
            )
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        ids = inputs.get("input_ids")
        rows = self.adapter.row_layouts(inputs)
        if cache is not None:  # generation continues after the last column: a right-padded row cannot be right
            _refuse_right_padding([r.index for r in rows if r.pad_right])
        if self.active:
            self.adapter.prepare_cache(cache)
        self.state = state = CallState(rows=rows, prompt_len=ids.shape[1], sink_dims=self.sink_dims, tau=self.tau,
                                       device=ids.device)
        self._local.cache = weakref.ref(cache) if cache is not None else None
        self._state_thread = threading.get_ident()
        state.calls = calls = [r.begin(state) for r in self.runtimes]
        state.askers = tuple(c for c in calls if isinstance(c, (ObservesQueries, EditsQueries, BiasesScores)))
        state.maskers = tuple(c for c in calls if isinstance(c, ReplacesMask))
        state.movers = tuple(c for c in calls if isinstance(c, MovesTokens) and c.runtime in self.movers)
        state.readers = tuple(c for c in calls if isinstance(c, ReadsInputs))
        pixels = getattr(self._local, "pixels", None)
        if pixels is not None:  # generate encoded the images before this forward
            inputs.setdefault("pixel_values", pixels)
            self._local.pixels = None
        for c in state.readers:
            c.read_inputs(state, inputs)
        if self._vision is not None:  # images that generate encoded before this forward
            self._vision.start_call(state, inputs)
        self._add_prefill_hooks()
        until = max((u for r in self.runtimes if (u := r.prepass_until()) is not None), default=None)
        if until is not None:
            self._prepass(args, kwargs, until)

    def _prepass(self, args: tuple, kwargs: dict, until: int) -> None:
        """Run the prompt through layers 0..until only (no cache written), in phase PREPASS."""

        def stop(module: nn.Module, a: tuple, kw: dict) -> None:
            raise _Stop

        layers = self.adapter.decoder_layers
        hook = layers[until + 1].register_forward_pre_hook(stop, with_kwargs=True) if until + 1 < len(layers) else None
        inputs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        inputs["use_cache"] = False
        self.state.phase, self._in_prepass = Phase.PREPASS, True
        try:
            self.model(*args, **inputs)
        except _Stop:
            pass
        finally:
            if hook is not None:
                hook.remove()
            self.state.phase, self._in_prepass = Phase.PREFILL, False

    def _post_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """After every forward (also one that raised: `output` is then None): combine a contrast branch's logits
        (the output then has the B real rows), end the prefill, free the model."""
        if torch.compiler.is_compiling():  # a compiled decoding step: only the branch's combination (tensor ops)
            state = self.state
            if output is not None and state is not None and state.branch is not None:
                return contrast.combine_output(output, state.branch, None)
            return None
        if self._in_prepass:
            return None
        try:
            state = self.state
            combined = None
            if output is not None and state is not None and state.branch is not None \
                    and getattr(output, "logits", None) is not None and output.logits.shape[0] > state.branch.real:
                last = None
                if state.phase is Phase.PREFILL and output.logits.shape[1] == state.prompt_len > 1:
                    last = state.last_tokens()
                combined = contrast.combine_output(output, state.branch, last)
            if output is None or state is None or state.phase is not Phase.PREFILL:  # a decode step, or it raised
                return combined
            self._drop_prefill_hooks()
            state.phase = Phase.DECODE
            cache = output.get("cache") if hasattr(output, "get") else None
            if cache is not None:
                self._local.cache = weakref.ref(cache)
            for c in state.calls:
                c.after_prefill(state)
            self._last_state = self._local.last_state = state
            return combined
        finally:
            self._leave()

    # -- prefill-only layer hooks -----------------------------------------------------------------
    def _add_prefill_hooks(self) -> None:
        layers = self.adapter.decoder_layers
        # movers first: in-place pruning gathers a layer's kept tokens before its sinks are read
        for idx in sorted({i for r in self.movers for i in r.moved_layers()}):
            self._prefill_hooks.append(layers[idx].register_forward_pre_hook(self._mover_hook(idx), with_kwargs=True))
        if self.tracks_sinks:
            for idx in range(FIRST_SINK_LAYER, len(layers)):
                self._prefill_hooks.append(layers[idx].register_forward_pre_hook(self._sink_hook(idx),
                                                                                 with_kwargs=True))

    def _drop_prefill_hooks(self) -> None:
        if self._vision is not None:
            self._vision.drop()
        for h in self._prefill_hooks:
            h.remove()
        self._prefill_hooks.clear()

    def _sink_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self.state
            if state.phase is Phase.PREFILL:
                hidden = args[0] if args else kwargs["hidden_states"]
                if state.branch_rows:  # contrast branch rows: not the call's rows
                    hidden = hidden[:len(state.rows)]
                state.phi[layer] = state.to_prompt(layer, sink_scores(hidden.detach(), self.sink_dims))

        return hook

    def _keep_pixels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Vision-tower pre-hook: keep the pixel values for the next prefill's readers."""
        if not torch.compiler.is_compiling():
            self._local.pixels = args[0] if args else kwargs.get("pixel_values")

    def _mover_hook(self, layer: int):
        """Pre-hook letting in-place pruning rewrite a decoder layer's prefill inputs (args, kwargs)."""
        movers = [r for r in self.movers if layer in r.moved_layers()]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self.state
            if state.phase is not Phase.PREFILL or self._in_prepass:
                return None
            changed = None
            for c in state.movers:
                if c.runtime not in movers:
                    continue
                new = c.before_layer(layer, state, args, kwargs)
                if new is not None:
                    args, kwargs = changed = new
            return changed

        return hook

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self.methods) or "no methods"
        status = "attached" if self._attached else "detached"
        return f"<vlmfix.Attached {type(self.model).__name__} ({self.adapter.family}) [{names}] {status}>"


def attach(
    model: nn.Module,
    processor: Any | None = None,
    methods: MethodConfig | Iterable[MethodConfig] | None = None,
    *,
    sink_dims: Sequence[int] | None = None,
    tau: float | str | None = None,
) -> Attached:
    """Attach vlmfix methods to a transformers VLM (a family of `vlmfix.supported_families()`).

    `methods`: one method or a list (VAR(), GIFT(), FastVPrune(), ...); none gives the model's
    exact outputs. `sink_dims` / `tau` override the model preset (configs/models) for sink
    detection; without a preset the dims are discovered with `find_sink_dims` and tau follows
    `scaled_tau(hidden_size)`. tau may be a number, "scaled", or "bos:F" (F x the first token's
    phi per row and layer). `processor` may be the model's processor or a bare tokenizer
    (anything with `decode` and `convert_tokens_to_ids`): either gives the tokenizer (the user's
    question, the last user turn's text, and its words; sink-dim discovery) and is checked against the model. A method that reads
    the question's words (GIFT) is refused without one.

    A forward takes a batch padded on either side (each row's real tokens come from its attention
    mask); generation needs left padding, and a right-padded batch is refused with a VlmfixError.
    """
    if methods is None:
        methods = ()
    elif isinstance(methods, MethodConfig):
        methods = (methods,)
    return Attached(model, processor, tuple(methods), sink_dims=sink_dims, tau=tau)
