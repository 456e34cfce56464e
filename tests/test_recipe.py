"""The recipe's refusals: a phase that cannot run with the chosen teacher is one `error:` line naming the key, exit 2,
before any phase starts (the recipe itself runs end to end in test_demo's toy demo and test_release's)."""

import pytest

from analogjax import cli

RECIPE = "recipe.prune_batches=1", "recipe.cache_k=8", "recipe.on_policy_steps=1"


def _distill(tmp_path, *sets):
    args = ["distill", "--config", "configs/tiny.yaml", "--workdir", str(tmp_path / "w"), "--no-progress"]
    for item in sets:
        args += ["--set", item]
    return cli.main(args)


@pytest.mark.parametrize(
    "sets, fragment",
    [
        # on-policy and pruning need the teacher's weights; a cache alone has neither
        (("teacher.cache={tmp}/cache", "recipe.on_policy_steps=2"), "recipe.on_policy_steps"),
        (("teacher.cache={tmp}/cache", "recipe.prune_batches=2"), "recipe.prune_batches"),
        (("teacher.cache={tmp}/cache", "recipe.cache_k=8"), "recipe.cache_k"),
        # pruning to a shape the teacher does not contain
        (
            ("recipe.prune_batches=1", "model.preset=tiny-teacher", "model.vocab_size=512", "model.n_layers=9"),
            "larger than the teacher",
        ),
        (("recipe.on_policy_steps=1", "recipe.on_policy.fraction=0"), "recipe.on_policy.fraction"),
        # a phase too short for its fraction would hold no on-policy step at all
        (("recipe.on_policy_steps=3", "recipe.on_policy.fraction=0.25"), "recipe.on_policy_steps"),
        (("recipe.on_policy_steps=1", "recipe.on_policy.prompt_len=64"), "recipe.on_policy"),
        (("recipe.cache_k=-1",), "recipe.cache_k"),
        (("recipe.cache_k=8", "recipe.cache_kind=dense"), "recipe.cache_kind"),
        (("recipe.cache_k=8", "distill.terms=[{{kind: ce, weight: 1.0}}]"), "recipe.cache_k"),
    ],
)
def test_a_recipe_that_cannot_run_is_refused_before_any_phase(tmp_path, capsys, sets, fragment):
    capsys.readouterr()
    assert _distill(tmp_path, *(s.format(tmp=tmp_path) for s in sets)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "w").exists()  # nothing written


def test_recipe_settings_reach_the_phase_configs(tmp_path):
    from analogjax.config import load_config
    from analogjax.recipes.analog import phase_configs, phase_names

    config = load_config("configs/tiny.yaml", list(RECIPE))
    names = phase_names(config)
    assert names == ["pruned_init", "teacher_cache", "distill", "on_policy"]
    phases = phase_configs(config, tmp_path)
    distill, on_policy = phases["distill"], phases["on_policy"]
    assert distill.teacher.cache == str(tmp_path / "teacher_cache")
    assert distill.checkpoint.init_path == str(tmp_path / "pruned_init")
    assert on_policy.teacher.cache is None and on_policy.distill.on_policy.fraction == 1.0
    assert on_policy.checkpoint.init_path == str(tmp_path / "distill" / "checkpoints")
    assert on_policy.train.steps == 1 and on_policy.optim.learning_rate == config.recipe.on_policy_learning_rate
    assert not distill.recipe.enabled and not on_policy.recipe.enabled  # each phase's config.yaml reruns it alone


def test_the_on_policy_phase_keeps_the_distillations_curve_spacing():
    from analogjax.recipes.analog import continued_curve_points

    # 80 distillation steps at 10 points (a point every ~9 steps): 8 more steps get start, middle and end.
    assert continued_curve_points(10, 80, 8) == 3
    assert continued_curve_points(10, 80, 40) == 6  # 4.5 gaps rounded up
    assert continued_curve_points(10, 80, 200) == 10  # never more points than the distillation's
    assert continued_curve_points(10, 80, 1) == 3  # curve_steps keeps the distinct steps (0 and 1)
    assert continued_curve_points(0, 80, 8) == 0  # no curve stays no curve
