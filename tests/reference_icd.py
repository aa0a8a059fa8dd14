"""A slow reference implementation of ICD (Wang et al., "Mitigating Hallucinations in Large Vision-Language Models
with Instruction Contrastive Decoding", ACL Findings 2024, arXiv 2403.18715), written from the paper's formulas:
at every step, two model calls, logits l on the prompt (v, x, y_<t) and l_d on the same prompt with the
disturbance instruction (v, x_d, y_<t), then p_icd = softmax[(1 + alpha) l - alpha l_d] restricted to
V_head = {y : p(y | v, x) >= beta max_w p(w | v, x)}.

The disturbed prompt is built by the caller (the instruction's tokens before the question: the test writes the
prompt out), one prompt at a time, with no KV cache, two model calls per step (reference_vcd's literal loop).
"""

from __future__ import annotations

from reference_vcd import contrast_generate_reference


def icd_generate_reference(model, inputs, disturbed_inputs, alpha, beta, steps):
    """ICD of one prompt: the contrasted prompt is `disturbed_inputs` (its own input_ids, the same image)."""
    return contrast_generate_reference(model, inputs, disturbed_inputs, alpha, beta, steps)
