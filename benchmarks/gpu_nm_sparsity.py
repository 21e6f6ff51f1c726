"""Does 2:4 sparsity from ``prune.nm`` make matrix products faster? On a GPU with sparse
tensor cores (Ampere and later), yes; on this project's CPU runtimes, no.

For each linear-layer shape, the weight is pruned with modelpress' N:M mask (the same
function ``prune.nm`` uses), checked for the 2:4 pattern, converted with
``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt / CUTLASS kernels) and timed
against the dense fp16 product of the same masked weight, with CUDA events, median of
many runs after warm-up. The sparse result is checked against the dense one.

    python benchmarks/gpu_nm_sparsity.py          # needs a CUDA GPU with sparse tensor cores
"""
from __future__ import annotations

import statistics
import sys

import torch

from modelpress.pruning.nm import nm_mask, verify_nm

# (name, tokens, in_features, out_features): MiniLM and BERT-base FFNs at batch 32 x 128 tokens,
# and a 7B-class MLP projection.
SHAPES = [
    ("MiniLM FFN up   (384->1536)", 4096, 384, 1536),
    ("MiniLM FFN down (1536->384)", 4096, 1536, 384),
    ("BERT-base FFN up (768->3072)", 4096, 768, 3072),
    ("7B MLP up (4096->11008)", 4096, 4096, 11008),
    ("7B MLP up, 16k tokens", 16384, 4096, 11008),
]


def cuda_time_ms(fn, repeats: int = 100, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    from torch.sparse import SparseSemiStructuredTensor

    print("| layer | tokens | backend | dense fp16 ms | 2:4 sparse ms | speed-up | rel. error | pattern ok |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    torch.manual_seed(0)
    for name, tokens, fin, fout in SHAPES:
        w = torch.randn(fout, fin, device=dev, dtype=torch.float16)
        w = w * nm_mask(w, 2, 4).to(w.dtype)
        ok = verify_nm(w, 2, 4)
        # feature-major activations (in, tokens): the sparse operand is then the left one, the
        # layout the sparse tensor cores take without transposes
        xt = torch.randn(fin, tokens, device=dev, dtype=torch.float16)
        dense = w @ xt
        t_dense = cuda_time_ms(lambda: w @ xt)
        for backend in ("cutlass", "cusparselt"):
            SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
            try:
                w_sparse = to_sparse_semi_structured(w)
                sparse = w_sparse @ xt
            except Exception as exc:  # noqa: BLE001 - a backend may be missing from this build
                print(f"| {name} | {tokens} | {backend} | {t_dense:.4f} | n/a | - | - | {ok} ({type(exc).__name__}) |")
                continue
            err = ((sparse.float() - dense.float()).norm() / dense.float().norm()).item()
            t_sparse = cuda_time_ms(lambda: w_sparse @ xt)
            print(f"| {name} | {tokens} | {backend} | {t_dense:.4f} | {t_sparse:.4f} | {t_dense / t_sparse:.2f}x "
                  f"| {err:.1e} | {ok} |")
        # cuSPARSELt called directly with the algorithm chosen once by its own search, so no
        # per-call planning is timed
        try:
            packed = torch._cslt_compress(w)
            alg = torch._cslt_sparse_mm_search(packed, xt)
            sparse = torch._cslt_sparse_mm(packed, xt, alg_id=alg)
            err = ((sparse.float() - dense.float()).norm() / dense.float().norm()).item()
            t_sparse = cuda_time_ms(lambda: torch._cslt_sparse_mm(packed, xt, alg_id=alg))
            print(f"| {name} | {tokens} | cusparselt, searched alg {alg} | {t_dense:.4f} | {t_sparse:.4f} "
                  f"| {t_dense / t_sparse:.2f}x | {err:.1e} | {ok} |")
        except Exception as exc:  # noqa: BLE001
            print(f"| {name} | {tokens} | cusparselt direct | {t_dense:.4f} | n/a | - | - | "
                  f"{type(exc).__name__}: {exc} |")


if __name__ == "__main__":
    main()
