"""The rejection sampler of speculative decoding (plain PyTorch; the reference for kernels).

For each request with k draft tokens d_1..d_k, the target's probabilities p_1..p_{k+1} at those
positions and the draft's q_1..q_k: d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i));
at the first rejection a token is drawn from max(0, p_i - q_i) (normalised) and the request
stops there; if all k are accepted a bonus token is drawn from p_{k+1}. The emitted tokens then
follow the target's distribution exactly, whatever the draft (Leviathan et al. 2023, Chen et al.
2023). A draft without probabilities (n-gram) is a point mass: q_i = one-hot(d_i). Greedy
requests accept d_i iff it is the target's argmax and otherwise emit that argmax.

Randomness comes in explicitly, so the result is a function of its inputs: `uniform` [B, k] for
the acceptance tests and `exp_noise` [B, k+1, V] (Exp(1) draws) for sampling: a draw from
weights w is argmax(w / noise), the exponential race (no normalisation needed).
"""
from __future__ import annotations

import torch

PAD = -1


def rejection_sample(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                     draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                     uniform: torch.Tensor, exp_noise: torch.Tensor,
                     greedy: torch.Tensor) -> torch.Tensor:
    """draft_token_ids [B, K] int64 (row b uses its first num_draft_tokens[b]); draft_probs
    [B, K, V] or None (point-mass drafts); target_probs [B, K+1, V] fp32 (row b: positions
    0..num_draft_tokens[b]); uniform [B, K]; exp_noise [B, K+1, V]; greedy [B] bool.
    Returns [B, K+1] int64: the emitted tokens of each row (accepted drafts, then one recovered
    or bonus token), PAD after them."""
    check_rejection_args(draft_token_ids, num_draft_tokens, draft_probs, target_probs, uniform,
                         exp_noise, greedy)
    B, K = draft_token_ids.shape
    out = torch.full((B, K + 1), PAD, dtype=torch.int64, device=target_probs.device)
    for b in range(B):
        k = int(num_draft_tokens[b])
        for i in range(k + 1):
            p = target_probs[b, i].float()
            if bool(greedy[b]):
                best = int(torch.argmax(p))
                out[b, i] = best
                if i == k or best != int(draft_token_ids[b, i]):
                    break
                continue
            if i == k:                                            # all accepted: bonus token
                out[b, i] = int(torch.argmax(p / exp_noise[b, i]))
                break
            d = int(draft_token_ids[b, i])
            q = (draft_probs[b, i].float() if draft_probs is not None
                 else torch.nn.functional.one_hot(torch.tensor(d), p.shape[0]).float())
            if q[d] > 0 and float(uniform[b, i]) * float(q[d]) < float(p[d]):   # u < p/q
                out[b, i] = d
                continue
            residual = torch.clamp(p - q, min=0)
            if float(residual.sum()) <= 0:        # p == q: rejection has probability 0 there
                residual = p
            out[b, i] = int(torch.argmax(residual / exp_noise[b, i]))
            break
    return out


def check_rejection_args(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor,
                         draft_probs: torch.Tensor | None, target_probs: torch.Tensor,
                         uniform: torch.Tensor, exp_noise: torch.Tensor,
                         greedy: torch.Tensor) -> None:
    """ValueError naming the argument whose shape does not fit (shared with octavo.ops)."""
    if draft_token_ids.dim() != 2:
        raise ValueError(f"draft_token_ids must be [B, K], got {tuple(draft_token_ids.shape)}")
    B, K = draft_token_ids.shape
    if target_probs.dim() != 3 or target_probs.shape[:2] != (B, K + 1):
        raise ValueError(f"target_probs must be [B, K+1, V] = [{B}, {K + 1}, V], "
                         f"got {tuple(target_probs.shape)}")
    V = target_probs.shape[2]
    shapes = {"num_draft_tokens": (num_draft_tokens, (B,)), "uniform": (uniform, (B, K)),
              "exp_noise": (exp_noise, (B, K + 1, V)), "greedy": (greedy, (B,))}
    if draft_probs is not None:
        shapes["draft_probs"] = (draft_probs, (B, K, V))
    for name, (t, shape) in shapes.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must be {list(shape)} (B={B}, K={K}, V={V}), "
                             f"got {tuple(t.shape)}")
