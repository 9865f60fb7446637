"""Quora Question Pairs: is question2 a duplicate of question1 (0 or 1)?

GLUE's QQP train and dev files have the header id, qid1, qid2, question1, question2,
is_duplicate; the test file has id, question1, question2 and gets the label
`test_label`.
"""

from __future__ import annotations

from .data import GLUEDataset, TaskDataError, column, nonempty_text, parse_uid, read_tsv

LABELS = (0, 1)


class QQPDataset(GLUEDataset):
    task_name = "QQP"

    def __init__(self, dataset_name, datapaths, tokenizer, max_seq_length,
                 test_label: int = 0) -> None:
        self.test_label = test_label
        super().__init__(dataset_name, datapaths, tokenizer, max_seq_length)

    def read_file(self, path: str) -> list[dict]:
        header, rows = read_tsv(path)
        uid_col = column(header, "id", path)
        a_col = column(header, "question1", path)
        b_col = column(header, "question2", path)
        label_col = header.index("is_duplicate") if "is_duplicate" in header else None
        samples = []
        for number, row in rows:
            if label_col is None:
                label = self.test_label
            else:
                value = row[label_col].strip()
                if value not in ("0", "1"):
                    raise TaskDataError(
                        f"{path}:{number}: is_duplicate must be 0 or 1, got {value!r}"
                    )
                label = int(value)
            samples.append({
                "text_a": nonempty_text(row[a_col], path, number, "question1"),
                "text_b": nonempty_text(row[b_col], path, number, "question2"),
                "label": label,
                "uid": parse_uid(row[uid_col], path, number, "id"),
            })
        return samples
