"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"), as Stable Diffusion 1.x feeds it to the text encoder.

SD's FrozenCLIPEmbedder calls transformers' CLIPTokenizer for openai/clip-vit-large-patch14 with
padding="max_length", truncation=True, max_length=77: `<|startoftext|> ids... <|endoftext|>`,
cut so that it still ends with end-of-text, then padded with end-of-text. This module gives the
same ids with one `tokenizers.Tokenizer` (`Tokenizer.backend`; its `save` writes a tokenizer.json
that ports to other runtimes can read).

The clean-up reproduces transformers' Python CLIPTokenizer without `ftfy` (BERT's
BasicTokenizer): drop U+FFFD and category C except tab and newlines, collapse whitespace, NFC,
lower-case (Python's final-sigma rule), CJK ideographs as words of their own. Then CLIP's word
regex, GPT-2's byte-to-character table, and BPE with `</w>` ending each word. Special tokens
written in a prompt are matched in the raw text, as transformers does. The few known differences
(special-token spellings that appear only after clean-up; code points newer than Python's
Unicode tables) are pinned by tests/test_tokenizer.py.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers, processors, trainers

from .io import WeightsError

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_USED = 49152 - 256 - 2  # OpenAI's file holds more merges; CLIP uses the first 48894

# Category C, plus U+FFFD, minus tab, newline and carriage return (BasicTokenizer._clean_text).
CONTROL = r"[\p{C}\x{FFFD}&&[^\t\n\r]]"
# Python's str.lower writes a capital sigma that ends a word as the final form ς; the `tokenizers`
# Lowercase normalizer does not, so that case is rewritten first. Python's rule: skipping
# case-ignorable characters, the nearest one before is cased and the nearest one after is not.
_CASED = r"[\p{Cased}&&\P{Case_Ignorable}]"
FINAL_SIGMA = rf"(?<={_CASED}\p{{Case_Ignorable}}*)Σ(?!\p{{Case_Ignorable}}*{_CASED})"
# The code points BasicTokenizer._is_chinese_char calls CJK.
CJK = (r"[\x{4E00}-\x{9FFF}\x{3400}-\x{4DBF}\x{20000}-\x{2A6DF}\x{2A700}-\x{2B73F}"
       r"\x{2B740}-\x{2B81F}\x{2B820}-\x{2CEAF}\x{F900}-\x{FAFF}\x{2F800}-\x{2FA1F}]")
# One CLIP word: a contraction, a run of letters, one digit, or a run of other non-space symbols.
# CLIP matches it case-insensitively, hence two quirks kept here: "'ſ" (long s) is the contraction
# "'s", and U+0345 (combining ypogegrammeni, whose case partner is a letter) belongs to no word.
WORD = r"""'[sſ]|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}\x{345}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes map to themselves, the other 68 to U+0100,
    U+0101, ... in byte order. Byte-level BPE then works on strings with no whitespace or control
    characters. The dict lists the printable bytes first, the order of CLIP's first 256 tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + n) for n, b in enumerate(others)}}


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """OpenAI's vocabulary layout: 256 byte characters, the same with `</w>`, one token per merge
    in merge order, then `<|startoftext|>` and `<|endoftext|>`."""
    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for t in base + [c + END_OF_WORD for c in base] + [a + b for a, b in merges] + [START, END]:
        vocab.setdefault(t, len(vocab))  # a trained vocabulary may reach one token by two merges
    return vocab


class Tokenizer:
    """Texts -> (B, max_length) token ids, exactly as SD 1.x's FrozenCLIPEmbedder tokenizes."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]],
                 max_length: int = 77):
        missing = [t for t in (START, END) if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {', '.join(missing)}")
        self.vocab, self.merges = dict(vocab), [tuple(m) for m in merges]
        self.max_length = max_length
        self.start_id, self.end_id = vocab[START], vocab[END]

        tok = _HFTokenizer(models.BPE(self.vocab, self.merges, end_of_word_suffix=END_OF_WORD,
                                      unk_token=END, fuse_unk=False))
        tok.normalizer = normalizers.Sequence([
            normalizers.Replace(Regex(CONTROL), ""),
            normalizers.Replace(Regex(r"\s+"), " "),
            normalizers.NFC(),
            normalizers.Replace(Regex(FINAL_SIGMA), "ς"),
            normalizers.Lowercase(),
        ])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CJK), behavior="isolated"),
            pre_tokenizers.Split(Regex(WORD), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t in (START, END)])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{START} $A {END}", special_tokens=[(START, self.start_id), (END, self.end_id)])
        tok.enable_truncation(max_length)  # keeps room for the two special tokens
        tok.enable_padding(length=max_length, pad_id=self.end_id, pad_token=END)
        self.backend = tok

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __call__(self, texts: list[str]) -> torch.Tensor:
        """(B,) texts -> (B, max_length) int64 ids."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer takes a list of texts, not one string")
        return torch.tensor([e.ids for e in self.backend.encode_batch(list(texts))],
                            dtype=torch.long).reshape(len(texts), self.max_length)

    # --- files -----------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path, max_length: int = 77) -> "Tokenizer":
        """Read OpenAI's `bpe_simple_vocab_16e6.txt.gz`, or a folder (or a file in it) holding the
        Hugging Face `vocab.json` and `merges.txt`."""
        path = Path(path)
        if not path.exists():
            raise WeightsError(f"{path}: no such file or folder")
        if path.is_file() and path.name.endswith(".gz"):
            try:
                with gzip.open(path, "rt", encoding="utf-8") as f:
                    lines = f.read().split("\n")
            except (OSError, EOFError, UnicodeDecodeError) as e:
                raise WeightsError(f"{path}: not a readable gzip text file ({e})") from None
            merges = _parse_merges(lines[1:1 + MERGES_USED], path)  # line 0 is a header
            if len(merges) != MERGES_USED:
                raise WeightsError(f"{path}: holds {len(merges)} merges, CLIP needs {MERGES_USED}")
            return cls(clip_vocab(merges), merges, max_length)

        folder = path.parent if path.is_file() else path
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise WeightsError(f"{f}: no such file (expected OpenAI's .txt.gz or a folder with "
                                   f"vocab.json and merges.txt)")
        try:
            vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise WeightsError(f"{vocab_file}: not a readable JSON vocabulary ({e})") from None
        if not (isinstance(vocab, dict)
                and all(isinstance(k, str) and type(v) is int for k, v in vocab.items())):
            raise WeightsError(f"{vocab_file}: not a JSON object of token -> integer id")
        try:
            lines = merges_file.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError) as e:
            raise WeightsError(f"{merges_file}: not a readable text file ({e})") from None
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        merges = _parse_merges(lines, merges_file)
        try:
            return cls(vocab, merges, max_length)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad vocab
            why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WeightsError(f"{folder}: vocab.json and merges.txt do not fit together ({why})"
                               ) from None

    def save(self, folder: str | Path) -> None:
        """Write `vocab.json` and `merges.txt` in the Hugging Face format (CLIPTokenizer reads
        them)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), "utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), "utf-8")

    # --- training --------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: list[str], vocab_size: int, max_length: int = 77) -> "Tokenizer":
        """Learn a small CLIP-style vocabulary (512 byte symbols + merges + 2 specials) on `texts`,
        with CLIP's clean-up and word splitting. A small corpus may give fewer merges than asked."""
        n_merges = vocab_size - 2 * 256 - 2
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least {2 * 256 + 2}, got {vocab_size}")
        learner = cls(clip_vocab([]), [], max_length).backend  # CLIP's clean-up and word split
        learner.model = models.BPE(end_of_word_suffix=END_OF_WORD)
        # The trainer's vocabulary holds the byte alphabet, the `</w>` forms it saw (at most 256),
        # the specials and the merges: ask for enough, then keep the first n_merges merges.
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=list(bytes_to_unicode().values()),
                                      special_tokens=[START, END], end_of_word_suffix=END_OF_WORD)
        learner.train_from_iterator(texts, trainer)
        merges = [tuple(m) for m in json.loads(learner.to_str())["model"]["merges"]][:n_merges]
        return cls(clip_vocab(merges), merges, max_length)


def _parse_merges(lines: list[str], path: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise WeightsError(f"{path}: merge line {n + 1} is not two symbols: {line[:40]!r}")
        merges.append((parts[0], parts[1]))
    return merges
