"""Section 1's state table and section 3's backward FLOPs, redone with embeddings and heads projected.

    .venv/bin/python benchmarks/bench_embedding_tables.py        # seconds; no timing involved

For GaLore's LLaMA configs (vocab 32000, untied) at GaLore's ranks, fp32:

- optimizer-state bytes of AdamW, GaLore, Grass on the attention/MLP matrices ("all-linear") and
  Grass also on the input embedding and the output head (``embeddings=True, lm_head=True``), from
  :func:`hf_grass.memory.plan_memory` (whose state and gradient bytes equal a real step's to the
  byte, ``tests/test_memory.py``);
- weight-gradient FLOPs of the backward per token, matmuls only. A linear W (m x n) costs ``2 m n``
  for its input gradient and ``2 m n`` for its weight gradient; Grass's compressed weight gradient
  costs ``2 r min(m, n)`` (r of the larger dimension). The output head (V x d) is a linear like
  the others; the input embedding's gradient is an index-add (no matmul), so projecting it saves
  memory, not FLOPs.

``--check`` measures the backward FLOPs of a small model with ``FlopCounterMode`` (dense, Grass,
Grass + head) and compares them with the formula. Writes ``results/embedding_tables.json``.
"""

from __future__ import annotations

import argparse

from _common import GALORE_RANKS, add_repo_to_path, env_info, write_json

add_repo_to_path()

import torch  # noqa: E402

from hf_grass.memory import architecture, plan_memory, resolve_config  # noqa: E402

MODELS = ("60m", "130m", "350m", "1b", "7b")
METHODS = {
    "AdamW": dict(method="adamw"),
    "GaLore": dict(method="galore"),
    "Grass": dict(method="grass"),
    "Grass + emb + head": dict(method="grass", embeddings=True, lm_head=True),
}


def state_mb(model: str, rank: int, **kw) -> float:
    parts = plan_memory(model, rank=rank, dtype="fp32", **kw).parts
    return (parts["optimizer_state"] + parts["indices"]) / 1e6


def backward_flops_per_token(model: str, rank: int, grass: bool, head: bool) -> dict[str, float]:
    """Matmul FLOPs of the backward per token: input gradients + weight gradients."""
    arch = architecture(resolve_config(model), embeddings=False, lm_head=head)
    d_input = d_weight = 0.0
    for p in arch.params:
        if not p.linear:
            continue
        m, n = p.shape
        d_input += 2 * m * n
        projected = grass and p.projected
        d_weight += 2 * rank * min(m, n) if projected else 2 * m * n
    return {"input": d_input, "weight": d_weight, "total": d_input + d_weight}


def tables() -> dict:
    rows = []
    for model in MODELS:
        r = GALORE_RANKS[model]
        state = {name: state_mb(model, r, **kw) for name, kw in METHODS.items()}
        dense = backward_flops_per_token(model, r, grass=False, head=False)
        grass = backward_flops_per_token(model, r, grass=True, head=False)
        head = backward_flops_per_token(model, r, grass=True, head=True)
        rows.append(
            {"model": model, "rank": r, "state_mb": state, "bwd_flops_per_token": {
                "dense": dense, "grass": grass, "grass_head": head}}
        )  # fmt: skip
    return {"rows": rows}


def print_tables(result: dict) -> None:
    names = list(METHODS)
    print("Optimizer state (MB, fp32):\n")
    print("| model | r | " + " | ".join(names) + " | emb+head / Grass | emb+head / AdamW |")
    print("|---|---|" + "---|" * (len(names) + 2))
    for row in result["rows"]:
        s = row["state_mb"]
        cells = " | ".join(f"{s[n]:,.1f}" for n in names)
        ratio = s["Grass + emb + head"]
        print(
            f"| {row['model']} | {row['rank']} | {cells} | {ratio / s['Grass']:.3f} "
            f"| {ratio / s['AdamW']:.3f} |"
        )
    print("\nBackward matmul FLOPs per token (M), weight gradients and total:\n")
    print(
        "| model | r | dense W-grad | Grass W-grad | + head W-grad | dense total | Grass total | + head total | + head / dense |"
    )  # noqa: E501
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        f = row["bwd_flops_per_token"]
        print(
            f"| {row['model']} | {row['rank']} | {f['dense']['weight'] / 1e6:,.1f} "
            f"| {f['grass']['weight'] / 1e6:,.1f} | {f['grass_head']['weight'] / 1e6:,.1f} "
            f"| {f['dense']['total'] / 1e6:,.1f} | {f['grass']['total'] / 1e6:,.1f} "
            f"| {f['grass_head']['total'] / 1e6:,.1f} "
            f"| {f['grass_head']['total'] / f['dense']['total']:.3f} |"
        )


def check(rank: int = 16, batch: int = 2, seq: int = 32) -> list[dict]:
    """FlopCounterMode's backward FLOPs of "tiny" (dense / Grass / Grass + head) vs the formula."""
    from torch.utils.flop_counter import FlopCounterMode

    from hf_grass import GrassAdamW, grassify
    from hf_grass.models import build_llama

    out = []
    for label, grass, head in (
        ("dense", False, False),
        ("grass", True, False),
        ("grass_head", True, True),
    ):  # noqa: E501
        torch.manual_seed(0)
        model = build_llama("tiny", attn_implementation="eager")
        ids = torch.randint(0, model.config.vocab_size, (batch, seq))
        if grass:
            # One step first: step 0 forms full gradients to select the rows.
            opt = GrassAdamW(grassify(model, rank=rank, lm_head=head), lr=1e-3)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        measured = counter.get_total_flops()
        # Attention's score/value matmuls (backward: 2 x 2 x 2 s² d per layer and sequence) are
        # not linear layers; add them to the formula.
        c = model.config
        attention = c.num_hidden_layers * batch * 8 * seq * seq * c.hidden_size
        formula = backward_flops_per_token("tiny", rank, grass, head)["total"] * batch * seq
        out.append({"run": label, "measured": measured, "formula": formula + attention})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare the FLOP formula on 'tiny'")
    args = ap.parse_args()
    result = tables()
    print_tables(result)
    if args.check:
        result["check"] = check()
        print("\nFlopCounterMode vs formula (tiny, backward FLOPs):")
        for c in result["check"]:
            print(f"  {c['run']:<10} measured {c['measured']:,}  formula {c['formula']:,.0f}")
    result["command"] = ".venv/bin/python benchmarks/bench_embedding_tables.py" + (
        " --check" if args.check else ""
    )
    result["env"] = env_info()
    write_json("embedding_tables.json", result)


if __name__ == "__main__":
    main()
