"""Minimal safetensors reader/writer using only torch and numpy.

File layout (https://github.com/huggingface/safetensors, "Format" section):
  * 8 bytes: little-endian uint64 N = length of the JSON header;
  * N bytes: UTF-8 JSON object {name: {"dtype": "F32", "shape": [...],
    "data_offsets": [begin, end]}, optional "__metadata__": {str: str}};
    offsets are relative to the first byte after the header;
  * the raw little-endian tensor data, row-major.

Sharded checkpoints (the Hugging Face convention) are several such files named
`model-00001-of-0000N.safetensors` plus `model.safetensors.index.json`:
  {"metadata": {"total_size": <bytes of tensor data>}, "weight_map": {tensor name: file name}}.

bfloat16 has no numpy dtype, so its raw 16-bit patterns travel through int16
and are reinterpreted with `Tensor.view(torch.bfloat16)` (bit-exact).
"""

import json
import os
import struct

import numpy as np
import torch

# safetensors dtype name -> (torch dtype, little-endian numpy storage dtype).
_DTYPES = {
    "F64": (torch.float64, np.dtype("<f8")),
    "F32": (torch.float32, np.dtype("<f4")),
    "F16": (torch.float16, np.dtype("<f2")),
    "BF16": (torch.bfloat16, np.dtype("<i2")),  # raw bits, see module docstring
    "I64": (torch.int64, np.dtype("<i8")),
    "I32": (torch.int32, np.dtype("<i4")),
    "I16": (torch.int16, np.dtype("<i2")),
    "I8": (torch.int8, np.dtype("i1")),
    "U8": (torch.uint8, np.dtype("u1")),
}
_NAME_OF_TORCH_DTYPE = {tdt: name for name, (tdt, _) in _DTYPES.items()}

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def dtype_name(t):
    """safetensors dtype string ("F32", "BF16", ...) of a torch tensor."""
    return _NAME_OF_TORCH_DTYPE[t.dtype]


def _tensor_bytes(t):
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        arr = t.view(torch.int16).numpy()
    else:
        arr = t.numpy()
    # astype with an explicit little-endian dtype keeps the file portable.
    return arr.astype(_DTYPES[dtype_name(t)][1], copy=False).tobytes()


def read_header(path):
    """Return (header dict without __metadata__, metadata dict, data start offset)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: file too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 1024 * 1024:
            raise ValueError(f"{path}: implausible header length {n}")
        header = json.loads(f.read(n).decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    return header, metadata, 8 + n


def load_file(path):
    """Load every tensor of one .safetensors file -> {name: torch.Tensor} (stored dtype)."""
    header, _, start = read_header(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    out = {}
    for name, info in header.items():
        tdt, ndt = _DTYPES[info["dtype"]]
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
        numel = int(np.prod(shape)) if shape else 1
        if end - begin != numel * ndt.itemsize or end > len(data) or begin < 0:
            raise ValueError(f"{path}: bad data_offsets for {name}")
        arr = np.frombuffer(data, dtype=ndt, count=numel, offset=begin).astype(ndt.newbyteorder("="))
        t = torch.from_numpy(arr.copy())
        if tdt == torch.bfloat16:
            t = t.view(torch.bfloat16)
        out[name] = t.reshape(shape)
    return out


def save_file(tensors, path, metadata=None):
    """Write {name: tensor} to one .safetensors file (tensors in name order)."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        t = tensors[name]
        blob = _tensor_bytes(t)
        header[name] = {
            "dtype": dtype_name(t),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    hjson = json.dumps(header, separators=(",", ":")).encode("utf-8")
    # Pad the header with spaces to a multiple of 8 so the data is aligned
    # (the reference implementation does the same; readers must accept it).
    hjson += b" " * (-len(hjson) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hjson)))
        f.write(hjson)
        for blob in blobs:
            f.write(blob)


def save_sharded(tensors, out_dir, n_shards):
    """Write a sharded checkpoint: n_shards files + model.safetensors.index.json.

    Tensors are assigned in name order, starting a new shard once the current one
    holds about 1/n_shards of the bytes; every shard gets at least one tensor.
    Returns the list of shard file names.
    """
    names = sorted(tensors)
    if not 1 <= n_shards <= len(names):
        raise ValueError("need 1 <= n_shards <= number of tensors")
    sizes = {n: tensors[n].numel() * tensors[n].element_size() for n in names}
    total = sum(sizes.values())
    shards = [[] for _ in range(n_shards)]
    acc, s = 0, 0
    for i, n in enumerate(names):
        remaining_names = len(names) - i
        remaining_shards = n_shards - s - 1
        # Move to the next shard when this one is "full", or when the remaining
        # tensors are only just enough to give every later shard one tensor.
        if shards[s] and s < n_shards - 1 and (
            acc >= total * (s + 1) / n_shards or remaining_names <= remaining_shards
        ):
            s += 1
        shards[s].append(n)
        acc += sizes[n]
    files = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {}
    for fname, shard in zip(files, shards):
        save_file({n: tensors[n] for n in shard}, os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total},
             "weight_map": {n: weight_map[n] for n in sorted(weight_map)}}
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    return files


def load_checkpoint(model_dir):
    """Load a model directory: sharded (index json) if present, else model.safetensors."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        out = {}
        for fname in sorted(set(weight_map.values())):
            part = load_file(os.path.join(model_dir, fname))
            for name, t in part.items():
                if weight_map.get(name) != fname:
                    raise ValueError(f"{fname}: tensor {name} not mapped to this shard")
                out[name] = t
        missing = set(weight_map) - set(out)
        if missing:
            raise ValueError(f"index lists tensors missing from shards: {sorted(missing)[:5]}")
        return out
    return load_file(os.path.join(model_dir, SINGLE_NAME))
