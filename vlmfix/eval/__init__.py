"""Evaluation: the generic runner (`runner`), the task builders (`tasks`: POPE, CHAIR) and the pruner-trend
calibration (`calibrate`). Metrics are pure functions in `vlmfix.metrics`, data loaders in `vlmfix.data`."""
