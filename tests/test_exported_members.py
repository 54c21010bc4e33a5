"""Pin the public API: a public name must be exported, and the list sorted."""

import taskiq_redis_cluster


def test_all_is_sorted_and_unique() -> None:
    names = taskiq_redis_cluster.__all__
    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_every_public_name_is_exported() -> None:
    public = {
        name
        for name in dir(taskiq_redis_cluster)
        if not name.startswith("_") and name not in {"devcluster", "pytest_plugin", "testing"}
    }
    assert public == set(taskiq_redis_cluster.__all__)


def test_exported_members_have_the_package_as_home() -> None:
    for name in taskiq_redis_cluster.__all__:
        member = getattr(taskiq_redis_cluster, name)
        assert member.__module__.startswith("taskiq_redis_cluster"), name
