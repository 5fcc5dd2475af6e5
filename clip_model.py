"""Our own CLIP (ViT image tower, text tower; the BPE tokenizer is in clip_tokenizer.py) that loads OpenAI's released
checkpoints with strict key matching. ZUTIS stands on it three times: retrieval (ViT-L/14@336px),
the segmenter's encoder (ViT-B/16, ViT-B/32) and the frozen text classifier.

Written here from the behaviour of OpenAI's CLIP (Radford et al. 2021; github.com/openai/CLIP is the
*format* reference: parameter names, tokenizer, URLs). Differences that do not change numbers:
batch-first tensors, attention through F.scaled_dot_product_attention, and two dense-feature paths
ZUTIS needs (`forward_dense`, `forward_maskclip`).

    model, preprocess = load("ViT-B/16")               # downloads to ~/.cache/clip, sha256-checked
    model, preprocess = load("path/to/ckpt.pt")         # TorchScript archive or plain state dict
    emb = text_embeddings(model, ["cat", "dog"])        # [2, 512], 85-template ensemble, unit norm

Benchmark (img/s of encode_image, ours vs the reference package on identical weights):
    python clip_model.py --benchmark               # CPU fp32, or CUDA with bf16/fp16 autocast
"""
import hashlib
import os
import time
import urllib.parse
import urllib.request
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from categories import TEMPLATES
from clip_tokenizer import Tokenizer, _tokenizer, tokenize  # noqa: F401  (re-exported: clip_model.tokenize)
from common import UserError, atomic_path

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The sha256 of each file is the second-to-last component of its URL (OpenAI's convention).
_BASE = "https://openaipublic.azureedge.net/clip/models"
_MODELS = {
    "ViT-B/32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def available_models():
    return list(_MODELS)


def arch_tag(name_or_path):
    """A filesystem-safe tag: 'ViT-L/14@336px' -> 'ViT-L-14-336px'; a file path -> its stem."""
    if name_or_path in _MODELS:
        return name_or_path.replace("/", "-").replace("@", "-")
    return os.path.splitext(os.path.basename(str(name_or_path)))[0]


# ----------------------------------------------------------------------------- download

def _file_ok(path, sha256=None, size=None):
    if size is not None and os.path.getsize(path) != size:
        return False
    return sha256 is None or sha256_of(path) == sha256


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download(url, root, sha256=None, size=None, filename=None):
    """Download `url` into `root` once: progress bar, atomic rename, checksum (sha256 and/or byte
    size) verified; a mismatching cached file is fetched again; a bad fresh download raises and
    leaves nothing behind. Under torchrun only rank 0 downloads; the others wait for the file."""
    from tqdm import tqdm
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, filename or os.path.basename(urllib.parse.urlparse(url).path))
    if int(os.environ.get("RANK", 0)) != 0:
        # Rank 0 writes atomically, so "exists and verifies" means "complete".
        for _ in range(7200):
            if os.path.isfile(path) and _file_ok(path, sha256, size):
                return path
            time.sleep(1.0)
        raise UserError(f"timed out waiting for rank 0 to download {url}")
    if os.path.isfile(path):
        if _file_ok(path, sha256, size):
            return path
        warnings.warn(f"{path} exists but does not match its checksum; downloading it again")
    try:
        with atomic_path(path) as tmp:
            with urllib.request.urlopen(url) as src, open(tmp, "wb") as dst:
                total = int(src.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024,
                          desc=os.path.basename(path)) as bar:
                    for block in iter(lambda: src.read(1 << 20), b""):
                        dst.write(block)
                        bar.update(len(block))
            got = sha256_of(tmp)
            print(f"downloaded {os.path.basename(path)}: {os.path.getsize(tmp)} bytes, sha256 {got}")
            if (sha256 is not None and got != sha256) or (size is not None and os.path.getsize(tmp) != size):
                raise UserError(f"checksum mismatch for {url}: expected sha256={sha256} size={size}, "
                                f"got sha256={got} size={os.path.getsize(tmp)}; nothing was kept")
    except OSError as e:
        raise UserError(f"could not download {url}: {e}") from None
    return path


# ----------------------------------------------------------------------------- model

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16 weights/activations stay stable."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (packed q/k/v
    `in_proj_weight` [3C, C], `out_proj`), computed by scaled_dot_product_attention."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x, causal=False):
        B, N, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, N, 3C]
        qkv = qkv.view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, nh, N, hs]
        y = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        y = y.transpose(1, 2).reshape(B, N, C)  # [B, nh, N, hs] -> [B, N, C]
        return self.out_proj(y)

    def value(self, x):
        """The value projection alone (MaskCLIP skips query-key mixing): [B, N, C] -> [B, N, C]."""
        C = x.shape[-1]
        return F.linear(x, self.in_proj_weight[2 * C:], self.in_proj_bias[2 * C:])


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x, n_blocks=None):
        for block in self.resblocks[:n_blocks]:
            x = block(x, self.causal)
        return x


def interpolate_pos_embed(pos, h, w, mode="bicubic"):
    """Resize a [1 + g*g, C] positional table to a (h, w) token grid -> [1 + h*w, C].

    "bicubic" resizes to size (h, w) and is the exact identity at the native grid. "official" is
    the scale-factor form of DINO that the official ZUTIS code runs on every forward (scale
    (h+0.1)/g, (w+0.1)/g): its sampling positions are slightly off the grid, so it resamples the
    table a little even at the native size, exactly as the released weights were trained."""
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if (h, w) == (g, g) and mode != "official":
        return pos
    cls, grid = pos[:1], pos[1:]
    grid = grid.reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [g*g, C] -> [1, C, g, g]
    if mode == "official":
        grid = F.interpolate(grid, scale_factor=((h + 0.1) / g, (w + 0.1) / g), mode="bicubic",
                             align_corners=False)
    elif mode == "bicubic":
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    else:
        raise ValueError(f"unknown pos_interp {mode!r}")
    assert grid.shape[-2:] == (h, w), (grid.shape, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)  # [1, C, h, w] -> [h*w, C]
    return torch.cat([cls, grid])


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size = input_resolution, patch_size
        self.width, self.output_dim = width, output_dim
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def embed(self, x, pos_interp="bicubic"):
        """Image [B, 3, H, W] -> tokens after ln_pre [B, 1 + h*w, width], and (h, w). Like the
        official code, remainders of H, W that do not fill a patch are dropped by the conv."""
        x = self.conv1(x.type(self.conv1.weight.dtype))  # [B, width, h, w]
        B, C, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, width, h, w] -> [B, h*w, width]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, C)
        x = torch.cat([cls, x], dim=1) + interpolate_pos_embed(self.positional_embedding, h, w, pos_interp).to(x.dtype)
        return self.ln_pre(x), (h, w)

    def forward(self, x):
        x, _ = self.embed(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0, :]) @ self.proj  # [B, output_dim]

    def forward_dense(self, x, pos_interp="bicubic"):
        """Patch tokens of the last layer after ln_post, before proj: [B, 3, H, W] -> [B, h, w, width]."""
        x, (h, w) = self.embed(x, pos_interp)
        x = self.ln_post(self.transformer(x)[:, 1:, :])
        return x.reshape(x.shape[0], h, w, self.width)  # [B, h*w, width] -> [B, h, w, width]

    def forward_maskclip(self, x, pos_interp="bicubic"):
        """MaskCLIP's training-free dense features (Zhou et al. 2022): the last block's attention is
        replaced by its value path (v = out_proj(value(ln_1(x))) + x, then v + mlp(ln_2(v))), then
        ln_post and proj on every patch token: [B, 3, H, W] -> [B, h, w, output_dim]."""
        x, (h, w) = self.embed(x, pos_interp)
        x = self.transformer(x, n_blocks=-1)
        last = self.transformer.resblocks[-1]
        v = x + last.attn.out_proj(last.attn.value(last.ln_1(x)))
        v = v + last.mlp(last.ln_2(v))
        v = self.ln_post(v[:, 1:, :]) @ self.proj
        return v.reshape(v.shape[0], h, w, -1)  # [B, h*w, D] -> [B, h, w, D]


class CLIP(nn.Module):
    def __init__(self, embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                 context_length, vocab_size, transformer_width, transformer_heads, transformer_layers):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        max(1, vision_width // 64), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * torch.log(torch.tensor(1 / 0.07)))
        self._init_text()

    def _init_text(self):
        # OpenAI's initialisation of the text tower (the vision tower keeps the module defaults).
        w, L = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=w ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=w ** -0.5 * (2 * L) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=w ** -0.5 * (2 * L) ** -0.5)
        nn.init.normal_(self.text_projection, std=w ** -0.5)

    @property
    def dtype(self):
        return self.visual.conv1.weight.dtype

    def encode_image(self, image):
        return self.visual(image.type(self.dtype))

    def encode_text(self, text):
        x = self.token_embedding(text).type(self.dtype) + self.positional_embedding.type(self.dtype)
        x = self.ln_final(self.transformer(x))  # [B, n_ctx, width]
        # the end-of-text token has the largest id, so argmax finds it
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        img = F.normalize(self.encode_image(image), dim=-1)
        txt = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


def build_model(state_dict):
    """Rebuild a ViT CLIP from a released state dict (architecture read from tensor shapes) and
    load it strictly. Returns an fp32 model in eval mode."""
    sd = {k: v for k, v in state_dict.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise UserError("not a ViT CLIP state dict (no visual.conv1.weight / visual.proj); "
                        "ResNet CLIP models are not supported")
    try:
        vision_width, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        text_width = sd["ln_final.weight"].shape[0]
        model = CLIP(
            embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid,
            vision_layers=len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
            vision_width=vision_width, vision_patch_size=patch,
            context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
            transformer_width=text_width, transformer_heads=max(1, text_width // 64),
            transformer_layers=len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")}))
    except KeyError as e:
        raise UserError(f"CLIP state dict lacks {e}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shape = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or unexpected or shape:
        raise UserError(f"CLIP state dict does not match: missing {missing[:8]}, unexpected {unexpected[:8]}, "
                        f"wrong shape {shape[:8]}")
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.float().eval()


def _read_state_dict(path):
    """A TorchScript archive (OpenAI's release format) or a plain state dict (torch.save)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            return torch.jit.load(path, map_location="cpu").state_dict()
    except (RuntimeError, ValueError):
        pass
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; the message is what matters
        raise UserError(f"cannot read {path!r} as a CLIP checkpoint: {type(e).__name__}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path!r} does not hold a state dict")
    return sd


def preprocess_for(resolution):
    """CLIP's transform: bicubic resize of the shorter side, centre crop, RGB, CLIP mean/std."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def load(name_or_path, device="cpu", download_root=None):
    """A model name (see available_models()) or a checkpoint path -> (fp32 eval model, preprocess)."""
    if name_or_path in _MODELS:
        url = _MODELS[name_or_path]
        root = download_root or os.path.expanduser("~/.cache/clip")
        path = download(url, root, sha256=url.split("/")[-2])
    elif os.path.isfile(str(name_or_path)):
        path = name_or_path
    else:
        raise UserError(f"CLIP model {name_or_path!r} not found: use one of {available_models()} "
                        "or a path to a checkpoint file")
    model = build_model(_read_state_dict(path)).to(device)
    return model, preprocess_for(model.visual.input_resolution)


@torch.no_grad()
def text_embeddings(model, names, templates=TEMPLATES, batch_size=256):
    """[K] names -> [K, embed_dim] unit vectors. With templates: every template is filled in,
    each embedding L2-normalised, averaged over templates and normalised again (the retrieval
    ensemble). templates=None embeds the bare names (what the official segmenter does)."""
    device = next(model.parameters()).device
    T = templates or ["{}"]
    texts = [t.format(n) for n in names for t in T]
    tokens = tokenize(texts, context_length=model.context_length, truncate=True)
    emb = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float()
                     for i in range(0, len(texts), batch_size)])
    emb = F.normalize(emb, dim=-1).view(len(names), len(T), -1).mean(1)  # [K*T, D] -> [K, D]
    return F.normalize(emb, dim=-1)


# ----------------------------------------------------------------------------- benchmark

_SHAPES = {  # name: (embed_dim, resolution, layers, width, patch, text width, text layers)
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 12), "ViT-B/16": (512, 224, 12, 768, 16, 512, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12), "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12)}


def random_model(name):
    """A randomly initialised CLIP with the shapes of a released model (benchmarks and tests only)."""
    e, r, L, w, p, tw, tl = _SHAPES[name]
    return CLIP(e, r, L, w, p, 77, 49408, tw, tw // 64, tl).eval()


def _time(fn, x, iters, sync):
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn(x)
    sync()
    return iters * x.shape[0] / (time.perf_counter() - t0)


@torch.no_grad()
def benchmark(device, batch, iters, rounds):
    """img/s of encode_image, ours vs the reference package on identical weights. The two models
    alternate for `rounds` rounds and the best round of each counts, so a neighbour's load on a
    shared machine hits both alike instead of whichever ran second."""
    try:
        import clip as reference  # the openai-clip package, if installed
    except Exception:
        reference = None
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtypes = [torch.bfloat16, torch.float16] if cuda else [torch.float32]
    print(f"device {device}, {torch.get_num_threads()} threads, batch {batch}, best of {rounds} rounds of "
          f"{iters} forward passes (after a warm-up); img/s of encode_image")
    for name, res in [("ViT-B/16", 224), ("ViT-B/16", 448), ("ViT-L/14@336px", 336)]:
        ours = random_model(name).to(device)
        ref = None
        if reference is not None and res == ours.visual.input_resolution:  # the reference cannot resize
            ref = reference.model.build_model(ours.state_dict()).float().eval().to(device)
        x = torch.randn(batch, 3, res, res, device=device)
        for dt in dtypes:
            with torch.autocast(device.type, dtype=dt, enabled=cuda):
                models = [ours.encode_image] + ([ref.encode_image] if ref is not None else [])
                for fn in models:
                    fn(x)  # warm-up
                best = [max(r) for r in zip(*[[_time(fn, x, iters, sync) for fn in models] for _ in range(rounds)])]
            line = f"{name:>15} @{res}  {str(dt).split('.')[-1]:>8}  ours {best[0]:8.2f}"
            if ref is not None:
                line += f"  reference {best[1]:8.2f}  ratio {best[0] / best[1]:5.2f}x"
            print(line, flush=True)


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", action="store_true", help="time encode_image (ours vs reference)")
    parser.add_argument("--device", default="auto", help="auto|cpu|cuda")
    parser.add_argument("--batch", type=int, default=8, help="images per forward pass")
    parser.add_argument("--iters", type=int, default=2, help="timed forward passes per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best counts")
    args = parser.parse_args()
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.benchmark:
        benchmark(dev, args.batch, args.iters, args.rounds)
    else:
        parser.print_help()
