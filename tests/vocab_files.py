"""Vocabulary files for the tests: the real GPT-2 / BERT files when they are on this machine,
otherwise a GPT-2-format byte-level BPE and an uncased WordPiece vocabulary trained here from
the test corpus with the `tokenizers` trainers.

The trained files have the real files' names and layouts, so a test passes the same
`--vocab-file` / `--merge-file` paths either way:

- gpt2-vocab.json / gpt2-merges.txt: the 256 byte tokens in GPT-2's order (ids 0-255), merge k
  -> id 256 + k, '<|endoftext|>' last (as 50256 is in GPT-2); the merge file starts with
  '#version: 0.2'.
- bert-large-uncased-vocab.txt: [PAD] [UNK] [CLS] [SEP] [MASK] (ids 0-4), then the WordPiece
  tokens of the lower-cased, accent-stripped text, one a line.

Training is deterministic (a fixed corpus, no randomness in either trainer); the files are
built once per test session (tests/conftest.py). Only tests that check the published GPT-2 /
BERT ids need the real files.
"""

from __future__ import annotations

import json
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
CORPUS = os.path.join(ROOT, "tests", "data", "corpus_small.jsonl")
SHARED_VOCAB = os.path.join(ROOT, "..", "shared", "vocab")
GPT2_FILES = ("gpt2-vocab.json", "gpt2-merges.txt")
BERT_FILE = "bert-large-uncased-vocab.txt"
# Small enough for tiny test models (the real ones are 50257 and 30522), large enough that
# words of the corpus are a few tokens each.
GPT2_VOCAB_SIZE = 4096
BERT_VOCAB_SIZE = 4096
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
EOD = "<|endoftext|>"
# The reason every test that needs the real files skips with when they are missing.
REAL_VOCAB_MISSING = (
    "needs the GPT-2/BERT vocabulary files: run dataset/download_vocab.sh or set MEGATRON_VOCAB_DIR"
)


def find_real_vocab_dir() -> str | None:
    """The folder with the real GPT-2 and BERT files: $MEGATRON_VOCAB_DIR, else ../shared/vocab
    beside the repository; None when neither holds gpt2-vocab.json."""
    for path in (os.environ.get("MEGATRON_VOCAB_DIR"), SHARED_VOCAB):
        if path and os.path.isfile(os.path.join(path, GPT2_FILES[0])):
            return os.path.abspath(path)
    return None


def corpus_texts(path: str = CORPUS) -> list[str]:
    """The documents of a loose-JSON corpus ({"text": ...} a line)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _gpt2_byte_order() -> list[str]:
    """GPT-2's 256 byte tokens in the order of its vocabulary (ids 0-255): the printable
    bytes as themselves, then the others shifted past U+0100."""
    from megatron.tokenizer.gpt2_tokenization import bytes_to_unicode

    table = bytes_to_unicode()
    printable = [b for b in range(256) if table[b] == chr(b)]
    return [table[b] for b in printable] + [table[b] for b in range(256) if table[b] != chr(b)]


def train_gpt2_bpe(texts: list[str], out_dir: str, vocab_size: int = GPT2_VOCAB_SIZE) -> None:
    """Train a byte-level BPE on `texts` and write gpt2-vocab.json / gpt2-merges.txt in GPT-2's
    layout into out_dir (vocab_size counts the bytes, the merges and '<|endoftext|>')."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    # GPT-2's pre-tokenizer: its split pattern, no added prefix space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # tokenizers >= 0.20 saves a merge as [a, b], older versions as "a b".
    saved = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in saved]
    tokens = _gpt2_byte_order() + [a + b for a, b in merges] + [EOD]
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("trained BPE: two merges give the same token")
    with open(os.path.join(out_dir, GPT2_FILES[0]), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, GPT2_FILES[1]), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def train_bert_wordpiece(texts: list[str], out_dir: str, vocab_size: int = BERT_VOCAB_SIZE) -> None:
    """Train an uncased WordPiece vocabulary on `texts` and write it, one token a line in id
    order, as bert-large-uncased-vocab.txt.

    The words come from BERT's normaliser (lower case, accents stripped) and pre-tokenizer.
    The tokenizers BPE trainer learns the pieces, as its WordPieceTrainer does, but over words
    whose non-initial characters are spelled with stand-in characters (one private-use code
    point per character, all in the initial alphabet): the WordPieceTrainer adds each '##c'
    in hash order, so the ties between merge counts, and the vocabulary, vary from run to run.
    A piece that starts with a stand-in is written back as '##' + its characters.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    docs = [[w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))] for t in texts]
    chars = sorted({c for words in docs for w in words for c in w})
    stand_in = {c: chr(0xF0000 + i) for i, c in enumerate(chars)}
    original = {s: c for c, s in stand_in.items()}
    spelled = [" ".join(w[0] + w[1:].translate(str.maketrans(stand_in)) for w in words)
               for words in docs]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BERT_SPECIALS),
        initial_alphabet=chars + list(stand_in.values()),
        show_progress=False,
    )
    tok.train_from_iterator(spelled, trainer)
    vocab = tok.get_vocab()
    back = str.maketrans(original)
    pieces = [
        "##" + t.translate(back) if t[0] in original else t.translate(back)
        for t in sorted(vocab, key=vocab.__getitem__)
    ]
    tokens = BERT_SPECIALS + pieces
    if len(set(tokens)) != len(tokens):
        raise RuntimeError("trained WordPiece: a piece is listed twice")
    with open(os.path.join(out_dir, BERT_FILE), "w", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in tokens))


def build_trained_vocab_dir(out_dir: str, corpus: str = CORPUS) -> str:
    """Write the trained GPT-2 and BERT files into out_dir (created) and return it."""
    os.makedirs(out_dir, exist_ok=True)
    texts = corpus_texts(corpus)
    train_gpt2_bpe(texts, out_dir)
    train_bert_wordpiece(texts, out_dir)
    return os.path.abspath(out_dir)
