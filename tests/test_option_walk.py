"""Every option of every registered estimator, protocol and task refuses a bad value at planning (#28).

For each field of a component's Config, a value of the field's type that no component can mean is tried
(NaN for a number, −10⁹ for a count or index, an unknown word for a choice); make_config must refuse it
with a ConfigError, which is what planning raises before anything is trained or written. Fields whose
values are free by design are listed with the reason."""

from __future__ import annotations

import dataclasses

import pytest

from bench.catalog import default_registries
from bench.config import ConfigError, make_config

BAD = {float: float("nan"), int: -10**9, str: "no-such-value"}
#: Options any value of their type may mean: paths and hub names (checked when loaded) and feature spaces
#: (which spaces exist is the task's to say: checked when the estimator is fitted on it).
FREE = {"data_dir", "checkpoint", "features"}

REGISTRIES = default_registries(entry_points=False)
COMPONENTS = [(kind, name) for kind in ("estimators", "protocols", "tasks")
              for name in getattr(REGISTRIES, kind).names() if not getattr(getattr(REGISTRIES, kind).get(name), "peer", "")]


@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_every_option_refuses_a_bad_value(kind, name):
    config_cls = getattr(REGISTRIES, kind).get(name).Config
    if not dataclasses.is_dataclass(config_cls):
        pytest.fail(f"{kind} {name}: Config {config_cls!r} is not a dataclass")
    default, accepted = config_cls(), []
    for field in dataclasses.fields(config_cls):
        bad = BAD.get(type(getattr(default, field.name)))
        if bad is None or field.name in FREE:
            continue
        try:
            make_config(config_cls, {field.name: bad}, f"{kind[:-1]} {name}")
        except ConfigError:
            continue
        accepted.append(f"{field.name} = {bad!r}")
    assert not accepted, f"{kind[:-1]} {name} accepts {', '.join(accepted)}"


def test_the_walk_covers_every_kind_of_component():
    assert {kind for kind, _ in COMPONENTS} == {"estimators", "protocols", "tasks"} and len(COMPONENTS) > 30
