"""Integrations with evaluation toolkits. Nothing here is imported by `import vlmfix`.

- `lmms_eval`: vlmfix as an lmms-eval model, `lmms-eval --model vlmfix --model_args ...`
  (imported by lmms-eval only when that model is asked for; needs lmms-eval installed);
- `pope_hf`: a local POPE dataset in the layout of `lmms-lab/POPE` and an lmms-eval task file that
  runs lmms-eval's own POPE task on it (needs only `datasets`).

lmms-eval finds the model through the entry point `vlmfix = "vlmfix.integrations:lmms_eval_manifest"`
of the group `lmms_eval.models` (pyproject.toml): no plugin variable, no copied lmms-eval file.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlmfix"
MODEL_CLASS = "vlmfix.integrations.lmms_eval.VlmfixLMM"


def lmms_eval_manifest() -> Any:
    """The lmms-eval `ModelManifest` of vlmfix: model id "vlmfix", a simple model (a task's text and
    visuals in, vlmfix applies the model's chat template). lmms-eval calls this when it builds its
    model registry; the model class is imported only when `--model vlmfix` is used."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
