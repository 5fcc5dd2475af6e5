"""CLIP's byte-level BPE tokenizer (49,408 tokens, <|startoftext|> / <|endoftext|>), written here from
the behaviour of OpenAI's CLIP; the vocabulary file bpe_simple_vocab_16e6.txt.gz is their data.
Library file: the vocabulary is read on first use, not at import. clip_model re-exports `tokenize`.

    from clip_tokenizer import tokenize
    tokenize(["a photo of a cat."])        # LongTensor [1, 77]: sot, tokens, eot, zero padding
"""
import gzip
import html
import os
from functools import lru_cache

import torch

@lru_cache()
def bytes_to_unicode():
    """Byte-level BPE works on bytes; each of the 256 byte values maps to a printable unicode
    character (printable latin-1 bytes map to themselves, the rest to code points from 256 on) so
    merges never see whitespace or control characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    # Order matters: the first 256 vocabulary ids follow this dict's order (printable bytes first).
    mapping = {b: chr(b) for b in keep}
    mapping.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return mapping


class Tokenizer:
    def __init__(self, bpe_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")):
        import regex
        self.byte_encoder = bytes_to_unicode()
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # 48894 merges
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}  # 49408 tokens
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                 regex.IGNORECASE)
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token):
        """Greedily apply the lowest-ranked merge until none applies; the last symbol of a word
        carries the end-of-word marker '</w>'."""
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
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        self.cache[token] = out
        return out

    @staticmethod
    def clean(text):
        import ftfy
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
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
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
