"""vlmfix as an lmms-eval model: `lmms-eval --model vlmfix --model_args pretrained=...,methods=var+gift`.

lmms-eval (PyPI `lmms-eval`, tested with 0.7.3) finds this class through the entry point of the group
`lmms_eval.models` (see `vlmfix.integrations`). Importing this module imports lmms-eval.

Model arguments (`--model_args k=v,k=v`; lmms-eval separates them by commas, so method sets join
their methods with "+"):

- `pretrained`: a named test-bed (`demo`: the bundled demo VLM, `smollm2-llava`, ...; see
  `vlmfix.loading.NAMED`), a local folder or a hub id (downloaded as by transformers unless
  HF_HUB_OFFLINE=1). Its architecture must be one of vlmfix's families, else the error names them;
- `methods`: as on vlmfix's command line, `var`, `var:general`, `fastv:keep64`, `var+gift`, `none`
  (default: none, the plain model, not attached). Parsed by `vlmfix.methods.parse_methods`;
- `tau`, `sink_dims` (`1+2+3` or `[1,2,3]`): attach's sink-detection options (default: the model's
  preset, else discovery and the scaled tau). `sink_dims` with `methods=none` attaches no method
  but records visual sinks; a `tau` that nothing uses is refused;
- `dtype`: `auto` (default: the checkpoint's dtype; float32 for the named test-beds), `float32`,
  `bfloat16`, `float16`; `attn_implementation`: `sdpa`, `eager`, ... for the decoder (pruning needs
  sdpa or eager); `device` (default: cuda when available, else cpu); `device_map` (e.g. `auto`: one
  model over several GPUs in one process); `batch_size` (prompts per `generate`, default 1).
  `batch_size` and `device` may also come from lmms-eval's `--batch_size` / `--device`; a value in
  `--model_args` wins.

Generation (`generate_until`): requests are grouped by their generation settings and batched in
the task's document order (so a batch holds the same items as `vlmfix eval pope --batch-size N`),
left-padded. Each request's visuals (`doc_to_visual`) go into one user turn before its text, in the
model's own chat template (`processor.apply_chat_template`): PIL images as images, video file paths
as videos (decoded by the processor's video backend); an `<image>` placeholder in the task's text is
removed. `max_new_tokens` (default 1024), `temperature`, `do_sample`, `top_p` and `num_beams` are
passed to `generate`; `until` cuts the answer at its first stop string; other keys are ignored with
a warning. `loglikelihood` and multi-round generation raise NotImplementedError, as lmms-eval's
generation-only models do.

What vlmfix did is logged per request in lmms-eval's sample logs (`--log_samples`), under
`token_counts[0]["vlmfix"]`: the method set, the process, its batch index and the batch size, and
when attached: the row's image tokens, visual sinks per layer (when sinks are tracked), attention
mass VAR moved (summed over layers, heads and steps), image tokens a pruner kept and its notes,
whether GIFT boosted the row.
`input_tokens` / `output_tokens` are the prompt's tokens (image tokens included, before pruning) and
the generated ones.

Data parallel: under `accelerate launch -m lmms_eval ...` each process loads the model on its own
device (cuda:LOCAL_RANK, or the CPU without CUDA), reports the launcher's RANK and WORLD_SIZE, and
lmms-eval shards the documents (document i goes to process i mod n) and gathers the results, as for
its Hugging Face models.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Sequence

import torch
from accelerate import Accelerator
from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from vlmfix.adapters import MODEL_CLASSES, VlmfixInputError, supported_families
from vlmfix.core.attach import attach
from vlmfix.adapters.chat import chat_turn
from vlmfix.loading import DTYPES as TORCH_DTYPES
from vlmfix.methods import normal_spec, parse_methods

DTYPES = ("auto", *TORCH_DTYPES)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")
GENERATION_KEYS = ("until", "max_new_tokens", "temperature", "do_sample", "top_p", "num_beams")
DEFAULT_MAX_NEW_TOKENS = 1024


class VlmfixTokenCounts(TokenCounts):
    """lmms-eval's per-request token counts plus vlmfix's record of the request's batch: lmms-eval
    writes `to_dict()` of the first response's counts into each sample log, so the record lands there."""

    def __init__(self, input_tokens: int, output_tokens: int, vlmfix: dict) -> None:
        super().__init__(input_tokens=input_tokens, output_tokens=output_tokens)
        self.vlmfix = vlmfix

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "vlmfix": self.vlmfix}


def method_spec(methods: Any) -> str:
    """model_args' `methods` ("var+gift", "var:general", "none") -> the CLI's spec ("var,gift")."""
    return normal_spec(str(methods).replace("+", ","))


def parse_sink_dims(value: Any) -> list[int] | None:
    """`sink_dims`: None, an int, or ints joined by "+" or "," (optionally in brackets) -> a list."""
    if value is None:
        return None
    parts = str(value).strip().strip("[]").replace("+", ",").split(",")
    try:
        dims = [int(p) for p in parts if p.strip()]
    except ValueError:
        raise VlmfixInputError(f"model_args sink_dims={value!r}: expected integers joined by '+', e.g. "
                               "sink_dims=1512+2298") from None
    if not dims:
        raise VlmfixInputError(f"model_args sink_dims={value!r} names no dimension")
    return dims


def parse_dtype(value: str) -> torch.dtype | None:
    """`dtype` -> a torch dtype, None for "auto"."""
    if value not in DTYPES:
        raise VlmfixInputError(f"model_args dtype={value!r}: choose one of {', '.join(DTYPES)}")
    return None if value == "auto" else getattr(torch, value)


def load_vlm(pretrained: str, dtype: torch.dtype | None, attn_implementation: str | None,
             device_map: str | None) -> tuple[Any, Any]:
    """(model, processor): a named test-bed through `vlmfix.loading.load`, else a checkpoint whose
    architecture a vlmfix adapter supports (checked before any weight is read)."""
    from vlmfix.loading import NAMED, _processor, load, require_vlm

    if pretrained in NAMED:
        if device_map:
            raise VlmfixInputError(f"device_map is for checkpoints; the test-bed {pretrained!r} loads on one device")
        model, processor = load(pretrained, dtype)
        if attn_implementation:
            model.set_attn_implementation(attn_implementation)
    else:
        import transformers

        try:
            config = transformers.AutoConfig.from_pretrained(pretrained)
        except OSError as err:
            raise VlmfixInputError(f"cannot load model {pretrained!r} ({err}); pass a hub id, a local folder with "
                                   f"config.json, or one of: {', '.join(NAMED)}") from err
        arch = (config.architectures or [type(config).__name__])[0]
        if arch not in MODEL_CLASSES:
            raise VlmfixInputError(f"vlmfix does not support {arch} ({pretrained}). Supported families: "
                                   f"{supported_families()}.")
        processor = _processor(pretrained)  # before the weights: fails fast
        options = {"dtype": dtype or "auto", "attn_implementation": attn_implementation, "device_map": device_map}
        model = getattr(transformers, arch).from_pretrained(pretrained, **{k: v for k, v in options.items() if v})
    require_vlm(processor, pretrained, "lmms-eval's tasks", hint="pretrained=demo")
    if not getattr(processor, "chat_template", None):
        raise VlmfixInputError(f"the processor of {pretrained} has no chat template; vlmfix builds each prompt with "
                               "processor.apply_chat_template")
    return model.eval(), processor


def split_visuals(visuals: Sequence[Any] | None) -> tuple[list[Any], list[str]]:
    """A request's visuals -> (PIL images, video file paths); anything else is refused."""
    from PIL import Image

    images, videos = [], []
    for v in visuals or ():
        if isinstance(v, Image.Image):
            images.append(v.convert("RGB"))
        elif isinstance(v, str) and v.lower().endswith(VIDEO_SUFFIXES):
            videos.append(v)
        else:
            raise VlmfixInputError(f"vlmfix's lmms-eval model takes PIL images and video files "
                                   f"({', '.join(VIDEO_SUFFIXES)}); this task gives {type(v).__name__} {str(v)[:80]!r}")
    return images, videos


def cut_at(text: str, until: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def row_records(fixed: Any, spec: str, process: int, batch: int, size: int) -> list[dict]:
    """Per batch row, what vlmfix did in the last call of `fixed` (see the module docstring): each attached
    method's record summary of the row (`Record.row`) and its notes in words (`Record.notes`), keyed by the
    method's name (`var_moved`, `fastv_kept`, `gift_notes`, ...)."""
    base = {"methods": spec, "process": process, "batch": batch, "batch_size": size}
    if fixed is None:
        return [dict(base) for _ in range(size)]
    state = fixed.last_state
    summary = state.summary()
    rows = []
    beams = max(1, len(summary["rows"]) // size)  # beam search (OPERA) expands each request into `beams` rows
    for r in range(size):
        entry = {**base, "image_tokens": summary["rows"][r * beams]["image_tokens"]}
        if "visual_sinks_per_layer" in summary:
            entry["visual_sinks"] = {str(layer): n[r * beams] for layer, n in summary["visual_sinks_per_layer"].items()}
        for record in state.records:
            if record is None:
                continue
            entry.update({f"{record.method}_{key}": value for key, value in record.row(r).items()})
            notes = record.notes(r)
            if notes:
                entry[f"{record.method}_notes"] = notes
        rows.append(entry)
    return rows


class VlmfixLMM(lmms):
    """An lmms-eval model: a transformers VLM with vlmfix methods attached (see the module docstring)."""

    is_simple = True

    def __init__(self, pretrained: str = "demo", methods: str = "none", tau: float | str | None = None,
                 sink_dims: Any = None, dtype: str = "auto", attn_implementation: str | None = None,
                 device: str | None = None, device_map: str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise VlmfixInputError(
                f"unknown model_args {sorted(unknown)} for --model vlmfix; known: pretrained, methods, tau, sink_dims, "
                "dtype, attn_implementation, device, device_map, batch_size")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise VlmfixInputError(f"batch_size={batch_size!r}: give a number of prompts >= 1 ('auto' is not "
                                   "supported)")
        if max_batch_size is not None:
            raise VlmfixInputError("max_batch_size bounds batch_size=auto, which vlmfix does not support: give "
                                   "--batch_size N")
        self.spec = method_spec(methods)
        try:
            method_configs = parse_methods(self.spec)
        except ValueError as err:
            raise VlmfixInputError(
                f"model_args methods={methods!r}: {err}. Give NAME or NAME:PRESET joined by '+', e.g. "
                "methods=var+gift, methods=var:general, methods=fastv:keep64, or methods=none") from err
        dims = parse_sink_dims(sink_dims)
        torch_dtype = parse_dtype(str(dtype))

        # the launcher's variables, which lmms-eval's evaluator also shards by (document i -> process i mod n)
        self._rank, self._world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        if self._world_size > 1:
            if device_map:
                raise VlmfixInputError("device_map spreads one model over the GPUs of one process; under accelerate "
                                       "launch each process holds its own copy: drop device_map")
            local = int(os.environ.get("LOCAL_RANK", "0"))
            self._device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = Accelerator()  # lmms-eval's evaluator synchronises the processes through it

        model, self.processor = load_vlm(str(pretrained), torch_dtype, attn_implementation, device_map)
        if not device_map:
            model.to(self._device)
        self._model = model
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = int(batch_size)
        self.fixed = attach(model, self.processor, method_configs, sink_dims=dims, tau=tau) \
            if method_configs or dims is not None else None
        if tau is not None and not (self.fixed is not None and self.fixed.tracks_sinks):
            self.detach()
            raise VlmfixInputError(f"model_args tau={tau!r} has no effect: no method of {self.spec!r} uses sinks; "
                                   "drop tau, or add sink_dims to record visual sinks")
        self._batches = 0
        self._ignored: set[str] = set()
        logger.info(f"vlmfix: {self.pretrained} with methods {self.spec} on {self._device} (process {self._rank} "
                    f"of {self._world_size}): {self.fixed if self.fixed is not None else 'not attached'}")

    # -- what lmms-eval reads --------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "VlmfixLMM":
        """As lmms-eval's, except that a key given both in --model_args and by lmms-eval's flags
        (batch_size, device) takes the --model_args value instead of raising a duplicate-keyword error."""
        given = utils.simple_parse_args_string(arg_string)
        flags = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**flags, **given})

    # -- requests --------------------------------------------------------------------------------
    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError("vlmfix's lmms-eval model generates only (generate_until): loglikelihood tasks "
                                  "(multiple-choice scoring) are not supported; use a task's generation variant")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("vlmfix's lmms-eval model does not implement multi-round generation")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, request in enumerate(requests):
            groups[json.dumps(request.args[1], sort_keys=True, default=str)].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self._rank != 0, desc="vlmfix generating")
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                for i, result in zip(batch, self._generate([requests[i] for i in batch])):
                    results[i] = result
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, requests: Sequence[Instance]) -> list[GenerationResult]:
        """One batch: prompts and visuals through the processor, one `generate`, decoded answers."""
        texts, images, videos = [], [], []
        for request in requests:
            context, _, doc_to_visual, doc_id, task, split = request.args
            row_images, row_videos = split_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))
            texts.append(chat_turn(self.processor, context.replace("<image>", "").strip(), len(row_images),
                                   len(row_videos)))
            images += row_images
            videos += row_videos
        options, until = self._generation_options(requests[0].args[1])
        inputs = self.processor(text=texts, images=images or None, videos=videos or None, return_tensors="pt",
                                padding=True, padding_side="left")
        inputs = inputs.to(device=self._device, dtype=self._model.dtype)
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            out = self._model.generate(**inputs, **options, pad_token_id=pad)
        new = out[:, inputs["input_ids"].shape[1]:]
        answers = self.processor.batch_decode(new, skip_special_tokens=True)
        records = row_records(self.fixed, self.spec, self._rank, self._batches, len(requests))
        self._batches += 1
        logger.debug(f"vlmfix batch {records[0]['batch']}: {records}")
        prompt = inputs["attention_mask"].sum(-1).tolist()
        made = (new != pad).sum(-1).tolist() if pad is not None else [new.shape[1]] * len(requests)
        return [GenerationResult(cut_at(a, until), VlmfixTokenCounts(int(p), int(m), rec))
                for a, p, m, rec in zip(answers, prompt, made, records)]

    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str]]:
        """(generate keyword arguments, stop strings) from a request's generation settings."""
        ignored = sorted(set(gen_kwargs) - set(GENERATION_KEYS) - self._ignored)
        if ignored:
            logger.warning(f"vlmfix ignores the generation settings {ignored} of this task")
            self._ignored.update(ignored)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = bool(gen_kwargs.get("do_sample")) or temperature > 0
        options = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
                   "do_sample": sample, "num_beams": int(gen_kwargs.get("num_beams") or 1)}
        if sample:
            options["temperature"] = temperature or 1.0
            if gen_kwargs.get("top_p") is not None:
                options["top_p"] = float(gen_kwargs["top_p"])
        return options, until

    def detach(self) -> None:
        """Detach vlmfix (the model is as loaded again)."""
        if self.fixed is not None:
            self.fixed.detach()
            self.fixed = None

    def clean(self) -> None:
        self.detach()
        super().clean()
