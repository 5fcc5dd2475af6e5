"""The ZUTIS training loss: one-to-one Hungarian matching of the class-agnostic queries to the target
masks (dice + BCE cost, scipy's linear_sum_assignment), the matched mask loss summed over decoder layers,
and the semantic cross-entropy of the patch tokens against the text embeddings.

    losses = criterion(model(images), batch)     # {"loss", "loss_ce", "loss_mask", "loss_dice", ...}

Importing this file does no work. Tests: `python -m pytest -q test_model.py` (CPU, tiny random CLIP).
The timing of this loss against the official formulation, inside a full training step, is `benchmark`
below, run by `python model.py --benchmark`.

References: Shin, Albanie, Xie, "Zero-shot Unsupervised Transfer Instance Segmentation" (CVPRW 2023),
section 3.3; behaviour of the official code (github.com/NoelShin/zutis criterion.py) as recorded in
shared/reference/zutis_facts.md section 6; DETR (Hungarian matcher layout, kept in its own file as
DETR's models/matcher.py). Written from those descriptions; no code copied.
"""
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from common import UserError


# ----------------------------------------------------------------------------- matching and losses

class _BCELogs(torch.autograd.Function):
    """(log p, log(1 - p)), each clamped at -100 as F.binary_cross_entropy does. The gradient uses
    1 / max(x, 1e-12) (torch's BCE epsilon), so saturated probabilities give no inf * 0 = NaN."""

    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return torch.log(p).clamp(min=-100), torch.log(1 - p).clamp(min=-100)

    @staticmethod
    def backward(ctx, g_log_p, g_log_1mp):
        p, = ctx.saved_tensors
        return g_log_p / p.clamp(min=1e-12) - g_log_1mp / (1 - p).clamp(min=1e-12)


def pairwise_dice_bce(probs, gt):
    """The official costs between every predicted and every target mask, by matrix products (never a
    Q x N x P tensor). probs [..., Q, P] in [0, 1]; gt [N, P] in {0, 1} -> dice, bce [..., Q, N] fp32:
      dice = 1 - (2 p.g + 1) / (sum p + sum g + 1)                (smoothing 1, full masks)
      bce  = -(log p . g + log(1 - p) . (1 - g)) / P              (= F.binary_cross_entropy, mean over pixels)"""
    with torch.autocast(probs.device.type, enabled=False):
        p, gT = probs.float(), gt.float().t()  # gT: [P, N]
        dice = 1 - (2 * (p @ gT) + 1) / (p.sum(-1, keepdim=True) + gT.sum(0) + 1)
        log_p, log_1mp = _BCELogs.apply(p)
        bce = -(log_p @ gT + log_1mp @ (1 - gT)) / p.shape[-1]
    return dice, bce


class HungarianMatcher:
    """One-to-one matching of class-agnostic queries to target masks (DETR layout, official costs):
    cost = w_dice * dice + w_bce * bce (no class term), solved by scipy's linear_sum_assignment."""

    def __init__(self, w_dice=1.0, w_bce=1.0):
        assert w_dice != 0 or w_bce != 0, "all matching costs are zero"
        self.w_dice, self.w_bce = w_dice, w_bce

    def cost(self, probs, gt):
        """probs [..., Q, P], gt [N, P] -> (cost, dice, bce), each [..., Q, N] fp32, differentiable."""
        dice, bce = pairwise_dice_bce(probs, gt)
        return self.w_dice * dice + self.w_bce * bce, dice, bce

    @staticmethod
    def assign(cost):
        """cost [..., Q, N] -> one (query_idx, target_idx) int64 pair per leading index, each with
        min(Q, N) entries. One device->host copy for all of them."""
        c = cost.detach().float().cpu()
        assert torch.isfinite(c).all(), f"non-finite matching cost (min {c.min()}, max {c.max()})"
        out = []
        for m in c.reshape(-1, *c.shape[-2:]).numpy():  # [..., Q, N] -> [M, Q, N]
            q, t = linear_sum_assignment(m)
            out.append((torch.as_tensor(q, dtype=torch.int64), torch.as_tensor(t, dtype=torch.int64)))
        return out

    @torch.no_grad()
    def __call__(self, probs, gt):
        """probs [Q, P] or [L, Q, P] probabilities, gt [N, P] -> list of (query_idx, target_idx)."""
        return self.assign(self.cost(probs, gt)[0])


def semantic_ce(tokens, semantic, text_emb, logit_scale=1.0, ignore_index=255):
    """Cross-entropy of logit_scale * cos(text, token) at the label size. The official code upsamples
    the tokens then takes dot products; upsampling the K logits instead is the same linear map, cheaper."""
    K = text_emb.shape[0]
    logits = logit_scale * torch.einsum("kc,bhwc->bkhw", text_emb.float(), tokens.float())  # [B, K, 2h, 2w]
    logits = F.interpolate(logits, size=semantic.shape[-2:], mode="bilinear", align_corners=False)  # [B, K, H, W]
    target = semantic.to(logits.device).long()
    valid = target != ignore_index
    if ((target[valid] < 0) | (target[valid] >= K)).any():
        raise ValueError(f"semantic labels outside [0, {K}) and != ignore_index {ignore_index}")
    if not valid.any():
        return logits.sum() * 0  # F.cross_entropy would return NaN on an all-ignored batch
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def mask_losses(mask_logits, instance_masks, matcher):
    """Official mask loss: per image with any target pixel, per decoder layer, sigmoid proposals are
    upsampled (bilinear, as probabilities) to the target size, matched, and the matched costs summed.
    Returns (per-layer sums [L], dice sum, bce sum, number of target masks used)."""
    B, L = mask_logits.shape[:2]
    zero = mask_logits.float().sum() * 0  # keeps the decoder in the graph when nothing is matched (DDP)
    layers, dice_sum, bce_sum, n_masks = [zero] * L, 0.0, 0.0, 0
    for b in range(B):
        gt = instance_masks[b]
        if gt.numel() == 0 or not gt.any():
            continue  # the official code skips images whose instance masks are all empty
        g = gt.to(mask_logits.device, torch.float32).flatten(1)  # [N, H, W] -> [N, H*W]
        p = F.interpolate(mask_logits[b].float().sigmoid(), size=gt.shape[-2:], mode="bilinear",
                          align_corners=False).flatten(2)  # [L, Q, 2h, 2w] -> [L, Q, H*W]
        cost, dice, bce = matcher.cost(p, g)  # [L, Q, N]
        for l, (qi, ti) in enumerate(matcher.assign(cost)):
            qi, ti = qi.to(cost.device), ti.to(cost.device)
            layers[l] = layers[l] + cost[l, qi, ti].sum()  # the matched cost itself is the loss (official)
            dice_sum = dice_sum + dice[l, qi, ti].detach().sum()
            bce_sum = bce_sum + bce[l, qi, ti].detach().sum()
        n_masks += g.shape[0]
    return layers, dice_sum, bce_sum, n_masks


def criterion(outputs, batch, text_emb=None, logit_scale=None, lambda_mask=1.0, lambda_ce=1.0,
              ignore_index=255, loss_norm="official", matcher=None):
    """ZUTIS loss = lambda_ce * CE(semantic) + lambda_mask * sum over decoder layers of matched dice+BCE.

    outputs: ZUTIS.forward's dict (text_emb / logit_scale default to the ones it carries).
    batch: {"semantic": long [B, H, W] (ignore_index allowed), "instance_masks": list of bool [n_b, H, W]}.
    loss_norm "official": mask loss summed over matched pairs and layers, divided by the batch size;
    "num_masks": divided by the number of target masks (all-reduced over ranks, >= 1), as Mask2Former.
    Returns fp32 scalars: loss, loss_ce, loss_mask (with grad) and detached loss_dice, loss_bce,
    loss_mask_{l} (per layer, normalised like loss_mask)."""
    if loss_norm not in ("official", "num_masks"):
        raise UserError(f"loss_norm must be 'official' or 'num_masks', got {loss_norm!r}")
    text_emb = outputs["text_emb"] if text_emb is None else text_emb
    logit_scale = outputs.get("logit_scale", 1.0) if logit_scale is None else logit_scale
    mask_logits = outputs["mask_logits"]
    with torch.autocast(mask_logits.device.type, enabled=False):
        loss_ce = semantic_ce(outputs["patch_tokens"], batch["semantic"], text_emb, logit_scale, ignore_index)
        matcher = matcher or HungarianMatcher()
        layers, dice_sum, bce_sum, n_masks = mask_losses(mask_logits, batch["instance_masks"], matcher)
        if loss_norm == "official":
            denom = float(mask_logits.shape[0])
        else:
            n = torch.tensor(float(n_masks), device=mask_logits.device)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(n)
                n = n / torch.distributed.get_world_size()  # DDP averages gradients over ranks
            denom = n.clamp(min=1.0)
        layers = [x / denom for x in layers]
        loss_mask = torch.stack(layers).sum()
        out = {"loss": lambda_ce * loss_ce + lambda_mask * loss_mask, "loss_ce": loss_ce, "loss_mask": loss_mask,
               "loss_dice": torch.as_tensor(dice_sum / denom).detach().float(),
               "loss_bce": torch.as_tensor(bce_sum / denom).detach().float()}
        out.update({f"loss_mask_{l}": x.detach() for l, x in enumerate(layers)})
    return out


# ----------------------------------------------------------------------------- benchmark

def _official_form_mask_loss(mask_logits, instance_masks):
    """The official criterion's formulation (BCE on n x Q repeated copies, one scipy call per layer),
    kept only to time it against ours: python model.py --benchmark."""
    total = 0.0
    for probs, gt in zip(mask_logits.float().sigmoid(), instance_masks):
        g = gt.float().flatten(1)  # [N, P]
        p = F.interpolate(probs, size=gt.shape[-2:], mode="bilinear", align_corners=False).flatten(2)
        for pl in p:  # [Q, P]
            dice = 1 - (2 * pl @ g.t() + 1) / (pl.sum(-1)[:, None] + g.sum(-1)[None] + 1)
            bce = F.binary_cross_entropy(pl[:, None].expand(-1, len(g), -1), g[None].expand(len(pl), -1, -1),
                                         reduction="none").mean(-1)  # [Q, N, P] -> [Q, N]
            cost = (dice + bce).t()
            r, c = linear_sum_assignment(cost.detach().cpu().numpy())
            total = total + cost[r, c].sum()
    return total / len(instance_masks)


def benchmark(arch, batch_size, crop, n_inst, iters, device, dtype):
    import time

    import clip_model
    from model import ZUTIS  # not at the top: model.py imports this file
    clip = clip_model.random_model(arch)  # random weights of the released shapes: no download
    model = ZUTIS(arch, ["background", "a", "b"], clip=clip).to(device)
    x = torch.randn(batch_size, 3, crop, crop, device=device)
    batch = {"semantic": torch.randint(0, 3, (batch_size, crop, crop), device=device),
             "instance_masks": [torch.rand(n_inst, crop, crop, device=device) > 0.5 for _ in range(batch_size)]}
    ctx = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(fn):
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            r = fn()
        sync()
        return (time.perf_counter() - t0) / iters * 1e3, r

    with ctx:
        t_enc, _ = timed(lambda: model.encoder.forward_dense(x))
        t_fwd, out = timed(lambda: model(x))
        t_loss, losses = timed(lambda: criterion(out, batch))
        t_off, _ = timed(lambda: _official_form_mask_loss(out["mask_logits"], batch["instance_masks"]))
    t_bwd, _ = timed(lambda: (criterion(model(x), batch)["loss"].backward(), model.zero_grad()))
    print(f"{arch} batch {batch_size} crop {crop} {n_inst} instances/image, {device}, {str(dtype)[6:]}, "
          f"{iters} iterations (ms): encoder {t_enc:.1f}, decoder+heads {t_fwd - t_enc:.1f}, criterion "
          f"{t_loss:.1f} (official formulation, mask loss only: {t_off:.1f}), forward+loss+backward {t_bwd:.1f}")
    if device.type == "cuda":
        print(f"peak memory {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB")
