import pytest

from tests.vocab_files import REAL_VOCAB_MISSING, build_trained_vocab_dir, find_real_vocab_dir


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "real_vocab: checks the published GPT-2/BERT ids (or a golden recorded with them): "
        "skipped without the real vocabulary files; vocab_dir is then the real folder",
    )


def pytest_runtest_setup(item) -> None:
    if item.get_closest_marker("real_vocab") and find_real_vocab_dir() is None:
        pytest.skip(REAL_VOCAB_MISSING)


@pytest.fixture(scope="session")
def trained_vocab_dir(tmp_path_factory) -> str:
    """A GPT-2-format BPE and an uncased WordPiece vocabulary trained on tests/data (the real
    files' names and layouts, see tests/vocab_files.py), built once per session."""
    return build_trained_vocab_dir(str(tmp_path_factory.mktemp("trained_vocab")))


@pytest.fixture(scope="session")
def vocab_dir(request) -> str:
    """A folder with gpt2-vocab.json, gpt2-merges.txt and bert-large-uncased-vocab.txt: the
    real files (MEGATRON_VOCAB_DIR or ../shared/vocab) when they are here, otherwise the
    trained ones. Tests of the real ids are marked real_vocab."""
    path = find_real_vocab_dir()
    return path if path is not None else request.getfixturevalue("trained_vocab_dir")


def pytest_terminal_summary(terminalreporter) -> None:
    """One line at the end: how many tests skipped for want of the real vocabulary files."""
    count = 0
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        count += REAL_VOCAB_MISSING in reason
    if count:
        terminalreporter.write_line(
            f"{count} tests skipped for want of the GPT-2/BERT vocabulary files: "
            "run dataset/download_vocab.sh or set MEGATRON_VOCAB_DIR"
        )
