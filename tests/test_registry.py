import pytest

from bench.catalog import default_registries
from bench.registry import Registry, RegistryError, registered


def test_unknown_name_lists_valid_names_and_suggests():
    registry = Registry("estimator")
    registry.add("if-exact", object())
    registry.add("tracin", object())
    with pytest.raises(RegistryError) as err:
        registry.get("if-exakt")
    message = str(err.value)
    assert "if-exakt" in message and "Did you mean 'if-exact'" in message and "if-exact, tracin" in message


def test_duplicate_names_are_rejected():
    registry = Registry("task")
    registry.add("a", 1)
    with pytest.raises(RegistryError, match="duplicate task name 'a'"):
        registry.add("a", 2)


def test_lazy_entries_import_on_first_use():
    registry = Registry("thing")
    registry.add("dumps", "json:dumps")
    import json

    assert registry.get("dumps") is json.dumps


def test_registries_are_independent_instances():
    first, second = default_registries(), default_registries()
    assert first.estimators is not second.estimators
    assert {"if-exact", "if-cg", "if-lissa", "random"} <= set(first.estimators.names())
    assert "mnist-logreg" in first.tasks and "loo" in first.protocols


def test_registered_marks_without_registering():
    @registered("marked")
    class Marked:
        pass

    assert Marked.name == "marked"
    assert "marked" not in default_registries().estimators
