"""Property tests: any config file or `--set` value ends in a valid, checked RunConfig that saves and
reloads to itself, or in one ConfigError line; never another exception."""
from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from graftnet import config
from graftnet.errors import ConfigError

SETTINGS = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["", "0", "1", "-1", "1e9", "nan", "adam", "last", "all", "top:2",
                                     "256,128", "[8]", "yes", "cifar10", "../x", "/tmp"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)
keys = st.one_of(st.sampled_from(config.KEYS), st.text(max_size=16))


def check(make):
    """What `make` returns, or None after checking its ConfigError is one line."""
    try:
        return make()
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message.strip(), message
        return None


@SETTINGS
@given(st.dictionaries(keys, values, max_size=5))
def test_any_override_is_a_valid_config_or_one_config_error(overrides):
    cfg = check(lambda: config.resolve(None, overrides))
    if cfg is not None:
        config.validate(cfg)


@SETTINGS
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.dictionaries(keys, values, max_size=4).map(lambda d: repr(d).encode())))
def test_any_config_file_is_a_valid_config_or_one_config_error(tmp_path_factory, content):
    path: Path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(content)
    cfg = check(lambda: config.resolve(path))
    if cfg is not None:
        again = path.with_name("again.yaml")
        config.save_yaml(cfg, again)
        assert config.resolve(again) == cfg


space_keys = st.one_of(st.sampled_from(config.KEYS), st.sampled_from(["backbone", "head.layers", "prune"]),
                       st.text(max_size=10))
entries = st.one_of(values, st.fixed_dictionaries(
    {"type": st.sampled_from(["int", "float", "categorical", "bool", "log", "fixed", "x"])},
    optional={"low": scalars, "high": scalars, "log": scalars, "step": scalars, "choices": values,
              "value": values, "when": values}))


@SETTINGS
@given(st.one_of(values, st.dictionaries(space_keys, entries, max_size=4)))
def test_any_search_space_is_checked_or_one_config_error(space):
    from graftnet.search.space import check_space
    check(lambda: check_space(space))


@SETTINGS
@given(st.one_of(st.binary(max_size=120), st.dictionaries(st.sampled_from(["data", "tasks", "x"]), st.one_of(
    values, st.lists(st.dictionaries(st.sampled_from(["name", "classes", "data", "y"]), values, max_size=3),
                     max_size=3)), max_size=3).map(lambda d: repr(d).encode())))
def test_any_tasks_file_is_a_sequence_or_one_config_error(tmp_path_factory, content):
    from graftnet.continual.tasks import load_tasks
    path: Path = tmp_path_factory.mktemp("tasks") / "tasks.yaml"
    path.write_bytes(content)
    check(lambda: load_tasks(path, "cifar10"))
