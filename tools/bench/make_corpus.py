"""Build a real English corpus offline, as loose JSON (one ``{"text": ...}`` per line).

The text is the prose that ships with the installed Python standard library:

1. the language-reference topics of ``pydoc_data.topics`` (the text ``help()`` prints);
2. for every ``.py`` file of the standard library, in sorted path order: the module,
   class and function docstrings (found in the source text, nothing is imported) and the
   paragraphs of full-line ``#`` comments.

Paragraphs are grouped into documents of about ``--doc-chars`` characters, never splitting a
paragraph, so the corpus looks like a collection of short articles (the reference corpus of
the preprocessing benchmark has ~2.8 kB per document). The output is deterministic for a
given Python installation. When the standard library holds less prose than ``--min-mb``,
the documents are emitted again, each pass numbered in a short heading so no two documents
are identical.

Usage::

    python tools/bench/make_corpus.py --output corpus.json --min-mb 10

or from Python: ``write_corpus(path, min_mb=10)``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator

_MB = 1024 * 1024
# Folders whose files are mostly code or data rather than prose.
_SKIP_DIRS = {"site-packages", "__pycache__", "lib2to3/tests/data", "encodings"}


def _stdlib_files(stdlib: str) -> list[str]:
    """Sorted paths (relative to ``stdlib``) of the standard library's ``.py`` files."""
    found = []
    for root, dirs, files in os.walk(stdlib):
        rel_root = os.path.relpath(root, stdlib)
        dirs[:] = sorted(
            d for d in dirs if os.path.join(rel_root, d).lstrip("./") not in _SKIP_DIRS
        )
        if rel_root.split(os.sep)[0] in _SKIP_DIRS:
            continue
        found.extend(
            os.path.normpath(os.path.join(rel_root, f)) for f in files if f.endswith(".py")
        )
    return sorted(found)


def _clean(text: str) -> str:
    """Dedent and strip a docstring; collapse runs of blank lines to one."""
    lines = [line.rstrip() for line in text.expandtabs(4).strip().splitlines()]
    out: list[str] = []
    for line in lines:
        if line or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


# A triple-quoted string that opens a line: in library code that is a docstring (module,
# class or function) nearly always. A regex is used rather than ``ast`` because parsing the
# whole standard library takes tens of seconds and this must take a few.
_DOCSTRING = re.compile(r'^[ \t]*[rRuU]?("""|\'\'\')(.*?)\1', re.DOTALL | re.MULTILINE)


def _docstrings(source: str) -> list[str]:
    """Docstrings of ``source`` in source order (at least 40 characters each)."""
    docs = []
    for match in _DOCSTRING.finditer(source):
        doc = _clean(inspect.cleandoc(match.group(2)))
        if len(doc) >= 40:
            docs.append(doc)
    return docs


def _comment_paragraphs(source: str) -> list[str]:
    """Runs of consecutive full-line ``#`` comments, joined into paragraphs of prose."""
    paragraphs, current = [], []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#!"):
            words = stripped.lstrip("#").strip()
            if words and not words.startswith(("-*-", "noqa", "type:", "pragma")):
                current.append(words)
                continue
        if current:
            text = " ".join(current)
            # Keep prose: a few words with letters, not commented-out code.
            if len(text) >= 60 and sum(c.isalpha() or c == " " for c in text) > 0.8 * len(text):
                paragraphs.append(text)
            current = []
    return paragraphs


def _paragraphs(stdlib: str) -> Iterator[str]:
    """Every prose paragraph of the standard library, in a fixed order."""
    try:
        from pydoc_data import topics
    except ImportError:  # a stripped-down Python without the help topics
        topics = None
    if topics is not None:
        for name in sorted(topics.topics):
            for para in topics.topics[name].split("\n\n"):
                para = _clean(para)
                if para:
                    yield para
    for rel in _stdlib_files(stdlib):
        try:
            with open(os.path.join(stdlib, rel), encoding="utf-8") as f:
                source = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        yield from _docstrings(source)
        yield from _comment_paragraphs(source)


def iter_documents(
    min_bytes: int, doc_chars: int = 2000, stdlib: str | None = None
) -> Iterator[str]:
    """Yield documents (strings) until their UTF-8 sizes sum to at least ``min_bytes``.

    Paragraphs are appended to the current document (separated by a blank line) until it
    holds ``doc_chars`` characters. If one pass over the standard library is not enough, the
    next pass repeats the documents under a heading naming the pass.
    """
    stdlib = stdlib or sysconfig.get_paths()["stdlib"]
    total, rounds = 0, 0
    seen: list[str] = []  # paragraphs of the first pass, replayed by later passes
    while total < min_bytes:
        emitted_this_pass = 0
        current: list[str] = []
        size = 0
        for para in seen if rounds else _paragraphs(stdlib):
            if not rounds:
                seen.append(para)
            current.append(para)
            size += len(para) + 2
            if size >= doc_chars:
                doc = "\n\n".join(current)
                if rounds:
                    doc = f"Reading {rounds + 1}.\n\n{doc}"
                yield doc
                total += len(doc.encode("utf-8"))
                emitted_this_pass += 1
                current, size = [], 0
                if total >= min_bytes:
                    return
        if emitted_this_pass == 0:
            raise RuntimeError(f"no prose found in the standard library at {stdlib}")
        rounds += 1


def write_corpus(output: str, min_mb: float = 10.0, doc_chars: int = 2000) -> tuple[int, int]:
    """Write the corpus to ``output`` (loose JSON, one document a line).

    Returns ``(documents, bytes)`` where bytes is the size of the file written.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = output + ".tmp"
    docs = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in iter_documents(int(min_mb * _MB), doc_chars):
            f.write(json.dumps({"text": doc}, ensure_ascii=False))
            f.write("\n")
            docs += 1
    os.replace(tmp, output)
    return docs, os.path.getsize(output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="the loose-JSON file to write")
    parser.add_argument("--min-mb", type=float, default=10.0, help="stop after this many MiB")
    parser.add_argument("--doc-chars", type=int, default=2000, help="characters per document")
    args = parser.parse_args(argv)
    if args.min_mb <= 0:
        parser.error(f"--min-mb must be positive, got {args.min_mb}")
    start = time.perf_counter()
    docs, size = write_corpus(args.output, args.min_mb, args.doc_chars)
    print(
        f"wrote {args.output}: {docs} documents, {size / _MB:.1f} MB "
        f"in {time.perf_counter() - start:.1f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
