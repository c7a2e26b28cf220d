import pytest

from bench.config import BUILTIN_SUITES, ConfigError, load_suite, make_config, parse_suite, with_overrides
from bench.groundtruth.loo import LooConfig


def test_builtin_suites_parse():
    for name in ("smoke", "default"):
        suite = load_suite(name)
        assert suite.name == name and suite.tasks and suite.protocols


def test_unknown_suite_names_builtins(tmp_path):
    with pytest.raises(ConfigError, match="smoke, default"):
        load_suite("nonexistent")


def test_malformed_toml_is_reported(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = [unclosed")
    with pytest.raises(ConfigError, match="malformed TOML"):
        load_suite(str(bad))


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match="Did you mean 'seed'"):
        parse_suite({"sed": 1, "tasks": [{"name": "t"}], "protocols": [{"name": "loo"}]})


def test_component_options_are_typed():
    assert make_config(LooConfig, {"n_removed": 7}, "loo").n_removed == 7
    with pytest.raises(ConfigError, match="must be an integer"):
        make_config(LooConfig, {"n_removed": "7"}, "loo")
    with pytest.raises(ConfigError, match="Valid options: n_removed, seeds"):
        make_config(LooConfig, {"n_remove": 7}, "loo")


def test_cli_overrides_and_device_validation():
    suite = load_suite("smoke")
    assert with_overrides(suite, seed=3, estimators=["random"]).seed == 3
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        with_overrides(suite, device="tpu")


def test_protocols_override_narrows_each_tasks_own_list():
    suite = load_suite("default")
    narrowed = with_overrides(suite, protocols=["group"])
    assert [t.name for t in narrowed.tasks] == ["mnist-logreg", "mnist-resnet"]  # rt-bert runs no group
    assert all(t.protocols == ("group",) for t in narrowed.tasks)
    assert [p.name for p in narrowed.protocols] == ["group"]
    both = with_overrides(suite, tasks=["rt-bert"], protocols=["lds-scratch", "loo"])
    assert both.tasks[0].protocols == ("lds-scratch",)
    with pytest.raises(ConfigError, match="no task of the run has protocol"):
        with_overrides(suite, tasks=["rt-bert"], protocols=["group"])


@pytest.mark.parametrize("name", BUILTIN_SUITES)
def test_every_builtin_suite_plans_with_valid_options(name):
    from bench.catalog import default_registries
    from bench.planning import plan_suite

    plan = plan_suite(load_suite(name), default_registries())
    assert plan.tasks and plan.protocols and plan.estimators
    planned = {p.name for p in plan.protocols}
    assert all(set(t.spec.protocols) <= planned for t in plan.tasks)


def test_a_task_overrides_a_protocols_options_for_itself_only():
    import tomllib

    from bench.catalog import default_registries
    from bench.planning import plan_suite

    text = """
        [[tasks]]
        name = "mnist-logreg"
        [[tasks]]
        name = "mnist-resnet"
        [tasks.protocol_options.lds]
        n_subsets = 12
        [[protocols]]
        name = "lds"
        n_subsets = 30
        alpha = 0.4
        [[protocols]]
        name = "loo-warm"
    """
    registries = default_registries(entry_points=False)
    plan = plan_suite(parse_suite(tomllib.loads(text.replace("\n        ", "\n"))), registries)
    lds = {t.spec.name: next(p for p in t.protocols if p.name == "lds").config for t in plan.tasks}
    assert (lds["mnist-logreg"].n_subsets, lds["mnist-logreg"].alpha) == (30, 0.4)
    assert (lds["mnist-resnet"].n_subsets, lds["mnist-resnet"].alpha) == (12, 0.4)  # its own size, the suite's α
    assert [p.name for p in plan.tasks[0].protocols] == ["lds", "loo-warm"]
    with pytest.raises(ConfigError, match="unknown option 'subsets' for task mnist-resnet: protocol lds"):
        plan_suite(parse_suite(tomllib.loads(text.replace("n_subsets = 12", "subsets = 12").replace("\n        ", "\n"))),
                   registries)
    with pytest.raises(ConfigError, match="names protocol 'group', which the suite does not run"):
        plan_suite(parse_suite(tomllib.loads(text.replace("protocol_options.lds", "protocol_options.group")
                                             .replace("\n        ", "\n"))), registries)
    narrowed = with_overrides(parse_suite(tomllib.loads(text.replace("\n        ", "\n"))), protocols=["loo-warm"])
    assert [p.name for t in plan_suite(narrowed, registries).tasks for p in t.protocols] == ["loo-warm", "loo-warm"]
