"""Bi-encoder losses: contrastive (in-batch + hard negatives, cross-rank gather), GradCache, Matryoshka.

Bi-encoder batches are ``{"query": chunks, "positive": chunks, "negative": chunks?}`` (see the collators).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.minibatch import check_mini_batch_size
from ..data.schema import CONTENT_IDS, GUIDE_EMBEDDINGS
from ..distributed import gather_with_grad, world
from ..retrieval.core import grouped_maxsim, maxsim
from .base import TrainerLoss
from .false_negatives import (
    DIRECTIONS,
    DOC_TO_DOC,
    DOC_TO_QUERY,
    GUIDES,
    HARDNESS_MODES,
    MARGIN_STRATEGIES,
    QUERY_CANDIDATES,
    QUERY_TO_DOC,
    QUERY_TO_QUERY,
    Layout,
    above_margin,
    guide_similarities,
    related_by_content,
)
from .grad_cache import grad_cached

# objective(query, positive, negative, *, content_ids=None, guide_embeddings=None) -> loss
Objective = Callable[..., torch.Tensor]

MAX_LOG_SCALE = math.log(100.0)  # a learnt temperature stays >= 1/100


class ContrastiveLoss(TrainerLoss):
    """InfoNCE over in-batch and hard negatives (MultipleNegativesRanking / CLIP-style loss).

    Each query is scored against every positive and negative in the global batch (other GPUs' included
    when ``gather_across_devices``); its own positive is the target.

    False negatives are taken out of the softmax (logit -inf, see :mod:`.false_negatives`): when the batch has
    ``content_ids`` (the collator's content hashes), every candidate whose content is the row's positive (or the
    positive of another row with the same query), on any rank; optionally, by a guide's margin as
    sentence-transformers' ``GISTEmbedLoss``. ``last_masked`` holds the number of (row, candidate) pairs this rank
    masked in the last call (every direction; targets and self-pairs not counted): the trainer logs it.

    Args:
        temperature: softmax temperature (default 0.05, sentence-transformers' scale 20), used as given. With
            ``learnable_temperature`` it is the start value of a trained log-scale, kept >= 1/100 like CLIP's.
        symmetric: shorthand for ``directions=("query_to_doc", "doc_to_query"), partition_mode="per_direction"``.
        directions: the score matrices in the loss, as sentence-transformers' ``MultipleNegativesRankingLoss``:
            ``"query_to_doc"`` (required), ``"query_to_query"``, ``"doc_to_query"``, ``"doc_to_doc"`` (each positive
            against the other rows' documents).
        partition_mode: ``"joint"`` (one softmax over every direction's scores, the default) or ``"per_direction"``
            (one per direction, averaged; only with ``query_to_doc`` / ``doc_to_query``).
        hardness_mode, hardness_strength: add ``hardness_strength * sim.detach()`` (unscaled) to the
            ``query_to_doc`` logits of ``"in_batch_negatives"`` (other rows' documents), ``"hard_negatives"`` (the
            row's own negatives) or ``"all_negatives"`` (all but the positive), as sentence-transformers does.
        mask_duplicates: mask by the batch's ``content_ids`` (default True; without ids nothing is masked).
        guide_margin: GIST filtering (None: off). ``margin_strategy`` ``"absolute"``: mask candidates whose guide
            similarity is > ``positive's - margin``; ``"relative"``: > ``positive's - |positive's| * margin``.
        guide: ``"batch"`` (the guide model's embeddings the collator put in ``batch["guide_embeddings"]``, cosine)
            or ``"self"`` (the model's own similarities, without gradient).
        gather_across_devices: gather embeddings from all ranks so negatives span the global batch.
        normalize_by_query_length: for token embeddings (:class:`~hf_mm_rerank.MultiVectorEncoder`), MaxSim divided
            by the number of scored query tokens.

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,
        ...                            loss=ContrastiveLoss(temperature=0.02, symmetric=True))
        >>> gte = ContrastiveLoss(directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
        ...                       guide="self", guide_margin=0.1)
    """

    def __init__(self, temperature: float = 0.05, *, learnable_temperature: bool = False, symmetric: bool = False,
                 directions: Sequence[str] | None = None, partition_mode: str | None = None,
                 hardness_mode: str | None = None, hardness_strength: float = 0.0, mask_duplicates: bool = True,
                 guide_margin: float | None = None, margin_strategy: str = "absolute", guide: str = "batch",
                 gather_across_devices: bool = True, normalize_by_query_length: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, received {temperature}.")
        if symmetric and directions is not None:
            raise ValueError("symmetric=True is directions=('query_to_doc', 'doc_to_query'): pass one or the other.")
        self.directions = tuple(directions or ((QUERY_TO_DOC, DOC_TO_QUERY) if symmetric else (QUERY_TO_DOC,)))
        self.partition_mode = partition_mode or ("per_direction" if symmetric else "joint")
        _check_options(self.directions, self.partition_mode, hardness_mode, hardness_strength, margin_strategy, guide)
        self.symmetric = DOC_TO_QUERY in self.directions
        self.hardness_mode, self.hardness_strength = hardness_mode, float(hardness_strength)
        self.mask_duplicates = mask_duplicates
        self.guide_margin, self.margin_strategy, self.guide = guide_margin, margin_strategy, guide
        self.normalize_by_query_length = normalize_by_query_length
        self.gather_across_devices = gather_across_devices
        self.last_masked = 0
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        if isinstance(self.log_scale, nn.Parameter):
            # A learnt temperature is capped at 1/100, like CLIP's: the parameter itself is clamped (as open_clip does
            # after each step), so its gradient keeps flowing at the cap; a clamp inside the graph would give it a
            # zero gradient there for good (temperature=0.01 would never move).
            if self.log_scale.detach() > MAX_LOG_SCALE:
                with torch.no_grad():
                    self.log_scale.clamp_(max=MAX_LOG_SCALE)
            return self.log_scale.exp()
        return self.log_scale.exp()  # a fixed one is used as given

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Objective | None = None) -> torch.Tensor:
        # One model call for every side: under DDP a step must run one forward per backward.
        sides = [batch[c] for c in ("query", "positive", "negative") if batch.get(c)]
        query, positive, *negative = model(*sides)
        return (objective or self.objective)(query, positive, negative[0] if negative else None, **batch_extras(batch))

    def similarity(self, query: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """``[Q, C]``: dot products of ``[N, D]`` embeddings, or MaxSim of ``[N, T, d]`` token embeddings."""
        return similarity(query, documents, self.normalize_by_query_length)

    def objective(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None, *,
                  content_ids: dict[str, Any] | None = None,
                  guide_embeddings: dict[str, Any] | None = None) -> torch.Tensor:
        """The loss from embeddings: query ``[B, D]``, positive ``[B, D]``, negative ``[B*k, D]`` or None (token
        embeddings ``[B, T, d]`` alike, scored by MaxSim); optionally the batch's ``content_ids`` and
        ``guide_embeddings`` (see the class)."""
        gather, directions = self.gather_across_devices, self.directions
        documents = positive if negative is None else cat_rows([positive, negative])
        # Each rank's positives lead its own block of the gathered documents: targets start at that block.
        all_documents, block_start = gather_with_grad(documents) if gather else (documents, 0)
        all_queries, query_start = query, 0
        if set(directions) & set(QUERY_CANDIDATES):
            all_queries, query_start = gather_with_grad(query) if gather else (query, 0)
        rows = query.shape[0]
        layout = Layout(rows, 0 if negative is None else negative.shape[0] // rows, block_start, query_start, gather)
        sims = {QUERY_TO_DOC: self.similarity(query, all_documents)}
        if QUERY_TO_QUERY in directions:
            sims[QUERY_TO_QUERY] = self.similarity(query, all_queries)
        if DOC_TO_QUERY in directions:
            sims[DOC_TO_QUERY] = self.similarity(positive, all_queries)
        if DOC_TO_DOC in directions:
            sims[DOC_TO_DOC] = self.similarity(positive, all_documents)
        blocked = self._blocked(sims, layout, content_ids, guide_embeddings)
        scale = self.scale.to(query.device)
        logits = {direction: scale * sim for direction, sim in sims.items()}
        if self.hardness_mode is not None and self.hardness_strength > 0:
            logits[QUERY_TO_DOC] = logits[QUERY_TO_DOC] + self._hardness(sims[QUERY_TO_DOC], layout)
        for direction, mask in blocked.items():
            logits[direction] = logits[direction].masked_fill(mask, float("-inf"))
        device = query.device
        if self.partition_mode == "per_direction":  # one softmax per direction, each with its own target
            targets = {QUERY_TO_DOC: layout.doc_targets(device), DOC_TO_QUERY: layout.query_targets(device)}
            loss = sum(self.classify(logits[d], targets[d]) for d in logits) / len(logits)
        else:  # one softmax over every direction's scores: the query_to_doc block holds the target
            loss = self.classify(torch.cat(list(logits.values()), 1) if len(logits) > 1 else logits[QUERY_TO_DOC],
                                 layout.doc_targets(device))
        # This rank's share of the global batch (1 when ranks hold equal rows): DDP's gradient average is then the
        # gradient of the mean over every query, also when the last batch leaves ranks with unequal rows.
        return loss * (documents.shape[0] * world()[1] / all_documents.shape[0]) if gather else loss

    def _blocked(self, sims: dict[str, torch.Tensor], layout: Layout, content_ids: dict[str, Any] | None,
                 guide_embeddings: dict[str, Any] | None) -> dict[str, torch.Tensor]:
        """Per direction, the ``[rows, candidates]`` entries out of the softmax: self-pairs of ``query_to_query`` /
        ``doc_to_doc`` (as sentence-transformers) and the false negatives, whose count goes to ``last_masked``."""
        device = sims[QUERY_TO_DOC].device
        index = torch.arange(layout.rows, device=device)
        use_ids = self.mask_duplicates and bool(content_ids)
        use_guide = self.guide_margin is not None
        blocked, masked = {}, {}
        if use_ids or use_guide:
            masked = {d: torch.zeros(s.shape, dtype=torch.bool, device=device) for d, s in sims.items()}
        if use_ids:
            documents, queries = related_by_content(content_ids, layout, device, QUERY_TO_QUERY in sims
                                                    or DOC_TO_QUERY in sims)
            for direction in masked:
                masked[direction] |= queries if direction in QUERY_CANDIDATES else documents
        if use_guide:
            if self.guide == "self":
                guide = {d: s.detach().float() for d, s in sims.items()}
            else:
                guide = guide_similarities(guide_embeddings or {}, layout, list(sims), device)
            positive = guide[QUERY_TO_DOC][index, layout.doc_targets(device)]
            for direction, above in above_margin(guide, positive, self.guide_margin, self.margin_strategy).items():
                masked[direction] |= above
        if masked:  # the targets are never masked, and self-pairs are not negatives
            masked[QUERY_TO_DOC][index, layout.doc_targets(device)] = False
            if DOC_TO_QUERY in masked:
                masked[DOC_TO_QUERY][index, layout.query_targets(device)] = False
        if QUERY_TO_QUERY in sims:
            self_pairs = torch.zeros(sims[QUERY_TO_QUERY].shape, dtype=torch.bool, device=device)
            self_pairs[index, layout.query_targets(device)] = True
            blocked[QUERY_TO_QUERY] = self_pairs
        if DOC_TO_DOC in sims:
            blocked[DOC_TO_DOC] = layout.own_documents(sims[DOC_TO_DOC].shape[1], device)
        for direction in masked:
            if direction in blocked:
                masked[direction] &= ~blocked[direction]
                blocked[direction] = blocked[direction] | masked[direction]
            else:
                blocked[direction] = masked[direction]
        # A host sync only when something can be masked.
        self.last_masked = int(sum(int(m.sum()) for m in masked.values())) if masked else 0
        return blocked

    def _hardness(self, sim: torch.Tensor, layout: Layout) -> torch.Tensor:
        """sentence-transformers' hardness penalty on the ``query_to_doc`` logits: ``strength * sim.detach()`` on the
        negatives of ``hardness_mode``, 0 elsewhere (the positive never)."""
        device, columns = sim.device, sim.shape[1]
        penalty = self.hardness_strength * sim.detach()
        if self.hardness_mode == "hard_negatives":
            keep = layout.own_negatives(columns, device)
        elif self.hardness_mode == "in_batch_negatives":
            keep = ~layout.own_documents(columns, device)
        else:  # all_negatives
            keep = torch.ones(sim.shape, dtype=torch.bool, device=device)
            keep[torch.arange(layout.rows, device=device), layout.doc_targets(device)] = False
        return penalty * keep

    def classify(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of scaled scores ``[B, C]`` whose targets are ``labels``: softmax cross-entropy (InfoNCE)."""
        return F.cross_entropy(logits, labels)


def batch_extras(batch: dict[str, Any]) -> dict[str, Any]:
    """The optional batch entries an objective takes as keywords: ``content_ids`` and ``guide_embeddings``."""
    return {key: batch[key] for key in (CONTENT_IDS, GUIDE_EMBEDDINGS) if batch.get(key) is not None}


def _check_options(directions: tuple[str, ...], partition_mode: str, hardness_mode: str | None,
                   hardness_strength: float, margin_strategy: str, guide: str) -> None:
    """The option checks of sentence-transformers' MultipleNegativesRankingLoss / GISTEmbedLoss, and ours."""
    if not directions or not set(directions) <= set(DIRECTIONS):
        raise ValueError(f"directions={directions}: choose from {DIRECTIONS}.")
    if QUERY_TO_DOC not in directions:
        raise ValueError("directions: 'query_to_doc' is required (it holds the positive pair).")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions={directions}: each at most once.")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be 'joint' or 'per_direction', received {partition_mode!r}.")
    if partition_mode == "per_direction" and set(directions) & {QUERY_TO_QUERY, DOC_TO_DOC}:
        raise ValueError("partition_mode='per_direction' needs the positive pair in every direction's candidates; "
                         "'query_to_query' and 'doc_to_doc' have none. Use partition_mode='joint'.")
    if hardness_mode not in HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, received {hardness_mode!r}.")
    if hardness_strength < 0:
        raise ValueError(f"hardness_strength must be >= 0, received {hardness_strength}.")
    if hardness_mode is not None and hardness_strength == 0:
        warnings.warn(f"hardness_mode={hardness_mode!r} with hardness_strength=0 has no effect; set a positive "
                      "hardness_strength.", stacklevel=3)
    if margin_strategy not in MARGIN_STRATEGIES:
        raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}, received {margin_strategy!r}.")
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES} (a guide model's embeddings come in the batch, computed by "
                         f"the collator), received {guide!r}.")


def cat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along rows; token embeddings ``[N, T, d]`` of different T are zero-padded (zeros are unscored)."""
    if parts[0].dim() < 3:
        return torch.cat(list(parts))
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])


def similarity(query: torch.Tensor, documents: torch.Tensor, normalize_by_query_length: bool = False) -> torch.Tensor:
    """``[Q, C]`` scores: dot products, or for token embeddings (zero vectors: not scored) MaxSim, optionally over
    the number of scored query tokens."""
    if query.dim() < 3:
        return query.float() @ documents.float().T

    q_mask, d_mask = query.abs().amax(-1) > 0, documents.abs().amax(-1) > 0
    scores = maxsim(query, q_mask, documents, d_mask)
    return scores / q_mask.sum(1, keepdim=True).clamp(min=1) if normalize_by_query_length else scores


def candidate_scores(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     normalize_by_query_length: bool = False) -> torch.Tensor:
    """``[rows, 1 + k]``: each query against its own positive and its k negatives (row-major ``[rows * k, ...]``);
    dot products, or MaxSim for token embeddings (optionally over the number of scored query tokens)."""
    rows = query.shape[0]
    if query.dim() < 3:
        candidates = torch.cat([positive.unsqueeze(1), negative.view(rows, -1, negative.shape[-1])], dim=1)
        return torch.einsum("bd,bkd->bk", query.float(), candidates.float())

    documents = cat_rows([positive, negative])
    candidates = torch.cat([documents[:rows].unsqueeze(1), documents[rows:].view(rows, -1, *documents.shape[1:])], 1)
    scores = grouped_maxsim(query, candidates)
    if normalize_by_query_length:
        scores = scores / (query.abs().amax(-1) > 0).sum(1, keepdim=True).clamp(min=1)
    return scores


class CachedContrastiveLoss(ContrastiveLoss):
    """GradCache version of :class:`ContrastiveLoss`: same loss and gradients, memory of one mini-batch.

    Pass 1 embeds every mini-batch without a graph; the loss is computed on those embeddings as leaves.
    When the Trainer calls ``backward``, a hook re-embeds each mini-batch with a graph and back-propagates
    the cached embedding gradients (same RNG state, same autocast). The collator featurizes mini-batches
    separately, and the trainer leaves them on the CPU: each moves to the device only when it is embedded.

    Args:
        mini_batch_size: inputs per forward pass (default 32).
        **kwargs: as :class:`ContrastiveLoss`.

    Example:
        >>> args = TrainingArguments("out", per_device_train_batch_size=1024)   # 1024 queries share their negatives
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,  # query, positive[, negative_1..k]
        ...                            loss=CachedContrastiveLoss(mini_batch_size=32, temperature=0.02))
    """

    def __init__(self, mini_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mini_batch_size = check_mini_batch_size(mini_batch_size, allow_none=False)

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Objective | None = None) -> torch.Tensor:
        leaves = grad_cached(model, batch, [c for c in ("query", "positive", "negative") if batch.get(c)])
        return (objective or self.objective)(leaves["query"], leaves["positive"], leaves.get("negative"),
                                             **batch_extras(batch))


class MatryoshkaLoss(TrainerLoss):
    """Applies a contrastive loss at several embedding sizes (Matryoshka Representation Learning).

    Embeddings are computed once; the wrapped loss's objective runs on each prefix ``[:, :dim]``
    (re-normalised), weighted by ``weights`` (default 1 each). Works with :class:`CachedContrastiveLoss`. The
    batch's ``content_ids`` and ``guide_embeddings`` go to every prefix's objective (the guide's embeddings uncut);
    ``last_masked`` is the wrapped loss's count at the first of ``dims``.

    Example:
        >>> loss = MatryoshkaLoss(ContrastiveLoss(), dims=[768, 256, 64])
    """

    def __init__(self, loss: ContrastiveLoss, dims: Sequence[int], weights: Sequence[float] | None = None,
                 renormalize: bool = True) -> None:
        super().__init__()
        if not dims or any(int(d) < 1 for d in dims):
            raise ValueError(f"dims must be positive sizes, received {list(dims)}.")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"weights: expected {len(dims)} values (one per dim), received {len(weights)}.")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dims)
        self.renormalize = renormalize
        self._last_masked = 0

    @property
    def mini_batch_size(self) -> int | None:
        return self.loss.mini_batch_size

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(model, batch, objective=self.objective)

    def _cut(self, x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if x is None:
            return None
        if dim > x.shape[-1]:
            raise ValueError(f"dims: {dim} is larger than the model's embedding size {x.shape[-1]}.")
        x = x[:, :dim]
        return F.normalize(x, dim=-1) if self.renormalize else x

    @property
    def last_masked(self) -> int:
        return self._last_masked

    def objective(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None,
                  **extras: Any) -> torch.Tensor:
        total, counts = 0, []
        for dim, weight in zip(self.dims, self.weights):
            total = total + weight * self.loss.objective(self._cut(query, dim), self._cut(positive, dim),
                                                         self._cut(negative, dim), **extras)
            counts.append(self.loss.last_masked)
        self._last_masked = counts[0]
        return total
