"""params.yaml and every profile parse into the frozen dataclasses; bad keys are named."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from tasks.params import load_params, parse_params
from ulmfit.errors import InputError
from ulmfit.model import ClassifierConfig

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
# The classifier recipe of the paper (the default profile trains one rate on every layer).
ULMFIT_RECIPE = {"gradual_unfreezing": True, "schedule": {"discriminative": True}}


def _default() -> dict:
    return yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())


def test_params_yaml_is_the_default_profile():
    assert (ROOT / "params.yaml").read_text() == (ROOT / "profiles" / "default.yaml").read_text()


def sizes(model) -> dict:
    """A model config's fields but its dropouts."""
    return {k: v for k, v in dataclasses.asdict(model).items() if not k.endswith("dropout")}


def test_a_backward_control_needs_the_datasets_backward_lm():
    """A control that starts from the dataset's fine-tuned backward LM is refused, before any
    work, where the dataset trains forward only; one that fine-tunes its own LM (from a
    pretraining snapshot) or needs none (scratch) is not."""
    data = _default()
    data["datasets"]["bbc_news"]["directions"] = ["fwd"]
    data["controls"] = {"c": {"dataset": "bbc_news", "direction": "bwd"}}
    with pytest.raises(ValueError) as refused:
        parse_params(data)
    assert str(refused.value).count("\n") == 0, "one line"
    assert "controls.c.direction: got bwd, and datasets.bbc_news.directions leaves bwd out" in (
        str(refused.value)
    )
    assert "remove datasets.bbc_news.directions" in str(refused.value)
    data["controls"]["c"]["encoder"] = "scratch"
    assert parse_params(data).control("c").direction == "bwd"
    data["controls"]["c"] = {"dataset": "bbc_news", "direction": "bwd", "pretrain_step": 10}
    data["pretrain"]["train"]["snapshot_steps"] = [10]
    assert parse_params(data).control("c").pretrain_step == 10
    del data["controls"]["c"]["pretrain_step"]
    data["controls"]["c"]["encoder"] = "finetuned"
    for both in ([], ["fwd", "bwd"]):  # an empty list is the default: both directions
        data["datasets"]["bbc_news"]["directions"] = both
        assert parse_params(data).control("c").direction == "bwd"
    del data["datasets"]["bbc_news"]["directions"]
    assert parse_params(data).control("c").direction == "bwd"


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_parses(path):
    params = load_params(path, root=ROOT)  # the profiles' paths start at the project root
    assert params.datasets, "a profile needs at least one dataset"
    for name, dataset in params.datasets.items():
        assert dataset.source.name  # the corpus kind: defaults to the entry's name
        # Backbone and sizes of the classifier's encoder always come from the pretrained LM.
        encoder = dataset.classifier.model.encoder
        assert sizes(encoder) == sizes(params.pretrain.model), name
    assert params.pretrain.model.vocab_size == params.tokenizer.vocab_size
    # Frozen all the way down: a stage cannot change its own parameters.
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.pretrain.train.lr = 1.0  # type: ignore[misc]


def test_required_profiles_exist():
    assert {"default", "paper", "paper-slice", "benchmark"} <= {p.stem for p in PROFILES}


def test_the_bench_recipe_controls_parse_in_the_benchmark_profile(benchmark_with):
    """bench/imdb_recipes.yaml is pasted into a benchmark workspace's controls: each entry must
    parse there and train the recipe its description names."""
    params, _ = benchmark_with("imdb_recipes.yaml")
    grid = params.control("imdb-ulmfit-5000-grid").classifier
    assert [p.lr for p in grid.grid()] == [0.01, 0.001] and grid.train.gradual_unfreezing
    recipe = params.control("imdb-ulmfit-5000-scratch_recipe")
    assert recipe.encoder == "finetuned" and recipe.classifier.grid() == [(0.001, 0.1, False)]
    assert not recipe.classifier.train.gradual_unfreezing
    assert not recipe.classifier.train.schedule.discriminative


def test_the_pool_embeddings_controls_parse_in_the_benchmark_profile(benchmark_with):
    """bench/imdb_pool_embeddings.yaml: each control is the profile's control of the same name
    without "-pool" (or imdb_recipes.yaml's), with the word vectors pooled too."""
    params, pasted = benchmark_with("imdb_recipes.yaml", "imdb_pool_embeddings.yaml")
    for name in pasted["imdb_pool_embeddings.yaml"]:
        control, plain = params.control(name), params.control(name.removesuffix("-pool"))
        config = control.classifier.build(vocab_size=99, num_classes=2, dropout_multiplier=0.5)
        assert config.pool_embeddings and config.pooled_size == 5 * config.encoder.embed_size
        unpooled = dataclasses.replace(control.classifier.model, pool_embeddings=False)
        assert dataclasses.replace(control.classifier, model=unpooled) == plain.classifier
        assert (control.labels, control.encoder) == (plain.labels, plain.encoder)


def _differs_by_the_seed_alone(control, plain, seed: int) -> None:
    assert control.classifier.train.seed == seed != plain.classifier.train.seed
    train = dataclasses.replace(control.classifier.train, seed=plain.classifier.train.seed)
    assert dataclasses.replace(control.classifier, train=train) == plain.classifier
    assert (control.labels, control.encoder) == (plain.labels, plain.encoder)


def test_the_seed_controls_differ_from_their_control_by_the_seed_alone(benchmark_with):
    """bench/imdb_seeds.yaml: the profile's imdb-ulmfit-1000 with another classifier seed."""
    params, pasted = benchmark_with("imdb_seeds.yaml")
    for name in pasted["imdb_seeds.yaml"]:
        seed = int(name.rsplit("seed", 1)[1])
        _differs_by_the_seed_alone(params.control(name), params.control("imdb-ulmfit-1000"), seed)


def test_the_lm_and_the_random_encoder_controls_train_one_classifier_section(benchmark_with):
    """bench/imdb_lm_vs_random.yaml: the fine-tuned LM and the random encoder get the same
    classifier (one rate 0.001 on every layer, x0.5, no one-rate copy), each seed-1 control
    differs from its pair by the seed alone, the LM's other rates by the rate alone, and the
    profile's own IMDb classifiers are the ones trained at one rate 0.01."""
    params, _ = benchmark_with("imdb_lm_vs_random.yaml")
    lm, scratch = (params.control(f"imdb-{arm}-1000-one_rate") for arm in ("ulmfit", "scratch"))
    assert (lm.encoder, scratch.encoder) == ("finetuned", "scratch")
    assert lm.classifier == scratch.classifier and lm.labels == scratch.labels == 1000
    assert lm.classifier.grid() == [(0.001, 0.5, False)]
    assert not lm.classifier.train.gradual_unfreezing
    assert not lm.classifier.train.schedule.discriminative
    for plain in (lm, scratch):
        _differs_by_the_seed_alone(params.control(f"{plain.name}-seed1"), plain, 1)
    for lr in (0.003, 0.01, 0.03):  # the LM's rate grid, one control per rate
        control = params.control(f"{lm.name}-lr{str(lr)[2:]}")  # lr003, lr01, lr03
        assert control.classifier == dataclasses.replace(lm.classifier, lrs=(lr,))
        assert (control.labels, control.encoder) == (lm.labels, lm.encoder)
    rate = params.control(f"{lm.name}-lr01")
    _differs_by_the_seed_alone(params.control(f"{rate.name}-seed1"), rate, 1)
    for step in (375, 750):  # the budget curve's snapshots at that rate
        snapshot = params.control(f"{rate.name}-pretrain-{step}")
        assert snapshot.pretrain_step == step and rate.pretrain_step is None
        assert (snapshot.classifier, snapshot.labels) == (rate.classifier, rate.labels)
    # The profile's ULMFiT classifiers on IMDb are the one-rate controls its comment cites: the
    # controls at 100 and 1,000 labels, the pipeline's own classifier at 5,000.
    for labels, profile in (
        (100, params.control("imdb-ulmfit-100").classifier),
        (1000, params.control("imdb-ulmfit-1000").classifier),
        (5000, params.dataset("imdb").classifier),
    ):
        control = params.control(f"imdb-ulmfit-{labels}-one_rate-lr01")
        assert control.encoder == "finetuned"
        assert control.classifier.grid() == profile.grid() == [(0.01, 0.5, False)]
        assert (control.classifier.train, control.classifier.model) == (
            profile.train,
            profile.model,
        )


def test_each_regulariser_control_changes_one_thing_against_the_one_rate_control(benchmark_with):
    """bench/imdb_regularisers.yaml: each control is imdb-ulmfit-1000-one_rate-lr01 (the
    profile's IMDb classifier at 1,000 labels) with one change: the dropout multiplier, the
    batch size, the decay toward the starting weights, or the word vectors pooled (and that
    once more under classifier seed 1)."""
    params, pasted = benchmark_with("imdb_lm_vs_random.yaml", "imdb_regularisers.yaml")
    plain = params.control("imdb-ulmfit-1000-one_rate-lr01").classifier
    train, replace = plain.train, dataclasses.replace
    expected = {
        "dropout1": replace(plain, dropout_multipliers=(1.0,)),
        "bs16": replace(plain, train=replace(train, batch_size=16)),
        "pool": replace(plain, model=replace(plain.model, pool_embeddings=True)),
    }
    for decay in (1, 10):
        optim = replace(train.optim, weight_decay=float(decay), decay_toward="start")
        expected[f"l2sp{decay}"] = replace(plain, train=replace(train, optim=optim))
    assert sorted(pasted["imdb_regularisers.yaml"]) == sorted(
        f"imdb-ulmfit-1000-one_rate-lr01-{change}" for change in [*expected, "pool-seed1"]
    )
    for change, classifier in expected.items():
        control = params.control(f"imdb-ulmfit-1000-one_rate-lr01-{change}")
        assert control.classifier == classifier, change
        assert (control.labels, control.encoder, control.dataset) == (1000, "finetuned", "imdb")
    pool = params.control("imdb-ulmfit-1000-one_rate-lr01-pool")
    _differs_by_the_seed_alone(params.control(f"{pool.name}-seed1"), pool, 1)


def test_the_lamb_controls_are_the_one_rate_controls_with_lamb(benchmark_with):
    """bench/imdb_lamb.yaml: the fine-tuned LM's one-rate control and the random encoder's,
    with LAMB instead of Adam at the rate each name gives."""
    params, pasted = benchmark_with("imdb_lm_vs_random.yaml", "imdb_lamb.yaml")
    for name in pasted["imdb_lamb.yaml"]:
        control = params.control(name)
        arm, lr = name.split("-")[1], float("0." + name.rsplit("-lr", 1)[1])
        plain = params.control(
            "imdb-ulmfit-1000-one_rate-lr01" if arm == "ulmfit" else "imdb-scratch-1000-one_rate"
        )
        optim = dataclasses.replace(plain.classifier.train.optim, name="lamb")
        train = dataclasses.replace(plain.classifier.train, optim=optim)
        lamb = dataclasses.replace(plain.classifier, lrs=(lr,), train=train)
        assert control.classifier == lamb, name
        assert (control.labels, control.encoder) == (plain.labels, plain.encoder)


def test_the_backward_controls_are_the_one_rate_controls_reading_backward(benchmark_with):
    """bench/imdb_bidirectional.yaml: each control is the profile's one-rate IMDb classifier at
    its labels, reading backward; its header asks for both directions, and without them the
    controls are refused."""
    files = ("imdb_lm_vs_random.yaml", "imdb_bidirectional.yaml")
    params, pasted = benchmark_with(*files, both_directions=("imdb",))
    assert sorted(pasted["imdb_bidirectional.yaml"]) == [
        f"imdb-ulmfit-{n}-one_rate-lr01-bwd" for n in (100, 1000, 5000)
    ]
    for name in pasted["imdb_bidirectional.yaml"]:
        control, forward = params.control(name), params.control(name.removesuffix("-bwd"))
        assert control.direction == "bwd" and forward.direction == "fwd"
        assert dataclasses.replace(control, name=forward.name, direction="fwd", description="") == (
            dataclasses.replace(forward, description="")
        )
    with pytest.raises(ValueError, match="datasets.imdb.directions leaves bwd out"):
        benchmark_with(*files)


def test_the_benchmark_profile_holds_the_bars_and_the_budget_curve_alone(benchmark_with):
    """Issue 9's budget is the whole benchmark profile in 120 minutes: each of its controls is
    one that bench/bars.py reads for a bar, or a point of the pretraining-budget curve (a
    pretraining snapshot, at each snapshot step, on TREC-6 and IMDb at 1,000 labels). A control
    added beyond those goes in a bench/*.yaml file, outside the budget."""
    import sys

    sys.path.insert(0, str(ROOT / "bench"))
    from bars import BARS

    params, _ = benchmark_with()
    read_by_bars = {name for bar in BARS for name in bar.ulmfit}
    budget = {name for name, c in params.controls.items() if c.pretrain_step is not None}
    assert set(params.controls) - budget <= read_by_bars
    snapshots = params.pretrain.train.snapshot_steps
    assert {
        (params.control(n).dataset, params.control(n).labels, params.control(n).pretrain_step)
        for n in budget
    } == {
        (d, labels, step) for d, labels in (("trec6", None), ("imdb", 1000)) for step in snapshots
    }


def test_the_paper_ablations_and_figure3_points_parse_beside_the_profile(benchmark_with):
    """bench/paper_figure3_ablations.yaml holds what the profile left out for its time budget:
    the paper's six TREC-6 ablations (section 5: no pretraining, no LM fine-tuning, from
    scratch, and each of the three recipe tricks removed) and Figure 3's from-scratch points at
    100 and 1,000 IMDb labels, which search the dropout too. Pasted into the profile, they
    parse, and none of them is the profile's own."""
    profile, _ = benchmark_with()
    params, pasted = benchmark_with("paper_figure3_ablations.yaml")
    moved = {name: params.control(name) for name in pasted["paper_figure3_ablations.yaml"]}
    assert not set(moved) & set(profile.controls)
    ablations = {n: c for n, c in moved.items() if c.dataset == "trec6"}
    assert sorted(c.encoder for c in ablations.values()) == sorted(
        ["lm_from_scratch", "pretrained", "scratch", "finetuned", "finetuned", "finetuned"]
    )
    ulmfit = params.dataset("trec6").classifier
    assert ulmfit.train.gradual_unfreezing and ulmfit.train.schedule.discriminative
    assert ulmfit.train.schedule.stlr
    removed = set()
    for control in ablations.values():
        if control.encoder != "finetuned":
            continue
        train, schedule = control.classifier.train, control.classifier.train.schedule
        assert control.classifier.one_rate_lrs == ()  # no one-rate copy: it has none of the tricks
        off = {
            trick
            for trick, on in (
                ("gradual_unfreezing", train.gradual_unfreezing),
                ("discriminative", schedule.discriminative),
                ("stlr", schedule.stlr),
            )
            if not on
        }
        assert len(off) == 1, off  # one trick removed per ablation
        removed |= off
    assert removed == {"gradual_unfreezing", "discriminative", "stlr"}
    figure3 = {c.labels: c for c in moved.values() if c.dataset == "imdb"}
    assert sorted(figure3) == [100, 1000]
    for control in figure3.values():
        assert control.encoder == "scratch"
        assert control.classifier.dropout_multipliers == (0.5, 0.1)


def test_the_trec6_rate_controls_are_the_profiles_one_rate_search_at_003(benchmark_with):
    """bench/trec6_one_rate_lr03.yaml: the profile's TREC-6 classifier trained at one rate 0.03
    on every layer (beyond its one-rate grid, 0.003 and 0.01), one control per direction and
    classifier seed."""
    params, pasted = benchmark_with("trec6_one_rate_lr03.yaml")
    profile = params.dataset("trec6").classifier
    assert profile.one_rate_lrs == (0.003, 0.01)
    for name in pasted["trec6_one_rate_lr03.yaml"]:
        control = params.control(name)
        direction, seed = name.split("-")[-2], int(name.rsplit("seed", 1)[1])
        assert (control.dataset, control.direction, control.labels) == ("trec6", direction, None)
        assert control.classifier.grid() == [(0.03, 0.5, False)]
        one_rate = dataclasses.replace(
            profile.train,
            seed=seed,
            gradual_unfreezing=False,
            schedule=dataclasses.replace(profile.train.schedule, discriminative=False),
        )
        assert control.classifier == dataclasses.replace(
            profile, lrs=(0.03,), one_rate_lrs=(), train=one_rate
        ), name


def test_the_demo_recipe_controls_parse_in_the_default_profile():
    """bench/demo_recipes.yaml is pasted into a demo workspace's controls: ULMFiT's recipe at
    the demo's former rate, and one rate on every layer at the rates its section names."""
    data = _default()
    data["controls"] = yaml.safe_load((ROOT / "bench" / "demo_recipes.yaml").read_text())
    params = parse_params(data)
    ulmfit = params.control("bbc-ulmfit_recipe").classifier
    assert ulmfit.grid() == [(0.03, 0.5, False)] and ulmfit.train.gradual_unfreezing
    assert ulmfit.train.schedule.discriminative
    searched = {
        (point.lr, point.dropout_multiplier)
        for name in ("bbc-one_rate", "bbc-one_rate-hi", "bbc-one_rate-dropout")
        for point in params.control(name).classifier.grid()
        if not params.control(name).classifier.train.gradual_unfreezing
    }
    assert searched == {
        (0.001, 0.5),
        (0.003, 0.5),
        (0.01, 0.5),
        (0.03, 0.5),
        (0.01, 0.1),
        (0.01, 0.25),
    }


@pytest.mark.parametrize(
    ("section", "where"),
    [
        (("tokenizer",), "tokenizer"),
        (("pretrain", "train"), "pretrain.train"),
        (("pretrain", "model"), "pretrain.model"),
        (("finetune",), "finetune"),
        (("finetune", "train"), "finetune.train"),
        (("classifier", "model"), "classifier.model"),
        (("classifier", "train"), "classifier.train"),
        (("datasets", "bbc_news", "source"), "datasets.bbc_news.source"),
        (("evaluate",), "evaluate"),
        (("mlflow",), "mlflow"),
    ],
)
def test_unknown_key_is_rejected_with_its_section(section, where):
    data = _default()
    node = data
    for key in section:
        node = node.setdefault(key, {})
    node["learning_rat"] = 1
    with pytest.raises(ValueError) as info:
        parse_params(data)
    message = str(info.value)
    assert "learning_rat" in message and where in message


def test_unknown_section_is_rejected():
    data = _default()
    data["pretrian"] = {}
    with pytest.raises(ValueError, match="pretrian"):
        parse_params(data)


def test_per_dataset_overrides_merge_into_the_shared_sections():
    data = _default()
    data["datasets"]["other"] = {
        "source": {"name": "bbc_news"},
        "finetune": {"train": {"epochs": 3}},
        "classifier": {"train": {"lr": 0.02}, "model": {"encoder": {"input_dropout": 0.1}}},
    }
    params = parse_params(data)
    other, base = params.dataset("other"), params.dataset("bbc_news")
    assert other.finetune.train.epochs == 3
    assert other.finetune.train.lr == base.finetune.train.lr  # untouched keys kept
    assert other.classifier.train.lr == 0.02
    assert other.classifier.model.encoder.input_dropout == 0.1
    assert (
        other.classifier.model.encoder.hidden_dropout
        == base.classifier.model.encoder.hidden_dropout
    )
    assert base.finetune.train.epochs == params.finetune.train.epochs


def test_encoder_sizes_cannot_be_overridden_by_the_classifier():
    data = _default()
    data["classifier"]["model"]["encoder"]["hidden_size"] = 10
    with pytest.raises(ValueError, match="hidden_size"):
        parse_params(data)


def test_vocab_size_is_set_once():
    data = _default()
    data["pretrain"]["model"]["vocab_size"] = 10
    with pytest.raises(ValueError, match="tokenizer.vocab_size"):
        parse_params(data)


def test_load_params_reports_bad_yaml_as_input_error(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("pretrain: [unclosed\n")
    with pytest.raises(InputError) as info:
        load_params(bad)
    assert str(bad) in str(info.value) and "Fix:" in str(info.value)
    with pytest.raises(InputError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_unknown_key_in_a_file_names_file_and_section(tmp_path):
    data = copy.deepcopy(_default())
    data["finetune"]["train"]["epohcs"] = 2
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as info:
        load_params(path)
    assert "epohcs" in str(info.value) and "finetune.train" in str(info.value)


def test_controls_merge_the_dataset_sections_and_their_own_overrides():
    data = _default()
    data["classifier"]["train"].update(ULMFIT_RECIPE)
    data["datasets"]["bbc_news"]["classifier"] = {"train": {"epochs": 9}, "lrs": [0.01, 0.02]}
    data["controls"] = {
        "bbc-scratch": {"dataset": "bbc_news", "encoder": "scratch", "labels": 50},
        "bbc-no_stlr": {
            "dataset": "bbc_news",
            "classifier": {"train": {"schedule": {"stlr": False}}},
        },
    }
    params = parse_params(data)
    scratch, no_stlr = params.control("bbc-scratch"), params.control("bbc-no_stlr")
    assert (scratch.encoder, scratch.labels, scratch.direction) == ("scratch", 50, "fwd")
    # The dataset's overrides reach its controls: the same tuning as its ULMFiT classifier.
    assert scratch.classifier.train.epochs == no_stlr.classifier.train.epochs == 9
    assert [p.lr for p in no_stlr.classifier.grid()] == [0.01, 0.02]
    # From scratch, each rate divided by 10 is searched too (one rate on a random stack).
    assert [p.lr for p in scratch.classifier.grid()] == [0.01, 0.02, 0.001, 0.002]
    assert scratch.classifier.train.schedule.stlr and not no_stlr.classifier.train.schedule.stlr
    # A random encoder trains every layer at one LR from the start; the others keep ULMFiT's.
    assert not scratch.classifier.train.gradual_unfreezing
    assert not scratch.classifier.train.schedule.discriminative
    assert (
        no_stlr.classifier.train.gradual_unfreezing
        and no_stlr.classifier.train.schedule.discriminative
    )
    assert params.label_subsets("bbc_news") == [(50, 42)]
    assert parse_params(_default()).controls == {}
    # ...unless the control asks for them explicitly.
    data["controls"]["bbc-scratch"]["classifier"] = {"train": {"gradual_unfreezing": True}}
    assert parse_params(data).control("bbc-scratch").classifier.train.gradual_unfreezing
    data["controls"]["bbc-scratch"]["classifier"] = {"lrs": [0.003]}
    assert parse_params(data).control("bbc-scratch").classifier.grid() == [(0.003, 0.5, False)]


@pytest.mark.parametrize(
    ("dataset_classifier", "grid"),
    [
        ({}, [0.01, 0.001]),  # no grid: train.lr (the default profile's 0.01) and a tenth
        ({"lrs": [], "train": {"lr": 0.02}}, [0.02, 0.002]),
        ({"lrs": [0.01, 0.001]}, [0.01, 0.001, 0.0001]),  # no repeats
    ],
)
def test_a_scratch_control_also_searches_a_tenth_of_each_rate(dataset_classifier, grid):
    data = _default()
    data["datasets"]["bbc_news"]["classifier"] = dataset_classifier
    data["controls"] = {"s": {"dataset": "bbc_news", "encoder": "scratch"}}
    assert [p.lr for p in parse_params(data).control("s").classifier.grid()] == grid


def test_one_rate_lrs_add_the_one_rate_recipe_to_the_search():
    data = _default()
    data["classifier"]["train"].update(ULMFIT_RECIPE)
    data["classifier"].update(lrs=[0.01, 0.03], dropout_multipliers=[0.5, 0.1])
    data["classifier"]["one_rate_lrs"] = [0.003]
    data["controls"] = {
        "u": {"dataset": "bbc_news", "labels": 20},
        "s": {"dataset": "bbc_news", "encoder": "scratch"},
    }
    params = parse_params(data)
    classifier = params.dataset("bbc_news").classifier
    assert classifier.grid() == [
        (0.01, 0.5, False),
        (0.01, 0.1, False),
        (0.03, 0.5, False),
        (0.03, 0.1, False),
        (0.003, 0.5, True),
        (0.003, 0.1, True),
    ]
    ulmfit = classifier.train_for(classifier.grid()[0], backward=True)
    assert (ulmfit.lr, ulmfit.backward, ulmfit.gradual_unfreezing) == (0.01, True, True)
    assert ulmfit.schedule.discriminative and ulmfit.schedule.stlr
    one_rate = classifier.train_for(classifier.grid()[-1], backward=False)
    assert (one_rate.lr, one_rate.backward, one_rate.gradual_unfreezing) == (0.003, False, False)
    # One rate on every layer; the rest of the schedule (STLR) is the train section's.
    assert not one_rate.schedule.discriminative and one_rate.schedule.stlr
    assert one_rate.epochs == ulmfit.epochs and classifier.train.gradual_unfreezing
    # A control inherits the dataset's search; a scratch control trains one rate already, so its
    # grid is its own rates alone.
    assert params.control("u").classifier.grid() == classifier.grid()
    assert not any(p.one_rate for p in params.control("s").classifier.grid())
    data["classifier"]["one_rate_lrs"] = [0]
    with pytest.raises(ValueError, match=r"classifier\.one_rate_lrs"):
        parse_params(data)


def test_a_scratch_control_with_a_bad_dataset_grid_names_the_key():
    data = _default()
    data["datasets"]["bbc_news"]["classifier"] = {"lrs": ["fast"]}
    data["controls"] = {"s": {"dataset": "bbc_news", "encoder": "scratch"}}
    with pytest.raises(ValueError, match=r"datasets\.bbc_news\.classifier\.lrs|controls\.s"):
        parse_params(data)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"dataset": "nope"}, "controls.c.dataset"),
        ({"dataset": "bbc_news", "encoder": "random"}, "controls.c.encoder"),
        ({"dataset": "bbc_news", "direction": "up"}, "controls.c.direction"),
        ({"dataset": "bbc_news", "labels": 1}, "controls.c.labels"),
        ({"dataset": "bbc_news", "epochs": 3}, "section 'controls.c'"),
        ({"dataset": "bbc_news", "classifier": {"train": {"patiense": 2}}}, "patiense"),
        ({"dataset": "bbc_news", "pretrain_step": 100}, "pretrain.train.snapshot_steps"),
        ({"dataset": "bbc_news", "encoder": "scratch", "pretrain_step": 1}, "encoder: finetuned"),
    ],
)
def test_bad_controls_are_rejected_with_their_key(entry, message):
    data = _default()
    data["controls"] = {"c": entry}
    with pytest.raises(ValueError, match=message):
        parse_params(data)


@pytest.mark.parametrize("directions", [["bwd"], ["fwd", "fwd"], ["fwd", "sideways"], []])
def test_dataset_directions_must_include_forward(directions):
    data = _default()
    data["datasets"]["bbc_news"]["directions"] = directions
    if not directions:  # empty: the default, both directions
        assert parse_params(data).dataset("bbc_news").directions == ("fwd", "bwd")
        return
    with pytest.raises(ValueError, match="directions"):
        parse_params(data)


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_every_profile_defines_what_dvc_yaml_reads(path):
    """dvc.yaml iterates over ``${datasets}`` and ``${controls}`` and lists params sections as
    stage parameters: DVC refuses to parse the pipeline when a profile lacks one of them."""
    import re

    text = (ROOT / "dvc.yaml").read_text()
    data = yaml.safe_load(path.read_text())
    iterated = set(re.findall(r"\$\{(\w+)\}", text)) - {"key"}  # ${key}: a foreach item
    stages = yaml.safe_load(text)["stages"].values()
    sections = {
        param.split(".")[0]
        for stage in stages
        for param in stage.get("params", stage.get("do", {}).get("params", []))
    }
    assert iterated == {"datasets", "controls"}
    missing = sorted(name for name in iterated | sections if name not in data)
    assert not missing, f"{path.name} lacks {missing}"


def test_classifier_config_is_built_once_the_sizes_are_known():
    data = _default()
    data["classifier"]["model"] = {"head_hidden": 7, "encoder": {"input_dropout": 0.4}}
    data["classifier"]["dropout_multipliers"] = [0.5, 1.0]
    classifier = parse_params(data).dataset("bbc_news").classifier
    assert [p.dropout_multiplier for p in classifier.grid()] == [0.5, 1.0]
    config = classifier.build(vocab_size=123, num_classes=5, dropout_multiplier=0.5)
    assert (config.encoder.vocab_size, config.num_classes, config.head_hidden) == (123, 5, 7)
    assert config.encoder.input_dropout == pytest.approx(0.2)
    # Unset head fields take the library's defaults, written once in ClassifierConfig.
    library = ClassifierConfig(encoder=config.encoder, num_classes=5)
    assert (config.bptt, config.max_len, config.head_dropouts) == (
        library.bptt,
        library.max_len,
        library.head_dropouts,
    )


def test_a_nested_section_overrides_only_the_keys_it_names():
    data = _default()
    data["classifier"]["train"]["optim"] = {"weight_decay": 0.1}
    optim = parse_params(data).classifier.train.optim
    # The classifier's own default betas survive an override of another optimiser key.
    assert (optim.weight_decay, optim.betas, optim.name) == (0.1, (0.7, 0.99), "adam")
    data["classifier"]["train"]["optim"] = {"nmae": "adam"}
    with pytest.raises(ValueError, match="nmae"):
        parse_params(data)


def test_numbers_written_as_text_or_integers_become_floats():
    data = _default()
    data["classifier"]["lrs"] = ["1e-3", 2]  # YAML 1.1 reads 1e-3 (no dot) as a string
    data["classifier"]["train"]["lr"] = "3e-2"
    classifier = parse_params(data).classifier
    assert [p.lr for p in classifier.grid()] == [0.001, 2.0]
    assert classifier.train.lr == 0.03
    data["classifier"]["train"]["lr"] = "fast"
    with pytest.raises(ValueError, match="classifier.train.lr"):
        parse_params(data)


def test_limit_rest_unsup_needs_train_limit():
    data = _default()
    del data["datasets"]["bbc_news"]["source"]["train_limit"]
    with pytest.raises(ValueError) as info:
        parse_params(data)
    assert "datasets.bbc_news.source" in str(info.value)
    assert "limit_rest 'unsup' without train_limit" in str(info.value)
