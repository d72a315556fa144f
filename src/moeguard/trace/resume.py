"""Resume for ``fingerprint`` and ``trace``: each MoE layer's sketch is kept once it is read.

Reading a checkpoint is what a trace costs (about twice reading both checkpoints from disk:
``benchmarks/results/trace_streaming.json``), and for a DeepSeek-V3-size model that is tens of
minutes per side; an interrupt must not start it over. The CLI passes a scratch folder
(``io.lazy_scratch``, ``.OUT.partial`` beside ``--out``), made here when the first layer read is kept. Here the sketches go into a
subfolder keyed by what they were read from (each source's ``weights_identity``, the seed and
moeguard's version), so a rerun against another suspect, a rewritten checkpoint or another seed
reads afresh; each sketch's file name also carries a digest of the hidden dimensions and frame it
was read in. A sketch is a few MB (``features.Sketch``): the arrays are kept as ``.npz``, never
unpickled (``kept.kept_arrays``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from moeguard.trace.features import Sketch

def source_identity(where: str | None) -> dict[str, Any]:
    """What a sketch was read from: a checkpoint folder's (or a fetched hub snapshot's, or the
    embedded model's) ``weights_identity``; a ``.gguf`` file's size, time and a sampled digest."""
    from moeguard.trace.weights import is_gguf

    if is_gguf(where):
        from moeguard.models.identity import file_identity

        return file_identity(Path(str(where)))
    from moeguard.models.identity import weights_identity

    return weights_identity(where)


# bumped whenever features, stream or align change what a layer's sketch holds (an install without a
# git commit has only this to tell its sketches apart)
SKETCH_FORMAT = 2


def keyed(keep: Path | None, role: str, settings: dict[str, Any]) -> Path | None:
    """``keep``'s subfolder for ``role`` ("original" or "suspect") and these ``settings``; the
    role's subfolders of other settings (an earlier, interrupted run of another trace) are
    removed, so one scratch folder holds one run's sketches of each side."""
    if keep is None:
        return None
    from moeguard.provenance import git_commit

    # the code that computed them: moeguard's version string never changes between commits (0.1.0), so
    # an interrupted trace resumed after an upgrade mixed layers sketched two ways under the new commit
    # and where the commit does not name the code (a wheel, a -dirty checkout) the source's digest: an edit
    # or an upgrade without a commit resumed on sketches the old code made, under the new one's name
    from moeguard.provenance import maker

    text = json.dumps({**settings, "sketch_format": SKETCH_FORMAT, "commit": git_commit(),
                       "source": maker().get("source")}, sort_keys=True, default=str)
    folder = keep / f"{role}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
    for old in keep.glob(f"{role}-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder   # made with the first sketch kept: a run refused before any read leaves nothing behind


def kept_sketch(folder: Path | None, name: str, H: np.ndarray, frame, compute: Callable[[], Sketch]) -> Sketch:
    """``compute()``'s sketch, kept in ``folder`` (None: computed) and read back on a resumed run."""
    from moeguard.kept import kept_arrays

    if folder is None:
        return compute()
    h = hashlib.sha256()
    for a in (np.asarray(H, dtype=np.int64), np.asarray(frame.cols, dtype=np.int64), np.asarray(frame.signs, dtype=np.float64)):
        h.update(a.tobytes())

    def arrays() -> dict[str, np.ndarray]:
        sk = compute()
        folder.mkdir(parents=True, exist_ok=True)
        return {"ka": sk.ka, "kb": sk.kb, "v": sk.v, "rows": sk.rows,
                "meta": np.array([sk.index, sk.intermediate], dtype=np.int64)}

    # C order as an array read back has, on the first run too (an in-memory or GGUF source's sketch is not:
    # a norm summed in another memory order differs in the last digits), so a resumed trace equals a whole one
    a = {k: np.ascontiguousarray(v) for k, v in kept_arrays(folder, f"{name}-{h.hexdigest()[:12]}", arrays).items()}
    return Sketch(index=int(a["meta"][0]), ka=a["ka"], kb=a["kb"], v=a["v"], rows=a["rows"],
                  intermediate=int(a["meta"][1]))
