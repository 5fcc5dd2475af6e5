"""Drawing of predictions for people to look at: VOC's colour palette, label-map overlays, integer zoom,
legend strips, and the titled image | ground truth | semantic | instances panels evaluate.py writes to
vis/ and returns from Segmenter.draw (and <stem>_semantic.png / <stem>_instances.png with --images). The
toy report draws with these too.
References: the PASCAL VOC devkit's colour map (labelcolormap: label bits spread over R, G, B).
"""
import functools

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import common


@functools.lru_cache(maxsize=None)
def _font():
    """Pillow's scalable default font where FreeType is available (smoother than the bitmap fallback)."""
    try:
        return ImageFont.load_default(size=10)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def palette(n):
    """VOC's colour map (bits of the label spread over R, G, B from the top bit down), any n."""
    pal = np.zeros((n, 3), np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal[i] = (r, g, b)
    return pal


def overlay(img, label_map, colours, alpha=0.55, ignore=None):
    """Blend a label map [H, W] (0 = background, left unpainted) over an image [H, W, 3]."""
    out = img.astype(np.float32).copy()
    m = label_map > 0
    if ignore is not None:
        m &= label_map != ignore
    out[m] = (1 - alpha) * out[m] + alpha * colours[np.clip(label_map[m], 0, len(colours) - 1)]
    return out.astype(np.uint8)


def with_legend(img, entries, cols=1):
    """Append a legend strip below an image: entries = [(rgb, text)], a swatch each, filled row by
    row into `cols` equal columns (rgb None: text only)."""
    rows, cw = -(-max(1, len(entries)) // cols), img.shape[1] // cols
    strip = Image.new("RGB", (img.shape[1], 12 * rows + 4), (255, 255, 255))
    d = ImageDraw.Draw(strip)
    for k, (rgb, text) in enumerate(entries):
        x, y = 2 + cw * (k % cols), 2 + 12 * (k // cols)
        if rgb is not None:
            d.rectangle([x, y, x + 9, y + 9], fill=tuple(int(v) for v in rgb))
        # both of Pillow's default fonts draw a space barely a pixel wide: two keep words apart
        d.text((x + (13 if rgb is not None else 0), y - 1), text.replace(" ", "  "), fill=(0, 0, 0), font=_font())
    return np.concatenate([img, np.asarray(strip)], axis=0)


def zoom(a, f, hw_axes=(0, 1)):
    """Nearest-neighbour upscaling by an integer factor, so legends stay readable on tiny images."""
    return a if f == 1 else a.repeat(f, axis=hw_axes[0]).repeat(f, axis=hw_axes[1])


def render_semantic(img, sem, names, ignore=None):
    f = max(1, -(-192 // img.shape[1]))
    pal = palette(max(len(names), 256))
    present = [int(c) for c in np.unique(sem) if 0 < c < len(names)]
    return with_legend(overlay(zoom(img, f), zoom(sem, f), pal, ignore=ignore), [(pal[c], names[c]) for c in present])


def render_instances(img, p, names):
    f = max(1, -(-192 // img.shape[1]))
    pal = palette(len(p["labels"]) + 2)[1:]
    lab = np.zeros(img.shape[:2], np.int64)
    for i in np.argsort(p["scores"].numpy()):  # best last, drawn on top
        lab[p["masks"][i].numpy()] = i + 1
    entries = [(pal[i + 1], f"{names[l]} {s:.2f}") for i, (l, s) in enumerate(zip(p["labels"].tolist(), p["scores"].tolist()))]
    return with_legend(overlay(zoom(img, f), zoom(lab, f), pal), entries[:20])


def panels(img, gt, p, names, ignore=None):
    """image | ground truth (None: no panel) | semantic prediction | instances, each titled and with its
    legend -> uint8 [H', W', 3]."""
    f = max(1, -(-192 // img.shape[1]))
    panels = [("image", zoom(img, f))] + ([("ground truth", render_semantic(img, gt, names, ignore))] if gt is not None else [])
    panels.append(("semantic", render_semantic(img, p["semantic"].numpy(), names)))
    if "masks" in p:
        panels.append(("instances", render_instances(img, p, names)))
    panels = [np.concatenate([with_legend(np.zeros((0, q.shape[1], 3), np.uint8), [(None, t)]), q]) for t, q in panels]
    h = max(q.shape[0] for q in panels)
    panels = [np.pad(q, ((0, h - q.shape[0]), (0, 4), (0, 0)), constant_values=255) for q in panels]
    return np.concatenate(panels, axis=1)


def save_vis(path, img, gt, p, names, ignore):
    common.save_image(panels(img, gt, p, names, ignore), path)


if __name__ == "__main__":
    common.library_main(__doc__, "evaluate.py draws its vis/ panels and --images overlays with it (python "
                                 "evaluate.py --help).")
