"""Forensics: prove that a suspect checkpoint was cut from the owner's MoE, and name the experts
it kept (``docs/trace.md``).

- :func:`fingerprint` makes the owner's compact, permutation-invariant signature of every
  expert (``fingerprint.py``), at most 1% of the checkpoint;
- :func:`trace` tests a suspect against it: a p-value from an expert-relabeling test whose null
  comes from the model itself (``stats.py``), the expert mapping per layer with merges
  (``api.py``), and the transformations it found;
- ``evasion.py`` holds the function-preserving rewrites an attacker can apply, each checked to
  keep the model's logits, for tests and the provenance benchmark.
"""

from __future__ import annotations

from typing import Any

from moeguard.errors import MoeguardError
from moeguard.trace.fingerprint import Fingerprint, is_fingerprint


def fingerprint(model, *, seed: int = 0, progress=None, weights=None, keep=None) -> Fingerprint:
    """The fingerprint of a checkpoint (path, hub id, None for the embedded model, or what
    ``weights.locate`` made of one), streamed from its safetensors files (a hub id's fetched into the
    Hugging Face cache once). ``progress``: a rich Progress, advanced per MoE layer; ``weights``: the
    checkpoint already opened as a trace source (``weights.load``); ``keep``: a scratch folder
    (``io.lazy_scratch``) where each layer read is kept, so an interrupted run resumes
    (``resume.py``); None keeps nothing."""
    from moeguard.provenance import run_record
    from moeguard.trace.fingerprint import build, checkpoint_bytes
    from moeguard.trace.resume import keyed, source_identity
    from moeguard.trace.weights import load, locate

    if isinstance(model, str):   # a quantized hub model is refused from its config, before its weights come
        _config_first(model, "model", hidden=None)
    loc = locate(model)
    size = checkpoint_bytes(loc.where)
    w = weights if weights is not None else load(loc)
    source = {"run": run_record({"model": w.name, "seed": seed})}
    if loc.revision:   # a hub original: the commit fingerprinted
        source["hub"] = {"hub_id": loc.hub_id, "revision": loc.revision}
    folder = keyed(keep, "original", {"original": source_identity(loc.where), "seed": seed}) if keep is not None else None
    return build(w, checkpoint_bytes=size, seed=seed, progress=progress, source=source, keep=folder)


def _config_first(ref: str, what: str, *, hidden: int | None) -> int | None:
    """For a hub id, what its config.json alone says (a small fetch) before its weights are fetched:
    quantized weights, or (``what`` the suspect) a hidden size other than ``hidden``, the original's.
    Returns its hidden size (None: not a hub id, or not said). A local folder is opened instead,
    reading no tensor."""
    from moeguard.models.hub import fetch_config
    from moeguard.models.loading import resolve
    from moeguard.trace.weights import is_gguf

    if not isinstance(ref, str) or is_gguf(ref):
        return None
    r = resolve(ref)
    if r.hub_id is None:
        return None
    config = fetch_config(r.hub_id)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config   # a multimodal wrapper's
    quantized = config.get("quantization_config") or text.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        raise MoeguardError(f"the {what} {ref} stores quantized weights (quantization_config {method}), said by its "
                            "config.json: its weights were not fetched",
                            hint="trace streams float checkpoints (F32, F16, BF16); dequantize it first, or pass its "
                                 "GGUF export")
    width = text.get("hidden_size")
    width = width if type(width) is int else None
    if hidden is not None and width is not None and width != hidden:
        from moeguard.trace.api import check_shape

        check_shape({"hidden": hidden, "layers": [], "intermediate": None}, hidden=width, layers=0)
    return width


def trace(original: str | None, suspect: str, *, seed: int = 0, progress=None, keep=None) -> dict[str, Any]:
    """Trace ``suspect`` (a checkpoint directory, hub id or ``.gguf`` file) against ``original``
    (a fingerprint folder, or a checkpoint whose fingerprint is made on the fly). ``keep``: a
    scratch folder (``io.lazy_scratch``) where each layer read, of the original and of the
    suspect, is kept, so an interrupted trace resumes (``resume.py``); None keeps nothing. A fingerprint or
    a local original is opened first (reading no expert), so a damaged one fails before a hub suspect
    is fetched whole; an unusable suspect fails before a hub original is fetched, and one of another
    width, depth or expert size before any of its tensors is read."""
    from pathlib import Path

    from moeguard.models.loading import resolve
    from moeguard.trace.api import trace as run
    from moeguard.trace.fingerprint import refuse_gguf
    from moeguard.trace.weights import load, locate

    if isinstance(original, str) and original.startswith("~"):   # as resolve and check_output read it
        original = str(Path(original).expanduser())
    given = is_fingerprint(original)
    own = loc = fp = None
    if given:   # tiny and local: a damaged fingerprint fails before a hub suspect is fetched whole
        fp = Fingerprint.load(Path(original))
    else:   # an original no fingerprint can be made from (a .gguf file, a missing folder): refused
        refuse_gguf(original)   # before the suspect is opened, which may fetch a hub suspect whole
        if resolve(original).hub_id is None:   # a local checkpoint (or the embedded model): opened now, reading
            loc = locate(original)             # no tensor, so one without config or safetensors fails first
            own = load(loc)
    # a hub original's and a hub suspect's configs first (small fetches): quantized weights or another width
    # are refused before any weights are fetched whole (DeepSeek-V3's FP8 weights: 690 GB, then refused)
    width = fp.meta["hidden"] if fp is not None else own.hidden if own is not None else \
        _config_first(original, "original", hidden=None)
    _config_first(suspect, "suspect", hidden=width)
    sus = locate(suspect)
    weights = load(sus)  # opening checks config, headers, layout and tokenizer; reads no tensor
    if not given:
        from moeguard.trace.api import check_shape

        if own is None:   # a hub original, fetched once, here (its config was checked above)
            loc = locate(original)
            # opening reads no tensor and refuses a folder without safetensors (fingerprint() sizes the same
            # files); the original's shape is checked against the suspect's before its fingerprint reads every expert
            own = load(loc)
        check_shape({"hidden": own.hidden, "layers": [None] * own.num_layers, "intermediate": own.intermediate},
                    hidden=weights.hidden, layers=weights.num_layers, intermediate=weights.intermediate)
        fp = fingerprint(loc, seed=seed, progress=progress, weights=own, keep=keep)
    from moeguard.trace.fingerprint import digest
    from moeguard.trace.resume import keyed, source_identity

    # the suspect's layers are read in the fingerprint's frame: keyed by both (a fingerprint made on the fly
    # is keyed by its checkpoint, whose identity is cheap; the digest would not change with it)
    made_from = {"fingerprint": digest(Path(original))} if given else {"original": source_identity(loc.where)}
    folder = keyed(keep, "suspect", {**made_from, "suspect": source_identity(sus.where), "seed": seed}) if keep is not None else None
    doc = run(fp, weights, seed=seed, progress=progress, keep=folder)
    from moeguard.provenance import run_record

    # what was compared, with which seed, by which moeguard: a result meant to be shown to others
    doc["run"] = run_record({"original": original or "embedded", "original_is_fingerprint": given,
                             "suspect": suspect, "seed": seed})
    if weights.source.get("revision"):   # a hub suspect: the commit its traced files come from
        doc["suspect_snapshot"] = {"hub_id": weights.source["hub_id"], "revision": weights.source["revision"]}
    return doc
