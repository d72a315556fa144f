"""GGUF, the format quantized models are most often redistributed in (llama.cpp's): read a suspect
from it (dequantized), and export a model to it (the provenance benchmark's quantized derivatives).

Tensor names follow llama.cpp's MoE convention: ``token_embd``, ``blk.N.ffn_gate_inp`` (router),
``blk.N.ffn_{gate,up,down}_exps`` (experts, 3-D), ``blk.N.attn_{q,k,v,output}``, norms. The
token strings come from ``tokenizer.ggml.tokens``. Quantization and dequantization are the
``gguf`` package's implementations of ggml's formats (Q8_0, Q4_0, Q4_K, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from moeguard.config import is_decimal
from moeguard.errors import MoeguardError
from moeguard.trace.weights import LayerWeights, ModelWeights

_LAYER = {"self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "mlp.gate.weight": "ffn_gate_inp.weight"}


def export_gguf(model, tokenizer, path: Path, *, qtype: str = "Q8_0") -> dict[str, Any]:
    """Write a Mixtral-layout model as GGUF with its matrices quantized to ``qtype`` (norms and
    the router stay float32, as llama.cpp's converters keep them). Returns what was written."""
    import gguf
    import torch

    from moeguard.models.adapter import MoEAdapter
    from moeguard.trace.weights import split_experts, token_strings

    kind = getattr(gguf.GGMLQuantizationType, qtype, None)
    if kind is None:
        raise MoeguardError(f"GGUF type '{qtype}' is not known", hint="e.g. Q8_0, Q4_0, Q4_K, F16")
    adapter = MoEAdapter(model)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_embedding_length(cfg.hidden_size)
    w.add_expert_count(adapter.num_experts)
    w.add_expert_used_count(adapter.top_k)
    w.add_token_list(token_strings(tokenizer, cfg.vocab_size))
    written = {"qtype": qtype, "tensors": 0}

    def put(name: str, x: np.ndarray, *, quantize: bool = True) -> None:
        x = np.ascontiguousarray(x.astype(np.float32))
        block = gguf.GGML_QUANT_SIZES[kind][0]
        if quantize and x.ndim >= 2 and x.shape[-1] % block == 0 and kind != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
        else:  # a vector, or rows shorter than the format's block: kept in float32, as llama.cpp does
            w.add_tensor(name, x)
            written["float32"] = written.get("float32", 0) + (x.ndim >= 2)
        written["tensors"] += 1

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    put("token_embd.weight", sd["model.embed_tokens.weight"])
    put("output_norm.weight", sd["model.norm.weight"], quantize=False)
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        put("output.weight", sd["lm_head.weight"])
    experts = {l.index: l for l in adapter.layers}
    for i in range(cfg.num_hidden_layers):
        for hf, name in _LAYER.items():
            key = f"model.layers.{i}.{hf}"
            if key in sd:
                put(f"blk.{i}.{name}", sd[key], quantize=not ("norm" in hf or hf.startswith("mlp.gate")))
        if i in experts:
            with torch.no_grad():
                g, u, d = split_experts(adapter.family, experts[i].experts)
            put(f"blk.{i}.ffn_gate_exps.weight", g)
            put(f"blk.{i}.ffn_up_exps.weight", u)
            put(f"blk.{i}.ffn_down_exps.weight", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


def _tokens(reader) -> list[str]:
    field = reader.get_field("tokenizer.ggml.tokens")
    if field is None:
        return []
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def load_gguf(path: Path) -> ModelWeights:
    """A suspect from a GGUF file: embeddings, routers and experts, dequantized to float."""
    import gguf

    if not path.is_file():
        raise MoeguardError(f"GGUF file {path} does not exist", hint="pass the path of the suspect's .gguf file")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError/IndexError/struct errors on damage
        raise MoeguardError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})",
                            hint="the file is truncated or not GGUF; download it again") from None
    parts = _field_int(reader, "split.count")
    if parts is not None and parts > 1:
        raise MoeguardError(f"{path} is one part of a GGUF split into {parts} files",
                            hint="merge the parts first (llama.cpp: llama-gguf-split --merge FIRST-PART OUT.gguf)")
    tensors = {t.name: t for t in reader.tensors}
    types: set[str] = set()

    def dequantize(name: str, t, data) -> np.ndarray:
        try:
            return gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError:
            raise MoeguardError(f"{path}: tensor {name} is {t.tensor_type.name}, which the gguf package cannot "
                                "dequantize", hint="convert the file to a type it reads (Q8_0, Q4_0, Q4_K, F16, ...) "
                                "with llama.cpp's llama-quantize") from None

    def tensor(name: str):
        t = tensors.get(name)
        if t is None:
            raise MoeguardError(f"{path} has no tensor {name}", hint="the file is incomplete, or not an MoE in "
                                "llama.cpp's naming (blk.N.ffn_gate_inp, blk.N.ffn_{gate,up,down}_exps)")
        types.add(t.tensor_type.name)
        return t

    def get(name: str, *, widen: bool = True) -> np.ndarray:
        t = tensor(name)
        x = dequantize(name, t, t.data)
        return x.astype(np.float64) if widen else x

    def experts(name: str) -> "_Experts":
        t = tensor(name)
        return _Experts([t], lambda data, t: dequantize(name, t, data), stacked=True, name=name)

    def expert_list(i: int, kind: str) -> "_Experts":
        # llama.cpp's layout before stacked expert tensors (2024): blk.N.ffn_gate.E.weight, one per expert
        ts, e = [], 0
        while (name := f"blk.{i}.ffn_{kind}.{e}.weight") in tensors:
            ts.append(tensor(name))
            e += 1
        label = f"blk.{i}.ffn_{kind}.*.weight"
        # each expert is dequantized with its own type (early 2024 files mixed them in a layer); the shapes
        # must agree: only expert 0's is checked below, another's broadcast or failed inside the sketch
        odd = [t.name for t in ts[1:] if _shape(t) != _shape(ts[0])]
        if odd:
            raise MoeguardError(f"{path}: {odd[0]} has shape {list(_shape(tensors[odd[0]]))}, expert 0 of {label} "
                                f"{list(_shape(ts[0]))}",
                                hint="the file is damaged or not an MoE in llama.cpp's layout; export it again")
        return _Experts(ts, lambda data, t: dequantize(label, t, data), stacked=False, name=label)

    if "token_embd.weight" not in tensors:
        raise MoeguardError(f"{path} has no token_embd.weight", hint="trace needs the token embeddings")
    arch_name = _field_str(reader, "general.architecture")
    blocks = _field_int(reader, f"{arch_name}.block_count") if arch_name else None
    # the blocks the tensors name: a damaged block_count (2^32 - 1) looped for an hour; a smaller one
    # dropped the last MoE layers, refused later as "a copy with layers dropped"
    named = {b for n in tensors if (b := _block(n)) is not None}
    present = max(named) + 1 if named else 0
    if blocks is not None and blocks < present:
        raise MoeguardError(f"{path} says it has {blocks} blocks ({arch_name}.block_count), and its tensors name "
                            f"{present}", hint="the file is damaged; download or export it again")
    # a multi-token-prediction block past the decoder's (GLM-4.5's NextN: llama.cpp counts it in
    # block_count and writes it as the last blk.N, with a router and experts): not a decoder layer
    nextn = (_field_int(reader, f"{arch_name}.nextn_predict_layers") or 0) if arch_name else 0
    mtp = {b for n in tensors if ".nextn." in n and (b := _block(n)) is not None}
    last = min(present, (blocks if blocks is not None else present) - nextn)
    layers = []
    for i in sorted(named):   # the blocks there are, not every number up to the largest (a crafted name)
        if i >= last or i in mtp:
            continue
        router = f"blk.{i}.ffn_gate_inp.weight"
        if f"blk.{i}.ffn_gate_exps.weight" in tensors:
            layers.append(LayerWeights(index=i, router=get(router), gate=experts(f"blk.{i}.ffn_gate_exps.weight"),
                                       up=experts(f"blk.{i}.ffn_up_exps.weight"),
                                       down=experts(f"blk.{i}.ffn_down_exps.weight")))
        elif f"blk.{i}.ffn_gate.0.weight" in tensors and router in tensors:
            layers.append(LayerWeights(index=i, router=get(router), gate=expert_list(i, "gate"),
                                       up=expert_list(i, "up"), down=expert_list(i, "down")))
        elif router in tensors:   # a router without experts: not a dense layer
            raise MoeguardError(f"{path}: block {i} has a router (ffn_gate_inp) but no ffn_gate_exps tensor",
                                hint="the file is incomplete or split; merge or download it again")
    if not layers:
        raise MoeguardError(f"{path} has no MoE layer (no blk.N.ffn_gate_exps tensors)",
                            hint="trace reads MoE models in llama.cpp's naming")
    tokens = _tokens(reader)
    if not tokens:
        raise MoeguardError(f"{path} has no token list (tokenizer.ggml.tokens)",
                            hint="trace aligns hidden dimensions through token strings; use a GGUF with its tokenizer")
    # shapes from the header, before anything large is dequantized (a damaged tensor failed inside it)
    _check_shapes(path, _shape(tensors["token_embd.weight"]), tokens, layers)
    embed = get("token_embd.weight", widen=False)   # float32: ModelWeights widens the rows it reads
    family = arch_name or "gguf"
    # float types are not quantization (safetensors bf16 is not reported as such either)
    return ModelWeights(name=str(path), family=family, embed=embed, tokens=tokens, layers=layers,
                        source={"format": "gguf", "quantization": sorted(types - {"F32", "F16", "BF16", "F64"}) or None})


def _block(name: str) -> int | None:
    """N of a tensor named ``blk.N.*``; None for any other name (a '²' is no block number)."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 1 and parts[0] == "blk" and is_decimal(parts[1]) else None


def _shape(t) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy order (the header lists dimensions fastest first)."""
    return tuple(int(x) for x in reversed(t.shape))


class _Experts:
    """A layer's experts of a GGUF file, dequantized one expert at a time from the memory-mapped file:
    a whole MoE widened to float64 took ~15x the file (a 26 GB Q4 Mixtral, ~370 GB). ``stacked``: one
    3-D tensor [E, ...]; else one 2-D tensor per expert (llama.cpp's layout before 2024). The shape
    comes from the header, so it is checked before any expert is dequantized."""

    ndim = 3

    def __init__(self, ts: list, dequantize, *, stacked: bool, name: str = ""):
        self._ts, self._dequantize, self._stacked, self.name = ts, dequantize, stacked, name
        self.shape = _shape(ts[0]) if stacked else (len(ts), *(_shape(ts[0]) if ts else ()))

    def __getitem__(self, e):
        if isinstance(e, (int, np.integer)):
            t = self._ts[0] if self._stacked else self._ts[e]
            return self._dequantize(t.data[e] if self._stacked else t.data, t)
        return np.stack([self[i] for i in range(self.shape[0])])[e]


def _field_int(reader, key: str) -> int | None:
    f = reader.get_field(key)
    if f is None or not f.data:
        return None
    try:
        return int(f.parts[f.data[0]][0])
    except (IndexError, ValueError, TypeError):   # a damaged field: an empty value, or not a number
        raise MoeguardError(f"the GGUF field {key} is damaged", hint="download or export the file again") from None


def _field_str(reader, key: str) -> str | None:
    f = reader.get_field(key)
    return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace") if f is not None and f.data else None


def _check_shapes(path: Path, embed: tuple[int, ...], tokens: list[str], layers: list[LayerWeights]) -> None:
    """The tensors' shapes agree with each other (d hidden, E experts, I intermediate per layer), or a
    one-line error: a GGUF written by another tool can hold anything."""
    fix = "the file is damaged or not an MoE in llama.cpp's layout; export it again"
    if len(embed) != 2:
        raise MoeguardError(f"{path}: token_embd.weight has shape {list(embed)}, expected [vocab, hidden]", hint=fix)
    if len(tokens) > embed[0]:
        raise MoeguardError(f"{path} lists {len(tokens)} tokens for {embed[0]} embedding rows", hint=fix)
    d = embed[1]
    for layer in layers:
        g = layer.gate.shape
        E, I = (g[0], g[1]) if len(g) == 3 and g[0] >= 1 else (None, None)
        want = {"ffn_gate_exps": (layer.gate, (E, I, d)), "ffn_up_exps": (layer.up, (E, I, d)),
                "ffn_down_exps": (layer.down, (E, d, I)), "ffn_gate_inp": (layer.router, (E, d))}
        for name, (t, shape) in want.items():
            if E is None or tuple(t.shape) != shape:
                expected = "[experts, intermediate, hidden]" if E is None else list(shape)
                # the tensor as the file names it (one per expert: blk.N.ffn_up.*.weight)
                label = getattr(t, "name", "") or f"blk.{layer.index}.{name}.weight"
                raise MoeguardError(f"{path}: {label} has shape {list(t.shape)}, expected {expected}", hint=fix)
