"""The DRO loss and training step in PyTorch on a transformers causal LM: the baseline and parity reference.

It takes the same numpy inputs as the JAX side (a `QueryBatch` of numpy
arrays and an `AnchorSpace`) and follows the objective's definition literally
rather than the JAX implementation's shortcuts:

* the soft prompt is spliced into `inputs_embeds` row by row (a concatenation,
  not a gather and select);
* position ids count real tokens only (cumsum(mask) - 1, clipped at 0) and the
  attention mask is passed, as for any left-padded batch;
* both states are projected onto the FULL anchor basis, z = (h - mean) @ basis,
  the probes are applied with their biases to z[:k] of each, and the norm term
  is the mean over the remaining hidden - k coordinates of (z_new - z_base)^2.
  The JAX loss never forms the full basis product (it uses
  |d|^2 - |d @ axes|^2), so agreement checks that identity independently.

The anchor algebra runs in float64 (`ANCHOR_DTYPE`): it is cheap ([b, h] x
[h, h]) and makes this side the more accurate one; the model runs in its own
dtype (float32 in the tests and benchmarks).

The first reply token's distribution (the preservation term and the `head`
refusal score) comes from the model's own output layer on the final states;
the `openings` score runs every whole input once per opening, the opening's
tokens appended, instead of the JAX side's one pass over a token tree.

The step is torch.nn.utils.clip_grad_norm_(1.0) then torch.optim.AdamW(lr 1e-3,
weight decay 0.01, betas and eps at their defaults), the same update as
`dro_jax.dro.train.make_optimizer` (optax clip_by_global_norm then adamw). The
one known difference: torch divides by (norm + 1e-6) when clipping, optax by
the norm, a relative 1e-6 / norm in the clipped gradient that Adam's first
step all but cancels.

torch is imported inside the functions, so importing this module (or the
benchmark registry) never needs it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dro_jax.anchors.space import AnchorSpace
from dro_jax.dro.loss import LossWeights, check_refusal_score
from dro_jax.inference.refusal_score import OpeningReadout

ANCHOR_DTYPE = "float64"


class TorchAnchors(NamedTuple):
    """An anchor space as torch tensors (see `torch_anchors`)."""

    mean: Any  # [h]
    basis: Any  # [h, h]
    num_components: int
    refusal_weight: Any  # [k]
    refusal_bias: float
    harmfulness_weight: Any  # [k]
    harmfulness_bias: float


def torch_anchors(anchors: AnchorSpace | TorchAnchors, dtype: str = ANCHOR_DTYPE, device: Any = "cpu") -> TorchAnchors:
    """Converts an `AnchorSpace` once, onto the model's `device` (a `TorchAnchors` passes through)."""
    import torch

    if isinstance(anchors, TorchAnchors):
        return anchors
    kind = getattr(torch, dtype)

    def tensor(array):
        return torch.from_numpy(np.asarray(array, np.float64)).to(device=device, dtype=kind)

    return TorchAnchors(
        tensor(anchors.mean), tensor(anchors.basis), int(anchors.num_components),
        tensor(anchors.refusal.weight), float(anchors.refusal.bias),
        tensor(anchors.harmfulness.weight), float(anchors.harmfulness.bias),
    )


def freeze(model):
    """eval mode and requires_grad False on every parameter, so only the soft prompt gets a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model


def position_ids(mask):
    """Positions that count real tokens only: cumsum(mask) - 1, clipped at 0 (as dro_jax does)."""
    return (mask.cumsum(1) - 1).clamp(min=0)


def _tensor(array, dtype=None, device: Any = "cpu"):
    """A host array as a tensor on `device` (the model's), in `dtype` when given."""
    import torch

    return torch.as_tensor(np.asarray(array)).to(device=device, dtype=dtype)


def soft_prompt_embeddings(model, soft_prompt, token_ids, soft_offsets):
    """[b, t, h] input embeddings with soft_prompt [N, h] spliced in at each row's offset (-1: none)."""
    import torch

    embeds = model.get_input_embeddings()(token_ids)
    count = soft_prompt.shape[0]
    rows = []
    for row, offset in enumerate(soft_offsets.tolist()):
        if offset < 0:
            rows.append(embeds[row])
            continue
        if offset + count > embeds.shape[1]:
            raise ValueError(f"row {row}: the soft prompt's slot [{offset}, {offset + count}) runs past the sequence ({embeds.shape[1]})")
        rows.append(torch.cat([embeds[row, :offset], soft_prompt.to(embeds.dtype), embeds[row, offset + count :]]))
    return torch.stack(rows)


def whole_sequences(batch, prefix=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(token_ids, mask, soft offsets) [b, p + t] of the whole inputs: the shared prefix (if any) in front of each
    row's own left-padded part, the soft prompt's offset counted from the start. The padding then sits between
    the prefix and a row's own tokens, which the mask and the positions from it take care of."""
    if prefix is None:
        return np.asarray(batch.token_ids), np.asarray(batch.attention_mask), np.asarray(batch.soft_offsets)
    prefix_ids, prefix_offset = prefix.tokens, int(prefix.soft_offset)
    rows = len(batch.token_ids)
    token_ids = np.concatenate([np.broadcast_to(prefix_ids, (rows, len(prefix_ids))), batch.token_ids], axis=1)
    mask = np.concatenate([np.ones((rows, len(prefix_ids)), np.int32), batch.attention_mask], axis=1)
    row_offsets = np.asarray(batch.soft_offsets)
    offsets = np.full(rows, prefix_offset) if prefix_offset >= 0 else np.where(row_offsets >= 0, len(prefix_ids) + row_offsets, -1)
    return token_ids, mask, offsets


def soft_prompt_states(model, soft_prompt, batch, prefix=None) -> Any:
    """[b, h] final-norm states at the last position of each whole input (see `whole_sequences`), soft prompt in its slot."""
    import torch

    ids, mask, offsets = whole_sequences(batch, prefix)
    token_ids = _tensor(ids, torch.long, model.device)
    mask = _tensor(mask, torch.long, model.device)
    embeds = soft_prompt_embeddings(model, soft_prompt, token_ids, _tensor(offsets, torch.long))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    return out.last_hidden_state[:, -1]


def _weighted_mean(values, weights):
    return (values * weights).sum() / weights.sum().clamp(min=1.0)


def opening_log_probs(model, soft_prompt, batch, prefix, openings: list[list[int]]) -> Any:
    """[b, n] float64 log p(opening j | whole input i): each whole input run once per opening, the opening appended."""
    import torch

    ids, mask, offsets = whole_sequences(batch, prefix)
    length, columns = ids.shape[1], []
    for opening in openings:
        extended = _tensor(np.concatenate([ids, np.broadcast_to(np.asarray(opening), (len(ids), len(opening)))], axis=1), torch.long, model.device)
        extended_mask = _tensor(np.concatenate([mask, np.ones((len(ids), len(opening)), mask.dtype)], axis=1), torch.long, model.device)
        embeds = soft_prompt_embeddings(model, soft_prompt, extended, _tensor(offsets, torch.long))
        logits = model(inputs_embeds=embeds, attention_mask=extended_mask, position_ids=position_ids(extended_mask), use_cache=False).logits
        log_p = torch.log_softmax(logits.double(), dim=-1)
        columns.append(sum(log_p[:, length - 1 + i, token] for i, token in enumerate(opening)))
    return torch.stack(columns, dim=1)


def reply_nll_per_token(model, soft_prompt, batch, prefix) -> Any:
    """[b] float64 mean NLL per token of each row's reply (`batch.reply_ids`, right-padded, `reply_mask`) appended to
    its whole input; 0 for a row without one."""
    import torch

    ids, mask, offsets = whole_sequences(batch, prefix)
    reply_ids, reply_mask = np.asarray(batch.reply_ids), np.asarray(batch.reply_mask)
    extended = _tensor(np.concatenate([ids, reply_ids], axis=1), torch.long, model.device)
    extended_mask = _tensor(np.concatenate([mask, reply_mask.astype(mask.dtype)], axis=1), torch.long, model.device)
    embeds = soft_prompt_embeddings(model, soft_prompt, extended, _tensor(offsets, torch.long))
    logits = model(inputs_embeds=embeds, attention_mask=extended_mask, position_ids=position_ids(extended_mask), use_cache=False).logits
    log_p = torch.log_softmax(logits.double(), dim=-1)[:, ids.shape[1] - 1 : -1]  # position j predicts token j + 1
    picked = torch.gather(log_p, 2, _tensor(reply_ids, torch.long, model.device)[..., None])[..., 0]
    scored = _tensor(reply_mask, torch.float64, model.device)
    return -(picked * scored).sum(dim=1) / scored.sum(dim=1).clamp(min=1.0)


def torch_dro_loss(
    model, soft_prompt, batch, anchors: AnchorSpace | TorchAnchors, weights: LossWeights = LossWeights(), prefix=None,
    refusal_score: str = "probe", readout: OpeningReadout | None = None,
):
    """(total loss tensor, metrics dict of tensors) with the same terms and names as `dro_jax.dro.loss.dro_loss`.

    `batch` is a `QueryBatch` (or anything with its fields) of numpy arrays, the rows' own parts after
    `prefix` (the training set's `SharedPrefix`, or None);
    `soft_prompt` a torch tensor [N, h], usually a leaf that requires grad; `readout` (numpy, from
    `OpeningReadout.of`) is needed by the `head` and `openings` refusal scores.
    """
    import torch
    import torch.nn.functional as F

    check_refusal_score(refusal_score)
    device = model.device
    space = torch_anchors(anchors, device=device)
    kind = space.basis.dtype
    states = soft_prompt_states(model, soft_prompt, batch, prefix)
    new = states.to(kind)
    base = _tensor(batch.base_states, kind, device)
    z_new = (new - space.mean) @ space.basis  # [b, h], full coordinates
    z_base = (base - space.mean) @ space.basis
    k = space.num_components
    refusal_shift = (z_new[:, :k] @ space.refusal_weight + space.refusal_bias) - (z_base[:, :k] @ space.refusal_weight + space.refusal_bias)
    harm_shift = (z_new[:, :k] @ space.harmfulness_weight + space.harmfulness_bias) - (
        z_base[:, :k] @ space.harmfulness_weight + space.harmfulness_bias
    )
    target = _tensor(batch.harmless, kind, device)
    row_weights = _tensor(batch.weights, kind, device)
    terms = {
        "refusal": _weighted_mean(F.binary_cross_entropy_with_logits(refusal_shift, target, reduction="none"), row_weights),
        "harmfulness": _weighted_mean(F.binary_cross_entropy_with_logits(harm_shift, target, reduction="none"), row_weights),
        "norm": _weighted_mean(((z_new[:, k:] - z_base[:, k:]) ** 2).mean(dim=1), row_weights),
    }
    head = model.get_output_embeddings()
    new_log_p = torch.log_softmax(head(states).double(), dim=-1)
    reference_log_p = torch.log_softmax(head(_tensor(batch.reference_states, states.dtype, device)).double(), dim=-1)
    kl = (reference_log_p.exp() * (reference_log_p - new_log_p)).sum(dim=1)
    terms["preserve"] = _weighted_mean(kl, row_weights * target)
    terms["replies"] = torch.zeros((), dtype=kind, device=device)
    if weights.replies > 0:  # computed only when weighted, as in the JAX loss
        has_reply = _tensor(np.asarray(batch.reply_mask).sum(axis=1) > 0, kind, device)
        terms["replies"] = _weighted_mean(reply_nll_per_token(model, soft_prompt, batch, prefix).to(kind), row_weights * target * has_reply)
    behaviour = {}
    if refusal_score != "probe":
        def first_token(log_p):
            return (torch.logsumexp(log_p[:, _tensor(readout.refusal_first, device=device)], dim=1)
                    - torch.logsumexp(log_p[:, _tensor(readout.compliant_first, device=device)], dim=1))

        if refusal_score == "head":
            log_odds, reference = first_token(new_log_p), first_token(reference_log_p)
        else:
            log_p = opening_log_probs(model, soft_prompt, batch, prefix, readout.tree.openings())
            refusal = _tensor(readout.is_refusal, torch.bool, device)
            log_odds = torch.logsumexp(log_p[:, refusal], dim=1) - torch.logsumexp(log_p[:, ~refusal], dim=1)
            reference = _tensor(batch.reference_log_odds, kind, device)
        # Harmful rows: towards refusal; harmless rows: below their log-odds with no safety prompt.
        compliance = torch.where(target > 0, reference - log_odds, -log_odds)
        terms["refusal"] = _weighted_mean(F.binary_cross_entropy_with_logits(compliance, target, reduction="none"), row_weights)
        behaviour = {
            "refusal_log_odds_harmful": _weighted_mean(log_odds, row_weights * (1 - target)),
            "refusal_log_odds_harmless": _weighted_mean(log_odds, row_weights * target),
        }
    if set(terms) != set(LossWeights.terms()):
        raise NotImplementedError(f"the PyTorch twin computes {sorted(terms)}, the DRO loss has {sorted(LossWeights.terms())}")
    total = weights.combine(terms)
    metrics = {
        "loss": total,
        **terms,
        "compliance_shift_harmful": _weighted_mean(refusal_shift, row_weights * (1 - target)),
        "compliance_shift_harmless": _weighted_mean(refusal_shift, row_weights * target),
        **behaviour,
    }
    return total, metrics


def make_torch_optimizer(soft_prompt, learning_rate: float = 1e-3, weight_decay: float = 0.01):
    """torch.optim.AdamW over the soft prompt alone (defaults of `dro_jax.dro.train.TrainConfig`)."""
    import torch

    return torch.optim.AdamW([soft_prompt], lr=learning_rate, weight_decay=weight_decay)


def apply_gradients(soft_prompt, optimizer, clip_norm: float = 1.0) -> float:
    """clip_grad_norm_ on the soft prompt's .grad, then the optimizer's step; returns the norm before clipping."""
    import torch

    grad_norm = torch.nn.utils.clip_grad_norm_([soft_prompt], clip_norm)
    optimizer.step()
    return float(grad_norm)


def torch_train_step(
    model, soft_prompt, optimizer, batch, anchors: AnchorSpace | TorchAnchors, weights: LossWeights = LossWeights(),
    clip_norm: float = 1.0, prefix=None,
) -> dict[str, float]:
    """One step in place on `soft_prompt` (an nn.Parameter): loss, backward, clip, AdamW; returns float metrics.

    The model must be frozen (`freeze`): a parameter that requires grad would
    get a weight gradient every step, which the JAX step never forms.
    """
    if any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model's parameters must have requires_grad=False (call freeze(model))")
    optimizer.zero_grad(set_to_none=True)
    total, metrics = torch_dro_loss(model, soft_prompt, batch, anchors, weights, prefix)
    total.backward()
    out = {name: float(value.detach()) for name, value in metrics.items()}
    out["grad_norm"] = apply_gradients(soft_prompt, optimizer, clip_norm)
    return out
