"""minibldm.tokenizer against two independent CLIP tokenizers on the real vocabulary.

1. `ReferenceClipTokenizer` below: a plain-Python statement of what transformers' slow Python
   CLIPTokenizer (transformers <= 4.x, the one SD's FrozenCLIPEmbedder called) does when `ftfy`
   is not installed: BasicTokenizer's clean-up, CLIP's case-insensitive regex, OpenAI's BPE loop.
   transformers 5 no longer ships that class, so it is restated here; it was checked against
   transformers 4.46's CLIPTokenizer on every code point and on 300k random strings.
2. transformers' current CLIPTokenizer (tokenizers-backed, the former CLIPTokenizerFast), on the
   strings where it agrees with the slow one (it skips the BasicTokenizer clean-up).
Both read vocab.json / merges.txt written here from OpenAI's .gz, not by minibldm.
"""
import gzip
import json
import random
import unicodedata

import pytest
import torch

from conftest import CLIP_VOCAB
from minibldm.io import WeightsError
from minibldm.tokenizer import Tokenizer

regex = pytest.importorskip("regex")  # the `regex` module, as transformers' slow CLIPTokenizer
needs_vocab = pytest.mark.skipif(not CLIP_VOCAB.is_file(), reason=f"{CLIP_VOCAB} not present")

START, END = "<|startoftext|>", "<|endoftext|>"


# --- an independent reference ---------------------------------------------------------------------

def write_hf_files(gz_path, folder):
    """vocab.json + merges.txt for openai/clip-vit-large-patch14, from OpenAI's merges file."""
    merges = gzip.open(gz_path, "rt", encoding="utf-8").read().split("\n")[1:48895]
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    rest = [b for b in range(256) if b not in printable]
    byte_chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]
    tokens = (byte_chars + [c + "</w>" for c in byte_chars] + [m.replace(" ", "") for m in merges]
              + [START, END])
    (folder / "vocab.json").write_text(json.dumps(dict(zip(tokens, range(len(tokens))))), "utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    return folder


class ReferenceClipTokenizer:
    """transformers 4.x CLIPTokenizer(vocab, merges, pad_token=<|endoftext|>) without ftfy, called
    with padding="max_length", truncation=True, max_length=n."""
    PATTERN = regex.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"
                            r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
    CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
           (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]

    def __init__(self, folder):
        self.vocab = json.loads((folder / "vocab.json").read_text("utf-8"))
        lines = (folder / "merges.txt").read_text("utf-8").split("\n")[1:]
        self.rank = {tuple(line.split()): i for i, line in enumerate(lines) if line}
        # GPT-2's byte table: printable non-space bytes stand for themselves, the rest for U+0100...
        shifted = iter(range(256, 512))
        self.byte_char = [chr(b) if chr(b).isprintable() and b != 0x20 else chr(next(shifted))
                          for b in range(256)]

    def clean(self, text):  # BasicTokenizer(strip_accents=False, do_split_on_punc=False)
        out = []
        for ch in text:
            cat = unicodedata.category(ch)
            if ch in "\x00\ufffd" or (cat[0] == "C" and ch not in "\t\n\r"):
                continue
            if ch in " \t\n\r" or cat == "Zs":
                out.append(" ")
            elif any(lo <= ord(ch) <= hi for lo, hi in self.CJK):
                out.append(f" {ch} ")
            else:
                out.append(ch)
        words = unicodedata.normalize("NFC", "".join(out)).split()
        return " ".join(w.lower() for w in words)

    def bpe(self, word):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = [(self.rank.get(p, float("inf")), p) for p in zip(symbols, symbols[1:])]
            best_rank, best = min(pairs)
            if best_rank == float("inf"):
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def ids(self, text):
        out = []
        for part in self.SPECIAL.split(text):  # the special tokens are cut out of the raw text
            if part in (START, END):
                out.append(self.vocab[part])
                continue
            for word in self.PATTERN.findall(self.clean(part)):
                if word in (START, END):
                    out.append(self.vocab[word])
                    continue
                chars = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                out += [self.vocab.get(s, self.vocab[END]) for s in self.bpe(chars)]
        return out

    def __call__(self, texts, max_length=77):
        rows = []
        for t in texts:
            ids = [self.vocab[START]] + self.ids(t)[:max_length - 2] + [self.vocab[END]]
            rows.append(ids + [self.vocab[END]] * (max_length - len(ids)))
        return torch.tensor(rows)


# --- test strings ---------------------------------------------------------------------------------

LONG = ("a very detailed photograph of a metal surface with a long thin scratch, " * 8).strip()
HANDWRITTEN = [
    # prompts of the kind minibldm writes
    "", " ", "a bottle with a broken_large", "a carpet with a hole", "a hazelnut with a crack",
    "a metal_nut with a color defect", "magnetic tile, a magnetic tile with a blowhole",
    "a photo of a cat", "A Photo Of A CAT", "a PCB with a missing_component",
    # punctuation and symbols
    "Hello, world!", "hello,world", "what?!?", "...", "--", "a-b-c", "(parenthesised)", "[x]{y}",
    "a/b\\c", "50% off", "$9.99", "#hashtag @mention", "e-mail: someone@example.com",
    "https://example.com/path?q=1&r=2", "<html>&amp;&lt;</html>", "x^2 + y_1 = z*3", "~`|",
    '"quoted" text', "'single quoted'", "semi;colon:colon", "a,b;c.d!e?f", "!!!!!!!!!!!!!!!!!!!!",
    "+-*/=<>", "_underscore_", "a__b", "hyphen-ated word-s", "C++ and C#", "1,000,000",
    # numbers
    "0", "123", "3.14159", "2024-05-17", "12:30pm", "1st 2nd 3rd 4th", "v1.2.3", "0xDEADBEEF",
    "1e-5", "-42", "½ ¾ ² ³", "Ⅻ ⅻ", "٣٤ ٥", "①②③",
    # case and contractions
    "It's", "IT'S", "it'S", "don't", "DON'T", "we're", "they've", "I'm", "you'll", "he'd",
    "'s", "''s", "it''s", "rock'n'roll", "o'clock", "can't won't shouldn't", "y'all",
    "James' book", "it’s (curly apostrophe)", "it'ſ long s", "MiXeD CaSe WoRdS", "ALLCAPS",
    "camelCaseWord", "snake_case_word",
    # accents, other scripts
    "café", "cafe\u0301", "CAFÉ", "naïve résumé", "Ångström", "Straße STRASSE ẞ", "İstanbul",
    "ǅemal", "ΟΔΟΣ οδός", "ΣΊΣΥΦΟΣ", "Σ", "ΑΣ ΑΣΑ", "Москва", "ПРИВЕТ мир", "עברית",
    "العربية", "हिन्दी", "ไทย", "한국어", "カタカナ ひらがな", "ｆｕｌｌｗｉｄｔｈ", "ﬁ ligature",
    "中文", "汉字测试", "a中b", "中'S", "漢字かな交じり文", "\u3400\U00020000\U0002b820\uf900",
    "\u2f00 kangxi", "Ⓐⓐ", "K\u212a", "\u0345", "a\u0345b", "ς σ Σ",
    # emoji
    "😀", "🐱 cat", "👍🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "❤️", "🇩🇪", "a😀b", "😀😀😀",
    # whitespace and invisible characters
    "  leading and trailing  ", "multiple     spaces", "tab\tseparated", "new\nline", "crlf\r\n",
    "\t\n\r ", "\u00a0non-breaking", "ideographic\u3000space", "line\u2028separator",
    "para\u2029graph", "vertical\x0btab", "form\x0cfeed", "file\x1csep", "nul\x00char",
    "zero\u200bwidth", "soft\u00adhyphen", "bom\ufeffhere", "rtl\u200fmark", "private\ue000use",
    "unassigned\u0378", "replacement\ufffdchar", "del\x7fchar", "c1\x85control",
    # special tokens written in the text
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "x<|endoftext|>y<|startoftext|>z",
    "<|endoftext|><|endoftext|>", "<|end", "<|endoftext", "endoftext|>",
    # length
    LONG, "word " * 80, "a" * 300, "ab" * 200, "1" * 100, "!" * 100, "中" * 100, "😀" * 40,
]


def fuzz_strings(n, seed=0):
    """Random concatenations of awkward pieces (the special tokens only in their exact spelling)."""
    pieces = ["a", "B", "cat", "DOG", "'", "'s", "'S", "'t", "'LL", "'re", "'ve", "'m", "'d", "ſ",
              "1", "23", "4.5", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2028", "\x0b",
              "\x1c", "\x00", "\ufffd", "\u200b", "\u200d", "\u00ad", "\ue000", "é", "e\u0301", "É",
              "ü", "Σ", "σ", "ς", "ΟΔΟΣ", "İ", "ẞ", "ß", "ǅ", "\u0345", "\u0301", "中", "文",
              "\U00020000", "\U0002b820", "\uf900", "\u2f00", "あ", "カ", "한", "😀", "👍🏽", "🏳️",
              "!", "?", "...", ",", ".", "-", "_", "(", "<", ">", "|", "/", "\\", '"', "“", "’",
              "#", "&", "*", "=", "~", START, END, "<|start", "oftext|>", "ﬁ", "Ⅻ", "½", "٣",
              "①", "Ⓐ", "K", "Å"]
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def prompt_strings(n, seed=1):
    """Prompts as users of a defect generator write them: objects, defects, numbers, punctuation."""
    objects = ["magnetic tile", "Metal Washer", "PILL", "woven fabric", "brushed-metal plate",
               "bottle", "screw (M4)", "hazelnut", "PCB #3", "transistor"]
    defects = ["crack", "Scratch", "hole", "stain", "rust spot", "black specks", "dent", "FRAY",
               "uneven surface", "contamination"]
    forms = ["a {o} with a {d}", "{o}, a {o} with a {d}", "A photo of a {o} with {k} {d}s!",
             "{o}: {d} ({k} mm)", "close-up of {o}'s {d}, 4K", "{d}?? on the {o}...",
             "the {o} isn't OK -- it's got a {d}", "{o}_{d}_{k}.png", "  {o}\t{d}\n", "{O} WITH A {D}"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        o, d, f = rng.choice(objects), rng.choice(defects), rng.choice(forms)
        out.append(f.format(o=o, d=d, O=o.upper(), D=d.upper(), k=rng.randint(0, 999)))
    return out


CORPUS = HANDWRITTEN + fuzz_strings(200) + prompt_strings(60)


def fast_agrees_with_slow(text):
    """transformers' tokenizers-backed CLIPTokenizer skips BasicTokenizer's clean-up: no control,
    format or unassigned characters removed, no spaces around CJK ideographs, no final sigma; it
    also splits U+0345 and "'ſ" differently. Elsewhere it gives the slow tokenizer's ids."""
    return not any(unicodedata.category(c)[0] == "C" or c in "\ufffd\u0345Σſ"
                   or any(lo <= ord(c) <= hi for lo, hi in ReferenceClipTokenizer.CJK)
                   for c in text)


# --- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    if not CLIP_VOCAB.is_file():
        pytest.skip(f"{CLIP_VOCAB} not present")
    return write_hf_files(CLIP_VOCAB, tmp_path_factory.mktemp("clip_hf"))


@pytest.fixture(scope="module")
def tok():
    if not CLIP_VOCAB.is_file():
        pytest.skip(f"{CLIP_VOCAB} not present")
    return Tokenizer.from_file(CLIP_VOCAB)


@pytest.fixture(scope="module")
def reference(hf_folder):
    return ReferenceClipTokenizer(hf_folder)


def _first_mismatch(ours, theirs, texts):
    bad = [i for i in range(len(texts)) if not torch.equal(ours[i], theirs[i])]
    if not bad:
        return ""
    i = bad[0]
    return (f"{len(bad)} of {len(texts)} differ; first {texts[i]!r}: ours {ours[i][:12].tolist()} "
            f"reference {theirs[i][:12].tolist()}")


# --- tests ----------------------------------------------------------------------------------------

def test_corpus_is_varied():
    assert len(set(CORPUS)) >= 300
    assert any(len(t) > 300 for t in CORPUS) and "" in CORPUS


@needs_vocab
def test_known_ids(tok):
    ids = tok(["a photo of a cat", ""])
    assert ids.dtype == torch.long and ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[0, 7:].eq(49407).all() and ids[1].tolist() == [49406] + [49407] * 76
    assert tok.vocab_size == 49408 and (tok.start_id, tok.end_id) == (49406, 49407)


@needs_vocab
def test_same_ids_as_slow_clip_tokenizer(tok, reference):
    ours, theirs = tok(CORPUS), reference(CORPUS)
    assert ours.shape == theirs.shape == (len(CORPUS), 77)
    assert not _first_mismatch(ours, theirs, CORPUS), _first_mismatch(ours, theirs, CORPUS)


@needs_vocab
def test_same_ids_as_transformers_clip_tokenizer(tok, hf_folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer(vocab=str(hf_folder / "vocab.json"),
                                    merges=str(hf_folder / "merges.txt"), pad_token=END)
    texts = [t for t in CORPUS if fast_agrees_with_slow(t)]
    assert len(texts) >= 200
    theirs = torch.tensor(hf(texts, padding="max_length", truncation=True,
                             max_length=77)["input_ids"])
    ours = tok(texts)
    assert not _first_mismatch(ours, theirs, texts), _first_mismatch(ours, theirs, texts)


@needs_vocab
def test_truncation_keeps_end_of_text(tok, reference):
    ids = tok([LONG, "word " * 80])
    assert (ids[:, 0] == tok.start_id).all() and (ids[:, -1] == tok.end_id).all()
    assert (ids[:, 1:-1] != tok.end_id).all()  # 75 text tokens, no padding
    short = Tokenizer.from_file(CLIP_VOCAB, max_length=16)
    texts = [LONG, "a cat", "", "中" * 20]
    assert torch.equal(short(texts), reference(texts, max_length=16))


@needs_vocab
def test_batch_of_none_and_one_string(tok):
    assert tok([]).shape == (0, 77)
    with pytest.raises(TypeError):
        tok("a photo of a cat")


# --- files ----------------------------------------------------------------------------------------

@needs_vocab
def test_save_round_trip(tok, hf_folder, tmp_path):
    tok.save(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text("utf-8")) == \
        json.loads((hf_folder / "vocab.json").read_text("utf-8"))
    assert (tmp_path / "merges.txt").read_text("utf-8") == \
        (hf_folder / "merges.txt").read_text("utf-8")
    for source in (tmp_path, tmp_path / "vocab.json", hf_folder):
        again = Tokenizer.from_file(source)
        assert again.vocab == tok.vocab and again.merges == tok.merges
        assert torch.equal(again(CORPUS[:60]), tok(CORPUS[:60]))


@needs_vocab
def test_transformers_reads_saved_files(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    texts = ["a photo of a cat", "a bottle with a broken_large", LONG]
    theirs = hf(texts, padding="max_length", truncation=True, max_length=77)["input_ids"]
    assert tok(texts).tolist() == theirs


def _one_line_error(fn, *needles):
    with pytest.raises(WeightsError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(str(n) in msg for n in needles), msg


def test_bad_paths(tmp_path):
    missing = tmp_path / "nope.txt.gz"
    _one_line_error(lambda: Tokenizer.from_file(missing), missing)
    _one_line_error(lambda: Tokenizer.from_file(tmp_path / "no_dir"), tmp_path / "no_dir")
    _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path / "vocab.json")

    (tmp_path / "bad.txt.gz").write_bytes(b"not gzip at all")
    _one_line_error(lambda: Tokenizer.from_file(tmp_path / "bad.txt.gz"), tmp_path / "bad.txt.gz")
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"header\ni n\nt h\n"))
    _one_line_error(lambda: Tokenizer.from_file(short), short, "48894")

    vocab = {"a": 0, "b": 1, "a</w>": 2, "b</w>": 3, "ab</w>": 4, START: 5, END: 6}
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n", "utf-8")
    _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path / "vocab.json")  # no vocab
    for text in ("{not json", "[1, 2, 3]", '{"a": "zero"}'):
        (tmp_path / "vocab.json").write_text(text, "utf-8")
        _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path / "vocab.json")
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), "utf-8")
    assert Tokenizer.from_file(tmp_path)(["ab"])[0, :3].tolist() == [5, 4, 6]  # the folder works

    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", "utf-8")
    _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path / "merges.txt", "line 1")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na zz\n", "utf-8")
    _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path)  # merge out of vocabulary
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b</w>\n", "utf-8")
    (tmp_path / "vocab.json").write_text(json.dumps({k: v for k, v in vocab.items() if k != END}))
    _one_line_error(lambda: Tokenizer.from_file(tmp_path), tmp_path, END)


# --- training -------------------------------------------------------------------------------------

PROMPTS = [f"a {obj} with a {defect}" for obj in ("bottle", "cable", "capsule", "carpet", "grid",
                                                  "hazelnut", "leather", "metal nut", "pill")
           for defect in ("crack", "scratch", "hole", "broken large", "contamination", "cut")]


def test_train_small_vocabulary(tmp_path):
    trained = Tokenizer.train(PROMPTS * 3, vocab_size=560)
    assert trained.vocab_size == 560 and len(trained.merges) == 560 - 514
    assert sorted(trained.vocab.values()) == list(range(560))
    every_word_whole = Tokenizer.train(PROMPTS, vocab_size=5000)  # runs out of pairs to merge
    assert 514 < every_word_whole.vocab_size < 5000
    assert (every_word_whole(PROMPTS) != every_word_whole.end_id).sum(1).tolist() == \
        [1 + len(p.split()) for p in PROMPTS]  # start + one token a word
    bytes_only = Tokenizer.train(PROMPTS, vocab_size=514)
    assert bytes_only.merges == [] and bytes_only.vocab_size == 514
    n_tokens = lambda t: int((t(PROMPTS) != t.end_id).sum())  # noqa: E731
    assert n_tokens(trained) < 0.6 * n_tokens(bytes_only)

    # The trained files behave as a CLIP vocabulary: the reference BPE gives the same ids.
    trained.save(tmp_path)
    again = Tokenizer.from_file(tmp_path)
    texts = PROMPTS + ["an unseen WORD, with 42 symbols!", "é中😀"]
    assert torch.equal(again(texts), trained(texts))
    assert torch.equal(trained(texts), ReferenceClipTokenizer(tmp_path)(texts))
    with pytest.raises(ValueError):
        Tokenizer.train(PROMPTS, vocab_size=100)


@needs_vocab
def test_known_differences_from_slow_clip_tokenizer(tok, reference):
    """Spellings of the special tokens that appear only after lower-casing or clean-up: the slow
    tokenizer's regex turns them into special tokens (unless a symbol precedes them); minibldm,
    like transformers' tokenizers-backed CLIPTokenizer, keeps them as text."""
    texts = [" <|EndOfText|>", "a <|STARTOFTEXT|> b", "<|end\u200boftext|>"]
    s, e, a, b = tok.start_id, tok.end_id, 320, 321  # a</w>, b</w>
    assert reference(texts)[:, :5].tolist() == [[s, e, e, e, e], [s, a, s, b, e], [s, e, e, e, e]]
    ours = tok(texts)
    for row in ours:
        inner = row[1:int((row != e).sum())]  # between start and the first end-of-text
        assert len(inner) >= 6 and s not in inner and e not in inner
    assert torch.equal(tok(["!<|EndOfText|>"]), reference(["!<|EndOfText|>"]))  # both: text
