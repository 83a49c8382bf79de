"""Benchmark of the ranking losses (SPEC §7, §8): cross_modal_triplet_loss,
batch_hard_triplet_loss and discriminative_embedding_loss.

    python -m bench.bench_losses                          # CUDA sweep, bf16
    python -m bench.bench_losses --dtype float32 --ops cross_modal_triplet_loss
    python -m bench.bench_losses --device cpu             # smoke run: tiny shapes, interpreter

Sweep: B ∈ {256, 512, 1024, 2048, 4096, 8192} × D ∈ {256, 512, 2048}; labels are balanced
batches of 8 samples per class (B/8 classes, shuffled), as the CCS sampler makes them.
Providers: ``eager`` (the reference), ``compile`` (torch.compile of the reference),
``triton`` (the fused kernels), ``pml`` (pytorch-metric-learning's TripletMarginLoss with a
BatchHardMiner on squared L2 of normalised embeddings; batch_hard_triplet_loss only, when
importable). Modes: ``fwd`` (loss only, no_grad) and ``full`` (loss + gradients of every
embedding input). The fused ops compute the gradient inside the forward when an input needs
it, so ``bwd`` alone is not a meaningful split and is not measured.

Useful FLOPs (multiply-add = 2): triplets 2·B²·D per distance matrix (cross-modal: one matrix
serves both directions); center loss 2·C²·D for the class-mean distances plus O(B·D).
``peak_mem_bytes`` is the peak allocation during one call beyond what was live before it.
Rows are appended to bench/results/losses-<gpu-slug>.json.
"""
import torch

from bench import common

OPS = ("cross_modal_triplet_loss", "batch_hard_triplet_loss", "discriminative_embedding_loss")
PROVIDERS = ("eager", "compile", "triton", "pml")
MODES = ("fwd", "full")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
PER_CLASS = 8


def useful_flops(op, B, D):
    if op == "discriminative_embedding_loss":
        classes = max(B // PER_CLASS, 1)
        return 2 * classes * classes * D + 8 * B * D
    return 2 * B * B * D


def _pml_batch_hard():
    try:
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.losses import TripletMarginLoss
        from pytorch_metric_learning.miners import BatchHardMiner
        from pytorch_metric_learning.reducers import MeanReducer
    except ImportError:
        return None
    distance = LpDistance(normalize_embeddings=True, power=2)
    loss_fn = TripletMarginLoss(margin=0.3, distance=distance, reducer=MeanReducer())
    miner = BatchHardMiner(distance=distance)
    return lambda z, y: loss_fn(z, y, miner(z, y))


def make_op(op, provider):
    """``fn(*embeddings, labels) -> loss`` for this op and provider, or None if it does not apply."""
    import importlib

    module = importlib.import_module("ccs_fast.kernels." + ("center" if op.startswith("discriminative") else "triplet"))
    ref = getattr(module, op + "_ref")
    if provider == "eager":
        return ref
    if provider == "compile":
        return torch.compile(ref)
    if provider == "triton":
        fused = getattr(module, op)
        return lambda *args: fused(*args, impl="triton")
    if provider == "pml":
        return _pml_batch_hard() if op == "batch_hard_triplet_loss" else None
    raise ValueError(provider)


def make_case(op, provider, mode, B, D, dtype, device):
    """A zero-argument callable running one ``mode`` step, or None if the provider lacks the op."""
    fn = make_op(op, provider)
    if fn is None:
        return None
    g = torch.Generator(device="cpu").manual_seed(0)
    n_inputs = 2 if op == "cross_modal_triplet_loss" else 1
    inputs = [torch.randn(B, D, generator=g).to(device, dtype).requires_grad_(mode == "full") for _ in range(n_inputs)]
    labels = (torch.arange(B) // PER_CLASS)[torch.randperm(B, generator=g)].to(device)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs, labels)
        return run
    grad_out = torch.tensor(1.3, device=device)

    def run():
        return torch.autograd.grad(fn(*inputs, labels), inputs, grad_out)
    return run


def case(op, provider, mode, B, D, dtype_name, device):
    """One row: ``op`` × ``provider`` × ``mode`` at (B, D); no row where the provider lacks the op."""
    params = dict(op=op, provider=provider, mode=mode, dtype=dtype_name, B=B, D=D)
    return common.Case(params, lambda: make_case(op, provider, mode, B, D, DTYPES[dtype_name], device),
                       flops=useful_flops(op, B, D))


def parse_args(argv=None):
    p = common.kernel_parser(__doc__, DTYPES, "bfloat16", MODES, rep=3,
                             providers_help="comma list (default: all on cuda, eager,triton,pml on cpu)")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--B", default=None, help="comma list of batch sizes")
    p.add_argument("--D", default=None, help="comma list of embedding sizes")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sweep = common.kernel_sweep(args, "bench_losses", ("eager", "triton", "pml"), PROVIDERS)
    device, cpu = sweep.device, sweep.cpu
    Bs = common.int_list(args.B, [24] if cpu else [256, 512, 1024, 2048, 4096, 8192])
    Ds = common.int_list(args.D, [16] if cpu else [256, 512, 2048])
    cases = [case(op, provider, mode, B, D, dtype_name, device)
             for op in args.ops.split(",") for dtype_name in sweep.dtypes for B in Bs for D in Ds
             for mode in sweep.modes for provider in sweep.providers]
    return common.run_sweep("losses", cases, device, args.out, rep=args.rep, warmup=1,
                            columns=["op", "provider", "mode", "dtype", "B", "D", "ms_p50", "ms_p20", "ms_p80",
                                     "tflops", "peak_mem_bytes"])


if __name__ == "__main__":
    main()
