"""DeepSeekMoE feed-forward layer (DeepSeekMoE, DeepSeek-V3 §2.1.2).

Also home of the SwiGLU feed-forward block: every expert is one, and the dense
FFN in model.py is one too.

One MoE layer, for a token h_t (DeepSeek-V3 eq. 12-16):
    s_i      = sigmoid(h_t . e_i)                  router affinity of routed expert i
    chosen   = top-k over i of (s_i + b_i)         b = expert_bias, for *selection only*
    g_i      = s_i / sum_{j in chosen} s_j         gate weight, from the unbiased scores
    out_t    = sum_shared FFN(h_t) + sum_{i in chosen} route_scale * g_i * FFN_i(h_t)
The bias b is nudged after every optimizer step so that overloaded experts are
chosen less often (auxiliary-loss-free balancing, §2.1.2).
"""
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import cli  # check_numbers: the checks every config's numbers get
import kernels  # on a GPU, every expert's SwiGLU in one Triton grouped GEMM (use_triton decides)


class SwiGLU(nn.Module):
    """FFN(x) = W2 (SiLU(W1 x) * W3 x) (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate projection
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up projection
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down projection

    def forward(self, x):  # (..., dim) -> (..., dim)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


SCORE_FUNCS = ("sigmoid", "softmax", "sqrtsoftplus")  # router affinities (router_scores)


@dataclass
class MoEConfig:
    n_routed_experts: int = 8         # N_r
    n_activated_experts: int = 2      # K_r, top-k
    n_shared_experts: int = 1         # N_s, always-on experts (fused into one wider SwiGLU)
    moe_inter_dim: int = 128          # width of each fine-grained expert
    n_dense_layers: int = 1           # first blocks use a dense SwiGLU FFN (model.py decides using this)
    score_func: str = "sigmoid"       # 'sigmoid' | 'softmax' | 'sqrtsoftplus' (DeepSeek-V4's router)
    route_scale: float = 1.0          # scales the routed experts' gate weights
    n_expert_groups: int = 1          # M groups for group-limited routing (DeepSeek-V2 §2.1.3)
    n_limited_groups: int = 1         # only tokens' best groups may be used
    bias_update_speed: float = 1e-3   # gamma of aux-loss-free balancing; 0 = off
    aux_loss_alpha: float = 0.0       # sequence-wise auxiliary loss weight

    def __post_init__(self):
        cli.check_numbers(self, at_least_1=("moe_inter_dim",), one_of={"score_func": SCORE_FUNCS},
                          nonneg=("n_shared_experts", "n_dense_layers", "route_scale", "bias_update_speed",
                                  "aux_loss_alpha"))
        E, k, groups = self.n_routed_experts, self.n_activated_experts, self.n_expert_groups
        if not 1 <= k <= E:
            raise ValueError(f"n_activated_experts={k} must be between 1 and n_routed_experts={E}")
        if groups < 1 or E % groups:
            raise ValueError(f"n_routed_experts={E} must divide into n_expert_groups={groups}")
        if not 1 <= self.n_limited_groups <= groups:
            raise ValueError(f"n_limited_groups={self.n_limited_groups} must be between 1 and n_expert_groups={groups}")
        if k > self.n_limited_groups * (E // groups):
            raise ValueError(f"top-{k} routing needs at least {k} experts in the {self.n_limited_groups} kept groups")


# -----------------------------------------------------------------------------
# routing

def router_scores(logits, score_func):
    """Affinities s_{i,t} in float32. logits: (N, E) -> (N, E).

    sqrtsoftplus is DeepSeek-V4's router: sqrt(softplus(l)), positive like sigmoid but unbounded (about
    sqrt(l) for large l, where sigmoid saturates at 1); route() normalises the chosen ones as for sigmoid."""
    logits = logits.float()
    if score_func == "sigmoid":
        return logits.sigmoid()
    if score_func == "softmax":
        return logits.softmax(dim=-1)
    if score_func == "sqrtsoftplus":
        return F.softplus(logits).sqrt()
    raise ValueError(f"unknown score_func {score_func!r}; use one of {', '.join(SCORE_FUNCS)}")


def limit_to_best_groups(choice_scores, n_groups, n_limited_groups):
    """Mask (with -inf) the experts outside each token's n_limited_groups best groups.

    Group-limited routing (DeepSeek-V2 §2.1.3, V3 node-limited routing): a group's
    score is the sum of its two highest (biased) scores, as in V3; with <= 2
    experts per group that would be the whole group, so the max is used instead.
    choice_scores: (N, E) -> (N, E).
    """
    N, E = choice_scores.shape
    grouped = choice_scores.view(N, n_groups, E // n_groups)  # (N, G, E/G)
    if E // n_groups <= 2:
        group_scores = grouped.amax(dim=-1)  # (N, G)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
    best_groups = group_scores.topk(n_limited_groups, dim=-1).indices  # (N, n_limited_groups)
    drop = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, False)  # (N, G)
    return grouped.masked_fill(drop[:, :, None], float("-inf")).view(N, E)


def route(scores, expert_bias, cfg):
    """Choose top-k experts per token and their gate weights.

    scores: (N, E) unbiased affinities; expert_bias: (E,).
    Returns weights (N, k) float32 and expert ids (N, k) int64.
    The bias only decides *which* experts are chosen; the weights come from the
    unbiased scores of those experts (DeepSeek-V3 eq. 13-16).
    """
    choice_scores = scores + expert_bias  # (N, E)
    if cfg.n_expert_groups > 1:
        choice_scores = limit_to_best_groups(choice_scores, cfg.n_expert_groups, cfg.n_limited_groups)
    expert_ids = choice_scores.topk(cfg.n_activated_experts, dim=-1).indices  # (N, k)
    weights = scores.gather(1, expert_ids)  # (N, k)
    if cfg.score_func != "softmax":
        # sigmoid (and V4's sqrtsoftplus) scores do not sum to 1, so normalise over the chosen experts (V3 eq. 13)
        weights = weights / weights.sum(dim=-1, keepdim=True)
    # softmax: keep the raw top-k probabilities (as DeepSeek-V2/V3 do); they already
    # share one normaliser, and route_scale sets the overall magnitude.
    return weights * cfg.route_scale, expert_ids


# -----------------------------------------------------------------------------
# dispatch: sort (token, expert) pairs by expert, run each expert on its segment

def expert_loop(x_sorted, counts, w1, w3, w2):
    """SwiGLU of each contiguous expert segment with that expert's weights: (M, dim), rows as given.
    x_sorted (M, dim) rows grouped by expert 0..E-1, counts (E,) rows per expert,
    w1, w3 (E, inter, dim), w2 (E, dim, inter)."""
    outputs = []
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n == 0:  # idle expert: nothing to compute, dropless routing is unaffected
            continue
        seg = x_sorted[start:start + n]  # (n, dim)
        hidden = F.silu(seg @ w1[e].t()) * (seg @ w3[e].t())  # (n, inter)
        outputs.append(hidden @ w2[e].t())  # (n, dim)
        start += n
    if not outputs:
        return x_sorted.new_zeros(x_sorted.shape)
    return torch.cat(outputs, dim=0)


def run_experts(x_sorted, counts, w1, w3, w2):
    """expert_loop, or on a GPU the same in one grouped-GEMM launch per projection for all experts
    (kernels.moe_grouped_swiglu: fine-grained experts are too small to fill a GPU one at a time)."""
    if kernels.use_triton(x_sorted.device, "moe_grouped_swiglu", kernels.compute_dtype(x_sorted)):
        return kernels.moe_grouped_swiglu(x_sorted, counts, w1, w3, w2)
    return expert_loop(x_sorted, counts, w1, w3, w2)


def dispatch_to_experts(x, expert_ids, weights, w1, w3, w2):
    """Dropless routed-expert output without a loop over tokens.

    x: (N, dim); expert_ids, weights: (N, k). Returns (N, dim) = sum over each token's
    chosen experts of weight * expert(x), and the per-expert token counts (E,).
    Each expert's SwiGLU runs on its contiguous segment of the sorted rows (run_experts).
    """
    N, k = expert_ids.shape
    n_experts = w1.shape[0]
    flat_ids = expert_ids.flatten()  # (N*k,) pair p = (token p // k, its choice p % k)
    order = flat_ids.argsort(stable=True)  # (N*k,) pairs grouped by expert
    counts = torch.bincount(flat_ids, minlength=n_experts)  # (E,)
    token_of_pair = order // k  # (N*k,)
    y_sorted = run_experts(x[token_of_pair], counts, w1, w3, w2)  # (N*k, dim)
    y_sorted = y_sorted * weights.flatten()[order, None].to(y_sorted.dtype)
    y = y_sorted.new_zeros(N, x.shape[1]).index_add(0, token_of_pair, y_sorted)  # (N, dim)
    return y, counts


# -----------------------------------------------------------------------------
# auxiliary loss

def sequence_balance_loss(scores, expert_ids, n_experts, batch_size, alpha):
    """Sequence-wise balance loss, DeepSeek-V3 eq. 17-20.

    L = alpha * sum_i f_i P_i per sequence (averaged over the batch), where
    f_i = N_r / (K_r T) * (#tokens of the sequence that chose expert i) and
    P_i = mean over the sequence of s'_{i,t} = s_{i,t} / sum_j s_{j,t}.
    scores: (B*T, E) unbiased; expert_ids: (B*T, k).
    """
    k = expert_ids.shape[1]
    scores = scores.view(batch_size, -1, n_experts)  # (B, T, E)
    T = scores.shape[1]
    chosen = torch.zeros_like(scores).scatter_(2, expert_ids.view(batch_size, T, k), 1.0)  # (B, T, E)
    f = chosen.sum(dim=1) * n_experts / (k * T)  # (B, E); not differentiable (a count)
    P = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)  # (B, E)
    return alpha * (f * P).sum(dim=-1).mean()


# -----------------------------------------------------------------------------

class MoE(nn.Module):
    """Shared experts + top-k routed fine-grained experts (DeepSeekMoE, V3 §2.1.2)."""

    def __init__(self, dim, cfg: MoEConfig):
        super().__init__()
        E = cfg.n_routed_experts
        self.cfg = cfg
        self.dim = dim
        self.gate = nn.Linear(dim, E, bias=False)  # router; row i is the centroid e_i
        # routed experts, stacked so one grouped kernel can index them (kernels.py)
        self.w1 = nn.Parameter(torch.empty(E, cfg.moe_inter_dim, dim))  # gate projections
        self.w3 = nn.Parameter(torch.empty(E, cfg.moe_inter_dim, dim))  # up projections
        self.w2 = nn.Parameter(torch.empty(E, dim, cfg.moe_inter_dim))  # down projections
        # N_s shared experts of width moe_inter_dim are one SwiGLU N_s times as wide
        self.shared = SwiGLU(dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts > 0 else None
        # b_i: selection bias, learnt by counting, not by gradient; saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        # tokens routed to each expert since the last update_bias() (training only)
        self.register_buffer("expert_load", torch.zeros(E, dtype=torch.float32), persistent=False)
        self.aux_loss = torch.zeros(())
        self.reset_expert_parameters()

    def reset_expert_parameters(self):
        # same distribution as nn.Linear's default init, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        for w in (self.w1, self.w3, self.w2):
            bound = 1.0 / math.sqrt(w.shape[-1])
            nn.init.uniform_(w, -bound, bound)

    def forward(self, x):  # (B, T, dim) -> (B, T, dim)
        B, T, dim = x.shape
        x_flat = x.reshape(B * T, dim)  # (N, dim)
        scores = router_scores(self.gate(x_flat), self.cfg.score_func)  # (N, E) float32
        weights, expert_ids = route(scores, self.expert_bias, self.cfg)  # (N, k), (N, k)
        y, counts = dispatch_to_experts(x_flat, expert_ids, weights, self.w1, self.w3, self.w2)  # (N, dim)
        if self.shared is not None:
            y = y + self.shared(x_flat)

        if self.training:
            self.expert_load += counts.detach().float()
        if self.training and self.cfg.aux_loss_alpha > 0:
            self.aux_loss = sequence_balance_loss(scores, expert_ids, self.cfg.n_routed_experts, B,
                                                  self.cfg.aux_loss_alpha)
        else:
            self.aux_loss = torch.zeros((), device=x.device)
        return y.view(B, T, dim)

    @torch.no_grad()
    def update_bias(self):
        """Aux-loss-free balancing step (DeepSeek-V3 §2.1.2); call after each optimizer step.

        b_i += gamma * sign(mean_load - load_i) from the tokens counted since the last
        call, then reset the counts. Returns load statistics ({} if nothing was counted).
        """
        load = self.expert_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank must see the global load, so biases stay identical
        self.expert_load.zero_()
        if load.sum() == 0:
            return {}
        mean = load.mean()
        gamma = self.cfg.bias_update_speed
        if gamma > 0:
            self.expert_bias += gamma * torch.sign(mean - load)
        return {
            "max_over_mean": (load.max() / mean).item(),
            "min_over_mean": (load.min() / mean).item(),
            "cv": (load.std(unbiased=False) / mean).item(),  # coefficient of variation
        }

    def n_inactive_params(self):
        """Routed-expert parameters a token does not use: routed * (1 - k/E)."""
        E, k = self.cfg.n_routed_experts, self.cfg.n_activated_experts
        per_expert = (self.w1.numel() + self.w3.numel() + self.w2.numel()) // E
        return (E - k) * per_expert
