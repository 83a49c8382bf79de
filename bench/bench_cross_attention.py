"""Benchmark of cross_stream_attention (SPEC §7, §8).

    python -m bench.bench_cross_attention                       # CUDA sweep, bf16 and fp32
    python -m bench.bench_cross_attention --device cpu          # smoke run: tiny shapes, interpreter

Providers: ``eager`` (the reference, fp32 math), ``compile`` (torch.compile of the reference),
``triton`` (the fused kernels), ``sdpa`` (two ``scaled_dot_product_attention`` calls, one per
direction: y_f = sdpa(q, k, v_o), y_o = sdpa(k, q, v_f), same scale). Modes: ``fwd``, ``bwd``
(backward only, graph kept from one forward), ``full`` (forward + backward).

FLOP count (useful work, the same for every provider; multiply-add = 2 FLOPs):
    fwd  = 2·B·N_f·N_o·(d + 2e)      S once, P_row·v_o and P_colᵀ·v_f
    bwd  = 2·B·N_f·N_o·(2d + 4e)     dP_row, dP_col, dq, dk, dv_o, dv_f
    full = 2·B·N_f·N_o·(3d + 6e)
``tflops`` divides the useful count by the median time. The Triton kernels execute more
(``cross_attention.executed_flops``): forward 2·B·N_f·N_o·(2d·⌈e/512⌉ + 2e) (S once per
direction, and once more per extra 512-wide value slice), backward 2·B·N_f·N_o·(4d + 6e) (S,
dP_row and dP_col rebuilt by the row and the column pass); ``executed_flops`` records that
count for the triton rows.
``pct_peak`` compares ``tflops`` with a dense torch.matmul of the row's dtype measured on the
same device at start-up (``peak_tflops``). ``peak_mem_bytes`` is the peak allocation during one
call beyond what was live before it (inputs, and in ``bwd`` mode the saved graph, excluded).
"""
import torch

from bench import common

OP = "cross_stream_attention"
PROVIDERS = ("eager", "compile", "triton", "sdpa")
MODES = ("fwd", "bwd", "full")
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def make_op(provider, scale):
    from ccs_fast.kernels.cross_attention import cross_stream_attention, cross_stream_attention_ref

    if provider == "eager":
        return lambda q, k, v_f, v_o: cross_stream_attention_ref(q, k, v_f, v_o, scale)
    if provider == "compile":
        compiled = torch.compile(cross_stream_attention_ref)
        return lambda q, k, v_f, v_o: compiled(q, k, v_f, v_o, scale)
    if provider == "triton":
        return lambda q, k, v_f, v_o: cross_stream_attention(q, k, v_f, v_o, scale, impl="triton")
    if provider == "sdpa":
        sdpa = torch.nn.functional.scaled_dot_product_attention
        return lambda q, k, v_f, v_o: (sdpa(q, k, v_o, scale=scale), sdpa(k, q, v_f, scale=scale))
    raise ValueError(provider)


def make_case(provider, mode, B, N_f, N_o, d, e, dtype, device):
    """A zero-argument callable running one ``mode`` step of ``provider``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = ((B, N_f, d), (B, N_o, d), (B, N_f, e), (B, N_o, e))
    inputs = [torch.randn(s, generator=g).to(device, dtype).requires_grad_(mode != "fwd") for s in shapes]
    op = make_op(provider, d ** -0.5)
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return op(*inputs)
        return run
    grads = [torch.randn(B, n, e, generator=g).to(device, dtype) for n in (N_f, N_o)]
    if mode == "full":
        def run():
            outs = op(*inputs)
            return torch.autograd.grad(outs, inputs, grads)
        return run
    outs = op(*inputs)

    def run():
        return torch.autograd.grad(outs, inputs, grads, retain_graph=True)
    return run


def case(provider, mode, B, n, f, dtype_name, device):
    """One row: ``provider`` × ``mode`` at N_f = N_o = n, d = e = f. TFLOP/s count the useful
    work; triton rows also record what the kernels execute (by the GPU tiling)."""
    from ccs_fast.kernels import cross_attention as xa

    params = dict(op=OP, provider=provider, mode=mode, dtype=dtype_name, B=B, N_f=n, N_o=n, d=f, e=f)
    useful = xa.useful_flops(mode, B, n, n, f, f)
    executed = xa.executed_flops(mode, B, n, n, f, f) if provider == "triton" else useful
    return common.Case(params, lambda: make_case(provider, mode, B, n, n, f, f, DTYPES[dtype_name], device),
                       flops=useful, extra=dict(executed_flops=executed))


def parse_args(argv=None):
    p = common.kernel_parser(__doc__, DTYPES, "all", MODES, rep=5,
                             providers_help="comma list (default: all four on cuda, eager,triton on cpu)")
    p.add_argument("--B", type=int, default=None)
    p.add_argument("--N", default=None, help="comma list of N (= N_f = N_o)")
    p.add_argument("--features", default=None, help="comma list of d (= e)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sweep = common.kernel_sweep(args, "bench_cross_attention", ("eager", "triton"), PROVIDERS)
    device, cpu = sweep.device, sweep.cpu
    B = args.B or (2 if cpu else 32)
    Ns = common.int_list(args.N, [20] if cpu else [147, 588, 1225, 2352])
    feats = common.int_list(args.features, [16] if cpu else [256, 512, 1024])
    peak = {} if cpu else {t: common.matmul_peak_tflops(device, DTYPES[t]) for t in sweep.dtypes}
    cases = [case(provider, mode, B, n, f, dtype_name, device) for dtype_name in sweep.dtypes for n in Ns
             for f in feats for mode in sweep.modes for provider in sweep.providers]
    return common.run_sweep("cross_attention", cases, device, args.out, rep=args.rep, peak_tflops=peak,
                            columns=["provider", "mode", "dtype", "B", "N_f", "d", "ms_p50", "ms_p20", "ms_p80",
                                     "tflops", "pct_peak", "peak_mem_bytes"])


if __name__ == "__main__":
    main()
