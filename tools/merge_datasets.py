"""Merge several `.bin/.idx` datasets into one, keeping every document boundary.

    python tools/merge_datasets.py --input data/shards --output-prefix data/merged
    python tools/merge_datasets.py --input a_text_document b_text_document \\
        --output-prefix merged_text_document

`--input` is either one folder (every `<prefix>.bin/.idx` pair in it, merged in sorted
prefix order) or a list of dataset prefixes (merged in the order given). All inputs must
have the same format (mmap or lazy/cached) and dtype; the output takes both. The output
appears under its final names only once complete.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from megatron.data import indexed_dataset  # noqa: E402


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    group = parser.add_argument_group(title="input data")
    group.add_argument(
        "--input",
        type=str,
        nargs="+",
        required=True,
        help="Folder holding the .bin/.idx pairs to merge, or the dataset prefixes themselves",
    )
    group = parser.add_argument_group(title="output data")
    group.add_argument(
        "--output-prefix",
        type=str,
        required=True,
        help="Path of the merged dataset without the .bin/.idx suffix",
    )
    return parser.parse_args(argv)


def find_prefixes(inputs: list[str]) -> list[str]:
    """Dataset prefixes named by `--input`: a folder's pairs sorted, or the prefixes given."""
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        folder = inputs[0]
        prefixes = set()
        for name in os.listdir(folder):
            stem, ext = os.path.splitext(name)
            if ext not in (".bin", ".idx") or not os.path.isfile(os.path.join(folder, name)):
                continue
            prefix = os.path.join(folder, stem)
            pair = prefix + (".bin" if ext == ".idx" else ".idx")
            if not os.path.isfile(pair):
                raise SystemExit(f"--input: {os.path.join(folder, name)} has no matching {pair}")
            prefixes.add(prefix)
        if not prefixes:
            raise SystemExit(f"--input: no .bin/.idx pairs in folder {folder}")
        return sorted(prefixes)
    for prefix in inputs:
        if not indexed_dataset.IndexedDataset.exists(prefix):
            raise SystemExit(
                f"--input: dataset {prefix} not found (need {prefix}.bin and {prefix}.idx)"
            )
    return list(inputs)


def dataset_format(prefix: str) -> tuple[str, type]:
    """('mmap' | 'lazy', dtype) of the dataset at `prefix`, from its index header."""
    impl = indexed_dataset.infer_dataset_impl(prefix)
    if impl == "mmap":
        index = indexed_dataset.MMapIndexedDataset.Index(prefix + ".idx", skip_warmup=True)
        return "mmap", index.dtype
    return "lazy", indexed_dataset.IndexedDataset(prefix).dtype


def merge(prefixes: list[str], output_prefix: str) -> None:
    """Concatenate the datasets at `prefixes` into `output_prefix`.{bin,idx}."""
    formats = [dataset_format(p) for p in prefixes]
    impl, dtype = formats[0]
    for prefix, (other_impl, other_dtype) in zip(prefixes, formats):
        if (other_impl, other_dtype) != (impl, dtype):
            raise SystemExit(
                f"--input: {prefix} is {other_impl} {other_dtype.__name__} but {prefixes[0]} "
                f"is {impl} {dtype.__name__}; all inputs must share format and dtype"
            )
    out = os.path.abspath(output_prefix)
    if any(os.path.abspath(p) == out for p in prefixes):
        raise SystemExit(f"--output-prefix: {output_prefix} is also an input")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if impl == "mmap":
        builder = indexed_dataset.MMapIndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    else:
        builder = indexed_dataset.IndexedDatasetBuilder(output_prefix + ".bin", dtype=dtype)
    with builder:
        for prefix in prefixes:
            builder.merge_file_(prefix)
        builder.finalize(output_prefix + ".idx")


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    prefixes = find_prefixes(args.input)
    try:
        merge(prefixes, args.output_prefix)
    except (indexed_dataset.IndexedDatasetError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin/.idx", flush=True)


if __name__ == "__main__":
    main()
