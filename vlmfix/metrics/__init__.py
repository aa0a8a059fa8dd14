"""Evaluation metrics as pure functions (no model, no torch): POPE and CHAIR.

    from vlmfix.metrics import pope, chair
    pope.pope_metrics([pope.parse_answer(a) for a in answers], labels)
    chair.CHAIR(instances_json, captions_json).compute([{"image_id": 1, "caption": "..."}])
"""

from vlmfix.metrics import chair, pope

__all__ = ["chair", "pope"]
