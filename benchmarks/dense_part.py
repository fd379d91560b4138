"""The ranking model's dense part on the GPU: the fused kernels (``runtime.kernels.dense``) against the
same computation in torch (``RankingModel.dense`` after concatenating V1's output, the runtime's
path before the kernels), side by side in one run, each replayed from a CUDA graph as the runtime
replays it (ten calls per graph, time per call), with TF32 products in both.

    PYTHONPATH=. python benchmarks/dense_part.py [--cands 256,1024,4096] [--sweep]

Default ModelConfig (input row of 1,184 columns, 2 cross layers, MLP 256-128, 3 heads); one request
row per 256 candidates. Each result is first checked against a float64 evaluation of the model.
``--sweep`` also times ``_linear_kernel`` alone at the model's four product shapes (256 candidates;
the long ones also at 1,024 and 4,096) over tile sizes, pipeline depths and with Hopper's wgmma
allowed, against cuBLAS (``F.linear``, TF32).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]  # this folder's runtime.py
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.append(_HERE)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from kernels import bench_graph, kernel_times  # noqa: E402  (benchmarks/kernels.py)

from runtime.kernels import dense as dk  # noqa: E402
from runtime.kernels import mma_sync_only, tf32_matmuls  # noqa: E402
from transact.config import ModelConfig  # noqa: E402
from transact.model import RankingModel  # noqa: E402


def inputs(cfg: ModelConfig, n: int, g: torch.Generator) -> tuple[tuple, list[torch.Tensor]]:
    rows = max(1, n // 256)
    dev = "cuda"
    user_dense = torch.randn(rows, cfg.user_dense_dim, generator=g).to(dev)
    item_dense = torch.randn(n, cfg.item_dense_dim, generator=g).to(dev)
    context = torch.stack([torch.randint(0, cfg.num_surfaces, (rows,), generator=g),
                           torch.randint(0, 24, (rows,), generator=g)]).to(dev)  # fmt: skip
    req = (torch.arange(n) * rows // n).to(torch.int32).to(dev)
    cand = (torch.randint(-127, 128, (n, 32), generator=g).float() * cfg.quant_scale / 127).to(dev)
    t1 = cfg.transact
    pool = torch.randn(n, t1.d_model, generator=g).to(dev)
    hidden = torch.randn(n, t1.seq_len, t1.d_model, generator=g).half().to(dev)
    v2 = torch.randn(n, cfg.transact_v2.out_dim, generator=g).to(dev)
    parts = [pool, hidden[:, : t1.latest_n_emb].reshape(n, -1), v2]
    return (user_dense, item_dense, context[0], context[1], req, cand), parts


# (BM, BN, BK, stages, wgmma allowed); wgmma needs 64-row tiles with 4 warps
SWEEP = [(32, 32, 64, 3, False), (32, 64, 32, 3, False), (16, 32, 64, 3, False), (16, 16, 64, 3, False),
         (64, 64, 64, 3, False), (64, 64, 32, 3, True), (64, 32, 64, 3, True), (64, 16, 128, 3, True),
         (64, 64, 64, 3, True), (128, 64, 32, 3, True), (128, 128, 32, 3, True)]  # fmt: skip
REPEAT = 10  # calls per graph: a graph of one call took ~0.015 ms for any small product (the replay itself)
PRODUCTS = [(256, 1184, 1184, "cross layer"), (256, 256, 1184, "MLP 1"), (256, 128, 256, "MLP 2"),
            (256, 3, 128, "heads"), (1024, 1184, 1184, "cross layer"), (4096, 1184, 1184, "cross layer"),
            (4096, 256, 1184, "MLP 1")]  # fmt: skip


def sweep() -> None:
    """``_linear_kernel`` (no epilogue) per configuration against cuBLAS, each checked against float64."""
    g = torch.Generator().manual_seed(1)
    print("\n| product (M x N x K) | cuBLAS TF32 ms | best kernel ms (BM/BN/BK/stages/wgmma) | all, ms |")
    print("|---|---:|---:|---|")
    for m, n, k, label in PRODUCTS:
        x = torch.randn(m, k, generator=g).cuda()
        w = (torch.randn(n, k, generator=g) / k**0.5).cuda()
        b = torch.randn(n, generator=g).cuda()
        out = torch.empty(m, n, device="cuda")
        want = x.double() @ w.double().T + b.double()

        def cublas(x=x, w=w, b=b):
            with tf32_matmuls(True):
                return F.linear(x, w, b)

        base = bench_graph([cublas] * REPEAT, replays=50)
        res = []
        for bm, bn, bk, st, wg in SWEEP:
            if bn > max(16, triton.next_power_of_2(n)) or bk > max(16, triton.next_power_of_2(k)):
                continue

            def launch(x=x, w=w, b=b, out=out, m=m, n=n, k=k, bm=bm, bn=bn, bk=bk, st=st, wg=wg):
                with contextlib.nullcontext() if wg else mma_sync_only():
                    dk._linear_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
                        x, w, b, x, out, m, n, k, EPI=0, BM=bm, BN=bn, BK=bk, PREC="tf32", num_warps=4,
                        num_stages=st,
                    )  # fmt: skip

            out.fill_(float("nan"))
            try:
                launch()
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a configuration the compiler rejects is reported, not fatal
                res.append((float("inf"), f"{bm}/{bn}/{bk}/{st}/{int(wg)} failed ({type(e).__name__})"))
                continue
            err = ((out.double() - want).norm() / want.norm()).item()
            if not err < 5e-3:
                res.append((float("inf"), f"{bm}/{bn}/{bk}/{st}/{int(wg)} wrong ({err:.1e})"))
                continue
            res.append((bench_graph([launch] * REPEAT, replays=50), f"{bm}/{bn}/{bk}/{st}/{int(wg)}"))
        best = min(res)
        cells = ", ".join(f"{name} {t:.4f}" for t, name in res)
        print(f"| {label} ({m} x {n} x {k}) | {base:.4f} | {best[0]:.4f} ({best[1]}) | {cells} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cands", default="256,1024,4096")
    ap.add_argument("--sweep", action="store_true", help="also time the product kernel's configurations")
    args = ap.parse_args()
    cfg = ModelConfig()
    torch.manual_seed(0)
    model = RankingModel(cfg).cuda().eval()
    ref_model = RankingModel(cfg).double().cuda().eval()
    ref_model.load_state_dict(model.state_dict())
    w = dk.pack_dense(model)
    g = torch.Generator().manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}\n")
    print("| candidates | torch: ms (launches) | dense_forward: ms (launches) | speed-up "
          "| max abs err torch / fused vs fp64 |")
    print("|---:|---:|---:|---:|---:|")
    for n in (int(c) for c in args.cands.split(",")):
        (ud, idn, sur, hr, req, cand), parts = inputs(cfg, n, g)

        def torch_path(ud=ud, idn=idn, sur=sur, hr=hr, req=req, cand=cand, parts=parts):
            with tf32_matmuls(True):
                v1 = torch.cat([parts[0], parts[1].float()], dim=1)
                return model.dense(ud, idn, sur, hr, req.long(), cand, v1, parts[2])

        def fused(ud=ud, idn=idn, sur=sur, hr=hr, req=req, cand=cand, parts=parts):
            return dk.dense_forward(w, ud, idn, sur, hr, req, cand, parts)

        with torch.no_grad():
            v1 = torch.cat([parts[0], parts[1].float()], dim=1).double()
            want = ref_model.dense(ud.double(), idn.double(), sur, hr, req.long(), cand.double(), v1,
                                   parts[2].double())  # fmt: skip
            errs = [(f().double() - want).abs().max().item() for f in (torch_path, fused)]
            times = [bench_graph([f] * REPEAT, replays=50) for f in (torch_path, fused)]
            launches = [sum(r[2] for r in kernel_times(f, calls=5)) for f in (torch_path, fused)]
        print(f"| {n} | {times[0]:.4f} ({launches[0]}) | {times[1]:.4f} ({launches[1]}) | "
              f"{times[0] / times[1]:.2f}x | {errs[0]:.1e} / {errs[1]:.1e} |", flush=True)  # fmt: skip
    if args.sweep:
        sweep()


if __name__ == "__main__":
    main()
