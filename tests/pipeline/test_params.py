from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.params import ParamsError, as_dict, from_dict, load_section, override
from pipeline.synth import SynthConfig


@dataclass(frozen=True)
class Cfg:
    n: int = 1
    rate: float = 0.5
    name: str = "a"
    flag: bool = False
    pair: tuple[int, int] = (1, 2)
    sizes: tuple[tuple[int, int], ...] = ((3, 4),)
    maybe: int | None = None


def test_values_are_typed_and_tuples_converted():
    cfg = from_dict(Cfg, {"n": 3, "rate": 1, "pair": [5, 6], "sizes": [[1, 2], [3, 4]], "maybe": 7}, "x")
    assert cfg == Cfg(n=3, rate=1.0, pair=(5, 6), sizes=((1, 2), (3, 4)), maybe=7)
    assert isinstance(cfg.rate, float)
    assert as_dict(cfg)["sizes"] == [[1, 2], [3, 4]]


@pytest.mark.parametrize("data, fragment", [
    ({"nn": 3}, "unknown key(s) ['nn']"),
    ({"n": 1.5}, "x.n: expected an integer"),
    ({"n": True}, "x.n: expected an integer"),
    ({"flag": "yes"}, "x.flag: expected true/false"),
    ({"rate": "fast"}, "x.rate: expected a number"),
    ({"pair": [1]}, "x.pair: expected 2 items"),
    ({"sizes": [[1, "b"]]}, "x.sizes[0][1]: expected an integer"),
])
def test_bad_values_name_the_key(data, fragment):
    with pytest.raises(ParamsError) as e:
        from_dict(Cfg, data, "x")
    assert fragment in str(e.value)


@dataclass(frozen=True)
class Outer:
    inner: Cfg = Cfg()
    k: int = 0


def test_nested_sections_are_typed_too():
    cfg = from_dict(Outer, {"inner": {"n": 5, "pair": [7, 8]}, "k": 1}, "x")
    assert cfg.inner == Cfg(n=5, pair=(7, 8)) and cfg.k == 1
    assert as_dict(cfg)["inner"]["pair"] == [7, 8]
    with pytest.raises(ParamsError, match=r"x.inner: unknown key\(s\) \['m'\]"):
        from_dict(Outer, {"inner": {"m": 1}}, "x")


def test_load_section_errors_name_file_and_section(tmp_path: Path):
    p = tmp_path / "params.yaml"
    p.write_text("other:\n  a: 1\n")
    with pytest.raises(ParamsError, match="no section 'synth'"):
        load_section(SynthConfig, "synth", p)
    with pytest.raises(ParamsError, match="does not exist"):
        load_section(SynthConfig, "synth", tmp_path / "missing.yaml")
    assert load_section(SynthConfig, "synth", None) == SynthConfig()


def test_override_only_replaces_given_values():
    cfg = override(SynthConfig(), images=10, seed=None)
    assert cfg.images == 10 and cfg.seed == SynthConfig().seed


def test_repo_params_yaml_loads(repo: Path):
    cfg = load_section(SynthConfig, "synth", repo / "params.yaml")
    assert cfg.images > 0 and sum(cfg.split_fractions) == pytest.approx(1)


@pytest.mark.parametrize("body", ["synth: 3\n", "synth:\n  - 1\n  - 2\n", "synth: text\n"])
def test_a_section_of_the_wrong_type_names_file_and_section(tmp_path: Path, body):
    p = tmp_path / "params.yaml"
    p.write_text(body)
    with pytest.raises(ParamsError, match=rf"{p}:synth: expected a mapping of SynthConfig settings"):
        load_section(SynthConfig, "synth", p)
    with pytest.raises(ParamsError, match="x: expected a mapping"):
        from_dict(Cfg, [1, 2], "x")
