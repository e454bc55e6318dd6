"""An index path that is no index folder is the one-line `no index at` error (exit 2), whatever it is."""
from __future__ import annotations

from pathlib import Path

import pytest

from deepindex.index.store import MANIFEST, read_manifest

pytestmark = pytest.mark.timeout(60)


def test_index_info_of_a_file_is_no_index_not_an_internal_failure(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Found on review: `deepindex index info <a file>` was "failed: NotADirectoryError ..." (exit 1)."""
    from deepindex.cli import main

    f = tmp_path / "index.faiss"
    f.write_bytes(b"not a folder")
    with pytest.raises(FileNotFoundError, match=f"^index: no index at {f} "):
        read_manifest(f)
    assert main(["index", "info", str(f)]) == 2
    assert capsys.readouterr().err == f"deepindex index: error: index: no index at {f} (a file, not an index folder)\n"
    (tmp_path / "odd" / MANIFEST).mkdir(parents=True)  # a folder where the manifest should be
    assert main(["index", "info", str(tmp_path / "odd")]) == 2
    assert capsys.readouterr().err == (f"deepindex index: error: index: no index at {tmp_path / 'odd'} (its "
                                       f"{MANIFEST} is a folder)\n")
    assert main(["index", "info", str(tmp_path / "nope")]) == 2  # as before
    assert capsys.readouterr().err == (f"deepindex index: error: index: no index at {tmp_path / 'nope'} (no "
                                       f"{MANIFEST} in it)\n")
