"""Tests for dynadet.config: loading, _base_ merging, overrides, build and its error messages."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest

from dynadet import config as config_module
from dynadet.config import (
    ConfigError,
    build,
    dump_config,
    get_by_dotted,
    list_presets,
    load_config,
    save_config,
    set_by_dotted,
)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


BASE = """\
model:
  type: Detector
  backbone: {type: ResNet, depth: 50, out_indices: [1, 2, 3], frozen: true}
  head:
    type: FCOSHead
    num_classes: 80
    strides: [8, 16, 32]
train: {lr: 0.01, epochs: 12, steps: [8, 11]}
"""


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    return write(tmp_path / "base" / "fcos.yaml", BASE)


@pytest.fixture
def presets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake ``dynadet/configs`` folder (a Path is a Traversable)."""
    root = tmp_path / "presets"
    write(root / "fcos_r50.yaml", BASE)
    write(root / "torchvision" / "fcos_resnet50_fpn.yaml", """\
        _base_: ../fcos_r50.yaml
        model: {head: {num_classes: 91}}
        """)
    write(root / "atss_r50.yaml", "_base_: fcos_r50\nmodel: {head: {type: ATSSHead}}\n")
    monkeypatch.setattr(config_module, "_preset_root", lambda: root)
    return root


# ----------------------------------------------------------------------------- _base_ merging


def test_base_merge_nested_dicts_and_replaced_lists(tmp_path: Path, base_file: Path) -> None:
    child = write(tmp_path / "exp" / "child.yaml", """\
        _base_: ../base/fcos.yaml
        model:
          backbone: {out_indices: [3]}
          head: {num_classes: 3}
        train: {steps: [2]}
        extra: {note: hi}
        """)
    cfg = load_config(child)
    assert "_base_" not in cfg
    assert cfg["model"]["backbone"] == {
        "type": "ResNet", "depth": 50, "out_indices": [3], "frozen": True
    }
    assert cfg["model"]["head"] == {"type": "FCOSHead", "num_classes": 3, "strides": [8, 16, 32]}
    assert cfg["train"] == {"lr": 0.01, "epochs": 12, "steps": [2]}
    assert cfg["extra"] == {"note": "hi"}
    assert list(cfg) == ["model", "train", "extra"]  # base order kept, new keys appended


def test_base_chain_and_list_of_bases(tmp_path: Path, base_file: Path) -> None:
    write(tmp_path / "mid.yaml", "_base_: base/fcos.yaml\ntrain: {lr: 0.02}\n")
    write(tmp_path / "sched.yaml", "train: {epochs: 24, steps: [16, 22]}\n")
    top = write(tmp_path / "top.yaml", "_base_: [mid.yaml, sched.yaml]\ntrain: {lr: 0.03}\n")
    cfg = load_config(str(top))
    assert cfg["train"] == {"lr": 0.03, "epochs": 24, "steps": [16, 22]}
    assert cfg["model"]["head"]["num_classes"] == 80


def test_replace_marker_drops_base_mapping(tmp_path: Path, base_file: Path) -> None:
    child = write(tmp_path / "swin.yaml", """\
        _base_: base/fcos.yaml
        model:
          backbone: {_replace_: true, type: Swin, embed_dim: 96}
        """)
    cfg = load_config(child)
    assert cfg["model"]["backbone"] == {"type": "Swin", "embed_dim": 96}


def test_base_cycle_is_reported(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "_base_: b.yaml\nx: 1\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\ny: 2\n")
    with pytest.raises(ConfigError, match="cyclic _base_") as info:
        load_config(a)
    assert "a.yaml" in str(info.value) and "b.yaml" in str(info.value)
    me = write(tmp_path / "self.yaml", "_base_: self.yaml\n")
    with pytest.raises(ConfigError, match="cyclic"):
        load_config(me)


def test_diamond_bases_are_not_a_cycle(tmp_path: Path, base_file: Path) -> None:
    write(tmp_path / "l.yaml", "_base_: base/fcos.yaml\nleft: 1\n")
    write(tmp_path / "r.yaml", "_base_: base/fcos.yaml\nright: 1\n")
    cfg = load_config(write(tmp_path / "d.yaml", "_base_: [l.yaml, r.yaml]\n"))
    assert cfg["left"] == cfg["right"] == 1


def test_missing_base_names_the_file(tmp_path: Path) -> None:
    child = write(tmp_path / "c.yaml", "_base_: nope/missing.yaml\n")
    with pytest.raises(ConfigError, match=r"not found: .*nope/missing\.yaml.*_base_ of .*c\.yaml"):
        load_config(child)
    bad = write(tmp_path / "bad.yaml", "_base_: {a: 1}\n")
    with pytest.raises(ConfigError, match="_base_ must be"):
        load_config(bad)


# ----------------------------------------------------------------------------- presets


def test_list_presets_real_package_returns_names() -> None:
    names = list_presets()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert names == sorted(names)
    for name in names:  # every packaged preset must load on its own (none yet is fine)
        cfg = load_config(name)
        assert isinstance(cfg, dict) and "_base_" not in cfg


def test_presets_by_name_and_preset_bases(presets: Path) -> None:
    assert list_presets() == ["atss_r50", "fcos_r50", "torchvision/fcos_resnet50_fpn"]
    tv = load_config("torchvision/fcos_resnet50_fpn")  # relative base inside the presets
    assert tv["model"]["head"]["num_classes"] == 91
    assert tv["model"]["backbone"]["depth"] == 50
    assert load_config("atss_r50")["model"]["head"]["type"] == "ATSSHead"  # base by name
    assert load_config("fcos_r50.yaml") == load_config("fcos_r50")


def test_user_file_with_preset_base(tmp_path: Path, presets: Path) -> None:
    mine = write(tmp_path / "mine.yaml", "_base_: torchvision/fcos_resnet50_fpn\ntrain: {lr: 1}\n")
    cfg = load_config(mine)
    assert cfg["model"]["head"]["num_classes"] == 91 and cfg["train"]["lr"] == 1
    # a .yaml base that is not next to the file falls back to the preset of that name
    other = write(tmp_path / "other.yaml", "_base_: fcos_r50.yaml\n")
    assert load_config(other)["model"]["head"]["num_classes"] == 80


def test_unknown_preset_suggests_close_names(presets: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config preset 'fcos_r5'") as info:
        load_config("fcos_r5")
    assert "fcos_r50" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config("fcos_resnet50")  # leaf name of a nested preset
    assert "torchvision/fcos_resnet50_fpn" in str(info.value)
    with pytest.raises(ConfigError, match="packaged presets: atss_r50, fcos_r50"):
        load_config("zzzzzz")


def test_missing_preset_base_names_the_including_file(presets: Path) -> None:
    write(presets / "orphan.yaml", "_base_: fcos_r5\n")
    with pytest.raises(ConfigError, match="'fcos_r5' .named in the _base_ of orphan.*'fcos_r50'"):
        load_config("orphan")


def test_preset_cycle_is_reported(presets: Path) -> None:
    write(presets / "p.yaml", "_base_: q\n")
    write(presets / "q.yaml", "_base_: p.yaml\n")
    with pytest.raises(ConfigError, match="cyclic _base_ chain: p -> q -> p"):
        load_config("p")


def test_preset_base_cannot_escape(presets: Path) -> None:
    write(presets / "evil.yaml", "_base_: ../../outside.yaml\n")
    with pytest.raises(ConfigError, match="outside the packaged presets"):
        load_config("evil")


# ----------------------------------------------------------------------------- bad files


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "model:\n  type: Detector\n  head: [1, 2\ntrain: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+") as info:
        load_config(bad)
    assert info.value.__cause__ is not None


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    dup = write(tmp_path / "dup.yaml", "train:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*line 3.*duplicate key 'lr'"):
        load_config(dup)


def test_top_level_must_be_mapping_and_empty_is_empty(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lst\.yaml: a config must be a mapping"):
        load_config(write(tmp_path / "lst.yaml", "- 1\n- 2\n"))
    assert load_config(write(tmp_path / "empty.yaml", "")) == {}


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file not found: .*nothere\.yaml"):
        load_config(tmp_path / "nothere.yaml")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path)


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("model.head.num_classes=3", "model.head.num_classes", 3),
        ("train.lr=0.5", "train.lr", 0.5),
        ("train.lr=1e-4", "train.lr", 1e-4),  # YAML 1.1 would give the string '1e-4'
        ("train.lr=-2.5E3", "train.lr", -2500.0),
        ("model.backbone.frozen=false", "model.backbone.frozen", False),
        ("model.backbone.frozen=True", "model.backbone.frozen", True),
        ("model.backbone.out_indices=[1, 2]", "model.backbone.out_indices", [1, 2]),
        ("model.backbone.depth=null", "model.backbone.depth", None),
        ("model.backbone.depth=", "model.backbone.depth", None),
        ("model.head.type=ATSSHead", "model.head.type", "ATSSHead"),
        ("model.head.type='123'", "model.head.type", "123"),
        ("train.steps={a: 1}", "train.steps", {"a": 1}),
        ("train.lr=a=b", "train.lr", "a=b"),
        ("model.backbone.out_indices.0=7", "model.backbone.out_indices", [7, 2, 3]),
        ("model.backbone.out_indices.-1=9", "model.backbone.out_indices", [1, 2, 9]),
        ("+model.backbone.out_indices.3=4", "model.backbone.out_indices", [1, 2, 3, 4]),
        ("+train.warmup=500", "train.warmup", 500),
        ("+train.optim.momentum=0.9", "train.optim", {"momentum": 0.9}),
        ("+train.lr=3", "train.lr", 3),
    ],
)
def test_override_values_are_parsed(
    base_file: Path, override: str, key: str, expected: Any
) -> None:
    cfg = load_config(base_file, [override])
    value = get_by_dotted(cfg, key)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_in_order_and_leave_the_rest(base_file: Path) -> None:
    plain = load_config(base_file)
    cfg = load_config(base_file, ["train.lr=1", "train.lr=2"])
    assert cfg["train"]["lr"] == 2
    cfg["train"]["lr"] = plain["train"]["lr"]
    assert cfg == plain


def test_unknown_override_key_suggests(base_file: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(base_file, ["model.head.num_clases=3"])
    msg = str(info.value)
    assert "unknown config key 'model.head.num_clases'" in msg
    assert "'model.head' has no key 'num_clases'" in msg
    assert "did you mean 'model.head.num_classes'" in msg
    assert "+model.head.num_clases=" in msg  # tells how to add it on purpose


def test_unknown_override_suggests_full_path_for_bare_leaf(base_file: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'model.head.num_classes'"):
        load_config(base_file, ["num_classes=3"])
    with pytest.raises(ConfigError, match="'model' has no key 'hed'.*'model.head'"):
        load_config(base_file, ["model.hed.num_classes=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr.x=1", r"'train.lr' is a float \(0.01\), not a mapping or a list"),
        ("model.backbone.out_indices.3=1", "index 3 out of range .* length 3"),
        ("model.backbone.out_indices.x=1", "must be an integer index"),
        ("+model.backbone.out_indices.5=1", "index 5 out of range"),
        ("train.lr", "must look like key=value"),
        ("=3", "must look like key=value"),
        ("train..lr=3", "malformed config key"),
        ("train.lr=[1,", r"override 'train.lr=\[1,': invalid YAML"),
    ],
)
def test_bad_overrides(base_file: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(base_file, [override])


def test_load_config_from_mapping_does_not_mutate(base_file: Path) -> None:
    given = {"_base_": str(base_file), "train": {"lr": 5}}
    cfg = load_config(given, ["train.epochs=1"])
    assert cfg["train"] == {"lr": 5, "epochs": 1, "steps": [8, 11]}
    assert given == {"_base_": str(base_file), "train": {"lr": 5}}


# ----------------------------------------------------------------------------- dotted helpers


def test_get_and_set_by_dotted() -> None:
    cfg: dict[str, Any] = {"a": {"b": [10, {"c": 1}]}, "ids": {1: "person"}}
    assert get_by_dotted(cfg, "a.b.1.c") == 1
    assert get_by_dotted(cfg, "ids.1") == "person"  # YAML int keys are reachable
    assert get_by_dotted(cfg, "a.x", default=None) is None
    with pytest.raises(ConfigError, match="did you mean 'a.b'") as info:
        get_by_dotted(cfg, "a.bb")
    assert "+a.bb" not in str(info.value)
    set_by_dotted(cfg, "a.b.1.c", 2)
    set_by_dotted(cfg, "a.b.0", 11)
    assert cfg["a"]["b"] == [11, {"c": 2}]
    with pytest.raises(ConfigError, match="unknown config key 'a.new'"):
        set_by_dotted(cfg, "a.new", 1)
    set_by_dotted(cfg, "a.new.deep", 1, create=True)
    assert cfg["a"]["new"] == {"deep": 1}


# ----------------------------------------------------------------------------- dump / save


def test_dump_round_trip(tmp_path: Path, base_file: Path) -> None:
    cfg = load_config(base_file, ["train.lr=1e-10", "+train.name='3'", "+train.none=null"])
    cfg["train"]["sizes"] = (1, 2)  # edited from Python: a tuple
    cfg["train"]["shared"] = cfg["train"]["steps"]  # one object twice: no YAML anchors
    text = dump_config(cfg)
    assert "&id" not in text and text.index("model") < text.index("train")
    out = tmp_path / "out" / "config.yaml"
    save_config(cfg, out)
    assert out.read_text(encoding="utf-8") == text
    assert [p.name for p in out.parent.iterdir()] == ["config.yaml"]  # no temp file left
    again = load_config(out)
    cfg["train"]["sizes"] = [1, 2]
    assert again == cfg
    assert type(again["train"]["lr"]) is float and again["train"]["name"] == "3"


# ----------------------------------------------------------------------------- build


class Conv:
    def __init__(self, in_channels: int, out_channels: int, bias: bool = True) -> None:
        self.in_channels, self.out_channels, self.bias = in_channels, out_channels, bias


class Tower:
    def __init__(self, convs: list[Conv], norm: dict[str, Any] | None = None) -> None:
        self.convs, self.norm = convs, norm


class Head:
    def __init__(self, *, tower: Tower, num_classes: int, strides: tuple[int, ...] = (8,)) -> None:
        if num_classes <= 0:
            raise ValueError("num_classes must be positive")
        self.tower, self.num_classes, self.strides = tower, num_classes, strides


class Net:
    def __init__(self, head: Head, **extras: Any) -> None:
        self.head, self.extras = head, extras


def make_pair(left: Any, right: Any) -> tuple[Any, Any]:
    return left, right


REGISTRY = {"Conv": Conv, "Tower": Tower, "Head": Head, "Net": Net, "Pair": make_pair}


def head_cfg(**changes: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "type": "Head",
        "num_classes": 3,
        "strides": [8, 16],
        "tower": {
            "type": "Tower",
            "norm": {"groups": 32, "eps": 1e-5},
            "convs": [{"type": "Conv", "in_channels": 4, "out_channels": 8},
                      {"type": "Conv", "in_channels": 8, "out_channels": 8, "bias": False}],
        },
    }
    cfg.update(changes)
    return cfg


def test_build_nested_tree() -> None:
    cfg = {"model": {"type": "Net", "head": head_cfg(), "anything": {"type": "Pair",
                                                                     "left": 1, "right": [2]}},
           "train": {"lr": 0.1}}
    before = dump_config(cfg)
    out = build(cfg, REGISTRY)
    net = out["model"]
    assert isinstance(net, Net) and out["train"] == {"lr": 0.1}
    assert net.extras == {"anything": (1, [2])}  # **kwargs accepted, factory functions work
    head = net.head
    assert isinstance(head, Head) and head.num_classes == 3 and head.strides == [8, 16]
    assert head.tower.norm == {"groups": 32, "eps": 1e-5}  # dict without type stays a dict
    convs = head.tower.convs
    assert [type(c) for c in convs] == [Conv, Conv]
    assert [(c.in_channels, c.out_channels, c.bias) for c in convs] == [(4, 8, True), (8, 8, False)]
    assert dump_config(cfg) == before  # the config is not mutated
    assert build(cfg, REGISTRY)["model"].head is not head  # fresh objects on each build
    assert build([1, "x", None], REGISTRY) == [1, "x", None]
    assert build(5, REGISTRY) == 5


def test_build_unknown_type_names_path_and_suggestion() -> None:
    cfg = head_cfg(tower={"type": "Towr", "convs": []})
    with pytest.raises(ConfigError) as info:
        build(cfg, REGISTRY, path="model.head")
    msg = str(info.value)
    assert msg.startswith("model.head.tower.type: unknown type 'Towr'")
    assert "did you mean 'Tower'" in msg
    with pytest.raises(ConfigError, match=r"^type: unknown type 'zzz'; known types: Conv, Head"):
        build({"type": "zzz"}, REGISTRY)
    with pytest.raises(ConfigError, match="did you mean 'Conv'"):
        build({"type": "conv"}, REGISTRY)
    with pytest.raises(ConfigError, match=r"^x.0.type: type must be a class name"):
        build({"x": [{"type": 3}]}, REGISTRY)


def test_build_unknown_keyword_names_path_class_accepted_and_suggestion() -> None:
    cfg = head_cfg(num_clases=3)
    del cfg["num_classes"]
    cfg["tower"]["convs"][1]["out_chanels"] = 8
    with pytest.raises(ConfigError) as info:
        build({"head": cfg}, REGISTRY, path="model")
    msg = str(info.value)
    # The outer node is validated before its children are built.
    assert "model.head.num_clases: Head has no parameter 'num_clases'" in msg
    assert "did you mean 'num_classes'" in msg
    assert "model.head: Head is missing required argument(s) 'num_classes'" in msg
    assert "Head accepts: tower, num_classes, strides" in msg
    del cfg["num_clases"]
    cfg["num_classes"] = 3
    with pytest.raises(ConfigError) as info:
        build({"head": cfg}, REGISTRY, path="model")
    msg = str(info.value)
    assert "model.head.tower.convs.1.out_chanels: Conv has no parameter 'out_chanels'" in msg
    assert "did you mean 'out_channels'" in msg
    assert "Conv accepts: in_channels, out_channels, bias" in msg


def test_build_missing_required_arguments() -> None:
    with pytest.raises(ConfigError) as info:
        build({"convs": [{"type": "Conv"}]}, REGISTRY)
    msg = str(info.value)
    assert "convs.0: Conv is missing required argument(s) 'in_channels', 'out_channels'" in msg


def test_build_wraps_constructor_errors() -> None:
    with pytest.raises(ConfigError, match=r"^model.head: Head\(...\) failed: ValueError: "
                       "num_classes must be positive") as info:
        build(head_cfg(num_classes=0), REGISTRY, path="model.head")
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(info.value, ValueError)  # ConfigError is a ValueError

    def picky(x: int) -> int:
        return len(x)  # type: ignore[arg-type]

    with pytest.raises(ConfigError, match=r"^<config root>: picky\(...\) failed: TypeError"):
        build({"type": "picky", "x": 1}, {"picky": picky})


def test_build_skips_signature_check_for_builtins() -> None:
    assert build({"type": "dict", "a": 1}, {"dict": dict}) == {"a": 1}
