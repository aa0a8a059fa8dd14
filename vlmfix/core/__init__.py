"""The core: attach and its attention function (`attach`, `attention`, `eager`), per-call state (`state`,
`slots`), sink detection (`sinks`), question words (`words`), YAML presets (`presets`) and the host-cost
counter (`profiling`). Nothing here knows a method."""
