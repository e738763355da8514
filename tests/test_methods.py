"""hf_grass.methods: one registry of training methods, read by the CLI, the scripts and the
planner; the memory-efficient peers (8-bit AdamW, Muon, Adam-mini, Fira, BAdam) as baselines."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import load_script, tiny_llama

from hf_grass import cli, memory, methods
from hf_grass.methods import REGISTRY

finetune = load_script("finetune")
pretrain = load_script("pretrain")
SCRIPTS = {"finetune": finetune, "pretrain": pretrain}

# The LLaMA matrices inside the decoder layers, by name: what Muon must take, and nothing else.
HIDDEN_MATRIX = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
)


# ---- the registry and who reads it --------------------------------------------------------------


def test_every_method_resolves_back_from_its_optim_names():
    seen: dict[str, str] = {}
    for method in REGISTRY:
        for optim in method.optims:
            assert optim not in seen, f"{optim} selects {seen[optim]} and {method.name}"
            seen[optim] = method.name
            assert cli.method_name(optim) == method.name
            assert cli.method_name(optim.upper()) == method.name
            assert methods.for_optim(optim) is method
    assert cli.method_name("adamw_torch_fused", use_lora=True) == "lora"
    assert len(methods.names()) == len(set(methods.names())) == len(REGISTRY)


def _old_rule(optim: str) -> str:
    """How cli.method_name named optimizers before the registry: by prefix."""
    for family in ("galore", "apollo"):
        if optim.startswith(family):
            return family
    return "adamw" if optim.startswith("adamw_torch") else optim


def test_transformers_optims_keep_their_method_names_but_8bit_adamw_joins_the_registry():
    from transformers.training_args import OptimizerNames

    eight_bit = set(methods.get("adamw-8bit").optims)
    for optim in (o.value for o in OptimizerNames):
        expected = "adamw-8bit" if optim in eight_bit else _old_rule(optim)
        assert cli.method_name(optim) == expected, optim
    assert eight_bit <= {o.value for o in OptimizerNames}  # transformers' own names


def test_an_unknown_method_is_an_error_naming_the_known_ones():
    assert methods.find("sgd") is None
    with pytest.raises(ValueError, match="Unknown method 'sgd'.*grass.*muon"):
        methods.get("sgd")


def test_the_planner_models_the_registry_planned_methods():
    planned = tuple(m.name for m in REGISTRY if m.planned)
    assert memory.METHODS == methods.planner_methods() == planned
    assert memory.RANKED_METHODS == tuple(m.name for m in REGISTRY if m.planned and m.ranked)
    for name in planned:
        plan = memory.plan_memory("tiny", name, 8, "fp32", batch_size=1, seq_len=8)
        assert plan.inputs["method"] == name and plan.total_bytes > plan.parts["weights"]
    unplanned = next(m.name for m in REGISTRY if not m.planned)
    with pytest.raises(memory.UsageError, match=f"Unknown method {unplanned!r}"):
        memory.plan_memory("tiny", unplanned)


def test_memory_script_offers_the_planned_methods():
    script = load_script("memory")
    method = next(a for a in script.build_parser()._actions if a.dest == "method")
    assert method.help == f"one of {', '.join(methods.planner_methods())}"


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
@pytest.mark.parametrize("method", [m for m in REGISTRY if m.optims], ids=lambda m: m.name)
def test_scripts_take_learning_rate_and_arguments_from_the_registry(script, method):
    parsed = SCRIPTS[script].parse_args(["--optim", method.optims[0]])
    args = parsed[-1]
    stock = finetune.GrassTrainingArguments("out").learning_rate
    lr = method.learning_rate(script)
    assert args.learning_rate == (stock if lr is None else lr)
    extra = method.finetune_args if script == "finetune" else method.pretrain_args
    for key, value in extra.items():
        assert getattr(args, key) == value, key
    assert cli.method_name(args.optim) == method.name
    assert args.output_dir.endswith(f"-{method.name}")


def test_the_finetune_benchmark_selects_each_method_by_its_registry_flags():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_finetune.py"
    spec = importlib.util.spec_from_file_location("bench_finetune", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for method in REGISTRY:
        if method.finetune_lr is None:
            continue
        flags = bench.METHODS[method.name]
        model, _, args = finetune.parse_args(flags)
        assert cli.method_name(args.optim, model.use_lora) == method.name


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_an_unknown_optim_is_one_line_naming_the_methods(script, capsys):
    assert SCRIPTS[script].run(["--optim", "nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{script}.py: error: Unknown --optim 'nope'")
    for optim in methods.BUILT_HERE:
        assert optim in lines[0]


def test_lora_with_an_optimizer_built_here_is_refused_in_one_line(capsys):
    assert finetune.run(["--use_lora", "--optim", "muon"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("finetune.py: error: --use_lora with --optim muon") and "\n" not in err


def test_a_method_whose_package_is_missing_is_refused_with_the_install_command():
    import dataclasses

    missing = dataclasses.replace(methods.get("adam-mini"), module="no_such_module_here")
    with pytest.raises(methods.UsageError, match=r"--optim adam_mini needs the adam-mini package"):
        missing.require()


def test_bad_optim_args_are_refused():
    args = pretrain.parse_args(["--optim", "muon", "--optim_args", "rank=8"])[-1]
    with pytest.raises(ValueError, match="rank: muon takes momentum"):
        methods.get("muon").build_optimizer(tiny_llama(), args)
    assert methods.parse_optim_args("rank=8, alpha=0.25,proj_type=std,x=true") == {
        "rank": 8,
        "alpha": 0.25,
        "proj_type": "std",
        "x": True,
    }


# ---- Muon: the hidden matrices under Muon, the rest under AdamW ---------------------------------


def _muon_split(optimizer, model) -> tuple[set[str], set[str]]:
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    return in_muon, in_adamw


@pytest.mark.parametrize("script", ["finetune", "pretrain"])
def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(script):
    if script == "finetune":
        model = tiny_llama("classifier", num_labels=2, pad_token_id=0)
        args = finetune.parse_args(["--optim", "muon"])[-1]
        args.optim_target_modules = finetune.same_targets_as_grass(model, args)
        heads = {"score.weight"}
    else:
        model = tiny_llama()
        args = pretrain.parse_args(["--optim", "muon"])[-1]
        heads = {"lm_head.weight"}
    optimizer = methods.get("muon").build_optimizer(model, args)
    in_muon, in_adamw = _muon_split(optimizer, model)
    every = {n for n, _ in model.named_parameters()}
    hidden = {n for n in every if HIDDEN_MATRIX.fullmatch(n)}
    norms = {n for n in every if n.endswith("norm.weight")}
    assert len(hidden) == 2 * 7 and len(norms) == 2 * 2 + 1
    assert in_muon == hidden
    assert in_adamw == every - hidden
    assert {"model.embed_tokens.weight", *heads, *norms} <= in_adamw


def test_the_chain_saves_loads_and_schedules_as_one_optimizer(tmp_path):
    """A chain restored from its saved state steps exactly as the one it was saved from, and an
    LR scheduler on the chain sets its optimizers' rates."""
    args = pretrain.parse_args(["--optim", "muon", "--learning_rate", "1e-2"])[-1]
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))

    def steps(model, optimizer, n):
        for _ in range(n):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    model = tiny_llama(seed=3)
    optimizer = methods.get("muon").build_optimizer(model, args)
    steps(model, optimizer, 2)
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    assert optimizer.state and all(p in optimizer.state for p in model.parameters())

    copy = tiny_llama(seed=4)
    copy.load_state_dict(model.state_dict())
    restored = methods.get("muon").build_optimizer(copy, args)
    restored.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    scheduler = torch.optim.lr_scheduler.LambdaLR(restored, lambda step: 0.5)
    for child in restored.optimizers:
        assert all(g["lr"] == pytest.approx(5e-3) for g in child.param_groups)
    for g in optimizer.param_groups:
        g["lr"] *= 0.5
    steps(model, optimizer, 1)
    steps(copy, restored, 1)
    scheduler.step()
    for (name, p), q in zip(model.named_parameters(), copy.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)


# ---- each peer trains: 2 steps of the scripts on the tiny preset --------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text("The quick brown fox jumps over the lazy dog, and the dog sleeps. " * 300)
    return path


PEERS = {  # optim -> extra flags of the run
    "adamw_bnb_8bit": [],
    "muon": [],
    "adam_mini": [],
    "fira_adamw": ["--optim_args", "rank=8,alpha=0.25"],
    "badam": [],
}


def _pretrain_two_steps(optim, flags, corpus, out, monkeypatch) -> tuple[dict, dict, dict]:
    """The run's results, and its model's weights before and after training."""
    built = {}

    def build_model(*a, **k):
        model = original(*a, **k)
        built["model"] = model
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    original = pretrain.build_model
    monkeypatch.setattr(pretrain, "build_model", build_model)
    results = pretrain.main(
        ["--preset", "tiny", "--train_files", str(corpus), "--tokenizer_vocab_size", "300",
         "--seq_len", "32", "--optim", optim, "--max_steps", "2", "--warmup_steps", "0",
         "--per_device_train_batch_size", "4", "--max_eval_samples", "8", "--logging_steps", "1",
         "--save_strategy", "no", "--disable_tqdm", "true", "--output_dir", str(out), *flags]
    )  # fmt: skip
    final = {n: p.detach() for n, p in built["model"].named_parameters()}
    return results, built["initial"], final


@pytest.mark.parametrize("optim", list(PEERS))
def test_each_peer_trains_two_pretraining_steps(optim, cache, corpus, tmp_path, monkeypatch):
    method = methods.for_optim(optim)
    pytest.importorskip(method.module)
    try:
        results, initial, final = _pretrain_two_steps(
            optim, PEERS[optim], corpus, tmp_path / "out", monkeypatch
        )
    finally:
        if optim == "adamw_bnb_8bit":
            # transformers registers the embedding's 32-bit override in bitsandbytes' process-wide
            # manager, keyed by id(): a later model whose weight reuses that id would inherit it
            import bitsandbytes

            bitsandbytes.optim.GlobalOptimManager.get_instance().initialize()
    assert results["method"] == method.name
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert len(losses) == 2 and all(map(torch.isfinite, torch.tensor(losses)))
    changed = {n for n in final if not torch.equal(final[n], initial[n])}
    assert all(torch.isfinite(p).all() for p in final.values())
    report = results["resources"]
    if optim == "badam":
        # Block coordinate descent: exactly one block moved (the layers, the embedding, and the
        # head with the final norm are its blocks in pretraining), every other weight is as built.
        blocks = [{n for n in final if n.startswith(f"model.layers.{i}.")} for i in range(2)] + [
            {"model.embed_tokens.weight"},
            {"model.norm.weight", "lm_head.weight"},
        ]
        assert set().union(*blocks) == set(final)
        assert changed in blocks, changed
    else:
        assert changed == set(final)
    if optim == "fira_adamw":
        # Fira projects the attention and MLP matrices (its groups with a rank)
        hidden = sum(p.numel() for n, p in final.items() if HIDDEN_MATRIX.fullmatch(n))
        share = hidden / sum(p.numel() for p in final.values())
        assert report["projected_param_fraction"] == pytest.approx(share)
    if optim == "adamw_bnb_8bit":
        # 8-bit moments (the embedding's stay 32-bit, as transformers sets): under 60% of the
        # 8 bytes per element that float32 AdamW keeps
        adamw = 8 * sum(p.numel() for p in final.values())
        assert report["optimizer_state_bytes"] < 0.6 * adamw


def test_muon_finetunes_a_classifier_two_steps(tiny_model_dir, tmp_path, monkeypatch):
    """scripts/finetune.py builds Muon on Grass's targets; the new head trains under AdamW."""
    built = {}
    original = methods.Method.build_optimizer

    def build_optimizer(self, model, args):
        built["model"] = model
        built["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        built["optimizer"] = original(self, model, args)
        return built["optimizer"]

    monkeypatch.setattr(methods.Method, "build_optimizer", build_optimizer)
    out = tmp_path / "out"
    results = finetune.main(
        ["--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--optim", "muon",
         "--max_train_samples", "16", "--max_eval_samples", "8", "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--warmup_steps", "0", "--learning_rate", "1e-3",
         "--disable_tqdm", "true"]
    )  # fmt: skip
    assert results["method"] == "muon"
    model = built["model"]
    in_muon, _ = _muon_split(built["optimizer"], model)
    assert in_muon == {n for n, _ in model.named_parameters() if HIDDEN_MATRIX.fullmatch(n)}
    final = dict(model.named_parameters())
    changed = {n for n in final if not torch.equal(final[n], built["initial"][n])}
    assert changed == set(final) and "score.weight" in changed
