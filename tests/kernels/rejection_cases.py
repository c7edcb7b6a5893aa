"""Inputs for the rejection sampler's kernel tests (CPU kernel and the CUDA kernel under the
emulator): every kind of row the reference distinguishes, with the noise given explicitly."""
import torch

# greedy rows; n-gram drafts (no draft probs); draft-model probs; greedy and sampled rows mixed;
# rows without drafts; rejections whose residual max(0, p - q) is all zero (the reference then
# draws from p); Exp noise draws of exactly 0 (p / 0: inf, or NaN where p is 0)
KINDS = ["greedy", "point_mass", "draft_probs", "mixed", "zero_drafts", "zero_residual",
         "zero_noise"]


def make_case(kind: str, B: int, K: int, V: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sharp = 4.0 if V > 1 else 1.0
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g) * sharp, dim=-1)
    q = torch.softmax(torch.randn(B, K, V, generator=g) * sharp, dim=-1)
    # drafts: half the positions the target's argmax (long accepted runs), half random tokens
    likely = p[:, :K].argmax(dim=-1)
    random = torch.randint(0, V, (B, K), generator=g)
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.5, likely, random)
    num = torch.randint(0, K + 1, (B,), generator=g)
    num[torch.rand(B, generator=g) < 0.4] = K
    greedy = torch.zeros(B, dtype=torch.bool)
    draft_probs = q
    uniform = torch.rand(B, K, generator=g)
    noise = torch.empty(B, K + 1, V).exponential_(generator=g)
    if kind == "greedy":
        greedy[:] = True
        draft_probs = None
    elif kind == "point_mass":
        draft_probs = None
    elif kind == "draft_probs":
        pass
    elif kind == "draft_probs" and K > 0:
        drafts = torch.where(torch.rand(B, K, generator=g) < 0.5, likely,
                             torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K))
    elif kind == "mixed":
        greedy = torch.rand(B, generator=g) < 0.5
    elif kind == "zero_drafts":
        num = torch.where(torch.rand(B, generator=g) < 0.7, 0, num)
    elif kind == "zero_residual":
        # q == p on the drafted positions and the drafted token has probability 0 under both:
        # a certain rejection with nothing left in the residual
        mask = torch.rand(B, K + 1, V, generator=g) < 0.5
        mask[..., 0] = True
        p = torch.where(mask, p, 0.0)
        p = p / p.sum(-1, keepdim=True)
        draft_probs = p[:, :K].clone()
        zeros = (p[:, :K] == 0).float() + 1e-9 * torch.rand(B, K, V, generator=g)
        drafts = zeros.argmax(dim=-1)  # a zero-probability token where the row has one
    elif kind == "zero_noise":
        noise[torch.rand(B, K + 1, V, generator=g) < 0.05] = 0.0
        p = torch.where(torch.rand(B, K + 1, V, generator=g) < 0.1, 0.0, p)
    else:
        raise ValueError(kind)
    return dict(draft_token_ids=drafts, num_draft_tokens=num, draft_probs=draft_probs,
                target_probs=p, uniform=uniform, exp_noise=noise, greedy=greedy)
