"""The tensors a trace reads from a model: token embeddings (with each id's token string), and per
MoE layer the router and every routed expert's gate, up and down projections.

A trace reads a model through four questions (the *source* interface, which
:class:`ModelWeights` answers from memory (arrays, or views of a loaded model's tensors) and
``stream.StreamedCheckpoint`` from safetensors files, a tensor at a time): ``tokens``,
``embed_rows(ids)``, ``embed_norms()`` and ``sketch(position, H, frame)`` (``features.Sketch``),
with ``hidden``, ``intermediate``, ``num_layers`` and ``quant_sample()`` beside them.

Each expert is a gated MLP ``down( act(gate x) * (up x) )``: ``gate`` and ``up`` are [I, d]
(one row per neuron, reading the hidden state), ``down`` is [d, I] (one column per neuron,
writing it). In memory, transformers holds a layer's experts fused: ``gate_up_proj`` [E, 2I, d]
(gate rows first, then up rows) and ``down_proj`` [E, d, I]; gpt-oss stores them transposed
and interleaved (``FamilySpec.expert_layout``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moeguard.errors import MoeguardError

EMBED_BLOCK = 4096   # embedding rows widened to float64 at a time


@dataclass(frozen=True, kw_only=True)
class LayerWeights:
    """One MoE layer's router and experts. The experts are arrays (a GGUF suspect, dequantized) or
    views of a loaded model's own tensors (:func:`from_model`): a sketch reads them one expert at a
    time (``features.sketch_layer``), so a model is never copied whole into float64."""

    index: int                 # decoder-layer index
    router: np.ndarray         # [E, d]
    gate: Any                  # [E, I, d]
    up: Any                    # [E, I, d]
    down: Any                  # [E, d, I]

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])


class LayerCounts:
    """``num_layers`` and ``experts`` of a source whose ``layers`` have ``num_experts``."""

    layers: list

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def experts(self) -> list[int]:
        return [l.num_experts for l in self.layers]


@dataclass(frozen=True, kw_only=True)
class ModelWeights(LayerCounts):
    name: str
    family: str
    embed: np.ndarray          # [V, d] as read (float32 from a GGUF): widened a block of rows at a time
    tokens: list[str]          # token string of each embedding row (id order)
    layers: list[LayerWeights]
    source: dict[str, Any] = field(default_factory=dict)   # format, quantization as stored, ...

    @property
    def hidden(self) -> int:
        return int(self.embed.shape[1])

    @property
    def intermediate(self) -> int:
        return int(self.layers[0].gate.shape[1])

    @property
    def vocab(self) -> int:
        return int(self.embed.shape[0])

    def embed_rows(self, ids) -> np.ndarray:
        return f64(self.embed[np.asarray(ids, dtype=int)])

    def embed_norms(self) -> np.ndarray:
        """[d] norm of each hidden dimension over the vocabulary, in float64 a block of rows at a
        time: the embedding is not widened whole (DeepSeek-V3's 129k x 7168 would take 7.4 GB)."""
        sq = np.zeros(self.hidden)
        for start in range(0, self.vocab, EMBED_BLOCK):
            x = f64(self.embed[start:start + EMBED_BLOCK])
            sq += np.add.reduce(x * x, axis=0)
        return np.sqrt(sq)

    def sketch(self, position: int, H: np.ndarray, frame, progress=None):
        from moeguard.trace.features import sketch_layer

        return sketch_layer(self.layers[position], H, frame)

    def quant_sample(self) -> np.ndarray:
        """Stored values of the first expert's gate, for the quantization-grid check."""
        return f64(self.layers[0].gate[0].reshape(-1)[:8192])


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64, copy=False)


def f64(x) -> np.ndarray:
    """A numpy array or a torch tensor (a slice of a model's weights) as a float64 array."""
    return x.astype(np.float64, copy=False) if isinstance(x, np.ndarray) else _np(x)


def split_experts(family, experts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(gate [E,I,d], up [E,I,d], down [E,d,I]) of one layer's fused expert module, as float64
    arrays (a copy: the GGUF export's and the scan's input)."""
    return tuple(_np(x) for x in expert_views(family, experts))


def expert_views(family, experts):
    """(gate [E,I,d], up [E,I,d], down [E,d,I]) of one layer's fused expert module: views of its
    own tensors (detached; no copy), in each family's layout (one module per expert: stacked copies)."""
    layout = getattr(family, "expert_layout", "gate_up")
    if getattr(experts, "gated", True) is False:   # JetMoE's attention experts: queries [E, H, d], outputs [E, d, H]
        q, o = experts.input_linear.weight.detach(), experts.output_linear.weight.detach()
        return q, q, o                             # ungated: the query stands in for the gate, as "up" does
    if layout == "blocked":   # DBRX: experts.mlp.w1 (gate), v1 (up), w2 (down transposed), each [E*I, d]
        mlp, E = getattr(experts, "mlp", None), int(getattr(experts, "num_experts", 0) or 0)
        if mlp is None or not E or any(not hasattr(mlp, n) for n in ("w1", "v1", "w2")):
            raise MoeguardError(f"the experts of family '{family.name}' are not mlp.w1/v1/w2 blocks",
                                hint="trace supports DBRX's blocked expert layout of transformers 5; report this model")
        g, u, w2 = (getattr(mlp, n).detach().view(E, -1, getattr(mlp, n).shape[-1]) for n in ("w1", "v1", "w2"))
        return g, u, w2.transpose(1, 2)
    if layout == "modules":   # one ungated module per expert (Switch: wi [I, d], wo [d, I]; NLLB-MoE: fc1, fc2): stacked, so copies
        import torch

        count = sum(1 for n in getattr(experts, "keys", lambda: [])() if n.startswith(family.expert_module.format("")))
        mods = [experts[family.expert_module.format(e)] for e in range(count)]
        # the tensors' names under an expert module are the family's on-disk ones (up twice: no gate)
        up_name, _, down_name = family.disk_expert_tensors

        def stacked(name):
            try:
                return torch.stack([m.get_parameter(name).detach() for m in mods])
            except AttributeError:
                return None
        up, down = (stacked(n) for n in (up_name, down_name)) if mods else (None, None)
        if up is None or down is None:
            raise MoeguardError(f"the experts of family '{family.name}' are not modules with {up_name} and {down_name}",
                                hint="trace supports the expert modules of transformers 5's Switch Transformers "
                                     "and NLLB-MoE; report this model")
        return up, up, down
    if layout == "up":   # ungated experts (Nemotron-H): the up projection stands in for the gate
        up, dn = getattr(experts, "up_proj", None), getattr(experts, "down_proj", None)
        if up is None or dn is None:
            raise MoeguardError(f"the experts of family '{family.name}' are not fused up_proj/down_proj tensors",
                                hint="trace supports the fused expert layout of transformers 5; report this family")
        return up.detach(), up.detach(), dn.detach()
    gu = getattr(experts, "gate_up_proj", None)
    dn = getattr(experts, "down_proj", None)
    if gu is None or dn is None or not hasattr(gu, "shape"):
        raise MoeguardError(f"the experts of family '{family.name}' are not fused gate_up_proj/down_proj tensors",
                            hint="trace supports the fused expert layout of transformers 5; report this family")
    gu, dn = gu.detach(), dn.detach()
    if layout == "gate_up":
        I = gu.shape[1] // 2
        return gu[:, :I, :], gu[:, I:, :], dn
    if layout == "gate_up_t":  # Llama-4: [E, d, 2I], gate = the first I columns; down [E, I, d]
        I = gu.shape[2] // 2
        return gu[:, :, :I].transpose(1, 2), gu[:, :, I:].transpose(1, 2), dn.transpose(1, 2)
    if layout == "gate_up_interleaved_t":  # gpt-oss: [E, d, 2I], gate = even columns; down [E, I, d]
        g, u = gu[:, :, ::2], gu[:, :, 1::2]
        return g.transpose(1, 2), u.transpose(1, 2), dn.transpose(1, 2)
    raise MoeguardError(f"unknown expert layout '{layout}' of family '{family.name}'",
                        hint="use 'gate_up', 'gate_up_t', 'gate_up_interleaved_t', 'up' or 'blocked'")


def traced_layers(adapter) -> list:
    """The MoE layers trace fingerprints: those whose experts are MLPs. JetMoE's attention experts
    (a query and an output projection each, a quarter of an MLP expert's weights in JetMoE-8B) are
    left out: a checkpoint cut from the model keeps its MLP experts' weights, which identify it."""
    return [l for l in adapter.layers if l.standalone]


def from_model(model, tokenizer, *, name: str) -> ModelWeights:
    """The trace's view of a loaded model (any supported family)."""
    from moeguard.models.adapter import MoEAdapter

    adapter = MoEAdapter(model)
    layers = []
    for layer in traced_layers(adapter):   # views: read an expert at a time by the sketch, never copied whole
        g, u, d = expert_views(adapter.family, layer.experts)
        layers.append(LayerWeights(index=layer.index, router=_np(layer.router_weight), gate=g, up=u, down=d))
    embed = model.get_input_embeddings().weight.detach().float().cpu().numpy()   # widened where read
    return ModelWeights(name=name, family=adapter.family.name, embed=embed, tokens=token_strings(tokenizer, len(embed)),
                        layers=layers, source={"format": "safetensors"})


def token_strings(tokenizer, n: int) -> list[str]:
    """The token string of ids 0..n-1 (ids the tokenizer does not know are empty: never anchors)."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    out = [""] * n
    for s, i in vocab.items():
        if 0 <= i < n:
            out[i] = s
    return out


@dataclass(frozen=True)
class Located:
    """A checkpoint reference made local once: ``where`` is what to open (a folder, a ``.gguf`` file,
    or None for the embedded model); a hub id's is its fetched snapshot, reported by ``hub_id``."""

    where: str | None
    hub_id: str | None = None

    @property
    def revision(self) -> str | None:
        """The hub commit a fetched snapshot holds (its folder's name in the cache)."""
        from pathlib import Path

        return Path(self.where).name if self.hub_id else None


def is_gguf(ref) -> bool:
    """Whether ``ref`` names a GGUF file (by its name: the one file format trace reads whole)."""
    return ref is not None and str(ref).lower().endswith(".gguf")


def locate(ref: "str | None | Located") -> Located:
    """``ref`` (a folder, a ``.gguf`` file, a hub id or None) made local: a hub id's safetensors,
    config and tokenizer files are fetched into the Hugging Face cache (the user's hub access)."""
    if isinstance(ref, Located):
        return ref
    if is_gguf(ref):   # ~ as every other path is read (--suspect=~/m.gguf: bash leaves it after '=')
        from pathlib import Path

        return Located(where=str(Path(ref).expanduser()))
    from moeguard.models.hub import local_checkpoint

    where, hub_id = local_checkpoint(ref)
    return Located(where=where, hub_id=hub_id)


def load(ref: "str | None | Located"):
    """A trace source: a ``.gguf`` file (read whole, dequantized), or a checkpoint directory, hub
    id or None (the embedded model), streamed from its safetensors files. A hub id is fetched, then
    streamed like a folder: loading it whole took the model's size in memory (DeepSeek-V3: ~700 GB).
    Pass what :func:`locate` returned to open a reference already made local."""
    from pathlib import Path

    loc = locate(ref)
    if is_gguf(loc.where):
        from moeguard.trace.gguf import load_gguf

        return load_gguf(Path(loc.where))
    from moeguard.trace.stream import StreamedCheckpoint

    w = StreamedCheckpoint.open(loc.where, name=loc.hub_id)
    if loc.hub_id is not None:   # what was traced: the hub commit the cached snapshot holds (a report is evidence)
        w.source.update({"hub_id": loc.hub_id, "revision": loc.revision})
    return w
