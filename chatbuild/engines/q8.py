"""Q8 weights for serving on a CPU (`serve --quant q8`): linear layers multiplied in 8-bit integers.

    weight = q8.pack(linear.weight)        # int8 blocks of 32 + one fp32 scale each (None if it cannot)
    y = q8.matmul(x, weight)               # x [rows, in] fp32 -> [rows, out] fp32

Why: a decode step on a 2-core CPU is mostly matrix products that read every weight once per step
(bench/cpu_kernels.py: 70-80% of SmolLM2's step is aten::mm in fp32), so it is bound by how many
bytes of weights it reads. int8 reads a quarter of fp32's, and the products are integer dot products
that AVX2 does 32 at a time. PyTorch's CPU int8 paths did not help here (the weight-only
`_weight_int8pack_mm` and `_int_mm` were slower than fp32; fbgemm's dynamic quantization with one
scale per tensor changed the next token too often), so this module builds its own small kernel.

The format is GGML's Q8_0 (llama.cpp): each row of a weight in blocks of 32 values, each block int8
with its own scale (absmax / 127); activations are quantized the same way at every call, so each
block's dot product is exact and only two scales are floating point. Greedy replies are q8's own:
close to fp32's, not always equal (tests/test_q8.py measures the agreement on SmolLM2).

Besides the product (weights repacked in groups of 8 outputs and summed in int32 lanes; a fused
projection's LoRA terms, each row its own adapter's columns, added in the same call), the kernel file
has `q8_decode`: a whole decode step of a Llama-family model, every layer, in one call (`decode`; the
fast decoder's q8 steps). Every output is computed from its own row alone, so a row's result is the
same in any batch.

The kernel (kernels/q8.c) is compiled once per machine with the system's C compiler (`$CC`, default
`cc`; -O3, OpenMP, AVX2/FMA where the CPU has them) into $CHATBUILD_HOME/kernels/, and loaded with
ctypes (which releases the GIL during the call). No compiler: `--quant q8` is refused with the reason.
The fp32 weights stay loaded beside the int8 copy (transformers' forward and adapters read them), so
q8 is a speed choice, not a memory one: memory is fp32's plus a quarter.
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from chatbuild.errors import UserError

BLOCK = 32  # values per block (GGML's QK8_0)
SOURCE = Path(__file__).with_name("kernels") / "q8.c"

_lock = threading.Lock()
_library = None


@dataclass(frozen=True)
class Q8Weight:
    """A packed [out, in] weight, as the kernel reads it (kernels/q8.c, `q8_repack`): `values` int8
    [groups of 8 outputs, in / BLOCK, 8, 32] (each 32 bytes: 4 inputs of each of 8 outputs), `scales`
    fp32 [groups, in / BLOCK, 8], zeros past `out`; and the layer's bias (fp32 or None). `unpacked()`
    gives the plain [out, in] int8 values and [out, in / BLOCK] scales."""

    values: object
    scales: object
    bias: object
    out: int
    size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.out, self.size

    def unpacked(self):
        """(values int8 [out, in], scales fp32 [out, in / BLOCK]): Q8_0 in plain row order."""
        groups, blocks = self.values.shape[:2]
        values = self.values.view(groups, blocks, 8, 8, 4).permute(0, 3, 1, 2, 4).reshape(groups * 8, self.size)
        scales = self.scales.permute(0, 2, 1).reshape(groups * 8, blocks)
        return values[:self.out], scales[:self.out]


def pack_reason(weight) -> str | None:
    """Why `weight` cannot be packed (None: it can): a 2-D fp32 tensor on the CPU whose input size is
    a multiple of BLOCK."""
    import torch

    if weight.dim() != 2 or weight.dtype != torch.float32 or weight.device.type != "cpu":
        return f"a {weight.dtype} weight of {tuple(weight.shape)} on {weight.device} (q8 packs 2-D fp32 CPU weights)"
    if weight.shape[1] % BLOCK:
        return f"an input size of {weight.shape[1]}, not a multiple of {BLOCK}"
    return None


def pack(weight, bias=None) -> Q8Weight | None:
    """`weight` [out, in] as Q8Weight, or None when `pack_reason` says it cannot be."""
    import torch

    if pack_reason(weight):
        return None
    weight = weight.detach().contiguous()
    out, size = weight.shape
    values = torch.empty(out, size, dtype=torch.int8)
    scales = torch.empty(out, size // BLOCK, dtype=torch.float32)
    groups = -(-out // 8)
    packed = torch.empty(groups, size // BLOCK, 8, 32, dtype=torch.int8)
    packed_scales = torch.empty(groups, size // BLOCK, 8, dtype=torch.float32)
    library = kernel()
    library.q8_quantize(weight.data_ptr(), out, size, values.data_ptr(), scales.data_ptr())
    library.q8_repack(values.data_ptr(), scales.data_ptr(), out, size, packed.data_ptr(), packed_scales.data_ptr())
    return Q8Weight(packed, packed_scales, None if bias is None else bias.detach().float(), out, size)


def pack_lora(a_all, b_all):
    """Stacked LoRA adapters (A_all [r, in], B_all [out, r], scalings included: the fast decoder's
    layout) as `matmul` takes them: A_all fp32, and B_all blocked by 8 outputs, [ceil(out / 8), r, 8]
    (the kernel reads 8 outputs' terms as one vector, sequentially)."""
    import torch

    out, rank = b_all.shape
    padded = torch.zeros(-(-out // 8) * 8, rank, dtype=torch.float32)
    padded[:out] = b_all.detach().float()
    return a_all.detach().float().contiguous(), padded.view(-1, 8, rank).transpose(1, 2).contiguous()


def matmul(x, weight: Q8Weight, lora=None, columns=None):
    """x [rows, in] (fp32) times `weight` transposed: [rows, out] fp32, plus the bias; with `lora`
    (`pack_lora`'s stacked adapters) and `columns` (int64 [2, rows]: row i's first and end column of
    A_all; equal for no adapter), plus each row's low-rank term, all in one kernel call. Each row's
    result depends on that row alone (the same bits in any batch)."""
    import torch

    x = x.contiguous() if x.dtype == torch.float32 else x.float().contiguous()
    rows, size = x.shape
    out = weight.out
    if size != weight.size:
        raise ValueError(f"q8.matmul: input of {size} features for a weight of {weight.shape}")
    y = torch.empty(rows, out, dtype=torch.float32)
    if rows:
        bias = weight.bias.data_ptr() if weight.bias is not None else None
        a = bt = lo = hi = None
        rank = 0
        if lora is not None and columns is not None:
            (a, b), rank = lora, lora[0].shape[0]
            if (columns.shape != (2, rows) or columns.dtype != torch.int64 or a.shape[1] != size
                    or b.shape != (-(-out // 8), rank, 8)):
                raise ValueError(f"q8.matmul: LoRA of {tuple(a.shape)}, {tuple(b.shape)} and columns "
                                 f"{tuple(columns.shape)} for {rows} rows of {size} into {out}")
            a, bt, lo, hi = a.data_ptr(), b.data_ptr(), columns[0].data_ptr(), columns[1].data_ptr()
        status = kernel().q8_matmul(x.data_ptr(), rows, size, weight.values.data_ptr(), weight.scales.data_ptr(),
                                    out, y.data_ptr(), torch.get_num_threads(), bias, a, bt, rank, lo, hi)
        if status:
            raise MemoryError(f"q8.matmul: no memory for {rows} x {size} quantized activations")
    return y


# ── building and loading the kernel ──────────────────────────────────────────────────────────
def kernel() -> ctypes.CDLL:
    """The compiled kernel, built on first use (UserError naming the compiler's complaint if it
    cannot be)."""
    global _library
    with _lock:
        if _library is None:
            import torch  # noqa: F401 — loaded first, so the kernel's OpenMP is torch's libgomp

            _library = _declare(ctypes.CDLL(str(build())))
        return _library


def compile_flags() -> list[str]:
    """The compiler flags for this machine: AVX2 + FMA when the CPU has them (PyTorch's own probe)."""
    import torch

    flags = ["-O3", "-std=c11", "-shared", "-fPIC", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def build(cache: Path | None = None) -> Path:
    """Compile kernels/q8.c unless this source with these flags already was; the library's path."""
    from chatbuild.bases import chatbuild_home

    compiler = os.environ.get("CC", "cc")
    flags = compile_flags()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    folder = cache or chatbuild_home() / "kernels"
    target = folder / f"q8-{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--quant q8: cannot create {folder} for its kernel ({e.strerror or e})") from None
    with tempfile.TemporaryDirectory(dir=folder) as tmp:  # built aside, then renamed: no half-written library
        built = Path(tmp) / target.name
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(built), "-lm"],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"--quant q8 compiles a small C kernel once and needs a C compiler with OpenMP "
                            f"(gcc; set $CC to another): {compiler}: {e}") from None
        if done.returncode:
            complaint = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise UserError(f"--quant q8: compiling its kernel with {compiler} failed: {' | '.join(complaint)}")
        os.replace(built, target)
    return target


# ── a whole decode step in one call (kernels/q8.c: q8_decode) ────────────────────────────────
class Projection(ctypes.Structure):
    """One packed product as q8_decode takes it: weight, scales, bias, LoRA (A, blocked B, rank),
    sizes, and the rows' adapter columns (set per step)."""

    _fields_ = [("w", ctypes.c_void_p), ("d", ctypes.c_void_p), ("bias", ctypes.c_void_p), ("la", ctypes.c_void_p),
                ("lb", ctypes.c_void_p), ("r", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64),
                ("lo", ctypes.c_void_p), ("hi", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    """One decoder layer as q8_decode takes it: the two RMSNorm weights and epsilons, the four products
    (q/k/v and gate/up fused), and the layer's KV cache (set per step)."""

    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("eps1", ctypes.c_float),
                ("eps2", ctypes.c_float), ("qkv", Projection), ("o", Projection), ("gate_up", Projection),
                ("down", Projection), ("keys", ctypes.c_void_p), ("values", ctypes.c_void_p)]


def projection(weight: Q8Weight, lora=None) -> Projection:
    """`weight` (and `pack_lora`'s adapters, or None) as a q8_decode Projection; the tensors must
    outlive it."""
    out, size = weight.shape
    p = Projection(weight.values.data_ptr(), weight.scales.data_ptr(),
                   None if weight.bias is None else weight.bias.data_ptr(), None, None, 0, out, size, None, None)
    if lora is not None:
        p.la, p.lb, p.r = lora[0].data_ptr(), lora[1].data_ptr(), lora[0].shape[0]
    return p


def set_columns(p: Projection, columns, rows: int) -> None:
    """Point `p` at this step's adapter columns (int64 [2, rows], contiguous), or none."""
    if columns is None:
        p.lo = p.hi = None
    else:
        p.lo, p.hi = columns.data_ptr(), columns.data_ptr() + 8 * rows


def decode(layers, hidden, cos, sin, slots, positions, capacity: int, heads: int, kv_heads: int,
           head_dim: int, ff: int, scale: float) -> None:
    """Run one decode step through `layers` (a ctypes array of Layer), updating `hidden` [rows, d]
    (fp32, contiguous) in place; cos/sin [rows, head_dim], slots/positions int64 [rows]."""
    import torch

    rows, size = hidden.shape
    status = kernel().q8_decode(layers, len(layers), hidden.data_ptr(), rows, size, heads, kv_heads, head_dim, ff,
                                cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), positions.data_ptr(), capacity,
                                scale, torch.get_num_threads())
    if status:
        raise MemoryError(f"q8.decode: no memory for a step of {rows} rows")


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.q8_quantize.argtypes = [pointer, size, size, pointer, pointer]
    library.q8_quantize.restype = None
    library.q8_repack.argtypes = [pointer, pointer, size, size, pointer, pointer]
    library.q8_repack.restype = None
    library.q8_matmul.argtypes = [pointer, size, size, pointer, pointer, size, pointer, ctypes.c_int,
                                  pointer, pointer, pointer, size, pointer, pointer]
    library.q8_matmul.restype = ctypes.c_int
    library.q8_decode.argtypes = [ctypes.POINTER(Layer), size, pointer, size, size, size, size, size, size,
                                  pointer, pointer, pointer, pointer, size, ctypes.c_float, ctypes.c_int]
    library.q8_decode.restype = ctypes.c_int
    return library
