"""OpenAI CLIP's text tokenizer: byte-level BPE over cleaned, lower-cased text.

The merge table `bpe_simple_vocab_16e6.txt.gz` is OpenAI's (MIT licence, see CLIP_LICENSE).
Token ids: 0-255 single byte symbols, 256-511 the same ending a word ("</w>"), then one id per
merge (48894), then <|startoftext|> = 49406 and <|endoftext|> = 49407; 49408 in all.
Unlike OpenAI's code this does not run `ftfy` (not available here): text is only HTML-unescaped,
whitespace-normalized and lower-cased before splitting into words.
"""
import gzip
import html
from pathlib import Path

import regex
import torch

VOCAB_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
# CLIP uses the first 49152 - 256 - 2 merges of the file, so that 2 * 256 byte symbols,
# the merges and the 2 special tokens make a vocabulary of 49408.
NUM_MERGES = 49152 - 256 - 2
END_OF_WORD = "</w>"

# The words BPE runs on: special tokens, English contractions, runs of letters, single digits,
# runs of anything else that is not whitespace.
WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE,
)


def byte_symbols():
    """A printable unicode character for every byte value, {byte: char}, in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves; the other 68 are mapped
    to chr(256), chr(257), ... in byte order. BPE then works on strings without raw bytes.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + offset)
    return table


def clean_text(text):
    """HTML-unescapes (twice, for doubly escaped text), collapses whitespace, strips, lower-cases."""
    text = html.unescape(html.unescape(text))
    return regex.sub(r"\s+", " ", text).strip().lower()


class SimpleTokenizer:
    """Text -> CLIP token ids."""

    def __init__(self, vocab_path=VOCAB_PATH):
        with gzip.open(vocab_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # line 0 is a version header
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        self.byte_encoder = byte_symbols()
        symbols = list(self.byte_encoder.values())
        vocab = [*symbols, *(s + END_OF_WORD for s in symbols), *("".join(m) for m in merges)]
        vocab += [START_OF_TEXT, END_OF_TEXT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token = self.encoder[START_OF_TEXT]
        self.eot_token = self.encoder[END_OF_TEXT]
        self._word_cache = {START_OF_TEXT: [START_OF_TEXT], END_OF_TEXT: [END_OF_TEXT]}

    def bpe(self, word):
        """Splits one word, written in byte symbols, into vocabulary tokens (a list of str).

        Starts from single symbols (the last one marked "</w>") and repeatedly merges every
        occurrence, left to right, of the adjacent pair with the lowest merge rank.
        """
        if word in self._word_cache:
            return self._word_cache[word]
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if pair not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._word_cache[word] = parts
        return parts

    def encode(self, text):
        """Token ids of `text` (a list of int), without start/end tokens."""
        ids = []
        for word in WORD_PATTERN.findall(clean_text(text)):
            symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(symbols))
        return ids

    def tokenize(self, texts, context_length=77, *, pad_token=None):
        """Fixed-length token ids for a batch of texts: (B, context_length) int64.

        Each row is <|startoftext|>, the text's tokens, <|endoftext|>, then padding: ``pad_token``,
        by default <|endoftext|> (OpenAI CLIP, SD v1); OpenCLIP (SD 2.x) pads with 0.
        Longer texts are cut so that <|endoftext|> stays the last token.
        """
        pad_token = self.eot_token if pad_token is None else pad_token
        rows = []
        for text in texts:
            ids = [self.sot_token, *self.encode(text)[: context_length - 2], self.eot_token]
            rows.append(ids + [pad_token] * (context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
