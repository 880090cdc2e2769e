"""Learned Mixture-of-Experts MLP: top-k or expert-choice routing, shared experts, capacity.

    y = shared(x) + sum over routed slots (n, e) of  w[n, e] * Expert_e(x_routed[n])

A router only decides the slots (token, expert, weight), as a `Routing` (layers/routing.py);
`GroupedExperts` computes them, so every routing shares one expert implementation.
`x_routed` is x itself, or with ScMoE the previous block's normalised input (`shortcut`): the
routed experts and the router read it while the shared experts read x.

Routers (config.moe_router, a name in hybridlm.registry; built-ins in layers/routers.py):
  topk           each token picks its k best experts (Switch k=1, Mixtral k=2). An optional
                 capacity (moe_capacity_factor) drops the overflow of busy experts, in
                 training only, first choices served before second choices.
  expert_choice  each expert picks its C best tokens (Zhou et al. 2022; C from
                 moe_ec_capacity_factor): balanced by
                 construction, but NOT causal — a token's experts depend on the other tokens,
                 later ones included. `causal_routing` switches it to token choice over the
                 same scores, for a causal held-out loss and for generation.

Balancing (config.moe_balance):
  aux_loss  Switch loss coef * E * sum_e f_e * P_e, returned in the stats for the model to add.
  aux_free  DeepSeek-V3: a per-expert bias added to the scores for selection only, moved by
            +-gamma (moe_aux_free_rate) towards the mean load at every `apply_balance`.
  ema       CORVUS-CORAX eq. 5: the same bias, moved by rate * (EMA of the load - target)
            (moe_ema_rate, moe_ema_decay).
  none      nothing.

Glossary: B batch, T time, N = B*T tokens, H hidden, E experts, k experts per token,
C capacity (slots one expert may take), M routed slots.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from hybridlm.config import MOE_SCORES, ModelConfig
from hybridlm.layers.experts import GroupedExperts
from hybridlm.layers.mlp import SharedExperts
from hybridlm.layers.recompute import recomputing
from hybridlm.layers.routing import Router, Routing, count_per_expert
from hybridlm.registry import router_entry


def _ceil(value: float) -> int:
    # ceil of a float ratio; the tiny slack keeps 12.000000000000002 from becoming 13.
    return math.ceil(value - 1e-9)


def _fp32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (N, H) @ weight (E, H)^T in float32 whatever the surrounding autocast says.

    Routing is a discrete decision on small logit gaps: bf16/fp16 rounding flips near-ties and
    is known to collapse routing onto few experts, so the gate always runs in fp32.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.float(), weight.float())  # (N, E) float32


def _scores(logits: torch.Tensor, score: str) -> torch.Tensor:
    """(N, E) logits -> (N, E) scores: softmax over the experts, or independent sigmoids."""
    return logits.softmax(dim=-1) if score == "softmax" else logits.sigmoid()


def _check_router_args(num_experts: int, score: str) -> None:
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if score not in MOE_SCORES:
        raise ValueError(f"moe_score={score!r} is not one of {list(MOE_SCORES)}")


class TopKRouter(Router):
    """Token choice: every token picks its top_k experts.

    Returns a token-major Routing: expert_ids (N, k) long, weights float32, probs (N, E)
    float32 (the scores), selected (E,) the slots chosen before capacity.
    `expert_bias` (E,) shifts which experts are selected (aux-free balancing) but never the
    weights: those are the unbiased scores of the chosen experts (renormalised to sum 1 when
    `renormalize`). Note: softmax with k=1 and renormalize gives weight 1 for every token, so
    the gate then learns only through the aux loss.

    Capacity (`capacity_factor` set, in training only): each expert keeps
    C = ceil(N * k * factor / E) of its slots, served in GShard/Switch order (every first
    choice before any second choice; see `_within_capacity`), and the rest are dropped.
    """

    fp32_parameters = ("gate",)  # see Router

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, score: str = "softmax",
        renormalize: bool = True, capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        _check_router_args(num_experts, score)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"moe_top_k={top_k} must lie in [1, num_experts={num_experts}]")
        self.num_experts, self.top_k = num_experts, top_k
        self.score, self.renormalize = score, renormalize
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # Persistent: a reloaded model must select exactly as the trained one did.
        self.register_buffer("expert_bias", torch.zeros(num_experts))

    @property
    def experts_per_token(self) -> float:
        return self.top_k

    def forward(self, x: torch.Tensor) -> Routing:
        probs = _scores(_fp32_logits(x, self.gate.weight), self.score)  # (N, E)
        biased = probs + self.expert_bias.float()  # (N, E), selection only
        expert_ids = biased.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = probs.gather(-1, expert_ids)  # (N, k) unbiased scores, carry the gradient
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        routing = Routing.token_choice(
            expert_ids, self.num_experts, weights, probs, distinct=True
        )
        if not (self.training and self.capacity_factor is not None):
            return routing
        capacity = _ceil(x.shape[0] * self.top_k * self.capacity_factor / self.num_experts)
        keep = _within_capacity(expert_ids, self.num_experts, capacity)  # (N, k)
        return routing.keep(keep.reshape(-1), capacity)  # token-major, the slot order


class ExpertChoiceRouter(Router):
    """Expert choice: every expert takes its C best tokens, C = ceil(N * factor / E) in [1, N].

    Scores are normalised over the experts of each token (softmax, as in the paper, or
    sigmoid); each expert then ranks the tokens by its score column. A token may be taken by
    several experts or by none (then only the shared experts and the residual see it).
    Returns a Routing of M = E * C slots (exactly C per expert, grouped by expert) with probs
    (N, E) float32.

    Not causal: whether expert e takes token t depends on how t ranks among all N tokens of
    the batch, later ones included, so the output at t (and the training loss) sees the
    future. Causal routing (`causal = True`, set by `causal_routing` / HybridLM.causal_routing,
    which the trainer's held-out loss uses): the same scores route by token choice instead.
    Every token takes its `causal_top_k` = clamp(floor(factor + 1/2), 1, E) best experts,
    each slot weighted by its score as in expert choice (no renormalisation). Expert choice
    fills E * C ~ N * factor slots, so a token gets `factor` experts on average; token choice
    keeps that budget and the weight scale while a token's experts depend on the token alone.
    Slots are then token-major (M = N * causal_top_k). It is an approximation of the trained
    routing (there a token may get anywhere from 0 to E experts), not the same function.
    """

    fp32_parameters = ("gate",)  # see Router

    def __init__(
        self, hidden_size: int, num_experts: int, capacity_factor: float | None = None,
        score: str = "softmax",
    ) -> None:
        super().__init__()
        _check_router_args(num_experts, score)
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"moe_ec_capacity_factor={capacity_factor} must be > 0")
        self.num_experts, self.score = num_experts, score
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.causal = False  # route by token choice (see the class docstring)

    @property
    def is_causal(self) -> bool:
        return self.causal

    @property
    def experts_per_token(self) -> float:
        """On average the capacity factor (E * C slots over N tokens), at most E."""
        return min(self.num_experts, self.capacity_factor)

    @property
    def causal_top_k(self) -> int:
        """Experts per token under causal routing: the capacity factor rounded half up, in
        [1, E] (the average number of experts a token gets from expert choice)."""
        return min(max(math.floor(self.capacity_factor + 0.5), 1), self.num_experts)

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(N * capacity_factor / E), clamped to [1, N]."""
        c = _ceil(num_tokens * self.capacity_factor / self.num_experts)
        return min(max(c, 1), num_tokens)

    def forward(self, x: torch.Tensor) -> Routing:
        probs = _scores(_fp32_logits(x, self.gate.weight), self.score)  # (N, E)
        if self.causal:
            return self._token_choice(probs)
        c = self.capacity(x.shape[0])
        weights, token_idx = probs.t().topk(c, dim=-1)  # (E, C) each: expert e's best tokens
        expert_idx = torch.arange(self.num_experts, device=x.device).repeat_interleave(c)
        return Routing(
            token_idx.reshape(-1), expert_idx, weights.reshape(-1), self.num_experts,
            probs=probs, selected=torch.full_like(probs[0], c, dtype=torch.long),  # (E,)
            dropped=torch.zeros((), dtype=torch.long, device=x.device), capacity=c,
        )

    def _token_choice(self, probs: torch.Tensor) -> Routing:
        """(N, E) scores -> M = N * causal_top_k slots: each token's best experts at their
        scores, token-major."""
        weights, expert_ids = probs.topk(self.causal_top_k, dim=-1)  # (N, k) each
        return Routing.token_choice(expert_ids, self.num_experts, weights, probs, distinct=True)


@contextlib.contextmanager
def causal_routing(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every expert-choice router under `module` (a model, or one wrapped
    by DDP/FSDP) routes causally by token choice (enabled=True) or by expert choice
    (False); each router's previous setting is restored on exit."""
    routers = [m for m in module.modules() if isinstance(m, ExpertChoiceRouter)]
    previous = [router.causal for router in routers]
    for router in routers:
        router.causal = enabled
    try:
        yield
    finally:
        for router, was in zip(routers, previous, strict=True):
            router.causal = was


def _rank_within_expert(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(M,) expert of each slot -> (M,) how many earlier slots went to the same expert.
    Sort, count and scatter: fixed shapes, nothing read on the host."""
    order = torch.argsort(expert_idx, stable=True)  # slots grouped by expert, in slot order
    counts = count_per_expert(expert_idx, num_experts)  # (E,)
    starts = counts.cumsum(0) - counts  # (E,) first sorted position of each expert
    rank_sorted = torch.arange(expert_idx.numel(), device=expert_idx.device)
    rank_sorted = rank_sorted - starts[expert_idx[order]]
    return torch.empty_like(rank_sorted).scatter(0, order, rank_sorted)


def _within_capacity(expert_ids: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(N, k) experts chosen by each token -> (N, k) bool: the slot fits its expert's capacity.

    Each expert serves its slots in the order (choice index, token position), as GShard and
    Switch do: every first choice before any second choice, and within one choice index
    earlier tokens first. So a later token's first choice never loses its place to an
    earlier token's second choice.
    """
    choice_major = expert_ids.t().reshape(-1)  # (k*N,) all first choices, then all second ...
    keep = _rank_within_expert(choice_major, num_experts) < capacity  # (k*N,)
    return keep.reshape(expert_ids.shape[1], -1).t()  # (N, k), the layout of expert_ids


class MoEMLP(nn.Module):
    """Learned MoE with the shared MLP interface: forward(x, *, token_ids, shortcut) -> (y, stats).

    Shared experts: `num_shared_experts` of shared_expert_intermediate_size (None: the
    routed experts' width) that every token passes through (layers/mlp.SharedExperts).

    Capacity (top-k, `moe_capacity_factor` set): in training each expert keeps
    C = ceil(N * k * factor / E) of its slots and drops the rest; a dropped slot contributes
    nothing. Priority is GShard/Switch order: an expert serves all first choices (in token
    position order over the flattened batch) before any second choice, and so on, so a
    token loses its first choice only to other first choices. In eval nothing is dropped, so a
    sequence's output never depends on the rest of the batch and cached decoding equals the
    full forward.

    Balancing state: training forwards add the experts' selected slot counts (before dropping)
    to `load_since_balance`; the model's balance step sums `pending_load()` over data-parallel
    ranks and hands it to `apply_balance`, which moves the selection bias and resets the
    counts. (Under DDP keep `broadcast_buffers=False`, or rank 0's counts overwrite the others.)
    """

    def __init__(self, config: ModelConfig, num_experts: int) -> None:
        super().__init__()
        c = config
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts} must be >= 1")
        self.num_experts = num_experts
        self.balance = c.moe_balance
        self.aux_loss_coef = c.moe_aux_loss_coef
        self.aux_free_rate, self.ema_rate = c.moe_aux_free_rate, c.moe_ema_rate
        self.ema_decay = c.moe_ema_decay
        self.router = router_entry(c.moe_router).builder(c, num_experts)
        self.active_experts_per_token = self.router.experts_per_token
        inter = c.moe_expert_size
        self.experts = GroupedExperts(num_experts, c.hidden_size, inter)
        self.shared = SharedExperts.build(c.hidden_size, c.num_shared_experts,
                                          c.shared_expert_size(inter))
        # Integer counts: exact, and untouched by model.to(dtype). Not saved: a run's counts.
        for name, value in self.derived_buffers().items():
            self.register_buffer(name, value, persistent=False)
        # EMA of the load in units of the uniform target (1.0 = exactly N*k/E); see apply_balance.
        self.register_buffer(
            "load_ema", torch.ones(num_experts) if c.moe_balance == "ema" else None
        )

    def derived_buffers(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The buffers not saved, as a new layer has them: load_since_balance (E,) long zeros.
        A model loaded onto the meta device first (hybridlm.checkpoint) gets them from here."""
        return {"load_since_balance": torch.zeros(self.num_experts, dtype=torch.long,
                                                  device=device)}

    # ScMoE: the block hands this MLP the previous block's normalised input as `shortcut`.
    reads_shortcut = True

    @property
    def is_causal(self) -> bool:
        """False for expert choice (a token's experts depend on later tokens, so no
        generation), unless its router is switched to causal routing."""
        return self.router.is_causal

    # --- forward ------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        *,
        token_ids: torch.Tensor | None = None,
        shortcut: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, T, H), shortcut (B, T, H) or None -> y (B, T, H), stats.

        stats: expert_counts (E,) long (slots processed), aux_loss () float32, router_entropy
        () float32 (detached), dropped_tokens () long (slots dropped by capacity).
        token_ids is accepted for the common MLP interface and unused.
        """
        if shortcut is not None and shortcut.shape != x.shape:
            raise ValueError(
                f"shortcut shape {tuple(shortcut.shape)} does not match x {tuple(x.shape)}"
            )
        hidden = x.shape[-1]
        flat = x.reshape(-1, hidden)  # (N, H): read by the shared experts
        routed_in = flat if shortcut is None else shortcut.reshape(-1, hidden)  # (N, H)
        routing = self.router(routed_in)
        y, counts = self.experts(routed_in, routing)
        if self.shared is not None:
            y = y + self.shared(flat)

        if self.training and not recomputing():  # counted once under activation checkpointing
            with torch.no_grad():
                self.load_since_balance += routing.selected

        stats = {
            "expert_counts": counts,
            "aux_loss": self._aux_loss(routing.probs, routing.selected),
            "router_entropy": self._entropy(routing.probs),
            "dropped_tokens": routing.dropped,
        }
        return y.reshape(x.shape), stats

    def _distribution(self, probs: torch.Tensor) -> torch.Tensor:
        """(N, E) scores -> per-token distribution over experts (sigmoid scores normalised)."""
        if self.router.score == "softmax":
            return probs
        return probs / probs.sum(dim=-1, keepdim=True).clamp_min(1e-20)

    def _aux_loss(self, probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """Switch loss coef * E * sum_e f_e * P_e (minimal, = coef, when balanced)."""
        if self.balance != "aux_loss":
            return torch.zeros((), dtype=torch.float32, device=probs.device)
        # f_e: fraction of the routed slots (before dropping) sent to e; a count, no gradient.
        f = selected.float() / selected.sum().clamp_min(1)  # (E,)
        p = self._distribution(probs).mean(dim=0)  # (E,) mean router probability, has gradient
        return self.aux_loss_coef * self.num_experts * (f * p).sum()

    @torch.no_grad()
    def _entropy(self, probs: torch.Tensor) -> torch.Tensor:
        """Mean entropy (nats) of the per-token router distribution; log(E) = uniform."""
        dist = self._distribution(probs)  # (N, E)
        return -(dist * dist.clamp_min(1e-20).log()).sum(dim=-1).mean()

    # --- the ExpertMLP and LoadBalanced protocols (layers/routing.py) -------------------------
    def inactive_parameters(self) -> float:
        return self.experts.unused_parameters(self.active_experts_per_token)

    def discard_loads(self) -> None:
        self.load_since_balance.zero_()

    def pending_load(self) -> torch.Tensor:
        """(E,) float32 copy of the slots each expert was selected for since the last balance."""
        return self.load_since_balance.to(torch.float32)

    @torch.no_grad()
    def apply_balance(self, load: torch.Tensor) -> None:
        """Move the selection bias from `load` (E,) (summed over ranks) and reset the counts.

        aux_free: bias += gamma * sign(mean(load) - load)  (DeepSeek-V3).
        ema:      load_ema = decay * load_ema + (1 - decay) * load / target
                  bias    -= rate * (load_ema - 1)
          This is CORVUS-CORAX eq. 5, bias -= rate * (load_ema - target) with target = n*k/E
          = mean(load), written with the loads normalised by the target (target = 1): the
          step then no longer scales with the batch size, and rate means what gamma means.
        none / aux_loss, and expert choice (no bias, balanced by construction): reset only.
        A zero load (nothing seen) corrects nothing. Nothing is read on the host, so the
        step neither waits for the device nor stops a CUDA graph capture.
        """
        load = load.detach().to(device=self.load_since_balance.device, dtype=torch.float32)
        if load.shape != (self.num_experts,):
            raise ValueError(f"load has shape {tuple(load.shape)}, expected ({self.num_experts},)")
        bias = getattr(self.router, "expert_bias", None)
        if bias is not None:
            target = load.mean()  # ()
            if self.balance == "aux_free":  # a zero load: every sign is 0, nothing moves
                bias += self.aux_free_rate * torch.sign(target - load)
            elif self.balance == "ema":
                seen = target > 0  # () bool, kept on the device
                decay = self.ema_decay
                ema = (self.load_ema * decay).add_(load / target.clamp_min(1e-20),
                                                   alpha=1.0 - decay)
                self.load_ema.copy_(torch.where(seen, ema, self.load_ema))
                bias -= torch.where(seen, self.ema_rate * (self.load_ema - 1.0), 0.0)
        self.load_since_balance.zero_()
