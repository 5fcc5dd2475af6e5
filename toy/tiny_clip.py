"""toy/tiny_clip.py: the toy world's tiny CLIP, pre-trained from scratch on captioned generated images
(contrastive, like CLIP's web data), and its report (zero-shot accuracy, retrieval precision from the
hidden labels). Library file, no side effects at import; toy.py drives it.

    python toy.py            # pre-trains toy_out/tiny_clip.pt through pretrain_clip
"""
if __name__ == "__main__":  # a library file: say what it is rather than fail on the imports below
    raise SystemExit(print(__doc__))
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import clip_model
import common
from categories import TEMPLATES
from toy.world import CATEGORIES, SIZE, caption_batch

def tiny_clip(context_length=16):
    """A CLIP small enough to pre-train on 2 CPU cores in minutes. The text context is 16 tokens
    (our captions are short); clip_model.build_model reads it back from the tensor shapes."""
    return clip_model.CLIP(embed_dim=128, image_resolution=SIZE, vision_layers=4, vision_width=128,
                           vision_patch_size=8, context_length=context_length, vocab_size=49408,
                           transformer_width=128, transformer_heads=2, transformer_layers=3)


def to_clip_input(imgs):
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (CLIP's own preprocess at 64 px)."""
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255  # [B, S, S, 3] -> [B, 3, S, S]
    mean, std = torch.tensor(common.CLIP_MEAN), torch.tensor(common.CLIP_STD)
    return (x - mean[:, None, None]) / std[:, None, None]


def pretrain_clip(path, seed, steps, batch_size=128, lr=1e-3, warmup=30, log_seconds=20.0, save_every=50):
    """Contrastive pre-training (symmetric InfoNCE, learned temperature) on freshly generated
    captioned images, like CLIP's web data; saved as a plain state dict (clip_model.load reads it).
    Every `save_every` steps the whole state (weights, optimizer, both RNGs) goes to PATH.resume.pt,
    so a killed run continues exactly where it stopped when rerun with the same arguments."""
    torch.manual_seed(seed)
    model = tiny_clip().train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng([seed, 1])  # stream (a)
    resume, args = path + ".resume.pt", dict(seed=seed, steps=steps, batch_size=batch_size, lr=lr, warmup=warmup)
    start = _load_clip_state(resume, args, model, opt, rng)
    labels = torch.arange(batch_size)
    t0 = last = time.time()
    for step in range(start, steps):
        # linear warm-up then cosine decay to zero
        # (a Python float, not numpy's: it goes into the optimizer state that the resume file saves)
        f = (step + 1) / warmup if step < warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * f
        imgs, caps = caption_batch(rng, batch_size)
        tokens = clip_model.tokenize(caps, context_length=model.context_length, truncate=True)
        logits_i, logits_t = model(to_clip_input(imgs), tokens)
        loss = (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # CLIP's cap on the temperature
        if step == start or step == steps - 1 or time.time() - last > log_seconds:  # by time: steps vary 10x with load
            last, el, done = time.time(), time.time() - t0, step + 1 - start
            print(f"  clip step {step:4d}/{steps} loss {loss.item():.3f} scale {model.logit_scale.exp().item():5.1f} "
                  f"{el / done:.2f} s/step, ETA {el / done * (steps - step - 1):.0f} s", flush=True)
        if (step + 1) % save_every == 0 and step + 1 < steps:
            common.save_torch({"args": args, "step": step + 1, "model": model.state_dict(), "opt": opt.state_dict(),
                               "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}, resume)
    common.save_torch(model.state_dict(), path)
    if os.path.exists(resume):
        os.remove(resume)


def _load_clip_state(resume, args, model, opt, rng):
    """Restore an interrupted pre-training saved with the same arguments; returns the step to start
    from (0 when there is none, or it was made with other arguments)."""
    if not os.path.isfile(resume):
        return 0
    ck = common.torch_load(resume, "tiny-CLIP resume file")
    if ck.get("args") != args:
        print(f"  {resume} was made with other settings: starting over")
        return 0
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    rng.bit_generator.state = ck["rng"]
    torch.set_rng_state(ck["torch_rng"])
    print(f"  resumed tiny-CLIP pre-training at step {ck['step']} from {resume}")
    return ck["step"]


def load_index(world_dir):
    """The index pool as uint8 [N, S, S, 3] with its hidden labels (reporting only)."""
    hidden = json.load(open(os.path.join(world_dir, "hidden", "index_labels.json")))
    imgs = np.stack([np.asarray(common.load_rgb(os.path.join(world_dir, "index", f))) for f in hidden["files"]])
    return imgs, np.array(hidden["labels"]), hidden["files"]


def clip_report(path, world_dir, k=50):
    """Zero-shot accuracy over the ten categories (85-template prompts, as the retrieval stage uses)
    and retrieval precision@k on the index pool, both from the hidden labels."""
    model, _ = clip_model.load(path)  # the same loader every stage uses
    imgs, labels, _ = load_index(world_dir)
    with torch.no_grad():
        emb = torch.cat([model.encode_image(to_clip_input(imgs[i:i + 256])) for i in range(0, len(imgs), 256)])
        emb = torch.nn.functional.normalize(emb, dim=-1)
        txt = clip_model.text_embeddings(model, CATEGORIES, templates=TEMPLATES)
        bg = clip_model.text_embeddings(model, ["background"] + CATEGORIES, templates=None)
    sim = (emb @ txt.T).numpy()  # [N, K]
    acc = float((sim.argmax(1) == labels).mean())
    top = np.argsort(-sim, axis=0, kind="stable")[:k]  # [k, K]
    prec = float(np.mean([(labels[top[:, c]] == c).mean() for c in range(len(CATEGORIES))]))
    # how distinct "background" is from the categories (the MaskCLIP baseline needs it)
    bg_cos = float((bg[0] @ bg[1:].T).max())
    return {"clip_zero_shot": acc, f"clip_precision@{k}": prec, "clip_background_max_cos": bg_cos}
