"""Grass on input embeddings and output heads (tied or not): float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from torch import nn

from hf_grass import GrassAdamW, GrassEmbedding, grass_param_groups, grassify, projection_of
from hf_grass.trainer import GrassTrainer, GrassTrainingArguments

V, D = 40, 6


class _Bag(nn.Module):
    """An embedding (with a padding row) feeding an untied head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids))).logsumexp(-1).mean()


def _ids(gen, n=3):
    # few distinct tokens, many repeats, and padding positions
    return [torch.randint(0, 12, (4, 9), generator=gen) for _ in range(n)]


def _selected(full: torch.Tensor, side: str, rows: torch.Tensor, rho: torch.Tensor):
    """``rho[:, None] * G[rows]`` (rows side) or ``rho[:, None] * G.t()[rows]`` (cols side) by
    plain indexing of a dense gradient: the reference the compressed gradient must equal."""
    oriented = full if side == "rows" else full.t()
    return rho[:, None] * oriented[rows]


@pytest.mark.parametrize("selection", ["top_r", "multinomial"])
def test_compressed_embedding_gradient_equals_rows_of_the_full_gradient(selection):
    torch.manual_seed(0)
    model = _Bag().double()
    reference = copy.deepcopy(model)
    groups = grassify(model, rank=15, target_modules=["head"], embeddings=True,
                      update_proj_gap=2, selection=selection)  # fmt: skip
    opt = GrassAdamW(groups, lr=1e-2)
    assert type(model.embed) is GrassEmbedding
    gen = torch.Generator().manual_seed(1)
    for step, ids in enumerate(_ids(gen, 4)):
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        reference(ids).backward()
        model(ids).backward()
        projection = projection_of(model.embed.weight)
        if step % 2:  # between selections the backward compresses with the current rows
            assert model.embed.weight.grad is None
        # a (40 x 6) table selects vocabulary rows
        assert projection.side == "rows" and projection.rows.shape == (15,)
        full = reference.embed.weight.grad
        expected = _selected(full, "rows", projection.rows, projection.rho)
        torch.testing.assert_close(projection.grad, expected, rtol=0, atol=1e-12)
        assert not expected[projection.rows == 0].any()  # the padding row gets nothing
        opt.step()
        opt.zero_grad()


def _tied_lm(seed=0):
    return tiny_llama(seed=seed, vocab_size=48, tie_word_embeddings=True).double()


def test_tied_embedding_and_head_share_one_compressed_gradient():
    torch.manual_seed(0)
    model = _tied_lm()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    opt = GrassAdamW(
        grassify(model, rank=16, embeddings=True, lm_head=True, update_proj_gap=3), lr=1e-2
    )
    reference = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 48, (2, 10), generator=gen) for _ in range(3)]
    for step, ids in enumerate(batches):
        reference.load_state_dict(model.state_dict())
        reference.zero_grad()
        reference(input_ids=ids, labels=ids).loss.backward()
        model(input_ids=ids, labels=ids).loss.backward()
        weight = model.model.embed_tokens.weight
        projection = projection_of(weight)
        if step:  # both uses added to one compressed gradient, with the rows chosen at step 0
            # the (48 x 64) table is wider than tall: Grass selects its 64 hidden columns
            assert projection.side == "cols" and projection.rows.shape == (16,)
            full = reference.model.embed_tokens.weight.grad
            expected = _selected(full, "cols", projection.rows, projection.rho)
            torch.testing.assert_close(projection.grad, expected, rtol=0, atol=1e-12)
        opt.step()
        opt.zero_grad()
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_full_rank_embedding_and_head_equal_adamw():
    """Every projected weight at full rank (vocab = hidden = 64): exactly AdamW, tied weight too."""
    model = tiny_llama(seed=0, vocab_size=64, tie_word_embeddings=True).double()
    reference = copy.deepcopy(model)
    groups = grassify(model, rank=64, target_modules=["q_proj"], embeddings=True, lm_head=True, weight_decay=0.1,
                      update_proj_gap=2, proj_side="rows")  # fmt: skip
    opt = GrassAdamW(groups, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        ids = torch.randint(0, 64, (2, 10), generator=gen)
        for m, o in ((model, opt), (reference, ref_opt)):
            m(input_ids=ids, labels=ids).loss.backward()
            o.step()
            o.zero_grad()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-10, msg=name)


def test_save_pretrained_keeps_the_tie(tmp_path):
    model = _tied_lm().float()
    grassify(model, rank=8, embeddings=True, lm_head=True)
    model.save_pretrained(tmp_path)
    from transformers import LlamaForCausalLM

    loaded, info = LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert type(loaded.model.embed_tokens) is nn.Embedding


def test_bad_embedding_flags_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"shared with .*--grass_embeddings with --grass_lm_head"):
        grassify(_tied_lm(), rank=8, embeddings=True)
    with pytest.raises(ValueError, match=r"rank 64 is larger .*size 48"):
        GrassAdamW(grass_param_groups(_tied_lm(), rank=64, embeddings=True, lm_head=True,
                                      target_modules=["q_proj"], proj_side="rows"))  # fmt: skip
    classifier = tiny_llama("classifier", num_labels=2, pad_token_id=0)
    args = GrassTrainingArguments(str(tmp_path), optim="grass", grass_rank=8, grass_lm_head=True,
                                  use_cpu=True, report_to="none")  # fmt: skip
    with pytest.raises(ValueError, match=r"--grass_lm_head.*no nn.Linear output head"):
        GrassTrainer(model=classifier, args=args)
