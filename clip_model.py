"""Our own CLIP (ViT image and text towers, BPE tokenizer) that loads OpenAI's released checkpoints
strictly. ZUTIS uses it for retrieval (ViT-L/14@336px), as the segmenter's encoder (ViT-B/16, ViT-B/32)
and as the frozen text classifier. Written from the behaviour of OpenAI's CLIP (github.com/openai/CLIP:
parameter names, tokenizer, URLs, fp16 rule); batch-first tensors and F.scaled_dot_product_attention
change no number. Speed: `python bench.py clip`; user reference: docs/retrieval.md.

    model, preprocess = load("ViT-B/16")             # downloads to ~/.cache/clip (docs/weights.md); fp32
    model, preprocess = load("path/to/ckpt.pt")       # TorchScript archive or plain state dict
    official_fp16(model)                              # what OpenAI's clip.load(device="cuda") computes
    emb = text_embeddings(model, ["cat", "dog"], categories.TEMPLATES)  # [2, D], template ensemble
"""
import gzip
import html
import os
import warnings
import zipfile
from collections import OrderedDict
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

import common
import downloads
from common import UserError

# The sha256 of each file is the second-to-last component of its URL (OpenAI's convention).
_BASE = "https://openaipublic.azureedge.net/clip/models"
MODELS = {
    "ViT-B/32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
# The Hugging Face hub's copies of the same weights (open_clip's `openai` tag), tried when OpenAI's host
# fails. They are open_clip state dicts, which keep OpenAI's parameter names and have no
# input_resolution / context_length / vocab_size entries (open_clip's `build_model_from_openai_state_dict`).
HUB_REPOS = {"ViT-B/32": "timm/vit_base_patch32_clip_224.openai", "ViT-B/16": "timm/vit_base_patch16_clip_224.openai",
             "ViT-L/14": "timm/vit_large_patch14_clip_224.openai",
             "ViT-L/14@336px": "timm/vit_large_patch14_clip_336.openai"}
HUB_FILE = "open_clip_pytorch_model.bin"
_META_KEYS = ("input_resolution", "context_length", "vocab_size")  # ints in OpenAI's archives, not weights
_SHAPES = {  # name: (embed_dim, resolution, layers, width, patch, text width, text layers)
    "ViT-B/32": (512, 224, 12, 768, 32, 512, 12), "ViT-B/16": (512, 224, 12, 768, 16, 512, 12),
    "ViT-L/14": (768, 224, 24, 1024, 14, 768, 12), "ViT-L/14@336px": (768, 336, 24, 1024, 14, 768, 12)}


def arch_tag(name_or_path):
    """A filesystem-safe tag: 'ViT-L/14@336px' -> 'ViT-L-14-336px'; a file path -> its stem."""
    if name_or_path in MODELS:
        return name_or_path.replace("/", "-").replace("@", "-")
    return os.path.splitext(os.path.basename(str(name_or_path)))[0]


# --------------------------------------------------- tokenizer: CLIP's byte-level BPE over OpenAI's vocabulary file

@lru_cache()
def bytes_to_unicode():
    """Each byte value -> a printable character (printable latin-1 bytes map to themselves, the rest to
    code points from 256 on), so merges never see whitespace or control characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    # Order matters: the first 256 vocabulary ids follow this dict's order (printable bytes first).
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


class Tokenizer:
    def __init__(self, bpe_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")):
        import regex
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48894 merges
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49408 tokens
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Apply the lowest-ranked merge until none applies; a word's last symbol carries '</w>'."""
        if token in self.cache:
            return self.cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                pair = i < len(word) - 1 and (word[i], word[i + 1]) == best
                merged.append(word[i] + word[i + 1] if pair else word[i])
                i += 2 if pair else 1
            word = merged
        self.cache[token] = " ".join(word)
        return self.cache[token]

    @staticmethod
    def clean(text):
        import ftfy  # imported on first use: loading it is slow and only tokenizing needs it
        import regex
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text):
        ids = []
        for token in self.pat.findall(self.clean(text)):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(token).split(" ")]
        return ids

    def decode(self, ids):
        raw = bytearray(self.byte_decoder[c] for c in "".join(self.decoder[i] for i in ids))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def _tokenizer():
    return Tokenizer()


def tokenize(texts, context_length=77, truncate=False):
    """A string or list of strings -> LongTensor [N, context_length]: <sot> tokens <eot>, zero-padded.
    Over-long text raises unless truncate=True, which cuts it and keeps <eot> as the last token."""
    tok = _tokenizer()
    texts = [texts] if isinstance(texts, str) else texts
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for i, text in enumerate(texts):
        ids = [tok.sot] + tok.encode(text) + [tok.eot]
        if len(ids) > context_length:
            if not truncate:
                raise RuntimeError(f"Input {text} is too long for context length {context_length}")
            ids = ids[:context_length]
            ids[-1] = tok.eot
        out[i, :len(ids)] = torch.tensor(ids)
    return out


# ----------------------------------------------------------------------------- download

def sources(name):
    """Where the weights of a MODELS name come from, in order (downloads.py tries $ZUTIS_MIRROR before
    each): OpenAI's URL, checked against the sha256 in it, then the Hugging Face hub's copy."""
    url = MODELS[name]
    out = [downloads.Source(url, sha256=url.split("/")[-2])]
    if name in HUB_REPOS:  # the mirror is not asked for it: it holds OpenAI's file, tried first
        out.append(downloads.Source(downloads.hub_url(HUB_REPOS[name], HUB_FILE), f"{arch_tag(name)}-{HUB_FILE}",
                                    sha256=downloads.HUB, mirror=False))
    return out


def check_layout(sd, name, what):
    """Exactly the keys and shapes of the released `name` (from _SHAPES), so that a file of another model
    or layout is refused with the offending keys named, before any weight is used."""
    with torch.device("meta"):  # shapes only: no memory, no random init
        ref = random_model(name)
    common.load_strict(ref, {k: v for k, v in sd.items() if k not in _META_KEYS}, what, assign=True)


# ----------------------------------------------------------------------------- model

class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back, so fp16 weights/activations stay stable."""
    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


class QuickGELU(nn.Module):  # OpenAI's sigmoid approximation of GELU, as the weights were trained
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
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))  # [B, nh, N, hs] -> [B, N, C]


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
    """Resize a [1 + g*g, C] positional table to a (h, w) grid -> [1 + h*w, C]. "bicubic": to size (h, w),
    the identity at the native grid. "official": DINO's scale-factor form (scale (h+0.1)/g) that official
    ZUTIS runs on every forward; it resamples a little even at the native size, as the released weights saw."""
    g = int(round((pos.shape[0] - 1) ** 0.5))
    if (h, w) == (g, g) and mode != "official":
        return pos
    if mode not in ("official", "bicubic"):
        raise ValueError(f"unknown pos_interp {mode!r}")
    cls, grid = pos[:1], pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2).float()  # [g*g, C] -> [1, C, g, g]
    size, scale = ((h, w), None) if mode == "bicubic" else (None, ((h + 0.1) / g, (w + 0.1) / g))
    grid = F.interpolate(grid, size=size, scale_factor=scale, mode="bicubic", align_corners=False)
    assert grid.shape[-2:] == (h, w), (grid.shape, h, w)
    grid = grid.permute(0, 2, 3, 1).reshape(h * w, -1).to(pos.dtype)  # [1, C, h, w] -> [h*w, C]
    return torch.cat([cls, grid])


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution, patch_size, width, layers, heads, output_dim):
        super().__init__()
        self.input_resolution, self.patch_size, self.width, self.output_dim = input_resolution, patch_size, width, output_dim
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
        x = torch.cat([self.class_embedding.to(x.dtype).expand(B, 1, C), x.flatten(2).transpose(1, 2)], dim=1)  # [B, 1+h*w, C]
        x = x + interpolate_pos_embed(self.positional_embedding, h, w, pos_interp).to(x.dtype)
        return self.ln_pre(x), (h, w)

    def forward(self, x):
        return self.ln_post(self.transformer(self.embed(x)[0])[:, 0, :]) @ self.proj  # [B, output_dim]

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
        last, C = self.transformer.resblocks[-1], self.width
        v = F.linear(last.ln_1(x), last.attn.in_proj_weight[2 * C:], last.attn.in_proj_bias[2 * C:])  # values only
        v = x + last.attn.out_proj(v)
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
    sd = {k: v for k, v in state_dict.items() if k not in _META_KEYS}
    if "visual.conv1.weight" not in sd or "visual.proj" not in sd:
        raise UserError("not a ViT CLIP state dict (no visual.conv1.weight / visual.proj; ResNet CLIPs are not supported)")
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
    except (KeyError, AttributeError, ValueError) as e:
        raise UserError(f"not a CLIP state dict ({type(e).__name__}: {e})") from None
    return common.load_strict(model, {k: v.float() for k, v in sd.items()}, "CLIP state dict").eval()


def random_model(name):
    """A randomly initialised CLIP with the shapes of a released model (benchmarks and tests)."""
    e, r, L, w, p, tw, tl = _SHAPES[name]
    return CLIP(e, r, L, w, p, 77, 49408, tw, tw // 64, tl).eval()


def official_fp16(model):
    """Convert `model` in place to the dtypes OpenAI's `clip.load(..., device="cuda")` leaves (openai clip/model.py
    `convert_weights`): conv and linear weights and biases, attention in_proj, `visual.proj`, `text_projection` in
    fp16; embeddings, positional tables, LayerNorms and logit_scale fp32. With `LayerNorm` computing in fp32 and
    casting back, encode_image/encode_text then give the official fp16 values. Returns the model."""
    for m in model.modules():
        names = (("weight", "bias") if isinstance(m, (nn.Conv2d, nn.Linear)) else
                 ("in_proj_weight", "in_proj_bias") if isinstance(m, Attention) else
                 ("proj",) if isinstance(m, VisionTransformer) else ("text_projection",) if isinstance(m, CLIP) else ())
        for name in names:
            if getattr(m, name) is not None:
                getattr(m, name).data = getattr(m, name).data.half()
    return model


def _read_state_dict(path):
    """OpenAI's release format (a TorchScript archive) or a plain state dict (torch.save). The archive
    needs torch.jit.load, which rebuilds TorchScript modules without running Python pickle code."""
    with open(path, "rb") as f:
        jit = zipfile.is_zipfile(f) and any(n.endswith("constants.pkl") for n in zipfile.ZipFile(f).namelist())
    if jit:
        try:
            with warnings.catch_warnings(action="ignore"):  # torch.jit.load's deprecation notice
                return torch.jit.load(path, map_location="cpu").state_dict()
        except RuntimeError as e:
            raise common.unreadable(path, "TorchScript CLIP archive", e) from None
    sd = common.torch_load(path, "CLIP checkpoint")
    if isinstance(sd, dict) and "model" in sd and "config" in sd:
        raise UserError(f"{path!r} is a ZUTIS training checkpoint (train.py's ckpt.pt), not CLIP weights: "
                        "pass it to evaluate.py --ckpt (or train.py --init), and give --arch a CLIP model")
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict):
        raise UserError(f"{path!r} does not hold a state dict")
    return sd


def preprocess_for(resolution):
    """CLIP's transform: bicubic resize of the shorter side, centre crop, RGB, CLIP mean/std."""
    from torchvision import transforms as T
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(resolution),
                      T.Lambda(lambda im: im.convert("RGB")), T.ToTensor(), T.Normalize(common.CLIP_MEAN, common.CLIP_STD)])


def load(name_or_path, device="cpu", download_root=None):
    """A model name (a key of MODELS) or a checkpoint path -> (fp32 eval model, preprocess)."""
    if name_or_path in MODELS:
        root = download_root or os.path.expanduser("~/.cache/clip")
        path = downloads.download(sources(name_or_path), root, hint="or pass a local file path with --arch")
        sd = _read_state_dict(path)
        if os.path.basename(path) != os.path.basename(MODELS[name_or_path]):  # the hub's copy
            try:
                check_layout(sd, name_or_path, f"the Hugging Face copy of {name_or_path} ({path}, deleted)")
            except UserError:
                os.remove(path)  # the hub's file, but not these weights: never kept
                raise
    elif os.path.isfile(str(name_or_path)):
        sd = _read_state_dict(name_or_path)
    else:
        raise UserError(f"CLIP model {name_or_path!r} not found: use one of {list(MODELS)} "
                        "or a path to a checkpoint file")
    model = build_model(sd).to(device)
    return model, preprocess_for(model.visual.input_resolution)


@torch.no_grad()
def text_embeddings(model, names, templates, batch_size=256):
    """[K] names -> [K, embed_dim] fp32 unit vectors: each template filled in (e.g. categories.TEMPLATES), embedded,
    normalised, averaged, normalised again (the prompt ensemble); templates=None embeds the bare names."""
    device = next(model.parameters()).device
    T = templates or ["{}"]
    texts = [t.format(n) for n in names for t in T]
    tokens = tokenize(texts, context_length=model.context_length, truncate=True)
    emb = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device)).float()
                     for i in range(0, len(texts), batch_size)])
    emb = F.normalize(emb, dim=-1).view(len(names), len(T), -1).mean(1)  # [K*T, D] -> [K, D]
    return F.normalize(emb, dim=-1)


if __name__ == "__main__":
    common.library_main(__doc__, "build_archive.py, train.py and evaluate.py load CLIP through it (their "
                                 "--arch flag); `python bench.py clip` times it.")
