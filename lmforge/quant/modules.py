"""Torch modules over quantized weights: a GPT loaded from a quantized model dir computes on its
blocks, never on an fp32 copy of the whole model.

- QuantLinear replaces a projection (and an untied or tied lm_head). Its products run the block
  kernels for any number of rows (decode steps, prefill, scoring). The backward pass (the input
  gradient, for adapters on top) dequantizes the matrix a slice of rows at a time into a small
  reused buffer and runs BLAS on it, so the extra memory is one slice (<= 8 MB), not the fp32
  matrix.
- QuantEmbedding replaces tok_emb: a lookup decodes just the rows asked for.

The weights are frozen: gradients flow to the input (so adapters on top could train) but the
blocks have no gradient. CPU only: the kernels are numba CPU code.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import torch.nn as nn

from lmforge.errors import LmforgeError
from lmforge.quant import kernels
from lmforge.quant.packed import GROUP, PackedWeight

_SLICE_BYTES = 8 << 20  # fp32 rows dequantized at once for BLAS (backward): fits in L3 next to g
_scratch = threading.local()


def _buffer(n: int) -> np.ndarray:
    """This thread's reused fp32 scratch of at least n values."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n, np.float32)
    return buf


def _slices(w: PackedWeight):
    """(first row, rows, fp32 [K, rows] tensor: those rows of W transposed) per slice of W, each
    dequantized into the same scratch."""
    n, k = w.shape
    groups = max(1, _SLICE_BYTES // (4 * k * GROUP))
    buf = _buffer(groups * GROUP * k)
    for g in range(0, w.groups, groups):
        count = min(groups, w.groups - g)
        out = buf[: count * GROUP * k].reshape(k, count * GROUP)
        kernels.dequantize_columns(w, g, out)
        first = g * GROUP
        rows = min(count * GROUP, n - first)
        yield first, rows, torch.from_numpy(out)[:, :rows]


def matmul(x: np.ndarray, w: PackedWeight) -> np.ndarray:
    """x [R, K] @ W.T -> [R, N] fp32 for any R, on the blocks with fp32 activations
    (`kernels.linear`)."""
    return kernels.linear(x, w)


def matmul_transposed(g: np.ndarray, w: PackedWeight) -> np.ndarray:
    """g [R, N] @ W -> [R, K] (the input gradient of x @ W.T)."""
    gt = torch.from_numpy(g)
    out = torch.zeros((g.shape[0], w.shape[1]), dtype=torch.float32)
    for first, rows, wt in _slices(w):
        out += gt[:, first : first + rows] @ wt.T
    return out.numpy()


class _QuantMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
        ctx.w = w
        flat = x.detach().reshape(-1, x.shape[-1]).contiguous().numpy()
        return torch.from_numpy(matmul(flat, w)).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.reshape(-1, grad.shape[-1]).contiguous().float().numpy()
        gx = torch.from_numpy(matmul_transposed(g, ctx.w)).reshape(*grad.shape[:-1], ctx.w.shape[1])
        return gx, None


def _check_input(x: torch.Tensor, what: str) -> None:
    if x.device.type != "cpu":
        raise LmforgeError(f"{what}: quantized weights run on the CPU only (input on {x.device}); "
                           "load the model with --dtype fp32 to use a GPU")


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W a PackedWeight (frozen)."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.packed = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, "QuantLinear")
        if x.dtype != torch.float32:
            x = x.float()
        y = _QuantMatmul.apply(x, self.packed)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.packed.format.name}, bias={self.bias is not None}"


class QuantEmbedding(nn.Module):
    """Row lookups in a quantized table [vocab, dim] (frozen)."""

    def __init__(self, weight: PackedWeight) -> None:
        super().__init__()
        self.packed = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _check_input(idx, "QuantEmbedding")
        rows = kernels.rows_of(self.packed, idx.detach().reshape(-1).numpy())
        return torch.from_numpy(rows).reshape(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.packed.format.name}"


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules())


def packed_weights(model: nn.Module) -> dict[str, PackedWeight]:
    """Every quantized weight by its state-dict name (`<module>.weight`), a shared one once
    (the first name it is found under, tok_emb's for a tied head)."""
    out: dict[str, PackedWeight] = {}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)) and id(m.packed) not in seen:
            seen.add(id(m.packed))
            out[f"{name}.weight"] = m.packed
    return out


def install_quantized(model: nn.Module, tensors: dict, source: str, *, release_source: bool = False) -> None:
    """Replace the modules whose weights are in `tensors` ({state-dict name: QuantTensor}, e.g.
    "blocks.0.attn.qkv.weight") by QuantLinear / QuantEmbedding over the packed blocks. The
    replaced modules' biases are kept (they must be loaded into the model already).
    release_source: the tensors are a memory map of a file that nobody reads afterwards (see
    `_release_pages`); never for arrays in ordinary memory, whose pages would be zeroed."""
    from lmforge.quant.packed import pack

    for name, t in tensors.items():
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or not path:
            raise LmforgeError(f"{source}: {name} is listed as quantized but is not a layer's weight")
        parent_path, _, child = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
            old = getattr(parent, child)
        except AttributeError:
            raise LmforgeError(f"{source}: {name} is listed as quantized but the model has no layer {path}") from None
        want = tuple(old.weight.shape)
        if tuple(t.shape) != want:
            raise LmforgeError(f"{source}: {name} is stored as {list(t.shape)}, the config needs {list(want)}")
        if isinstance(old, nn.Embedding):
            new = QuantEmbedding(pack(t))
        elif isinstance(old, nn.Linear):
            new = QuantLinear(pack(t), old.bias)
        else:
            raise LmforgeError(f"{source}: {name} belongs to a {type(old).__name__}, which cannot hold quantized weights")
        setattr(parent, child, new)
        if release_source:
            _release_pages(t.blocks)


def _release_pages(a: np.ndarray) -> None:
    """Let the kernel drop the memory pages that lie wholly inside `a`'s bytes (Linux).

    A model dir's weights are a memory map of model.safetensors: every page packing read stays
    resident until the map closes, so a load would briefly hold the model twice (98 MB of SmolLM2
    blocks read + 98 MB packed). Dropped pages of a file map are read from the file again if
    touched; `a` is never read after packing, and pages shared with a neighbouring tensor are kept.
    """
    import sys

    if sys.platform != "linux" or a.nbytes < (1 << 20):
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = -(-a.ctypes.data // page) * page
    end = (a.ctypes.data + a.nbytes) // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # MADV_DONTNEED
