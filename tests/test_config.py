"""The config loader: defaults, then YAML, then overrides; numbers as people write them; renamed keys; help."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest

from recalign.config import ConfigError, describe, fingerprint, help_text, load_config, option


@dataclass
class Inner:
    lr: float = option(1e-3, "a learning rate")
    layers: list[int] = option(factory=lambda: [1, 2], help="layer sizes")
    mode: str = option("a", "a mode")


@dataclass
class Outer:
    RENAMED: ClassVar[dict[str, str]] = {"step": "steps", "old_flag": "use flag (true/false) instead"}

    name: str = option("x", "a name")
    steps: int = option(10, "how many steps")
    flag: bool = option(False, "a switch")
    inner: Inner = option(factory=Inner, help="a section")


def test_defaults_yaml_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, path, ["inner.layers=[3, 4]", "flag=true", "name=run1"])
    assert cfg == Outer(name="run1", steps=20, flag=True, inner=Inner(lr=0.5, layers=[3, 4]))
    assert load_config(Outer).steps == 10
    assert fingerprint(cfg) != fingerprint(Outer()) and fingerprint(cfg) == fingerprint(load_config(
        Outer, path, ["inner.layers=[3, 4]", "flag=true", "name=run1"]))


@pytest.mark.parametrize("text, value", [("5e-3", 5e-3), ("1e5", 1e5), ("-1E-4", -1e-4), (".5", 0.5), ("+2.5e+1", 25.0),
                                         ("3", 3.0), ("1_000.5", 1000.5)])
def test_numbers_as_people_write_them_in_overrides_and_yaml(tmp_path, text, value):
    assert load_config(Outer, None, [f"inner.lr={text}"]).inner.lr == pytest.approx(value)
    path = tmp_path / "c.yaml"
    path.write_text(f"inner:\n  lr: {text}\n  layers: [{text}]\n" if float(value).is_integer() else
                    f"inner:\n  lr: {text}\n")
    assert load_config(Outer, path).inner.lr == pytest.approx(value)
    if float(value).is_integer():
        assert load_config(Outer, path).inner.layers == [int(value)], "an integral float fits an int"


def test_integers_strings_and_non_finite_numbers():
    assert load_config(Outer, None, ["steps=1e5"]).steps == 100_000
    assert load_config(Outer, None, ["name=1e5"]).name == "1e5", "a string field keeps the text as written"
    assert load_config(Outer, None, ["name=2024-01-01"]).name == "2024-01-01"
    with pytest.raises(ConfigError, match=r"steps: expected an integer, got 2\.5"):
        load_config(Outer, None, ["steps=2.5"])
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(Outer, None, ["inner.lr=1e400"])
    with pytest.raises(ConfigError, match="expected a finite number"):
        load_config(Outer, None, ["inner.lr=.nan"])


@pytest.mark.parametrize("overrides, pattern", [
    (["inner.lrr=1"], r"unknown key\(s\) inner\.lrr for Inner"),
    (["steps=ten"], r"steps: expected an integer, got 'ten'"),
    (["flag=1"], r"flag: expected true/false"),
    (["inner.layers=3"], r"inner\.layers: expected a list"),
    (["noequals"], r"expected key=value"),
    (["step=3"], r"overrides: step: renamed to steps"),
    (["old_flag=true"], r"old_flag: use flag \(true/false\) instead"),
    (["name=" + "x" * 5000, "steps=" + "y" * 5000], r"got 'y+\.\.\.$"),  # a long value is cut
])
def test_bad_overrides(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(Outer, None, overrides)


def test_bad_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key\(s\) stepz"):
        load_config(Outer, path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "missing.yaml")
    path.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(Outer, path)


def test_help_lists_every_key_with_type_default_and_help():
    rows = {r["key"]: r for r in describe(Outer)}
    assert list(rows) == ["name", "steps", "flag", "inner.lr", "inner.layers", "inner.mode"]
    assert rows["inner.lr"] == {"key": "inner.lr", "type": "float", "default": "0.001", "help": "a learning rate",
                                "section": "inner"}
    assert rows["inner.layers"]["default"] == "[1, 2]" and rows["flag"]["default"] == "false"
    text = help_text(Outer, "usage: job [key=value ...]")
    assert text.startswith("usage: job [key=value ...]\n") and "[inner]" in text
    assert "inner.lr" in text and "float = 0.001" in text and "a learning rate" in text
    with pytest.raises(ValueError, match="help text"):
        option(1)


def test_field_metadata_carries_the_help():
    (field,) = [f for f in dataclasses.fields(Outer) if f.name == "steps"]
    assert field.metadata["help"] == "how many steps" and field.default == 10


@dataclass
class WithSectionDefault:
    inner: Inner = option(factory=lambda: Inner(lr=0.5, mode="b"), help="a section whose default is not Inner()")


def test_a_partly_given_section_keeps_its_fields_default(tmp_path):
    cfg = load_config(WithSectionDefault, None, ["inner.layers=[7]"])
    assert cfg.inner == Inner(lr=0.5, layers=[7], mode="b"), "keys not given keep the section's default, not the class's"
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  mode: c\n")
    assert load_config(WithSectionDefault, path).inner == Inner(lr=0.5, mode="c")
