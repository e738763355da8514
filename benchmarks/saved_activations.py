#!/usr/bin/env python
"""What a training step keeps for the backward, by method: the live tensors at the end of the forward.

    OMP_NUM_THREADS=1 python benchmarks/saved_activations.py [--batch 16 --seq 64]

SmolLM2-135M-Instruct as the default finetune builds it (sequence classification, float32,
batch 16 x 64 tokens), one forward per method. A ``TorchDispatchMode`` notes the storage of
every tensor the forward creates, by weak reference; at the end of the forward the storages still
alive, parameters excepted, are what the step keeps for its backward (plus the loss), wherever
they are held: autograd's saved tensors and the inputs a checkpointed region keeps for its
recompute alike. Methods:

- ``lora``: peft LoRA r=8 on q_proj, v_proj (``configs/lora.yaml``);
- ``grass-kept``: Grass r=64 with the embedding projected, on a selection step with nothing
  recomputed: whole inputs of every linear layer and the norms' normalized tensors, which is
  what every Grass step kept before ``X[:, cols]`` and the recomputation;
- ``grass``: the same on an ordinary step, as GrassTrainer runs it: cols-side layers keep
  ``X[:, cols]``, norms recomputed (``--grass_recompute_norms``);
- ``grass-selection``: a selection step as GrassTrainer runs it, layers recomputed
  (``--grass_recompute_selection``).

Writes ``benchmarks/results/saved_activations.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch
from _common import RESULTS, env_info
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

MIB = 2**20
METHODS = ("lora", "grass-kept", "grass", "grass-selection")


class LiveStorages(TorchDispatchMode):
    """Notes the storage of every tensor an op returns; :meth:`live_bytes` sums those alive."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.nbytes():
                    self.storages[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
        return out

    def live_bytes(self, exclude: set[int]) -> int:
        return sum(
            nbytes
            for ptr, (ref, nbytes) in self.storages.items()
            if ptr not in exclude and not ref.expired()
        )


def build(method: str):
    """The model (and Grass's optimizer) as scripts/finetune.py sets them up for ``method``."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from hf_grass import GrassAdamW, grassify
    from hf_grass.models import default_model_path
    from hf_grass.recompute import recompute_norms

    logging.set_verbosity_error()
    model = AutoModelForSequenceClassification.from_pretrained(
        default_model_path(), num_labels=2, dtype=torch.float32, pad_token_id=0
    )
    model.train()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="SEQ_CLS",
            r=8,
            lora_alpha=16,
            lora_dropout=0.05,
            target_modules=["q_proj", "v_proj"],
        )
        return get_peft_model(model, config), None
    opt = GrassAdamW(grassify(model, rank=64, embeddings=True), lr=1e-5)
    if method in ("grass", "grass-selection"):
        recompute_norms(model)
    return model, opt


def step_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(0, 49152, (batch, seq), generator=g),
        labels=torch.randint(0, 2, (batch,), generator=g),
    )


def kept_bytes(method: str, batch: int, seq: int) -> int:
    """Bytes alive at the end of one forward of ``method``, parameters excepted."""
    from hf_grass.recompute import layers_recomputed

    model, opt = build(method)
    if method == "grass":  # measure an ordinary step: the selection step first
        model(**step_inputs(batch, seq, 0)).loss.backward()  # the selection step
        opt.step()
        opt.zero_grad()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    recomputed = layers_recomputed(model) if method == "grass-selection" else None
    with recomputed or contextlib.nullcontext():
        tracker = LiveStorages()
        with tracker:
            loss = model(**step_inputs(batch, seq, 1)).loss
        kept = tracker.live_bytes(params)
        loss.backward()
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", default=str(RESULTS / "saved_activations.json"))
    args = parser.parse_args()
    results = {}
    for method in args.methods:
        results[method] = kept_bytes(method, args.batch, args.seq)
        print(f"{method:16s} {results[method] / MIB:8.1f} MiB kept for the backward", flush=True)
    payload = dict(
        batch=args.batch,
        seq=args.seq,
        kept_mib={m: round(b / MIB, 1) for m, b in results.items()},
        env=env_info(),
    )
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
