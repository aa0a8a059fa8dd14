"""`attach()` / `detach()` and the `Attached` handle.

attach registers vlmfix's attention function with `transformers.AttentionInterface` (and its
mask with `AttentionMaskInterface`) under the name "vlmfix", selects it for the text decoder only
(`model.set_attn_implementation({"text_config": "vlmfix"})`), and adds forward hooks on the model
instance that build a fresh `CallState` at each prefill. No model class is patched; `detach()`
puts back the exact attention implementation of every sub-config and removes the hooks.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import attention
from .adapters import Adapter, get_adapter
from .methods.base import Method
from .sinks import check_tau, find_sink_dims, scaled_tau, sink_scores
from .state import CallState

if TYPE_CHECKING:
    from .slots import SlotView

AttentionInterface.register(attention.NAME, attention.vlmfix_attention)
AttentionMaskInterface.register(attention.NAME, attention.vlmfix_mask)


class VlmfixError(RuntimeError):
    """Misuse of attach/detach (the message says what to do instead)."""


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


class Attached:
    """A model with vlmfix attached. Use as a context manager, or call `detach()`.

    - `generate(...)` is the model's generate; plain `model.generate(...)` and `model(...)` run the
      methods too while attached;
    - `last_state` is the `CallState` of the last call (spans, sink scores, method records);
    - `sink_dims` / `tau` are what sink detection uses (preset, argument or discovery).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any | None,
        methods: Sequence[Method],
        *,
        sink_dims: Sequence[int] | None = None,
        tau: float | str | None = None,
    ):
        self.model = model
        self.processor = processor
        self.adapter: Adapter = get_adapter(model, processor)
        for m in methods:
            if not isinstance(m, Method):
                raise TypeError(f"attach expects vlmfix methods (VAR(), GIFT(), ...), got {type(m).__name__}")
        #: in ascending `order` (pruners first: they score the raw attention), else as given
        self.methods: tuple[Method, ...] = tuple(sorted(methods, key=lambda m: m.order))
        for m in self.methods:
            m.validate(self.adapter)
        for m in self.methods:
            m.check_combination(self.methods)
        #: methods that may replace the attention mask (asked in every attached layer call)
        self.maskers = tuple(m for m in self.methods if type(m).mask is not Method.mask)
        #: methods that may move a layer's tokens (in-place pruning; see vlmfix/slots.py)
        self.viewers = tuple(m for m in self.methods if type(m).view is not Method.view)
        self.state: CallState | None = None
        self.last_state: CallState | None = None
        self.tracks_sinks = any(m.uses_sinks for m in self.methods) or sink_dims is not None
        self.sink_dims, self.tau, self.sink_source = self._resolve_sinks(sink_dims, tau)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._fallbacks: dict[type, Any] = {}
        self._in_prepass = False
        self._pixels: torch.Tensor | None = None
        self._attached = False
        self._attach()

    # -- sinks ------------------------------------------------------------------------------------
    def _resolve_sinks(
        self, dims: Sequence[int] | None, tau: float | str | None
    ) -> tuple[tuple[int, ...], float | str, str]:
        preset = self.adapter.preset
        if tau is None:
            tau = preset["tau"] if preset else scaled_tau(self.adapter.hidden_size)
        tau = check_tau(tau, self.adapter.hidden_size)
        if dims is not None:
            bad = [d for d in dims if not 0 <= int(d) < self.adapter.hidden_size]
            if bad:
                raise ValueError(f"sink dims {bad} are outside the hidden size {self.adapter.hidden_size}")
            return tuple(int(d) for d in dims), tau, "argument"
        if preset:
            return tuple(preset["sink_dims"]), tau, f"preset {preset['name']}"
        if not self.tracks_sinks:
            return (), tau, "not needed"
        if self.adapter.tokenizer is None:
            raise VlmfixError(
                "sink dims are unknown for this model and discovery needs its tokenizer: pass the processor to "
                "attach(), or pass sink_dims=[...]."
            )
        return find_sink_dims(self.model, self.adapter.tokenizer), tau, "discovered"

    # -- attach / detach --------------------------------------------------------------------------
    def _attach(self) -> None:
        config = self.model.config
        text = self.adapter.text_config
        configs = {id(text)} | {id(layer.self_attn.config) for layer in self.adapter.decoder_layers}
        for cid in configs:
            other = attention._ROUTES.get(cid)
            if other is not None and other() is not None:
                raise VlmfixError(
                    "this model is already attached; call .detach() on the existing handle (or leave its "
                    "`with` block) before attaching again."
                )
        key = _text_config_key(config, text)
        if key is None:
            raise VlmfixError(f"cannot find the text sub-config of {type(self.model).__name__}")
        self._previous = _implementations(config)
        self.previous_text_implementation = text._attn_implementation
        self.model.set_attn_implementation({key: attention.NAME})
        ref = weakref.ref(self)
        self._route_ids = configs
        for cid in configs:
            attention._ROUTES[cid] = ref
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._hooks.append(self.model.register_forward_hook(self._post_forward))
        layers = self.adapter.decoder_layers
        # method hooks first: in-place pruning gathers a layer's kept tokens before its sinks are read
        for idx in sorted({i for m in self.methods for i in m.hooked_layers()}):
            self._hooks.append(layers[idx].register_forward_pre_hook(self._method_layer_hook(idx), with_kwargs=True))
        if self.tracks_sinks:
            for idx, layer in enumerate(layers):
                if idx >= 2:
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(idx), with_kwargs=True))
        tower = getattr(getattr(self.model, "model", self.model), "vision_tower", None)
        if tower is not None and any(type(m).on_inputs is not Method.on_inputs for m in self.methods):
            self._hooks.append(tower.register_forward_pre_hook(self._keep_pixels, with_kwargs=True))
        self._attached = True

    def detach(self) -> nn.Module:
        """Restore every sub-config's previous attention implementation and remove the hooks.
        Detaching twice is a no-op. Returns the model."""
        if not self._attached:
            return self.model
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for cid in self._route_ids:
            attention._ROUTES.pop(cid, None)
        self.model.set_attn_implementation(self._previous)
        self.state = None
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "Attached":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    # -- calls ------------------------------------------------------------------------------------
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        if not self._attached:
            raise VlmfixError("this handle was detached; attach again with vlmfix.attach(model, processor, methods)")
        return self.model.generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def slot_view(self, state: CallState, layer: int, q_len: int, kv_len: int) -> "SlotView | None":
        """The `SlotView` of this layer call when a method moved its tokens (in-place pruning), else None."""
        for m in self.viewers:
            view = m.view(state, layer, q_len, kv_len)
            if view is not None:
                return view
        return None

    def fallback_attention(self, module: nn.Module) -> Any:
        """The attention function the text decoder used before attach (per attention class)."""
        fn = self._fallbacks.get(type(module))
        if fn is None:
            fn = attention.previous_attention(self.previous_text_implementation, module)
            self._fallbacks[type(module)] = fn
        return fn

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if self._in_prepass or (cache is not None and cache.get_seq_length() > 0):
            return
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        rows = self.adapter.row_layouts(inputs)
        self.state = CallState(
            rows=rows, prompt_len=inputs["input_ids"].shape[1], sink_dims=self.sink_dims, tau=self.tau
        )
        for m in self.methods:
            m.on_prefill(self.state)
        if self._pixels is not None:  # generate encoded the images before this forward
            inputs.setdefault("pixel_values", self._pixels)
            self._pixels = None
        for m in self.methods:
            m.on_inputs(self.state, inputs)
        until = max((u for m in self.methods if (u := m.prepass_until()) is not None), default=None)
        if until is not None:
            self._prepass(args, kwargs, until)

    def _prepass(self, args: tuple, kwargs: dict, until: int) -> None:
        """Run the prompt through layers 0..until only (no cache written), in phase "prepass"."""

        class _Stop(Exception):
            pass

        def stop(module: nn.Module, a: tuple, kw: dict) -> None:
            raise _Stop

        layers = self.adapter.decoder_layers
        hook = layers[until + 1].register_forward_pre_hook(stop, with_kwargs=True) if until + 1 < len(layers) else None
        inputs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        inputs["use_cache"] = False
        self.state.phase, self._in_prepass = "prepass", True
        try:
            self.model(*args, **inputs)
        except _Stop:
            pass
        finally:
            if hook is not None:
                hook.remove()
            self.state.phase, self._in_prepass = "prefill", False

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        state = self.state
        if state is None or self._in_prepass:
            return
        if state.phase == "prefill":
            state.phase = "decode"
            self.last_state = state
        else:
            state.step += 1

    def _layer_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self.state
            if state is None or state.phase != "prefill":
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            state.phi[layer] = state.to_prompt(layer, sink_scores(hidden, self.sink_dims).cpu())

        return hook

    def _keep_pixels(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Vision-tower pre-hook: keep the pixel values for the next prefill's `on_inputs`."""
        self._pixels = args[0] if args else kwargs.get("pixel_values")

    def _method_layer_hook(self, layer: int):
        """Pre-hook letting methods rewrite a decoder layer's prefill inputs (args, kwargs)."""
        methods = [m for m in self.methods if layer in m.hooked_layers()]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self.state
            if state is None or state.phase != "prefill" or self._in_prepass:
                return None
            changed = None
            for m in methods:
                new = m.before_layer(state, layer, args, kwargs)
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
    methods: Method | Iterable[Method] | None = None,
    *,
    sink_dims: Sequence[int] | None = None,
    tau: float | str | None = None,
) -> Attached:
    """Attach vlmfix methods to a transformers VLM (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL / Qwen2.5-VL).

    `methods`: one method or a list (VAR(), GIFT(), FastVPrune(), ...); none gives the model's
    exact outputs. `sink_dims` / `tau` override the model preset (configs/models) for sink
    detection; without a preset the dims are discovered with `find_sink_dims` and tau follows
    `scaled_tau(hidden_size)`. tau may be a number, "scaled", or "bos:F" (F x the first token's
    phi per row and layer). The processor gives the tokenizer (user-query spans, discovery)
    and is checked against the model.
    """
    if methods is None:
        methods = ()
    elif isinstance(methods, Method):
        methods = (methods,)
    return Attached(model, processor, tuple(methods), sink_dims=sink_dims, tau=tau)
