"""The segmenters evaluate.py runs: one call maps a normalised image to a prediction dict.

    ZutisSegmenter       a model.py ZUTIS network (a train.py or official checkpoint)
    MaskCLIPSegmenter    the training-free MaskCLIP baseline on a clip_model.py CLIP
    component_instances  connected components of a semantic map as scored instance masks

Both segmenters share the interface evaluate.py's benchmark loop, --images demo and --throughput
(and toy.py's sheet) rely on: `kind`, `norm` (the input normalisation evaluate.to_input applies),
`device`, `categories`, `set_categories(names)`, and seg(x [1, 3, h, w], (H, W), instances=True)
-> {"semantic": [H, W]} plus, with instances, "masks" [N, H, W], "labels" [N], "scores" [N], all
on the CPU.

Library only; importing it does no work (model.py, clip_model.py and scipy load on first use).
evaluate.py re-exports these names, so `evaluate.ZutisSegmenter` and the like keep working.
Tests: `python -m pytest -q test_evaluate.py`.
References: MaskCLIP (Zhou et al. 2022) for the baseline; paper Table 3 for its instances.
"""
import numpy as np
import torch
import torch.nn.functional as F

import categories


class ZutisSegmenter:
    """model.py's ZUTIS behind one call: (x [1, 3, h, w] normalised, original (H, W)) -> dict with
    semantic [H, W] and, if asked, masks [N, H, W], labels [N], scores [N] (all on the CPU). Logits
    and mask probabilities are upsampled to the original size (the ImageNet-S rule for capped inputs)."""
    kind = "zutis"

    def __init__(self, model, norm="imagenet", t=0.5, nms="hard", nms_iou=0.3, class_prob="sigmoid"):
        self.model, self.norm = model.eval(), norm
        self.device = next(model.parameters()).device
        self.kw = dict(t=t, nms=nms, nms_iou=nms_iou, class_prob=class_prob)
        self._cache = {}

    @property
    def categories(self):
        return list(self.model.categories)

    def set_categories(self, names):
        """Re-embed only on a new list; CUB's breed mode revisits lists, so embeddings are cached."""
        names = list(names)
        if names == self.categories:
            return
        key = tuple(names)
        if key in self._cache:
            self.model.text_emb, self.model.categories = self._cache[key].to(self.device), names
        else:
            self.model.set_categories(names)
            self._cache[key] = self.model.text_emb.detach().cpu()

    @torch.no_grad()
    def __call__(self, x, out_size, instances=True):
        import model as M
        if not instances:
            return {"semantic": M.predict_semantic(self.model, x, size=out_size).cpu()}
        return {k: v.cpu() for k, v in M.predict(self.model, x, size=out_size, **self.kw).items()}


class MaskCLIPSegmenter:
    """Training-free MaskCLIP (Zhou et al. 2022): value-path dense CLIP features, cosine with the
    85-template text embeddings, "background" a text class like any other. Instances (the paper's
    Table 3 baseline) are the connected components of each predicted class, scored by the mean
    softmax probability (CLIP's own temperature) of that class inside the component."""
    kind = "maskclip"

    def __init__(self, clip, categories, norm="clip", max_instances=100, proposals="components"):
        self.clip, self.norm, self.max_instances, self.proposals = clip.eval(), norm, max_instances, proposals
        self.scale = clip.logit_scale.detach().exp().item()
        self.device = next(clip.parameters()).device
        self._cache, self.categories = {}, []
        self.set_categories(categories)

    def set_categories(self, names):
        import clip_model
        key = tuple(names)
        if key not in self._cache:  # CUB breed mode switches names per image: embed each list once
            self._cache[key] = clip_model.text_embeddings(self.clip, list(names), categories.TEMPLATES)
        self.text, self.categories = self._cache[key], list(names)

    @torch.no_grad()
    def __call__(self, x, out_size, instances=True):
        p = self.clip.visual.patch_size
        H, W = x.shape[-2:]
        size = (max(1, round(H / p)) * p, max(1, round(W / p)) * p)
        if size != (H, W):  # forward_maskclip needs multiples of the patch size
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        f = F.normalize(self.clip.visual.forward_maskclip(x).float(), dim=-1)  # [1, h, w, D]
        logits = torch.einsum("bhwd,kd->bkhw", f, self.text.to(f))  # cosines [1, K, h, w]
        logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)[0]  # [K, H, W]
        sem = logits.argmax(0)
        out = {"semantic": sem.cpu()}
        if instances:
            # p(class | pixel) without a [K, H, W] softmax copy: exp(s*l_c - logsumexp_k(s*l_k))
            lse = torch.logsumexp(logits * self.scale, dim=0)  # [H, W]
            out.update(component_instances(sem, lambda c: torch.exp(logits[c] * self.scale - lse).cpu().numpy(),
                                           self.max_instances, whole_class=self.proposals == "classes"))
        return out


def component_instances(sem, prob_of, max_n=100, whole_class=False):
    """Connected components (8-connectivity) of every non-background class of `sem` [H, W] as
    instances, scored by the mean of prob_of(c) [H, W] over the component; the best max_n kept.
    whole_class: one proposal per predicted class instead (the paper's literal "semantic masks as
    mask proposals")."""
    from scipy import ndimage
    s = sem.cpu().numpy()
    cand = []  # (score, class, component labels, component index)
    for c in np.unique(s):
        if c == 0:
            continue
        lab, n = ((s == c).astype(np.int32), 1) if whole_class else ndimage.label(s == c, structure=np.ones((3, 3)))
        scores = ndimage.mean(prob_of(int(c)), labels=lab, index=np.arange(1, n + 1))
        cand += [(float(sc), int(c), lab, i + 1) for i, sc in enumerate(np.atleast_1d(scores))]
    cand = sorted(cand, key=lambda z: -z[0])[:max_n]
    H, W = s.shape
    masks = torch.from_numpy(np.stack([lab == i for _, _, lab, i in cand])) if cand else torch.zeros((0, H, W), dtype=torch.bool)
    return {"masks": masks, "labels": torch.tensor([c for _, c, _, _ in cand], dtype=torch.long),
            "scores": torch.tensor([sc for sc, _, _, _ in cand], dtype=torch.float)}
