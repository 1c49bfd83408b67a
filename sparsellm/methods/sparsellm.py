"""SparseLLM (Bai et al., NeurIPS 2024, arXiv 2402.17946): global pruning of each FFN.

Attention is pruned locally, as SparseGPT (this class inherits its :meth:`prune`). The FFN's
linears are coupled through auxiliary variables and pruned jointly. With X the FFN input
tokens (rows) and Y the dense FFN output, the per-layer objective is

    ReLU (OPT):    alpha ||z - W1 X - b1||^2                      + gamma ||p - ReLU(z)||^2
                   + beta ||Y - b2 - W2 p||^2
    SwiGLU (LLaMA): alpha ||z - Wu X - bu||^2 + alpha ||s - Wg X - bg||^2 + gamma ||p - SiLU(s) * z||^2
                   + beta ||Y - bd - Wd p||^2

(the SwiGLU biases only where the model has them: LLaMA's ``mlp_bias``; z and s are the
pre-activations the model computes, biases included, so the hidden is the model's)

minimised by alternating closed-form steps, from auxiliaries set by the dense pass:

1. W-steps: each linear is fitted to its target by least squares (up to ``z``, gate to ``s``,
   down to Y on ``p``; biases stay fixed and are subtracted from the targets), then pruned by
   the OBS solver with the Hessian of its input (X, or the current ``p``). The least squares
   is dampened towards the *dense* weight (same dampening as the OBS solver), so a linear
   whose target is still the dense one gets back exactly its dense weight.
2. p-step: argmin_p beta ||Y' - W2 p||^2 + gamma ||p - act||^2, act = ReLU(z) or SiLU(s) z.
3. z-step (and s-step for SwiGLU): element-wise, through :mod:`sparsellm.ops`.
4. Over-relaxation of the auxiliaries: z <- z_old + omega (z_new - z_old), s likewise
   (``relaxation``; omega = 1 is the plain alternation). The alternation creeps: on the default
   model each iteration lowered the FFN error by 1-3% and the error still fell at the sixth.
   Stepping past each step's minimiser, as successive over-relaxation does for linear systems,
   moves the auxiliaries further along the direction they keep taking. Measured on fixed FFN
   inputs (``benchmarks/sparsellm_sweep.py``; ``DEFAULT_RELAXATION``).

Only the ratios of alpha, beta, gamma matter (each W-step is a separate least squares). With
``scale_aware`` each penalty is divided by the squared norm of the dense quantity its term
measures (||z||^2, ||s||^2, ||Y'||^2, ||p||^2), so every term is a relative squared error and the
defaults do not depend on a layer's activation scale (layers with outliers, where raw
penalties let the beta term swamp the rest, were the public code's failure).

Safeguards: candidate 0 is sequential SparseGPT of the FFN (up/gate with the Hessian of X,
down with the Hessian of the hidden of the *pruned* up/gate). Each iterate is measured by the
FFN output error ||Y - FFN(X)|| / ||Y|| and the best one is kept; iterating stops when an
iteration makes that error worse than the previous iteration did.

Memory: z, s and Y' are kept for all calibration tokens (p is recomputed from act(z, s) and Y'
in every sweep), chunk by chunk; they live on
the compute device when they fit and in host memory otherwise, and every token-wise step runs on
one chunk at a time, so the temporaries stay bounded. Their size is reported as ``aux_bytes``.

Precision: the token-wise products and the Gram accumulations over all tokens (nearly all of the
solver's arithmetic at 7B shapes) run in ``product_precision``; by default float16 operands
scaled into range with float32 results on CUDA (:class:`Products`), and "tf32" elsewhere, which is
plain float32 on the CPU (:func:`default_product_precision`), where oneDNN's GEMM multiplies them by
default (``cpu_gemm``: MKL, torch's, runs its AVX2 kernels on AMD CPUs; :mod:`sparsellm.precision`).
Factorisations, the OBS sweeps and the p-step's system stay float32.
"""
from __future__ import annotations

import collections
import logging
import math

import torch
import torch.nn.functional as F
from torch.profiler import record_function as stage

from .. import ops
from ..precision import large_products, onednn_gemm_available, onednn_linear
from ..reference import sq_norm
from ..plan import LayerView, Step, Tokens
from ..sparsity import SparsityPattern
from .base import set_weight
from .sparsegpt import SparseGPT, obs_prune_with_gram

log = logging.getLogger(__name__)

# Elements of one [chunk, ffn_dim] temporary: ~32 MB in float32. The s-step keeps about ten
# such temporaries alive, so a chunk costs a few hundred MB at most.
CHUNK_ELEMENTS = 1 << 23
# On a CUDA device, four times that (128 MB temporaries, ~3k tokens of a 7B FFN): each token-wise
# step is one launch per chunk, and at the CPU's chunk a 7B layer's sweep is ~170 chunks of
# kernels short enough for the host's launch path to show. Measured on an H200 (benchmarks/RESULTS.md,
# "SparseLLM at 7B shapes", run 3, commit f8def43): SparseLLM's steady time per layer 4.88 s at
# this chunk against 6.6 s at the CPU's 762-token one, with the same FFN errors to 1e-4
# (--chunk-tokens sets it).
CUDA_CHUNK_ELEMENTS = 1 << 25
# Auxiliary buffers stay on a CUDA device only if they take at most this share of its free memory.
DEVICE_AUX_SHARE = 0.5
# Row blocks of the symmetric Gram accumulations (Products.sym_gram_add). On the CPU 256: each
# block's entries are the full product's bit for bit (MKL, 1 thread, the default model's
# [5461, 1536] chunks; 128 rounds differently), and the accumulation took 90 ms instead of 131 ms.
SYM_BLOCK = 256
# On CUDA 2048: a 7B FFN's hidden Gram (f = 11008, the full product a quarter of a sweep's TF32
# GEMM work in the H200 profile at f8def43) in 6 row blocks, 59% of the full product's work, each
# block a GEMM of at least 768 x 768 x the chunk's tokens (not yet measured on a GPU).
CUDA_SYM_BLOCK = 2048


def _sq_norm_(t: torch.Tensor) -> torch.Tensor:
    """:func:`sparsellm.reference.sq_norm` of a temporary, squared in place: the same value without allocating
    another buffer of its size (each fresh one of a token chunk's [5461, 1536] costs page faults
    on the CPU)."""
    return t.square_().sum().double()


# float16 operands are scaled by a power of two (exact) so that the largest magnitude lies in
# (2^13, 2^14]: float16's largest finite value is 65504 (just under 2^16), and its normal range
# reaches down to 2^-14, so every entry above 2^-27 of its tensor's largest keeps float16's 11
# significant bits (TF32's too). The scale's exponent is kept within +-60 so that the product of
# two inverse scales stays a normal float32.
FLOAT16_TOP = 2.0 ** 14
FLOAT16_MAX_EXPONENT = 60
# Scaled float16 operands kept for reuse (least recently used dropped): within a token chunk the
# chunk's inputs enter four products and the down weight three, and the weights every chunk's.
# At 7B shapes a weight's cast reads and writes ~0.8 GB; redone per product it would cost about
# 0.1 s a layer.
FLOAT16_KEPT = 16
# torch.mm(float16, float16, out_dtype=torch.float32) on CUDA (torch 2.8+): the overload exists
FLOAT16_GEMM = hasattr(torch.ops.aten.mm, "dtype")
# The defaults of the settings left None (SparseLLMSettings.iterations, .relaxation): chosen on
# fixed FFN inputs of the default model (benchmarks/sparsellm_sweep.py; benchmarks/RESULTS.md,
# "SparseLLM's over-relaxation"): with omega = 1.6, 3 iterations gave lower FFN errors than 4
# plain ones on 24 of 25 layers and settings (the other, an error of 0.0132, +0.7%) in 27% less
# time; omega 1.7 and above overshot on the layers of small error.
DEFAULT_ITERATIONS = 3
DEFAULT_RELAXATION = 1.6
# The float32 products' library on the CPU where SparseLLMSettings.cpu_gemm is None: oneDNN where
# this torch has it (sparsellm.precision: 1.6-2.2x MKL's speed on an AMD EPYC; the same float32
# arithmetic in another summation order), else torch's (MKL).
DEFAULT_CPU_GEMM = "onednn"
# Candidate 0's error comes from the statistics of its hidden, ||Y'||^2 - 2 <W, Y'^T H> + <W H^T H, W>:
# float32 sums whose rounding, about 1e-7 of ||Y'||^2 (measured 7e-8 at 4096 tokens), the
# difference cancels down to. Below this share of ||Y'||^2 (a relative error under 0.3%, where that
# rounding is above 1% of the error: at 1% sparsity the expansion came out 0 for an error of
# 2.6e-4) the error is measured directly instead, by one more sweep over the tokens. Under
# "bfloat16" products it always is: their GEMMs round each token chunk's statistics to bfloat16
# (8 bits), not only the operands, and on the tests' synthetic FFNs the expansion put the error up
# to 5% off at 30% sparsity and up to 1.5% at 50-70% (either way), where the sweep, in the products
# that measure the iterates, came within 0.5% and 0.13% of float64's.
START_EXPANSION_LIMIT = 1e-5


class Products:
    """The solver's large products (token-wise forward products and Gram accumulations over
    the calibration tokens) in its ``product_precision``, results in float32 (a's dtype):

    - "float32" and "tf32": float32 operands ("tf32" is float32 here and TF32 on CUDA inside
      :func:`large_products`);
    - "bfloat16": bfloat16 operands and products, widened to float32, which the CPU's AMX units
      multiply about 8x faster than float32 (a [5461, 576] x [576, 1536] product, 2-core
      Sapphire Rapids);
    - "float16": float16 operands, each scaled by a power of two into float16's range, products
      accumulated and returned in float32 (on CUDA one tensor-core GEMM with a float32 output,
      twice TF32's peak rate on Hopper at the same 11 significant bits per operand; elsewhere
      the same arithmetic emulated in float32, where products of float16 values are exact).
    """

    def __init__(self, precision: str, cpu_gemm: str = "torch"):
        self.low = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision)
        # float32 products of CPU tensors through oneDNN (config.CPU_GEMMS)
        self.onednn = cpu_gemm == "onednn"
        self._kept: collections.OrderedDict = collections.OrderedDict()  # float16 operands, see FLOAT16_KEPT

    def _on_onednn(self, t: torch.Tensor) -> bool:
        """Whether a float32 product with ``t`` runs on oneDNN (chosen, and a CPU tensor)."""
        return self.onednn and t.device.type == "cpu"

    def float32_mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b of float32 operands, by oneDNN on the CPU where chosen."""
        return onednn_linear(a, b.t()) if self._on_onednn(a) else a @ b

    def _operand(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``t`` as a product's operand, and the factor that undoes its scaling (None: unscaled)."""
        if self.low is not torch.float16:
            return t.to(self.low), None
        # The entry holds t itself, so t's memory cannot be reused by another tensor while the
        # key (its address, layout and version: an in-place change makes a new key) is kept.
        # Tensors made under torch.inference_mode have no version counter: never kept.
        key = None if t.is_inference() else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t._version)
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return kept[1], kept[2]
        top = torch.linalg.vector_norm(t, float("inf")).float()  # on the device: no wait for the GPU
        exponent = torch.floor(torch.log2(FLOAT16_TOP / top)).clamp_(-FLOAT16_MAX_EXPONENT, FLOAT16_MAX_EXPONENT)
        scale = torch.exp2(exponent)
        operand, inverse = (t * scale).to(torch.float16), scale.reciprocal()
        if key is not None:
            self._kept[key] = (t, operand, inverse)
            if len(self._kept) > FLOAT16_KEPT:
                self._kept.popitem(last=False)
        return operand, inverse

    def _product(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b of two operands (:meth:`_operand`), float32 for float16 operands."""
        if self.low is not torch.float16:
            return a @ b
        if a.device.type == "cuda":
            return torch.mm(a, b, out_dtype=torch.float32)
        return a.float() @ b.float()

    def _unscaled(self, a: tuple, b: tuple, dtype: torch.dtype) -> torch.Tensor:
        """The product of two (operand, inverse scale) pairs, in ``dtype``, its scaling undone."""
        out = self._product(a[0], b[0]).to(dtype)
        return out if a[1] is None else out.mul_(a[1] * b[1])

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b, in a's dtype."""
        if self.low is None:
            return self.float32_mm(a, b)
        return self._unscaled(self._operand(a), self._operand(b), a.dtype)

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ w^T (+ bias, added in float32)."""
        if self.low is None:
            if not self._on_onednn(x):
                return F.linear(x, w, bias)
            out = onednn_linear(x, w)
            return out if bias is None else out.add_(bias)
        w_op, w_inv = self._operand(w)  # w's own operand, not its transpose's: shared with mm(q, w)
        out = self._unscaled(self._operand(x), (w_op.t(), w_inv), x.dtype)
        return out if bias is None else out.add_(bias)

    @staticmethod
    def _accumulate(acc: torch.Tensor, product: torch.Tensor, inverse: torch.Tensor | None) -> None:
        # a bfloat16 product added to acc is widened exactly; a scaled one is unscaled on the way
        if inverse is None:
            acc.add_(product)
        else:
            acc.addcmul_(product, inverse)

    def gram_add(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """acc += a^T b (acc float32)."""
        if self.low is None:
            if self._on_onednn(acc):
                acc.add_(self.float32_mm(a.t(), b))
            else:
                acc.addmm_(a.t(), b)
            return
        (a_op, a_inv), (b_op, b_inv) = self._operand(a), self._operand(b)
        self._accumulate(acc, self._product(a_op.t(), b_op), None if a_inv is None else a_inv * b_inv)

    def sym_gram_add(self, acc: torch.Tensor, a: torch.Tensor) -> None:
        """acc += a^T a, only the blocks of rows [i, i + block) from column i on (the upper block
        triangle; :func:`_sym_block`): about 60% of the full product's work at the default
        model's FFN width 1536 (CPU) and a 7B FFN's 11008 (CUDA). The blocks below are not
        touched and :func:`full_gram` completes the matrix."""
        block = _sym_block(acc)
        if self.low is None and self._on_onednn(acc):
            # a^T's rows, contiguous, so that every block's operands are dense (oneDNN is slow on
            # column slices of a: precision._dense); one copy per call instead of one per block
            at = a.t().contiguous()
            for i in range(0, a.shape[1], block):
                acc[i:i + block, i:].add_(onednn_linear(at[i:i + block], at[i:]))
            return
        if self.low is None:
            for i in range(0, a.shape[1], block):
                acc[i:i + block, i:].addmm_(a[:, i:i + block].t(), a[:, i:])
            return
        op, inv = self._operand(a)  # cast once, not once per block
        inv = None if inv is None else inv * inv
        for i in range(0, a.shape[1], block):
            self._accumulate(acc[i:i + block, i:], self._product(op[:, i:i + block].t(), op[:, i:]), inv)


def default_product_precision(device: torch.device) -> str:
    """The product precision a ``product_precision`` of None takes on ``device``: "float16" on CUDA
    where torch.mm has float32 outputs of float16 operands (on an H200 at 7B shapes 7-15% less time
    per layer than TF32 in two calls, with FFN errors within 3e-4 of TF32's, none higher: benchmarks/RESULTS.md,
    "SparseLLM at 7B shapes", run 5); "tf32" elsewhere (float32 on the CPU, where float16 is
    emulated and slower)."""
    return "float16" if device.type == "cuda" and FLOAT16_GEMM else "tf32"


def check_product_precision(config) -> None:
    """float16 products on CUDA need torch.mm's float32 output of float16 operands (torch 2.8+),
    and an explicit ``cpu_gemm`` "onednn" needs oneDNN: without them, a ValueError before
    anything loads (SparseLLM's and StructPrune's preflight)."""
    from ..driver import resolve_device  # (the driver imports the methods' modules)

    if (config.sparsellm.product_precision == "float16" and not FLOAT16_GEMM
            and resolve_device(config.device).type == "cuda"):
        raise ValueError(f"--product-precision float16 on CUDA needs torch >= 2.8 (torch.mm with out_dtype); "
                         f"this torch is {torch.__version__}: use tf32 (the default)")
    resolve_cpu_gemm(config.sparsellm.cpu_gemm, "torch")  # an explicit onednn that this torch cannot run


def resolve_cpu_gemm(setting: str | None, default: str) -> str:
    """The CPU GEMM library a solver uses: ``setting``, or where it is None the method's
    ``default`` if this torch has it (else torch's). An explicit "onednn" without oneDNN is a
    ValueError (the preflight's :func:`check_product_precision` raises it before anything loads);
    the setting's own value was checked when :class:`SparseLLMSettings` was built."""
    if setting is None:
        return default if default != "onednn" or onednn_gemm_available() else "torch"
    if setting == "onednn" and not onednn_gemm_available():
        raise ValueError("--cpu-gemm onednn: this torch has no oneDNN float32 GEMM (built without mkldnn, or "
                         "torch.backends.mkldnn.matmul.fp32_precision lets it round float32 operands); use torch")
    return setting


def _sym_block(acc: torch.Tensor) -> int:
    return CUDA_SYM_BLOCK if acc.device.type == "cuda" else SYM_BLOCK


def full_gram(acc: torch.Tensor) -> torch.Tensor:
    """The whole Gram matrix of a :meth:`Products.sym_gram_add` accumulation: its upper triangle
    mirrored (exactly symmetric)."""
    return acc.triu() + acc.triu(1).t()


def _act(swiglu: bool, z: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return F.silu(s).mul_(z) if swiglu else torch.relu(z)  # a fresh tensor (callers change it in place)


def least_squares_towards(reference: torch.Tensor, cross: torch.Tensor, chol: torch.Tensor,
                          damp: float) -> torch.Tensor:
    """argmin_W ||W X^T - T^T||^2 / N + damp ||W - reference||^2.

    ``cross`` = X^T T / N (in x out), ``chol`` the lower Cholesky factor of G + damp I with
    G = X^T X / N. Normal equations: (G + damp I) W^T = X^T T / N + damp reference^T.
    Regularising towards the dense weight (not zero) means a target equal to the dense output
    returns the dense weight, so the dampening alone never shrinks a layer.
    """
    return torch.cholesky_solve(cross + damp * reference.t(), chol).t().contiguous()


def p_step_factor(w2: torch.Tensor, ratio: float) -> torch.Tensor:
    """Lower Cholesky factor of W2 W2^T + ratio I (d x d), the system of :func:`p_step`. It
    depends only on the down weight, so each iteration factors it once for all token chunks."""
    system = w2 @ w2.t()
    system.diagonal().add_(ratio)
    chol, info = torch.linalg.cholesky_ex(system)
    if int(info):  # ratio > 0 makes it positive definite; rounding can still break a tiny ratio
        chol, _ = ops.damped_cholesky(system, 1e-6)
    return chol


def p_step_inverse(chol: torch.Tensor, cpu_gemm: str | None = None) -> torch.Tensor | None:
    """(W2 W2^T + ratio I)^-1 from :func:`p_step_factor`'s factor where :func:`p_step` should
    apply the inverse rather than solve with the factor (None elsewhere): on CUDA, and on the CPU
    where the products run on oneDNN (``cpu_gemm``), whose GEMM made the product of a
    [5461, 576] chunk with the inverse about 9 ms against LAPACK's solve's 35 ms. On CUDA the
    solve of one token chunk runs as a chain of small blocked triangular-solve kernels: 220
    solves of ~3k-token chunks took 1.38 s of device time, 6.3 ms each, on an H200 at d = 4096
    (``benchmarks/profile_prune.py``, commit f8def43; 0.7 s of a 4.9 s 7B layer), where the
    product with the inverse is one [chunk, d] x [d, d] GEMM. The inverse is formed once per
    iteration, in float32, from the same factor. The system is well conditioned: cond <= 1 +
    ||W2||^2 / ratio, and under the default scale-aware penalties ratio is
    ||y||^2 / ||p||^2 (y ~ W2 p), so ||W2||^2 / ratio is the spread of W2's singular values
    over the hidden's directions, not a rounding-level damping. With torch's CPU GEMM LAPACK's
    solve stays (StructPrune's published numbers are its)."""
    return torch.cholesky_inverse(chol) if chol.device.type == "cuda" or cpu_gemm == "onednn" else None


@stage("sparsellm.p_step")
def p_step(r: torch.Tensor, y: torch.Tensor, w2: torch.Tensor, chol: torch.Tensor, products: Products | None = None,
           inverse: torch.Tensor | None = None):
    """argmin_p beta ||y - p W2^T||^2 + gamma ||p - r||^2 for rows of tokens; ratio = gamma / beta.

    The minimiser is p = (beta W2^T W2 + gamma I)^-1 (beta W2^T y + gamma r). Written as
    p = r + W2^T q with (W2 W2^T + ratio I) q = y - W2 r (push-through identity), the system is
    d x d (model width) instead of f x f (FFN width); ``chol`` is its Cholesky factor
    (:func:`p_step_factor`), ``inverse`` its inverse where given (:func:`p_step_inverse`: q is
    then a float32 product instead of two triangular solves). Returns ``(p, q)``; the fit
    residual y - W2 p equals ratio * q. ``products`` computes the token-wise products (default:
    float32).
    """
    products = products or Products("float32")
    residual = y - products.linear(r, w2)
    if inverse is None:
        q = torch.cholesky_solve(residual.t(), chol).t()
    else:
        # float32 operands even where the products are bfloat16 or float16 (the inverse stands in
        # for the float32 solve); TF32 inside large_products' "tf32". Symmetric: (M^-1 v^T)^T = v M^-1.
        q = products.float32_mm(residual, inverse)
    return products.mm(q, w2).add_(r), q  # r + W2^T q, into the product's fresh buffer


class SparseLLM(SparseGPT):
    """Attention groups as SparseGPT; one step for the whole FFN, observing its input tokens."""

    name = "sparsellm"
    structured = None  # its structured member is StructPrune (sparsellm.methods.structprune)
    settings_groups = ("sparsellm",)

    @classmethod
    def preflight(cls, config) -> None:
        check_product_precision(config)

    def plan(self, layer: LayerView) -> list[Step]:
        ffn_linears = {name: lin for group in layer.ffn_groups for name, lin in group.items()}
        ffn_step = Step(ffn_linears, lambda x: self.prune_ffn(layer.ffn, x, layer.pattern), observe=Tokens,
                        source=layer.ffn.up)
        return self.group_steps(layer.attention_groups, layer.pattern) + [ffn_step]

    @torch.no_grad()
    def prune_ffn(self, ffn, x: torch.Tensor, pattern: SparsityPattern) -> dict:
        """Prune the FFN ``ffn`` jointly on its input tokens ``x`` [N, d]; sets the weights in
        place and returns JSON-able diagnostics."""
        return _FFNSolver(ffn, x, pattern, self.config).run()


class _FFNSolver:
    DEFAULT_ITERATIONS = DEFAULT_ITERATIONS
    DEFAULT_RELAXATION = DEFAULT_RELAXATION
    DEFAULT_CPU_GEMM = DEFAULT_CPU_GEMM

    def __init__(self, ffn, x, pattern, config):
        settings = config.sparsellm  # validated when the settings were built
        self.ffn, self.pattern, self.config, self.settings = ffn, pattern, config, settings
        self.iterations = self.DEFAULT_ITERATIONS if settings.iterations is None else settings.iterations
        self.relaxation = self.DEFAULT_RELAXATION if settings.relaxation is None else settings.relaxation
        self.swiglu = ffn.activation == "swiglu"
        self.x = x.float()
        self.device = x.device
        self.tokens, self.width = x.shape
        self.dense = {k: v.float() for k, v in ffn.dense_copy().items()}
        self.b1 = None if ffn.up.bias is None else ffn.up.bias.detach().float()
        # gate's bias (LLaMA's mlp_bias): in every gate pre-activation s, as b1 in z's
        self.bg = None if ffn.gate is None or ffn.gate.bias is None else ffn.gate.bias.detach().float()
        self.b2 = None if ffn.down.bias is None else ffn.down.bias.detach().float()
        self.hidden = self.dense["up"].shape[0]
        step = settings.chunk_tokens or max(
            256, (CUDA_CHUNK_ELEMENTS if self.device.type == "cuda" else CHUNK_ELEMENTS) // self.hidden)
        self.chunks = [slice(i, min(i + step, self.tokens)) for i in range(0, self.tokens, step)]
        # p is recomputed from act(z, s) and Y' in every sweep, so it needs no buffer; z and s are
        # kept (the relaxation steps from them; s is also the s-step's warm start).
        names = ["z", "y"] + (["s"] if self.swiglu else [])
        widths = {"z": self.hidden, "s": self.hidden, "y": self.width}
        self.aux_bytes = sum(self.tokens * widths[n] * 4 for n in names)
        self.store = self.device
        if self.device.type == "cuda" and self.aux_bytes > DEVICE_AUX_SHARE * torch.cuda.mem_get_info(self.device)[0]:
            self.store = torch.device("cpu")
        # The auxiliaries per token chunk: on the compute device, the tensors the steps return (kept,
        # not copied); in host memory, pinned buffers the results are copied into.
        if self.store == self.device:
            self.buf = {n: [None] * len(self.chunks) for n in names}
        else:
            self.buf = {n: [torch.empty(c.stop - c.start, widths[n], pin_memory=True) for c in self.chunks]
                        for n in names}
        self.precision = settings.product_precision or default_product_precision(self.device)
        # which library multiplies the float32 products on the CPU (None on other devices)
        self.cpu_gemm = (resolve_cpu_gemm(settings.cpu_gemm, self.DEFAULT_CPU_GEMM) if self.device.type == "cpu"
                         else None)
        self.products = Products(self.precision, self.cpu_gemm or "torch")

    # -- helpers -----------------------------------------------------------------------------

    def _get(self, name, chunk):
        return self.buf[name][chunk].to(self.device, non_blocking=True)

    def _put(self, name, chunk, value):
        """Store ``value`` (not changed afterwards) as auxiliary ``name`` of token chunk ``chunk``."""
        if self.store == self.device:
            self.buf[name][chunk] = value
        else:
            self.buf[name][chunk].copy_(value, non_blocking=True)

    def _lin(self, xc, w, bias=None):
        return self.products.linear(xc, w, bias)

    def _obs(self, weight, gram, hinv=None):
        return obs_prune_with_gram(weight, gram, self.pattern, self.config.blocksize, self.config.percdamp, hinv)

    def _products(self):
        """The precision of the float32 matmuls among the token-wise steps (:func:`large_products`):
        under "float16" products, the p-step's product by the inverse stays float32 operands and
        runs in TF32, as under "tf32"."""
        return large_products(self.device, "tf32" if self.precision == "float16" else self.precision)

    def _zeros(self, *shape):
        return torch.zeros(*shape, device=self.device, dtype=torch.float32)

    # -- where the pruning happens (StructPrune's structured solver overrides these) ----------

    def _start_inputs(self, gx):
        """Candidate 0's up and gate, and the factor of the input Hessian the later W-steps share."""
        up0, hinv_x = self._obs(self.dense["up"], gx)
        gate0 = self._obs(self.dense["gate"], gx, hinv_x)[0] if self.swiglu else None
        return up0, gate0, hinv_x

    def _candidate_zero(self, up0, gate0, hidden_gram):
        """Candidate 0 (sequential SparseGPT): down pruned on the Gram of the pruned up/gate's hidden."""
        return up0, gate0, self._obs(self.dense["down"], hidden_gram)[0]

    def _selection_error(self, weights: dict, fit_error: float) -> float:
        """The error by which the safeguard keeps the best iterate and stops: here the FFN's
        error on the calibration tokens it was fitted on (StructPrune: on held-out tokens)."""
        return fit_error

    def _prune_w_steps(self, up_ls, gate_ls, down_ls, gx, hinv_x, gp, up0, gate0):
        """Prune the W-steps' least-squares fits (up_ls/gate_ls None: candidate 0's up0/gate0),
        each by OBS with the Hessian of its input (X, or the current p)."""
        down = self._obs(down_ls, gp)[0]
        if up_ls is None:
            return up0, gate0, down
        gate = self._obs(gate_ls, gx, hinv_x)[0] if gate_ls is not None else None
        return self._obs(up_ls, gx, hinv_x)[0], gate, down

    # -- the algorithm -----------------------------------------------------------------------

    def _hidden(self, xc, up, gate):
        """The down projection's input for the tokens ``xc`` and the weights ``up``, ``gate``."""
        return _act(self.swiglu, self._lin(xc, up, self.b1), self._lin(xc, gate, self.bg) if self.swiglu else None)

    def _error_sq(self, up, gate, down) -> float:
        """||Y' - FFN(X)||^2 (FFN without the down bias) of these weights, by a sweep over the tokens."""
        err_sq = 0.0
        with self._products():
            for chunk, rows in enumerate(self.chunks):
                err_sq += _sq_norm_(self._lin(self._hidden(self.x[rows], up, gate), down).sub_(self._get("y", chunk)))
        return float(err_sq)

    @stage("sparsellm.gram_stats")
    def _gather(self, stats, h, yc):
        """Add the tokens' hidden ``h`` and targets ``yc`` to ``stats`` = (H^T H, H^T Y')."""
        self.products.sym_gram_add(stats[0], h)
        self.products.gram_add(stats[1], h, yc)

    def _start(self, up0, gate0, stats, y_sq, y_full) -> dict:
        """Candidate 0 (sequential SparseGPT), from the statistics of its up/gate's hidden H
        (:meth:`_gather`); its error from them too (||Y' - H W^T||^2 = ||Y'||^2 - 2 <W, Y'^T H>
        + <W H^T H, W>, in float64), or by a sweep over the tokens where that cancels to rounding
        (START_EXPANSION_LIMIT; always under bfloat16 products). Returns the safeguard's first best
        iterate."""
        hh, hy = full_gram(stats[0]), stats[1]
        up0, gate0, down0 = self._candidate_zero(up0, gate0, hh / self.tokens)
        d0 = down0.double()
        err_sq = y_sq - 2 * float((d0 * hy.t().double()).sum()) + float(((d0 @ hh.double()) * d0).sum())
        if err_sq < START_EXPANSION_LIMIT * y_sq or self.products.low is torch.bfloat16:
            err_sq = self._error_sq(up0, gate0, down0)
        error = math.sqrt(max(err_sq, 0.0) / y_full) if y_full > 0 else float("nan")
        log.info("sparsellm: start (sequential SparseGPT) ffn rel error %.5g", error)
        weights = {"up": up0, "gate": gate0, "down": down0}
        return {"error": error, "score": self._selection_error(weights, error), "iteration": 0, "weights": weights}

    def run(self) -> dict:
        s, x, n, f, d = self.settings, self.x, self.tokens, self.hidden, self.width
        swiglu, dense = self.swiglu, self.dense
        pd = self.config.percdamp

        # The input Hessian and its factors are the same for every iteration: computed once.
        gx = self.products.float32_mm(x.t(), x) / n
        up0, gate0, hinv_x = self._start_inputs(gx)
        chol_x, damp_x = ops.damped_cholesky(gx, pd)
        lam_x = float(damp_x) * float(gx.diagonal().mean())

        # Candidate 0 is judged on the hidden H0 of its up/gate. Where those are the dense weights
        # (StructPrune), H0 is the dense p, whose statistics the dense pass gathers anyway.
        # Otherwise H0 is the hidden of iteration 1 (its up/gate are candidate 0's): that sweep
        # gathers them, and candidate 0 is judged after it, which saves two products per token
        # chunk. Only without iterations does the dense pass compute H0.
        h0_is_p = up0 is dense["up"] and gate0 is dense.get("gate")
        h0_stats = None if h0_is_p else (self._zeros(f, f), self._zeros(f, d))
        h0_in_dense = h0_stats is not None and self.iterations == 0
        # Iteration 1's down W-step fits the dense hidden to Y' = (dense hidden) W2^T: its
        # dampened least squares is the dense down (up to rounding), used as is. So the dense
        # pass needs H^T Y' only where candidate 0 is judged on the dense hidden (h0_is_p).

        # Dense pass: auxiliaries, Y' = Y - b2 and the Hessian of the first down W-step (dense p),
        # in one sweep over the tokens.
        ptp, pty = self._zeros(f, f), self._zeros(f, d)
        norms = dict.fromkeys(("z", "s", "p", "y", "y_full"), 0.0)
        # (The profiler ranges, ``stage``, name the solver's parts in a torch.profiler trace:
        # benchmarks/prune_7b.py --profile.)
        with stage("sparsellm.dense_pass"), self._products():
            for chunk, rows in enumerate(self.chunks):
                xc = x[rows]
                z = self._lin(xc, dense["up"], self.b1)
                sc = self._lin(xc, dense["gate"], self.bg) if swiglu else None
                p = _act(swiglu, z, sc)
                y = self._lin(p, dense["down"])
                if h0_is_p:
                    self._gather((ptp, pty), p, y)
                else:
                    self.products.sym_gram_add(ptp, p)
                if h0_in_dense:
                    self._gather(h0_stats, self._hidden(xc, up0, gate0), y)
                sq = {key: sq_norm(val) for key, val in (("z", z), ("s", sc), ("p", p), ("y", y)) if val is not None}
                sq["y_full"] = sq["y"] if self.b2 is None else sq_norm(y + self.b2)  # Y' = Y without bias
                for key, value in sq.items():
                    norms[key] += value
                for key, val in (("z", z), ("s", sc), ("y", y)):
                    if key in self.buf:
                        self._put(key, chunk, val)
        norms = {key: float(value) for key, value in norms.items()}  # read once per pass (see sq_norm)
        y_full = norms["y_full"]

        if h0_stats is None or h0_in_dense:  # else after iteration 1's sweep
            start = best = self._start(up0, gate0, h0_stats or (ptp, pty), norms["y"], y_full)
            h0_stats = None

        if s.scale_aware:  # each term becomes a relative squared error (see module docs)
            alpha_z = s.alpha / max(norms["z"], 1e-30)
            alpha_s = s.alpha / max(norms["s"], 1e-30)
            beta = s.beta / max(norms["y"], 1e-30)
            gamma = s.gamma / max(norms["p"], 1e-30)
        else:
            alpha_z = alpha_s = s.alpha
            beta, gamma = s.beta, s.gamma
        ratio = gamma / beta

        history = []
        xtz = xts = None
        previous = None
        stopped_early = False
        omega = self.relaxation
        for it in range(1, self.iterations + 1):
            last = it == self.iterations
            # (1) W-steps: least squares to the targets, then pruned (_prune_w_steps). In the first
            # iteration up/gate targets are the dense outputs, whose dampened least squares is
            # exactly the dense weight: no fit (None), candidate 0's up/gate.
            with stage("sparsellm.w_steps"):
                if it == 1:
                    up_ls = gate_ls = None
                else:
                    up_ls = least_squares_towards(dense["up"], xtz / n, chol_x, lam_x)
                    gate_ls = least_squares_towards(dense["gate"], xts / n, chol_x, lam_x) if swiglu else None
                gp = full_gram(ptp) / n
                if it == 1:
                    down_ls = dense["down"]
                else:
                    chol_p, damp_p = ops.damped_cholesky(gp, pd)
                    lam_p = float(damp_p) * float(gp.diagonal().mean())
                    down_ls = least_squares_towards(dense["down"], pty / n, chol_p, lam_p)
                    del chol_p
                up, gate, down = self._prune_w_steps(up_ls, gate_ls, down_ls, gx, hinv_x, gp, up0, gate0)
                del down_ls, gp, up_ls, gate_ls

            # One sweep over the tokens: this iterate's FFN error and (unless it is the last
            # iteration) the p-, z- and s-steps and the next W-steps' statistics. The aux update
            # is speculative only where the error then says stop.
            err_sq = 0.0
            terms = dict.fromkeys(("z", "s", "p", "y"), 0.0)
            if not last:
                p_chol = p_step_factor(down, ratio)
                p_inv = p_step_inverse(p_chol, self.cpu_gemm)
                xtz, xts = self._zeros(d, f), (self._zeros(d, f) if swiglu else None)
                ptp.zero_()
                pty.zero_()
            with stage("sparsellm.sweep"), self._products():
                for chunk, rows in enumerate(self.chunks):
                    xc = x[rows]
                    m = self._lin(xc, up, self.b1)
                    g = self._lin(xc, gate, self.bg) if swiglu else None
                    yc = self._get("y", chunk)
                    h = _act(swiglu, m, g)
                    if h0_stats is not None:
                        self._gather(h0_stats, h if up is up0 and gate is gate0 else self._hidden(xc, up0, gate0), yc)
                    # A temporary not needed afterwards is squared in place (_sq_norm_): the same
                    # floats, one large allocation fewer.
                    err_sq += _sq_norm_(self._lin(h, down).sub_(yc))
                    del h
                    if last:
                        continue
                    z_old, s_old = self._get("z", chunk), (self._get("s", chunk) if swiglu else None)
                    p, q = p_step(_act(swiglu, z_old, s_old), yc, down, p_chol, self.products, p_inv)  # (2)
                    terms["y"] += beta * ratio ** 2 * sq_norm(q)
                    # (3) z with the current s, then s with the new z, (4) both relaxed, z_old +
                    # omega (z - z_old), and the objective's terms at them: one operation, which
                    # the CPU runs as one compiled pass over memory (sparsellm.reference)
                    if swiglu:
                        z, sc, sq_s, sq_z, sq_p = ops.swiglu_aux_update(p, m, g, z_old, s_old, alpha_z, alpha_s, gamma,
                                                                        omega, s.s_step_iterations)
                        terms["s"] += alpha_s * sq_s
                    else:
                        (z, sq_z, sq_p), sc = ops.relu_aux_update(p, m, z_old, alpha_z, gamma, omega), None
                    terms["z"] += alpha_z * sq_z
                    terms["p"] += gamma * sq_p
                    self.products.gram_add(xtz, xc, z if self.b1 is None else z - self.b1)
                    if swiglu:
                        self.products.gram_add(xts, xc, sc if self.bg is None else sc - self.bg)
                        self._put("s", chunk, sc)
                    self._gather((ptp, pty), p, yc)
                    self._put("z", chunk, z)
                    del m, g, z, sc, p, q, yc, z_old, s_old

            err_sq = float(err_sq)
            terms = {key: float(value) for key, value in terms.items()}
            if h0_stats is not None:
                start = best = self._start(up0, gate0, h0_stats, norms["y"], y_full)
                h0_stats = None
            error = math.sqrt(err_sq / y_full) if y_full > 0 else float("nan")
            entry = {"iteration": it, "ffn_rel_error": error}
            if not last:
                if not swiglu:
                    del terms["s"]
                entry["objective_terms"] = terms
                entry["objective"] = sum(terms.values())
            history.append(entry)
            log.info("sparsellm: iteration %d ffn rel error %.5g%s", it, error,
                     "" if last else " objective %.5g (%s)" % (entry["objective"], ", ".join(
                         f"{k} {v:.4g}" for k, v in terms.items())))
            weights = {"up": up, "gate": gate, "down": down}
            score = self._selection_error(weights, error)
            if score != error:
                entry["selection_error"] = score
            if score < best["score"]:
                best = {"error": error, "score": score, "iteration": it, "weights": weights}
            # Iteration 1's down is fitted on the dense hidden, a different start than candidate
            # 0's, so the stopping rule compares iterations with each other.
            if previous is not None and not score <= previous:
                stopped_early = not last
                break
            previous = score

        for name, weight in best["weights"].items():
            if weight is not None:
                set_weight(getattr(self.ffn, name), weight)
        penalties = {"alpha": alpha_z, "beta": beta, "gamma": gamma}
        if swiglu:
            penalties["alpha_s"] = alpha_s
        log.info("sparsellm: kept iteration %d (ffn rel error %.5g; start %.5g)", best["iteration"], best["error"],
                 start["error"])
        return {
            "start_ffn_rel_error": start["error"],
            "best_iteration": best["iteration"],
            "best_ffn_rel_error": best["error"],
            "start_selection_error": start["score"],
            "best_selection_error": best["score"],
            "stopped_early": stopped_early,
            "iterations": history,
            "penalties": penalties,
            "max_iterations": self.iterations,  # with relaxation: the defaults a None setting took
            "relaxation": self.relaxation,
            "product_precision": self.precision,
            "cpu_gemm": self.cpu_gemm,
            "aux_bytes": self.aux_bytes,
            "aux_device": str(self.store),
        }
