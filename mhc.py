"""mHC: manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880), the residual design DeepSeek
pairs with Engram, built on Hyper-Connections (ByteDance, arXiv 2409.19606).

A pre-norm transformer keeps one residual stream per token, x in R^C, and every sublayer F (attention,
FFN, each with its own pre-norm) adds to it: x <- x + F(x). Hyper-connections widen the stream to n
copies, x in R^{n x C}, and give each sublayer three small maps:

    x <- H_res x + H_post^T F(H_pre x)        H_pre (1 x n): how much of each stream F reads
                                              H_post (1 x n): how much of F's output each stream gets
                                              H_res (n x n): how the streams mix among themselves

In words, per token: F reads one weighted sum of the n streams, its output is written back into every
stream with that stream's weight, and the streams trade contents through H_res. With n = 1 and all maps 1
this is the plain residual. The streams start as n copies of the token embedding (expand_streams) and are
summed back into one, with learned weights, before the final norm and the head (StreamCollapse).

Unconstrained, H_res compounds over depth: the composite map H_res^(L) ... H_res^(1) can amplify the signal
(DeepSeek report an "Amax gain", its largest row or column sum, near 3000 in a 27B model, with loss
spikes). mHC computes the maps from the streams and keeps H_res doubly stochastic (non-negative, every row
and column summing to 1). Products of doubly stochastic matrices are doubly stochastic, so however deep
the model, the composite map neither amplifies (Amax gain <= 1) nor loses the streams' mean:

    x~     = RMSNorm(vec(x))                       (n*C,)  all streams of the token, flattened
    h      = x~ phi                                (n + n + n*n,)  one linear map for all three
    H_pre  = sigmoid(a_pre  h_pre  + b_pre)        non-negative weights
    H_post = 2 sigmoid(a_post h_post + b_post)      in (0, 2); 1 at b = 0, the plain residual's write
    H_res  = SinkhornKnopp(a_res mat(h_res) + b_res)

a_* are learned scalars (0.01 at init, so each map starts near its static part b_*), b_* learned biases.
The Sinkhorn start here is exp (the paper's); DeepSeek-V4's code starts from a softmax + eps instead
(--hc_sinkhorn_start=softmax), adds eps to H_pre (--hc_pre_eps=true) and collapses the streams before the
head with weights computed from them (--hc_collapse=dynamic); tests/test_parity.py checks all three
against transformers' DeepseekV4HyperConnection and DeepseekV4HyperHead.
Sinkhorn iterations 0 (--hc_sinkhorn_iters=0) drop the constraint: H_res = a_res mat(h_res) + b_res, as in
Hyper-Connections, the control that shows what the constraint prevents (composite_amax_gain).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli  # check_numbers: the checks every config's numbers get


@dataclass
class MHCConfig:  # names start with 'hc_' so that flat CLI flags are unique across configs
    hc_mult: int = 1                  # n residual streams; 1 = off (the plain residual stream)
    hc_sinkhorn_iters: int = 20       # Sinkhorn-Knopp iterations that make H_res doubly stochastic; 0 = unconstrained HC
    hc_eps: float = 1e-6              # keeps Sinkhorn's row and column sums away from 0
    hc_init_scale: float = 0.01       # a_pre, a_post, a_res at init: the input-dependent part starts small
    hc_dynamic: bool = True           # maps computed from the streams (mHC); false = static per-sublayer maps
    hc_sinkhorn_start: str = "exp"    # 'exp' (the paper's) | 'softmax' (DeepSeek-V4's code: softmax + hc_eps)
    hc_pre_eps: bool = False          # add hc_eps to every read weight (H_pre, the dynamic collapse), as V4's code
    hc_collapse: str = "static"       # 'static' learned weights | 'dynamic' from the streams (V4's HyperHead)
    hc_init: str = "spread"           # 'spread' ('mhc' with distinct write gains: the streams differ from step 1)
                                      # | 'mhc' (a = hc_init_scale, the read preferring one stream, H_post 1, H_res
                                      # near I) | 'v4' (DeepSeek-V4's: a = 1, every bias 0: H_pre 1/2, H_post 1,
                                      # H_res 1/n). RESULTS.md: "mHC's recipe"
    hc_lr_mult: float = 1.0           # mHC's parameters: Adam lr x this (phi decayed like every matrix; a, b never)

    def __post_init__(self):
        cli.check_numbers(self, at_least_1=("hc_mult",), nonneg=("hc_sinkhorn_iters", "hc_init_scale", "hc_lr_mult"),
                          positive=("hc_eps",), one_of={"hc_sinkhorn_start": ("exp", "softmax"),
                                                        "hc_collapse": ("static", "dynamic"), "hc_init": HC_INITS})
        if self.hc_sinkhorn_iters == 0 and (self.hc_sinkhorn_start == "softmax" or self.hc_init == "v4"):
            flag = "--hc_sinkhorn_start=softmax" if self.hc_sinkhorn_start == "softmax" else "--hc_init=v4"
            raise ValueError(f"{flag}: needs --hc_sinkhorn_iters >= 1 (0 = no Sinkhorn, and V4's b_res = 0 would "
                             "make an unconstrained H_res the zero map)")


HC_INITS = ("mhc", "v4", "spread")
SPREAD = 0.5  # --hc_init=spread: the write gains H_post run from 1 - SPREAD to 1 + SPREAD over the streams


# -----------------------------------------------------------------------------
# The Sinkhorn-Knopp projection and the Amax gain

def sinkhorn(logits, iters: int, eps: float = 1e-6):
    """(..., n, n) logits -> (..., n, n) approximately doubly stochastic: exp, then alternately divide each
    column and each row by its sum. Each pass brings the sums closer to 1 (Sinkhorn-Knopp converges for any
    positive matrix); the last pass is over rows, so rows sum to 1 to rounding, columns to within the
    remaining error. The max is taken out first so that exp cannot overflow (it cancels in the ratios)."""
    m = torch.exp(logits - logits.amax(dim=(-2, -1), keepdim=True))
    for _ in range(iters):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows
    return m


def sinkhorn_softmax_start(logits, iters: int, eps: float = 1e-6):
    """DeepSeek-V4's code's Sinkhorn (its comb map, transposed to H_res here): (..., n, n) -> (..., n, n).
    Its first column pass is an exact softmax over each column, then + eps on every entry; then rows, and
    iters - 1 more column and row passes. As many passes as sinkhorn, in the same order, ending on rows:
    only where eps enters the first pass differs (sinkhorn adds it to the column sums)."""
    m = logits.softmax(dim=-2) + eps
    m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-2, keepdim=True) + eps)  # columns
        m = m / (m.sum(dim=-1, keepdim=True) + eps)  # rows
    return m


def stream_diversity(x) -> float:
    """How different the n streams are: the mean over tokens and streams of |x_m - mean_m x_m| / |mean_m x_m|,
    x (B, T, n, C). 0 while the streams are copies; mHC only adds something once this grows."""
    x = wide(x.detach())
    mean = x.mean(dim=2, keepdim=True)  # (B, T, 1, C)
    return float(((x - mean).norm(dim=-1) / mean.norm(dim=-1).clamp_min(1e-12)).mean())


def amax_gain(h):
    """(..., n, n) -> (...): the largest absolute row sum (forward gain) or column sum (backward gain)."""
    a = h.abs()
    return torch.maximum(a.sum(dim=-1).amax(dim=-1), a.sum(dim=-2).amax(dim=-1))


def composite_amax_gain(res_maps) -> dict:
    """The Amax gain of H_res^(L) ... H_res^(1), the map from the embedding's streams to the last block's,
    per token, over a list of (B, T, n, n) maps in forward order; its max and mean over the tokens."""
    total = None
    for h in res_maps:
        h = h.double()
        total = h if total is None else h @ total  # later maps act after earlier ones
    gain = amax_gain(total)  # (B, T)
    return {"max": float(gain.max()), "mean": float(gain.mean())}


def log_fields(model) -> dict:
    """mHC's fields in log.jsonl, from the last batch the model ran: the composite H_res's Amax gain
    (GPT.hc_amax_gain) and how far apart the streams are at each block's output (GPT.hc_stream_diversity);
    {} with one stream."""
    gain = model.hc_amax_gain()
    return {} if gain is None else {"hc_amax_gain": gain, "hc_stream_diversity": model.hc_stream_diversity()}


def sinkhorn_warning(cfg, sequences_per_step: int, device: str) -> str:
    """A warning when --hc_sinkhorn_iters makes every step far slower than at the paper's 20: how long its
    Sinkhorn kernels alone take per step, estimated from their count (2 per iteration, for each of the 2 maps
    a block, forward and backward) at ~10 us of launch and memory traffic each. cfg: the GPTConfig."""
    mhc = cfg.mhc
    if mhc.hc_mult == 1 or mhc.hc_sinkhorn_iters <= 200:  # n = 1 has no Sinkhorn; up to 10x the paper's 20 is fine
        return ""
    tokens = sequences_per_step * cfg.block_size
    bandwidth = 1e12 if device.startswith("cuda") else 1e10  # bytes/s: a GPU's HBM, a CPU's DRAM

    def seconds(iters):
        kernels_per_step = 2 * iters * 2 * cfg.n_layer * 3
        return kernels_per_step * (1e-5 + 4 * 2 * tokens * mhc.hc_mult ** 2 / bandwidth)
    return (f"warning: --hc_sinkhorn_iters={mhc.hc_sinkhorn_iters}: each step spends about "
            f"{seconds(mhc.hc_sinkhorn_iters):,.1f} s in Sinkhorn's kernels alone (about {seconds(20) * 1000:,.0f} ms "
            "at the paper's 20)")


# -----------------------------------------------------------------------------
# The streams: expanded at the embedding, collapsed before the head

def expand_streams(x, n: int):
    """(B, T, C) -> (B, T, n, C): n copies of the token embedding (a view; the first write makes them real)."""
    return x.unsqueeze(2).expand(-1, -1, n, -1)


def wide(t):
    """t in float32 at least (bf16 and fp16 widened, float64 kept for gradcheck)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def stream_features(x, weight):
    """x (B, T, n, C), weight (rows, n*C) -> h = RMSNorm(vec(x)) weight^T, (B, T, rows) in float32 at least:
    what the dynamic maps (and the dynamic collapse) are computed from."""
    flat = F.rms_norm(wide(x.flatten(2)), (x.shape[2] * x.shape[3],))  # (B, T, n*C) x~
    return F.linear(flat, wide(weight))


def read_weights(h, scale, bias, cfg: MHCConfig):
    """(..., n) -> sigmoid(scale h + bias) (..., n): how much of each stream is read; with --hc_pre_eps, + hc_eps
    as DeepSeek-V4's code (no stream's weight reaches 0)."""
    w = torch.sigmoid(scale * h + bias)
    return w + cfg.hc_eps if cfg.hc_pre_eps else w


class StreamCollapse(nn.Module):
    """(B, T, n, C) -> (B, T, C): a weighted sum of the streams, the mean at init; with one stream, that
    stream (no parameters). --hc_collapse=static: n learned weights. dynamic (DeepSeek-V4's HyperHead):
    per-token weights read_weights(h), h from the streams as for H_pre; b = -log(n - 1) gives 1/n at init."""

    def __init__(self, n: int, dim: int | None = None, cfg: MHCConfig | None = None):
        super().__init__()
        self.cfg = cfg if cfg is not None else MHCConfig(hc_mult=n)
        self.weight = None
        self.dynamic = n > 1 and self.cfg.hc_collapse == "dynamic"
        if self.dynamic:
            if dim is None:
                raise ValueError("--hc_collapse=dynamic: StreamCollapse needs the model width (dim)")
            self.phi = nn.Linear(n * dim, n, bias=False)  # GPT.init_weights draws it N(0, 0.02)
            v4 = self.cfg.hc_init == "v4"  # V4's HyperHead: a = 1, b = 0 (weights 1/2, the final norm rescales)
            self.scale = nn.Parameter(torch.full((1,), 1.0 if v4 else self.cfg.hc_init_scale))
            self.bias = nn.Parameter(torch.full((n,), 0.0 if v4 else -math.log(n - 1)))  # sigmoid(b) = 1/n: the mean
        elif n > 1:
            self.weight = nn.Parameter(torch.full((n,), 1.0 / n))

    def custom_param_groups(self) -> list[dict]:
        return hc_param_groups(self)  # --hc_lr_mult, as HyperConnection's

    def forward(self, x):
        if self.dynamic:
            with torch.autocast(x.device.type, enabled=False):
                w = read_weights(stream_features(x, self.phi.weight), self.scale, self.bias, self.cfg)  # (B, T, n)
                return (w[..., None] * wide(x)).sum(dim=2).to(x.dtype)
        if self.weight is None:
            return x[:, :, 0]
        return (self.weight[:, None] * x).sum(dim=2)


# -----------------------------------------------------------------------------
# One hyper-connection: the read, write-back and mix around one sublayer

RES_OFF_DIAGONAL = -4.0  # mHC's b_res off the diagonal: exp(-4) = 0.018, so SK(b_res) starts near the identity


def initial_biases(n: int, cfg: MHCConfig, sublayer: int) -> torch.Tensor:
    """(2n + n^2,) b_pre, b_post, b_res at init, by --hc_init.
    mhc: the static read prefers stream (sublayer mod n), as Hyper-Connections read stream k mod n in layer k;
         H_post = 2 sigmoid(0) = 1; SK(b_res) near the identity (b_res = I itself when unconstrained).
    v4:  DeepSeek-V4's (transformers' DeepseekV4PreTrainedModel._init_weights): every bias 0, so H_pre = 1/2
         for each stream, H_post = 1 and H_res = SK(0) = 1/n everywhere (each stream the streams' mean).
    spread: mhc with the write gains H_post = 1 - SPREAD ... 1 + SPREAD (mean 1) over the streams. At equal
         streams it is the only map that can make them differ: the pre-norm undoes any read weights' scale
         and a doubly stochastic H_res maps equal streams to themselves, so the gradient cannot split the
         streams (HyperConnection's docstring), but unequal writes split them at the first sublayer."""
    if cfg.hc_init == "v4":
        return torch.zeros(2 * n + n * n)
    pre = torch.full((n,), -1.0)
    pre[sublayer % n] = 1.0  # sigmoid: 0.73 for that stream, 0.27 for the others
    post = torch.zeros(n)  # 2 sigmoid(0) = 1
    if cfg.hc_init == "spread":
        gains = torch.linspace(1 - SPREAD, 1 + SPREAD, n)  # (n,) H_post at init
        post = torch.log(gains / (2 - gains))  # 2 sigmoid(b) = g  <=>  b = logit(g / 2)
    eye = torch.eye(n)
    res = eye if cfg.hc_sinkhorn_iters == 0 else RES_OFF_DIAGONAL * (1 - eye)  # unconstrained: H_res = I
    return torch.cat([pre, post, res.flatten()])


def hc_param_groups(module) -> list[dict]:
    """A HyperConnection's or StreamCollapse's optimizer groups under --hc_lr_mult != 1: phi (a matrix) with
    the model's weight decay (None: GPT.configure_optimizers fills it in), the scales a and biases b without."""
    mult = module.cfg.hc_lr_mult
    params = [p for p in module.parameters() if p.requires_grad]
    if mult == 1 or not params:
        return []
    matrices, vectors = [p for p in params if p.dim() >= 2], [p for p in params if p.dim() < 2]
    return [g for g in ({"params": matrices, "lr_mult": mult, "weight_decay": None, "sparse": False},
                        {"params": vectors, "lr_mult": mult, "weight_decay": 0.0, "sparse": False}) if g["params"]]


class HyperConnection(nn.Module):
    """The maps around one sublayer: read(x) gives the sublayer's input, write(x, y, maps) the new streams.

    Initialisation (--hc_init=mhc) as the sources: phi random (DeepSeek-V4), the static read preferring stream
    (sublayer mod n) (Hyper-Connections read stream k mod n in layer k), H_post at 1, H_res near the identity,
    so each stream starts as the plain residual stream. This does NOT break the streams' symmetry: they start as
    copies, and while they are copies the read's pre-norm makes it scale-invariant and a doubly stochastic
    H_res maps equal streams to themselves, so the read weights and H_res get (near) zero gradient and every
    write gain the same one. stream_diversity measures it (log.jsonl: hc_stream_diversity). --hc_init=spread,
    the default, breaks the symmetry with unequal write gains (initial_biases); RESULTS.md, "mHC's recipe",
    has what each init measured. With one stream all maps are 1 and there is nothing to learn: read and
    write are the plain residual, exactly."""

    def __init__(self, dim: int, cfg: MHCConfig, sublayer: int):
        super().__init__()
        n = self.n = cfg.hc_mult
        self.cfg = cfg
        self.last_res = None  # (B, T, n, n) H_res of the last forward, detached (for composite_amax_gain)
        if n == 1:
            return
        if cfg.hc_dynamic:
            self.phi = nn.Linear(n * dim, 2 * n + n * n, bias=False)  # GPT.init_weights draws it N(0, 0.02)
        self.scale = nn.Parameter(torch.full((3,), 1.0 if cfg.hc_init == "v4" else cfg.hc_init_scale))  # a_pre, a_post, a_res
        self.bias = nn.Parameter(initial_biases(n, cfg, sublayer))  # b_pre, b_post, b_res

    def custom_param_groups(self) -> list[dict]:
        """--hc_lr_mult != 1: this connection's parameters in groups of their own (GPT.configure_optimizers):
        phi decayed as the model's matrices are (weight_decay None), a and b never. At 1 they stay in the
        model's groups, so that runs and checkpoints are exactly those of before the option."""
        return hc_param_groups(self)

    def maps(self, x):
        """x (B, T, n, C) -> H_pre (B, T, n), H_post (B, T, n), H_res (B, T, n, n), in float32 whatever
        the autocast: they are few numbers, and rounding them to bf16 would break the row and column sums."""
        n = self.n
        with torch.autocast(x.device.type, enabled=False):
            if self.cfg.hc_dynamic:
                h = stream_features(x, self.phi.weight)  # (B, T, 2n + n^2)
            else:
                h = wide(x.new_zeros(*x.shape[:2], 2 * n + n * n))
            a_pre, a_post, a_res = self.scale
            b = self.bias
            h_pre = read_weights(h[..., :n], a_pre, b[:n], self.cfg)  # (B, T, n)
            h_post = 2 * torch.sigmoid(a_post * h[..., n:2 * n] + b[n:2 * n])  # (B, T, n)
            res = a_res * h[..., 2 * n:].unflatten(-1, (n, n)) + b[2 * n:].view(n, n)  # (B, T, n, n)
            if self.cfg.hc_sinkhorn_iters:
                project = sinkhorn if self.cfg.hc_sinkhorn_start == "exp" else sinkhorn_softmax_start
                res = project(res, self.cfg.hc_sinkhorn_iters, self.cfg.hc_eps)
        self.last_res = res.detach()
        return h_pre, h_post, res

    def read(self, x):
        """x (B, T, n, C) -> (the sublayer's input H_pre x as (B, T, 1, C), the maps for write). With one
        stream it is x itself: the sublayer's pre-norm reads the residual tensor as a plain block does, so
        that even the order in which backward sums its gradients is the plain block's."""
        if self.n == 1:
            return x, None
        h_pre, h_post, h_res = self.maps(x)
        return (h_pre[..., None] * wide(x)).sum(dim=2, keepdim=True).to(x.dtype), (h_post, h_res)

    def write(self, x, y, maps):
        """x (B, T, n, C) streams, y (B, T, C) the sublayer's output -> H_res x + H_post^T y, (B, T, n, C)."""
        if self.n == 1:
            return x + y[:, :, None]
        h_post, h_res = maps
        with torch.autocast(x.device.type, enabled=False):
            mixed = torch.matmul(h_res, wide(x))  # (B, T, n, n) @ (B, T, n, C): stream i gets sum_j H_ij x_j
            return (mixed + h_post[..., None] * wide(y)[:, :, None]).to(x.dtype)
