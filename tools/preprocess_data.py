"""Turn loose JSON (one document a line) into Megatron's indexed `.bin/.idx` datasets.

    python tools/preprocess_data.py --input my-corpus.json --output-prefix my-gpt2 \\
        --vocab gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --tokenizer-type GPT2BPETokenizer --dataset-impl mmap --append-eod

For every key of `--json-keys` this writes `{prefix}_{key}_document.bin/.idx` (one item per
document), or `{prefix}_{key}_sentence.bin/.idx` with `--split-sentences` (one item per
sentence; the index's doc_idx marks where each document starts).

Contract:
* Output is in input order whatever `--workers` and `--partitions` are, so those flags never
  change a byte of the result.
* With `--append-eod` the end-of-document id is the last token of each document and is
  counted in that item's size.
* Documents that are empty, or tokenise to nothing, are skipped and counted, never written.
* A line that is not JSON, is not an object, or lacks a key (or has a non-string value) stops
  the run with `file:line` in the message and exit status 1; `--skip-invalid` skips and
  counts such lines instead. Whitespace-only lines are ignored.
* A `.gz` input that is truncated, corrupt or not gzip at all stops the run the same way
  (`file:line`, or the file alone when it is not gzip). So does an `--output-prefix` whose
  folder cannot be created or written (under a regular file, read-only): checked before
  any tokenizing.
* Files are written under temporary names and renamed at the very end, so a failed or
  interrupted run (exception, Ctrl-C, SIGTERM) leaves nothing under the final names.

`--input` is a file or a glob (sorted); files ending in `.gz` are decompressed on the fly.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir)))

_MB = 1024 * 1024
_PUNKT_TRAIN_BYTES = 1 << 20  # text sample Punkt is trained on when no model is installed
_IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: bounds memory on huge inputs


class InputError(Exception):
    """Bad input (file, line or flag); reported as one line, exit status 1."""


# ------------------------------------------------------------------------------ arguments


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line (Megatron's flag spellings)."""
    from megatron.tokenizer import TOKENIZER_TYPES

    parser = argparse.ArgumentParser(description="Tokenise loose JSON into .bin/.idx datasets.")
    # fmt: off
    g = parser.add_argument_group(title="input data")
    g.add_argument("--input", type=str, required=True,
                   help="loose JSON file, or a glob of them; .gz files are accepted")
    g.add_argument("--json-keys", nargs="+", default=["text"],
                   help="space separated keys to extract from each JSON line")
    g.add_argument("--split-sentences", action="store_true",
                   help="split documents into sentences (nltk punkt)")
    g.add_argument("--keep-newlines", action="store_true",
                   help="keep newlines between sentences when splitting")
    g.add_argument("--skip-invalid", action="store_true",
                   help="skip and count lines that are not JSON or lack a key")
    g = parser.add_argument_group(title="tokenizer")
    g.add_argument("--tokenizer-type", type=str, required=True, choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file", "--vocab", dest="vocab_file", type=str, default=None,
                   help="path to the vocab file")
    g.add_argument("--merge-file", type=str, default=None, help="path to the BPE merge file")
    g.add_argument("--tokenizer-model", type=str, default=None,
                   help="sentencepiece or HuggingFace tokenizer model")
    g.add_argument("--vocab-extra-ids", type=int, default=0,
                   help="number of <extra_id_N> sentinel tokens to add (T5)")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocab size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocab size to a multiple of this (reported only)")
    g.add_argument("--append-eod", action="store_true",
                   help="append an <eod> token to the end of each document")
    g.add_argument("--lang", type=str, default="english",
                   help="language of the nltk punkt sentence splitter")
    # The pure-Python reference tokenizer (the algorithm of Megatron's own tool), for the
    # benchmark and for cross-checks.
    g.add_argument("--tokenizer-impl", choices=("fast", "tiktoken", "tokenizers", "python"),
                   default="fast",
                   help=argparse.SUPPRESS)
    g = parser.add_argument_group(title="output data")
    g.add_argument("--output-prefix", type=str, required=True,
                   help="path prefix of the output files, without the key and suffix")
    g.add_argument("--dataset-impl", type=str, default="mmap", choices=["lazy", "cached", "mmap"])
    g = parser.add_argument_group(title="runtime")
    g.add_argument("--workers", type=int, default=1, help="worker processes that tokenise")
    g.add_argument("--partitions", type=int, default=1,
                   help="split the input into this many parts, processed at the same time "
                        "and merged at the end")
    g.add_argument("--chunk-size", type=int, default=64, help="lines a worker encodes per task")
    g.add_argument("--log-interval", type=int, default=100,
                   help="report progress every this many documents")
    # fmt: on
    args = parser.parse_args(argv)

    for name in ("workers", "partitions", "chunk_size", "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.vocab_extra_ids < 0:
        parser.error(f"--vocab-extra-ids must be >= 0, got {args.vocab_extra_ids}")
    # Values build_tokenizer reads that this tool does not expose.
    args.rank = 0
    args.tensor_model_parallel_size = 1
    return args


# ------------------------------------------------------------------------------ input


def list_inputs(pattern: str) -> list[str]:
    """The files named by `--input`: the file itself, else the sorted matches of the glob."""
    if os.path.exists(pattern) and not os.path.isdir(pattern):  # a file, or a named pipe
        return [pattern]
    paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not paths:
        raise InputError(f"--input {pattern}: no such file, and no file matches it as a glob")
    return paths


def open_input(path: str):
    """Binary file object of `path`, decompressing `.gz` files."""
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)  # noqa: SIM115


def gzip_problem(path: str, lineno: int | None, err: Exception) -> InputError:
    """The one-line error for a `.gz` input that cannot be decompressed (at line `lineno`,
    when known)."""
    if isinstance(err, gzip.BadGzipFile) and str(err).startswith("Not a gzipped file"):
        return InputError(f"{path}: not a gzip file, although its name ends in .gz")
    where = path if lineno is None else f"{path}:{lineno}"
    if isinstance(err, EOFError):
        return InputError(
            f"{where}: truncated gzip file (the compressed data ends before its "
            "end-of-stream marker)"
        )
    return InputError(f"{where}: corrupt gzip data ({err})")


_GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def read_lines(path: str, f) -> Iterator[bytes]:
    """The lines of input file `path` (open as `f`); a damaged `.gz` raises InputError
    naming the file and the line where reading stopped."""
    lineno = 0
    try:
        for line in f:
            lineno += 1
            yield line
    except _GZIP_ERRORS as e:
        raise gzip_problem(path, lineno + 1, e) from None


@dataclass
class Segment:
    """Lines [start, stop) of one input file (0-based; stop None = to the end)."""

    path: str
    start: int = 0
    stop: int | None = None


def count_lines(path: str) -> int:
    """Number of lines of `path` (a last line without a newline counts)."""
    lines, last = 0, b"\n"
    with open_input(path) as f:
        try:
            for block in iter(lambda: f.read(1 << 22), b""):
                lines += block.count(b"\n")
                last = block[-1:]
        except _GZIP_ERRORS as e:
            raise gzip_problem(path, None, e) from None
    return lines + (last != b"\n")


def partition_segments(paths: list[str], partitions: int) -> list[list[Segment]]:
    """Cut the concatenated lines of `paths` into `partitions` contiguous, near-equal parts."""
    if partitions == 1:
        return [[Segment(p) for p in paths]]
    counts = [count_lines(p) for p in paths]
    total = sum(counts)
    bounds = [total * i // partitions for i in range(partitions + 1)]
    parts: list[list[Segment]] = []
    for lo, hi in itertools.pairwise(bounds):
        part, offset = [], 0
        for path, n in zip(paths, counts):
            start, stop = max(lo - offset, 0), min(hi - offset, n)
            if start < stop:
                part.append(Segment(path, start, stop))
            offset += n
        parts.append(part)
    return parts


def iter_chunks(segments: list[Segment], chunk_size: int) -> Iterator[tuple[str, int, list]]:
    """(path, 1-based number of the first line, up to `chunk_size` raw lines), in order."""
    for seg in segments:
        with open_input(seg.path) as f:
            lines = itertools.islice(read_lines(seg.path, f), seg.start, seg.stop)
            lineno = seg.start + 1
            while True:
                chunk = list(itertools.islice(lines, chunk_size))
                if not chunk:
                    break
                yield seg.path, lineno, chunk
                lineno += len(chunk)


# ------------------------------------------------------------------------------ sentences


def _punkt_lang_vars(keep_newlines: bool):
    """Punkt language variables; with keep_newlines the whitespace (newlines included) after
    a sentence end stays with that sentence, so joining the sentences restores the text."""
    from nltk.tokenize import punkt

    if not keep_newlines:
        return punkt.PunktLanguageVars()

    class NewlineKeepingVars(punkt.PunktLanguageVars):
        # Punkt finds a candidate sentence end with this pattern: word material, an
        # end character, then the next token. The stock pattern needs whitespace before the
        # next token and leaves it out of the sentence; taking `\s*` into the match and
        # letting the next token start right after keeps that whitespace in the sentence.
        _period_context_fmt = r"""
            \S*                          # word material before the end character
            %(SentEndChars)s             # a potential sentence end
            \s*                          # whitespace, newlines included, stays with it
            (?=(?P<after_tok>
                %(NonWord)s              # punctuation follows
                |
                (?P<next_tok>\S+)        # or the next word
            ))"""

    return NewlineKeepingVars()


def _installed_punkt(lang: str):
    """Parameters of the installed punkt model for `lang`, or None."""
    import nltk

    try:
        return nltk.data.load(f"tokenizers/punkt/{lang}.pickle")._params
    except (LookupError, OSError, ValueError):
        pass
    try:
        from nltk.tokenize.punkt import PunktTokenizer  # punkt_tab, nltk >= 3.8.2

        return PunktTokenizer(lang)._params
    except (ImportError, LookupError, OSError, ValueError):
        return None


def _download_punkt(timeout: float = 10.0) -> bool:
    """Try to fetch punkt/punkt_tab quietly; False at once when the host does not resolve."""
    import socket
    import threading

    import nltk

    resolved = []

    def resolve() -> None:
        try:
            resolved.append(socket.getaddrinfo("raw.githubusercontent.com", 443))
        except OSError:  # offline: no download, and nothing to print
            pass

    probe = threading.Thread(target=resolve, daemon=True)
    probe.start()
    probe.join(2.0)
    if not resolved:
        return False
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        return any(nltk.download(name, quiet=True, raise_on_error=False)
                   for name in ("punkt_tab", "punkt"))  # fmt: skip
    except Exception:  # noqa: BLE001 - any download failure means "not available"
        return False
    finally:
        socket.setdefaulttimeout(old)


def _training_text(paths: list[str], keys: list[str], limit: int) -> str:
    """The first `limit` bytes (about) of document text of the input, for training Punkt."""
    texts, size = [], 0
    for path in paths:
        with open_input(path) as f:
            for line in read_lines(path, f):
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                for key in keys:
                    value = doc.get(key) if isinstance(doc, dict) else None
                    if isinstance(value, str) and value:
                        texts.append(value)
                        size += len(value)
                if size >= limit:
                    return "\n\n".join(texts)
    return "\n\n".join(texts)


def build_splitter(args: argparse.Namespace, paths: list[str]):
    """nltk Punkt sentence splitter for `--lang`.

    Uses the installed punkt model; if there is none and it cannot be downloaded, trains
    Punkt (unsupervised) on the first MiB of the input and says so once.
    """
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer

    params = _installed_punkt(args.lang)
    if params is None and _download_punkt():
        params = _installed_punkt(args.lang)
    if params is None:
        text = _training_text(paths, args.json_keys, _PUNKT_TRAIN_BYTES)
        if not text:
            raise InputError(f"--input {args.input}: no text to train the Punkt splitter on")
        trainer = PunktTrainer(lang_vars=_punkt_lang_vars(False))
        trainer.train(text, finalize=True)
        params = trainer.get_params()
        print(
            f"punkt model for '{args.lang}' not found; trained Punkt on "
            f"{len(text.encode('utf-8')) / _MB:.2f} MB of the input",
            file=sys.stderr,
            flush=True,
        )
    return PunktSentenceTokenizer(params, lang_vars=_punkt_lang_vars(args.keep_newlines))


# ------------------------------------------------------------------------------ encoding


@dataclass
class KeyData:
    """One chunk's kept documents for one JSON key."""

    tokens: np.ndarray  # [n_tokens] every kept document's items, concatenated
    sizes: np.ndarray  # [n_items] length of each item (sentence, or whole document)
    doc_items: np.ndarray  # [n_docs] number of items of each kept document
    empty: int  # documents skipped because they hold no tokens


@dataclass
class ChunkResult:
    """What `Encoder.encode_chunk` returns for one chunk of lines."""

    lines: int  # non-blank lines read
    nbytes: int  # their size in bytes
    invalid: int  # lines skipped by --skip-invalid
    keys: dict[str, KeyData]


class TokenBytes:
    """Token ids of texts as raw bytes in the output dtype, straight from the tokenizer.

    The tokenizer runs on the calling thread, so `--workers` is the number of CPUs in use.
    """

    def __init__(self, tokenizer, dtype: type) -> None:
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)

    def __call__(self, texts: list[str]) -> list[bytes]:
        if not texts:
            return []
        # tokenize_batch_bytes skips the list of Python ints where the backend allows it.
        batch_bytes = getattr(self.tokenizer, "tokenize_batch_bytes", None)
        if batch_bytes is not None:
            return batch_bytes(texts, self.dtype)
        ids = self.tokenizer.tokenize_batch(texts)
        return [np.asarray(x, dtype=self.dtype).tobytes() for x in ids]


def _is_unicode(text: str) -> bool:
    """False when text holds a lone surrogate (a JSON escape like "\\ud800" gives one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class Encoder:
    """Parses JSON lines and tokenises their documents (one instance per process)."""

    def __init__(self, args: argparse.Namespace, tokenizer, splitter, dtype: type) -> None:
        self.keys = list(args.json_keys)
        self.skip_invalid = args.skip_invalid
        self.tokenizer = tokenizer
        self.splitter = splitter
        self.dtype = np.dtype(dtype)
        self.eod = np.asarray([tokenizer.eod], self.dtype).tobytes() if args.append_eod else None
        self.token_bytes = TokenBytes(tokenizer, dtype)

    def _parse(self, path: str, lineno: int, lines: list[bytes]) -> tuple[list[list[str]], int]:
        """Per valid line, its values for self.keys; and how many lines were skipped."""
        docs, invalid = [], 0
        for i, raw in enumerate(lines):
            if raw.isspace() or not raw:
                continue
            try:
                doc = json.loads(raw)
            except ValueError as e:  # includes UnicodeDecodeError
                problem = f"invalid JSON ({e})"
            else:
                problem = None
                if not isinstance(doc, dict):
                    problem = f"expected a JSON object, got {type(doc).__name__}"
                else:
                    values = []
                    for key in self.keys:
                        value = doc.get(key)
                        if value is None and key not in doc:
                            problem = f"key '{key}' not found (keys: {', '.join(doc)})"
                            break
                        if not isinstance(value, str):
                            problem = f"key '{key}' holds {type(value).__name__}, not a string"
                            break
                        if not (value.isascii() or _is_unicode(value)):
                            problem = f"key '{key}' holds a lone surrogate (not valid Unicode)"
                            break
                        values.append(value)
            if problem is None:
                docs.append(values)
            elif self.skip_invalid:
                invalid += 1
            else:
                raise InputError(f"{path}:{lineno + i}: {problem} (use --skip-invalid to skip)")
        return docs, invalid

    def _encode_key(self, texts: list[str]) -> KeyData:
        """Tokenise documents (splitting sentences if asked) into one KeyData."""
        if self.splitter is not None:
            sentences = [self.splitter.tokenize(text) for text in texts]
        else:
            sentences = [[text] for text in texts]
        encoded = self.token_bytes([s for doc in sentences for s in doc])  # bytes per item
        kept: list[bytes] = []  # kept items, in order
        doc_items: list[int] = []
        empty, pos = 0, 0
        for doc in sentences:
            items = [x for x in encoded[pos : pos + len(doc)] if x]
            pos += len(doc)
            if not items:
                empty += 1
                continue
            if self.eod is not None:
                # The eod belongs to the last item and is counted in its size. (Megatron's
                # own tool records that size before appending the eod, so its index
                # disagrees with its .bin by one token per document; not reproduced here.)
                items[-1] += self.eod
            kept.extend(items)
            doc_items.append(len(items))
        sizes = np.fromiter(map(len, kept), dtype=np.int64, count=len(kept))
        sizes //= self.dtype.itemsize
        tokens = np.frombuffer(b"".join(kept), dtype=self.dtype)
        return KeyData(tokens, sizes, np.asarray(doc_items, dtype=np.int64), empty)

    def encode_chunk(self, chunk: tuple[str, int, list[bytes]]) -> ChunkResult:
        """Encode one chunk `(path, first line number, raw lines)`."""
        path, lineno, lines = chunk
        docs, invalid = self._parse(path, lineno, lines)
        keys = {key: self._encode_key([d[k] for d in docs]) for k, key in enumerate(self.keys)}
        nbytes = sum(len(raw) for raw in lines)
        lines_read = sum(1 for raw in lines if raw and not raw.isspace())
        return ChunkResult(lines_read, nbytes, invalid, keys)


_ENCODER: Encoder | None = None  # the encoder of this process (pool workers inherit it)


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that clean-up code runs."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _worker_init(encoder: Encoder | None) -> None:
    """Pool worker set-up: the parent handles Ctrl-C and SIGTERM and then stops the pool."""
    global _ENCODER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if encoder is not None:
        _ENCODER = encoder


def _encode_in_worker(chunk: tuple[str, int, list[bytes]]) -> ChunkResult:
    return _ENCODER.encode_chunk(chunk)


def _mp_context():
    import multiprocessing

    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else methods[0])


def encode_all(chunks: Iterator, workers: int) -> Iterator[ChunkResult]:
    """Encode chunks in order: in this process when workers == 1, else on a process pool
    with at most `_IN_FLIGHT_PER_WORKER * workers` chunks queued at any time."""
    if workers == 1:
        for chunk in chunks:
            yield _ENCODER.encode_chunk(chunk)
        return
    ctx = _mp_context()
    initarg = None if ctx.get_start_method() == "fork" else _ENCODER
    pool = ctx.Pool(workers, initializer=_worker_init, initargs=(initarg,))
    pending: collections.deque = collections.deque()
    try:
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= _IN_FLIGHT_PER_WORKER * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ------------------------------------------------------------------------------ writing


@dataclass
class Stats:
    """Counters of a run (per JSON key where they differ between keys)."""

    lines: int = 0
    nbytes: int = 0
    invalid: int = 0
    docs: collections.Counter = field(default_factory=collections.Counter)
    items: collections.Counter = field(default_factory=collections.Counter)
    tokens: collections.Counter = field(default_factory=collections.Counter)
    empty: collections.Counter = field(default_factory=collections.Counter)

    def add_chunk(self, result: ChunkResult) -> None:
        self.lines += result.lines
        self.nbytes += result.nbytes
        self.invalid += result.invalid
        for key, data in result.keys.items():
            self.docs[key] += len(data.doc_items)
            self.items[key] += len(data.sizes)
            self.tokens[key] += len(data.tokens)
            self.empty[key] += data.empty

    def merge(self, other: Stats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class DatasetWriter:
    """One indexed-dataset builder per JSON key; all-or-nothing `finalize()`."""

    def __init__(self, prefixes: dict[str, str], impl: str, vocab_size: int) -> None:
        from megatron.data.indexed_dataset import data_file_path, make_builder

        self.prefixes = prefixes
        self.builders = {}
        try:
            for key, prefix in prefixes.items():
                self.builders[key] = make_builder(data_file_path(prefix), impl, vocab_size)
        except BaseException:
            self.abort()
            raise

    def add(self, result: ChunkResult) -> None:
        for key, data in result.keys.items():
            builder = self.builders[key]
            item_ends = np.cumsum(data.sizes)
            first_item = 0
            for n_items in data.doc_items.tolist():
                last_item = first_item + n_items
                start = int(item_ends[first_item - 1]) if first_item else 0
                end = int(item_ends[last_item - 1])
                builder.add_doc(data.tokens[start:end], data.sizes[first_item:last_item])
                first_item = last_item

    def merge(self, part_prefixes: list[dict[str, str]]) -> None:
        for prefixes in part_prefixes:
            for key, builder in self.builders.items():
                builder.merge_file_(prefixes[key])

    def finalize(self) -> None:
        """Rename every key's files into place with Ctrl-C/SIGTERM held off meanwhile."""
        from megatron.data.indexed_dataset import index_file_path

        blocked = {signal.SIGINT, signal.SIGTERM}
        old = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        done = []
        try:
            for key, builder in self.builders.items():
                builder.finalize(index_file_path(self.prefixes[key]))
                done.append(self.prefixes[key])
        except BaseException:
            self.abort()
            for prefix in done:  # all keys or none
                remove_dataset(prefix)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def abort(self) -> None:
        for builder in self.builders.values():
            builder.abort()


def remove_dataset(prefix: str) -> None:
    """Delete `prefix.bin/.idx` and their temporary files, where present."""
    for suffix in (".bin", ".idx", ".bin.tmp", ".idx.tmp"):
        if os.path.exists(prefix + suffix):
            os.remove(prefix + suffix)


# ------------------------------------------------------------------------------ running


class Progress:
    """Prints `Processed N documents (x docs/s, y MB/s).` every `interval` documents."""

    def __init__(self, interval: int, label: str = "") -> None:
        self.interval = interval
        self.label = label
        self.start = time.perf_counter()
        self.next_report = interval

    def update(self, stats: Stats) -> None:
        if stats.lines < self.next_report:
            return
        self.next_report = (stats.lines // self.interval + 1) * self.interval
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        print(
            f"{self.label}Processed {stats.lines} documents "
            f"({stats.lines / elapsed:.1f} docs/s, {stats.nbytes / _MB / elapsed:.2f} MB/s).",
            file=sys.stderr,
            flush=True,
        )


def run_partition(
    args: argparse.Namespace,
    segments: list[Segment],
    prefixes: dict[str, str],
    vocab_size: int,
    workers: int,
    label: str = "",
) -> Stats:
    """Encode `segments` with `workers` processes and write the datasets at `prefixes`."""
    stats = Stats()
    progress = Progress(args.log_interval, label)
    writer = DatasetWriter(prefixes, args.dataset_impl, vocab_size)
    try:
        for result in encode_all(iter_chunks(segments, args.chunk_size), workers):
            writer.add(result)
            stats.add_chunk(result)
            progress.update(stats)
        writer.finalize()
    except BaseException:
        writer.abort()
        raise
    return stats


def _partition_child(args, segments, prefixes, vocab_size, workers, label, conn) -> None:
    """Body of a partition process: send ("ok", Stats) or ("error", message) to the parent."""
    try:
        conn.send(("ok", run_partition(args, segments, prefixes, vocab_size, workers, label)))
    except InputError as e:
        conn.send(("error", str(e)))
    except Exception as e:  # noqa: BLE001 - reported by the parent as one line
        conn.send(("error", f"{label}{type(e).__name__}: {e}"))
    finally:
        conn.close()


def run_partitions(
    args: argparse.Namespace, parts: list[list[Segment]], prefixes: dict[str, str], vocab_size: int
) -> Stats:
    """Encode each part in its own process (workers shared out), then merge in order."""
    n = len(parts)
    workers = max(1, args.workers // n)
    part_prefixes = [{k: f"{p}.part{i}of{n}" for k, p in prefixes.items()} for i in range(n)]
    ctx = _mp_context()
    procs, conns = [], []
    try:
        for i, segments in enumerate(parts):
            recv, send = ctx.Pipe(duplex=False)
            label = f"partition {i + 1}/{n}: "
            proc = ctx.Process(
                target=_partition_child,
                args=(args, segments, part_prefixes[i], vocab_size, workers, label, send),
            )
            proc.start()
            send.close()
            procs.append(proc)
            conns.append(recv)
        replies = []
        for i, conn in enumerate(conns):
            try:
                replies.append(conn.recv())
            except EOFError:
                replies.append(("error", f"partition {i + 1}/{n}: worker process died"))
        for status, payload in replies:
            if status == "error":
                raise InputError(payload)
        stats = Stats()
        for _, part_stats in replies:
            stats.merge(part_stats)
        writer = DatasetWriter(prefixes, args.dataset_impl, vocab_size)
        try:
            writer.merge(part_prefixes)
            writer.finalize()
        except BaseException:
            writer.abort()
            raise
        return stats
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
        for part in part_prefixes:
            for prefix in part.values():
                remove_dataset(prefix)


def output_prefixes(args: argparse.Namespace) -> dict[str, str]:
    """`{key: f"{output_prefix}_{key}_{document|sentence}"}` for every JSON key."""
    level = "sentence" if args.split_sentences else "document"
    return {key: f"{args.output_prefix}_{key}_{level}" for key in args.json_keys}


def _first_existing(path: str) -> str:
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def prepare_output_folder(prefix: str) -> str | None:
    """Create the folder of `--output-prefix` and check that files can be created in it, by
    creating one (permission bits alone mislead: root ignores them, a read-only mount does
    not). Returns the topmost folder this created (to remove if the run fails), or None;
    raises InputError naming the flag and the folder."""
    flag = f"--output-prefix {prefix}"
    folder = os.path.dirname(os.path.abspath(prefix))
    existing = _first_existing(folder)
    if not os.path.isdir(existing):
        raise InputError(f"{flag}: {existing} is a file, not a folder")
    created = None
    if existing != folder:
        rest = os.path.relpath(folder, existing).split(os.sep)[0]
        created = os.path.join(existing, rest)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".preprocess-probe-", dir=folder)
    except OSError as e:
        remove_empty_folders(created)
        raise InputError(f"{flag}: cannot write in folder {folder} ({e.strerror})") from None
    os.close(fd)
    os.remove(probe)
    return created


def remove_empty_folders(top: str | None) -> None:
    """Remove `top` and the folders under it when they hold no file."""
    if top is None or not os.path.isdir(top):
        return
    for root, _, _ in sorted(os.walk(top), key=lambda w: -len(w[0])):
        try:
            os.rmdir(root)
        except OSError:  # not empty: keep it
            pass


def build(args: argparse.Namespace) -> Stats:
    """Everything after parsing: output folder, tokenizer, splitter, encoding, writing."""
    paths = list_inputs(args.input)
    created = prepare_output_folder(args.output_prefix)
    try:
        return _build(args, paths)
    except BaseException:
        remove_empty_folders(created)
        raise


def _build(args: argparse.Namespace, paths: list[str]) -> Stats:
    """Tokenizer, splitter, encoding and writing of `paths`."""
    global _ENCODER
    from megatron.data.indexed_dataset import best_fitting_dtype
    from megatron.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(args)
    if args.append_eod:
        try:
            tokenizer.eod  # noqa: B018 - probe
        except (AttributeError, NotImplementedError) as e:
            raise InputError(
                f"--append-eod: {args.tokenizer_type} has no end-of-document token"
            ) from e
    splitter = build_splitter(args, paths) if args.split_sentences else None
    vocab_size = tokenizer.vocab_size
    dtype = best_fitting_dtype(vocab_size) if args.dataset_impl == "mmap" else np.int32
    _ENCODER = Encoder(args, tokenizer, splitter, dtype)

    prefixes = output_prefixes(args)
    if args.partitions == 1:
        return run_partition(args, [Segment(p) for p in paths], prefixes, vocab_size, args.workers)
    return run_partitions(args, partition_segments(paths, args.partitions), prefixes, vocab_size)


def summary(args: argparse.Namespace, stats: Stats, seconds: float) -> str:
    """The closing report: one line per key when there are several, then the totals."""
    lines = []
    prefixes = output_prefixes(args)
    if len(prefixes) > 1:
        for key, prefix in prefixes.items():
            lines.append(
                f"  {key}: {stats.docs[key]} documents, {stats.items[key]} items, "
                f"{stats.tokens[key]} tokens, {stats.empty[key]} skipped empty -> {prefix}"
            )
    docs = sum(stats.docs.values())
    lines.append(
        f"Done: {docs} documents written, {sum(stats.empty.values())} skipped empty, "
        f"{stats.invalid} skipped invalid, {sum(stats.tokens.values())} tokens, "
        f"{stats.nbytes / _MB:.2f} MB in {seconds:.2f} s "
        f"({stats.lines / seconds:.1f} docs/s, {stats.nbytes / _MB / seconds:.2f} MB/s)"
        + ("" if len(prefixes) > 1 else f" -> {next(iter(prefixes.values()))}.bin/.idx")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    # tiktoken encodes on the calling thread; the Rust `tokenizers` fallback gets one thread
    # per process too, so --workers is the real degree of parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    args = get_args(argv)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        stats = build(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError, NotImplementedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # unreadable input, full disk, ...: one line naming the file
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; no output written", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; no output written", file=sys.stderr)
        return 143
    print(summary(args, stats, max(time.perf_counter() - start, 1e-9)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
