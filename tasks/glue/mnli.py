"""MultiNLI: premise/hypothesis pairs labelled contradiction, entailment or neutral.

GLUE's MNLI files have the header index, promptID, pairID, genre, the two binary parses,
the two parses, sentence1, sentence2, then label1 (.. label5 in the dev files) and
gold_label; the test files stop after sentence2 and get the label `test_label`.
"""

from __future__ import annotations

from .data import GLUEDataset, TaskDataError, column, nonempty_text, parse_uid, read_tsv

LABELS = {"contradiction": 0, "entailment": 1, "neutral": 2}


class MNLIDataset(GLUEDataset):
    task_name = "MNLI"

    def __init__(self, dataset_name, datapaths, tokenizer, max_seq_length,
                 test_label: str = "contradiction") -> None:
        self.test_label = test_label
        super().__init__(dataset_name, datapaths, tokenizer, max_seq_length)

    def read_file(self, path: str) -> list[dict]:
        header, rows = read_tsv(path)
        uid_col = column(header, "index", path)
        a_col = column(header, "sentence1", path)
        b_col = column(header, "sentence2", path)
        label_col = header.index("gold_label") if "gold_label" in header else None
        samples = []
        for number, row in rows:
            if label_col is None:
                label = self.test_label
            else:
                label = row[label_col].strip()
                if label not in LABELS:
                    raise TaskDataError(
                        f"{path}:{number}: gold_label {label!r} is not one of "
                        f"{', '.join(LABELS)}"
                    )
            samples.append({
                "text_a": nonempty_text(row[a_col], path, number, "sentence1"),
                "text_b": nonempty_text(row[b_col], path, number, "sentence2"),
                "label": LABELS[label],
                "uid": parse_uid(row[uid_col], path, number, "index"),
            })
        return samples
