"""A float64 twin of DeepSeek's routers for the reference: ``transformers`` casts their input and weight to
float32, which would cap a float64 comparison near 1e-7."""
from __future__ import annotations

import torch


def deepseek_router_in_input_dtype(module: torch.nn.Module) -> None:
    """DeepSeek's routers cast the input and the weight to float32; the same formulas in the input dtype. V2: softmax
    scores, top-k of them (``greedy``) or of those in the ``topk_group`` groups with the largest maximum, the rest
    set to 0 (``group_limited_greedy``), times the scaling factor. V3: sigmoid scores; the selection adds
    ``e_score_correction_bias`` and searches the groups with the largest sum of their two best (the rest -inf);
    gates are the selected sigmoid scores, over their sum plus 1e-20 with ``norm_topk_prob``, times the factor."""
    v3 = hasattr(module, "e_score_correction_bias")

    def groups(choice: torch.Tensor, m: torch.nn.Module, rank: torch.Tensor, fill: float) -> torch.Tensor:
        keep = torch.zeros_like(rank).scatter_(1, torch.topk(rank, k=m.topk_group, dim=-1)[1], 1)
        mask = keep[..., None].expand(-1, m.num_group, m.num_experts // m.num_group).reshape(-1, m.num_experts)
        return choice.masked_fill(~mask.bool(), fill)

    def forward(h: torch.Tensor, m: torch.nn.Module = module) -> tuple[torch.Tensor, ...]:
        logits = torch.nn.functional.linear(h.reshape(-1, m.hidden_dim), m.weight)
        if not v3:
            scores = logits.softmax(dim=-1)
            if m.topk_method == "group_limited_greedy":
                rank = scores.view(-1, m.num_group, m.num_experts // m.num_group).max(dim=-1).values
                scores = groups(scores, m, rank, 0.0)
            top, index = torch.topk(scores, k=m.top_k, dim=-1)
            return logits, top * m.routed_scaling_factor, index
        scores = logits.sigmoid()
        choice = scores + m.e_score_correction_bias
        rank = choice.view(-1, m.num_group, m.num_experts // m.num_group).topk(2, dim=-1)[0].sum(dim=-1)
        index = torch.topk(groups(choice, m, rank, float("-inf")), k=m.top_k, dim=-1)[1]
        top = scores.gather(1, index)
        if m.norm_topk_prob:
            top = top / (top.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, top * m.routed_scaling_factor, index
    module.forward = forward
