"""Optimizer-state bytes: GrassAdamW vs torch.optim.AdamW vs GaLore (galore-torch), same rank.

GaLore's LLaMA configs (60M ... 7B) at GaLore's ranks. Grass and GaLore project the same weights
(every attention and MLP linear layer); embeddings, norms and lm_head get plain AdamW in all three.
fp32 parameters and states.

Three ways to get the numbers, which must agree:

1. ``analytic``: from the shapes (see ``_common.analytic_state_bytes``).
2. ``measured`` on models built on the ``meta`` device (no memory): AdamW and GaLore run a real
   ``step()`` on the meta model (GaLore's SVD has a meta kernel, so its projector is created with
   the right shape). GrassAdamW's selection reads the row norms on the CPU, which a meta tensor
   cannot give, so it runs a real step on one CPU tensor per distinct shape and the bytes are
   multiplied by the number of weights of that shape.
3. ``real``: the whole 60M model on the CPU, real gradients from a forward/backward, one real step
   of each optimizer; every tensor in ``optimizer.state`` counted (GaLore's projection matrix too).

Run: ``.venv/bin/python benchmarks/bench_optimizer_state.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
from collections import Counter

import _common as C
import torch

C.add_repo_to_path()
from hf_grass import GrassAdamW, grass_param_groups, methods  # noqa: E402

# The registry's methods whose state this benchmark builds and counts (a renamed one fails here).
METHODS = tuple(methods.get(name).name for name in ("adamw", "galore", "grass"))


def shapes_of(model):
    projected, other = C.split_params(model)
    return [tuple(p.shape) for p in projected], [p.numel() for p in other], projected, other


def analytic(model, rank: int) -> dict:
    pshapes, onumels, _, _ = shapes_of(model)
    return {m: C.analytic_state_bytes(m, pshapes, onumels, rank) for m in METHODS}


# ------------------------------------------------------------------------------------ real 60M
def measure_real(name: str, rank: int, batch: int = 2, seq: int = 128) -> dict:
    """Real gradients and one real step of each optimizer on a CPU model."""
    model = C.build_llama(name)
    projected, other = C.split_params(model)
    ids = {id(p) for p in projected}
    tokens = torch.randint(
        0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    model(input_ids=tokens, labels=tokens).loss.backward()

    out = {}
    for method in METHODS:
        if method == "adamw":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        elif method == "grass":
            opt = GrassAdamW(grass_param_groups(model, rank=rank), lr=1e-3)
        else:
            if C.import_galore() is None:
                out[method] = None
                continue
            opt = C.new_galore(C.galore_groups(projected, other, rank))
        opt.step()
        out[method] = C.state_bytes(opt, ids)
        del opt
        gc.collect()
    expected = analytic(model, rank)
    del model
    gc.collect()
    return {"measured": out, "analytic": expected}


# ----------------------------------------------------------------------------------- meta models
def grass_probe_bytes(shape: tuple[int, ...], rank: int | None) -> int:
    """GrassAdamW's state bytes for one CPU parameter of ``shape`` after a real step."""
    p = torch.nn.Parameter(torch.zeros(shape))
    p.grad = torch.randn(shape) if rank else torch.zeros(shape)
    group = {"params": [p], "rank": rank} if rank else {"params": [p]}
    opt = GrassAdamW([group], lr=1e-3)
    opt.step()
    n = C.state_bytes(opt, {id(p)})["total"]
    del opt, p
    gc.collect()
    return n


def measure_meta(name: str, rank: int) -> dict:
    model = C.build_llama(name, device="meta")
    pshapes, onumels, projected, other = shapes_of(model)
    ids = {id(p) for p in projected}
    n_params = sum(p.numel() for p in projected) + sum(onumels)
    for p in model.parameters():
        p.grad = torch.empty_like(p)

    measured = {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    measured["adamw"] = C.state_bytes(opt, ids)
    del opt
    if C.import_galore() is not None:
        opt = C.new_galore(C.galore_groups(projected, other, rank))
        opt.step()
        measured["galore"] = C.state_bytes(opt, ids)
        del opt
    else:
        measured["galore"] = None

    proj = sum(c * grass_probe_bytes(s, rank) for s, c in Counter(pshapes).items())
    dense = sum(c * grass_probe_bytes(tuple(p.shape), None) for p, c in _count_other_shapes(other))
    measured["grass"] = {"total": proj + dense, "projected": proj, "by_key": None}

    return {
        "params": n_params,
        "projected_params": sum(p.numel() for p in projected),
        "n_projected_matrices": len(projected),
        "measured": measured,
        "analytic": analytic(model, rank),
    }


def _count_other_shapes(other):
    counts = Counter(tuple(p.shape) for p in other)
    firsts = {}
    for p in other:
        firsts.setdefault(tuple(p.shape), p)
    return [(firsts[s], c) for s, c in counts.items()]


# -------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--models",
        default="60m,130m,350m,1b,7b",
        help="comma-separated names from _common.LLAMA_CONFIGS",
    )
    ap.add_argument("--real", default="60m", help="model to run for real on the CPU ('' to skip)")
    ap.add_argument(
        "--out", default=None, help="output folder (default $OUT or benchmarks/results)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)

    results = {"env": C.env_info(), "bytes_per_element": 4, "models": {}, "real": {}}
    names = [n for n in args.models.split(",") if n]
    for name in names:
        rank = C.GALORE_RANKS[name]
        r = measure_meta(name, rank)
        r["rank"] = rank
        results["models"][name] = r
        print(f"measured {name} (r={rank}) on meta", flush=True)

    if args.real:
        rank = C.GALORE_RANKS[args.real]
        r = measure_real(args.real, rank)
        r["rank"] = rank
        results["real"][args.real] = r
        print(f"measured {args.real} (r={rank}) for real on the CPU", flush=True)

    # ------------------------------------------------------------------------------------ tables
    def agree(entry, method, key):
        m = entry["measured"][method]
        return m is not None and m[key] == entry["analytic"][method][key]

    for key, title in (
        ("total", "total (all parameters)"),
        ("projected", "projected matrices only"),
    ):
        rows = []
        for name, e in results["models"].items():
            a = e["analytic"]
            mm = {k: (v[key] if v else None) for k, v in e["measured"].items()}
            ok = all(agree(e, m, key) for m in METHODS if e["measured"][m] is not None)
            gal = mm["galore"]
            rows.append(
                [
                    name,
                    e["rank"],
                    C.mb(mm["adamw"]),
                    C.mb(gal) if gal else "n/a",
                    C.mb(mm["grass"]),
                    f"{gal / mm['adamw']:.3f}" if gal else "n/a",
                    f"{mm['grass'] / mm['adamw']:.3f}",
                    f"{mm['grass'] / gal:.3f}" if gal else "n/a",
                    "yes" if ok else f"NO (analytic {C.mb(a['grass'][key])})",
                ]
            )
        print(f"\nOptimizer state, {title}, MB (1e6 bytes), fp32; measured (meta/probe steps)")
        print(
            C.fmt_table(
                [
                    "model",
                    "r",
                    "AdamW",
                    "GaLore",
                    "Grass",
                    "GaLore/AdamW",
                    "Grass/AdamW",
                    "Grass/GaLore",
                    "= analytic",
                ],
                rows,
            )
        )

    for name, e in results["real"].items():
        rows = []
        for method in METHODS:
            m = e["measured"][method]
            a = e["analytic"][method]
            if m is None:
                rows.append([method, "n/a", C.mb(a["total"]), "", "n/a", C.mb(a["projected"]), ""])
                continue
            rows.append(
                [
                    method,
                    f"{m['total']:,}",
                    f"{a['total']:,}",
                    f"{m['total'] - a['total']:+,}",
                    f"{m['projected']:,}",
                    f"{a['projected']:,}",
                    f"{m['projected'] - a['projected']:+,}",
                ]
            )
        print(
            f"\nValidation: {name} (r={e['rank']}) on the CPU, real gradients, one real step; bytes"
        )
        print(
            C.fmt_table(
                [
                    "method",
                    "real total",
                    "analytic total",
                    "diff",
                    "real projected",
                    "analytic projected",
                    "diff",
                ],
                rows,
            )
        )
        g = e["measured"]["grass"]
        if g:
            print(
                f"Grass state by key ({name}): "
                + ", ".join(f"{k} {C.mb(v)} MB" for k, v in g["by_key"].items())
            )

    path = C.write_json("optimizer_state.json", results, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
