"""Pin the public API: a public name must be exported, and the list sorted."""

import inspect

from taskiq.exceptions import TaskiqError

import taskiq_redis_cluster
from taskiq_redis_cluster import _errors


def test_all_is_sorted_and_unique() -> None:
    names = taskiq_redis_cluster.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name in dir(taskiq_redis_cluster)
        if not name.startswith("_") and name != "testing"
    }
    assert public == set(taskiq_redis_cluster.__all__)


def test_exported_members_have_the_package_as_home() -> None:
    for name in taskiq_redis_cluster.__all__:
        member = getattr(taskiq_redis_cluster, name)
        assert member.__module__.startswith("taskiq_redis_cluster"), name


def test_every_error_is_exported_and_rooted_at_taskiq() -> None:
    # A caller can only catch what it can import: every error class in the
    # one errors module is public, and all share taskiq's root.
    errors = {
        name for name, obj in inspect.getmembers(_errors, inspect.isclass)
        if obj.__module__ == _errors.__name__
    }
    assert errors, "the errors module defines no error"
    assert errors - set(taskiq_redis_cluster.__all__) == set()
    for name in errors:
        assert issubclass(getattr(_errors, name), TaskiqError), name


def test_error_tree_in_the_docstring_names_every_error() -> None:
    doc = _errors.__doc__ or ""
    missing = [
        name for name, obj in inspect.getmembers(_errors, inspect.isclass)
        if obj.__module__ == _errors.__name__ and name not in doc
    ]
    assert missing == []
