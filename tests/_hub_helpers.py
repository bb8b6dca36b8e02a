"""Offline Hugging Face caches for tests: what an earlier download leaves behind."""

from __future__ import annotations

import shutil

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def populate_hf_cache(cache, repo, files, commit=COMMIT):
    """``cache/models--org--name/snapshots/<commit>/<files>`` + ``refs/main``."""
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for path in files:
        shutil.copy(path, snapshot / path.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
