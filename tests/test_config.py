"""Configuration: layering, recipes, errors that name the key, and what reading refuses."""
import dataclasses
import math
import re
import subprocess
import sys
import time
import typing

import pytest

from byol_fast.errors import ConfigError
from byol_fast.config import (ORDERED, RANGES, Config, FinetuneConfig, LinearConfig, interval, load_config,
                              to_dict, to_yaml)
from byol_fast.config_files import MAX_BYTES, MAX_DEPTH, read_yaml
from conftest import CHILD_ENV, ROOT


def test_defaults_are_the_paper_recipe():
    cfg = load_config()
    v1, v2 = cfg.data.view1, cfg.data.view2
    assert (v1.blur_p, v1.solarize_p, v2.blur_p, v2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert (v1.brightness, v1.contrast, v1.saturation, v1.hue) == (0.4, 0.4, 0.2, 0.1)
    assert (v1.jitter_p, v1.grayscale_p, v1.blur_kernel, v1.crop_area) == (0.8, 0.2, 23, (0.08, 1.0))
    assert cfg.optim.batch_size == 4096 and cfg.optim.momentum == 0.9 and cfg.optim.eta == 1e-3


@pytest.mark.parametrize("name, epochs, lr, wd, tau", [
    ("byol_r50_in1k_1000ep", 1000, 0.2, 1.5e-6, 0.996),
    ("byol_r50_in1k_300ep", 300, 0.3, 1e-6, 0.99),
    ("byol_r50_in1k_100ep", 100, 0.45, 1e-6, 0.99),
    ("byol_r50_in1k_40ep", 40, 0.45, 1e-6, 0.97),
])
def test_recipes_match_deepmind_presets(name, epochs, lr, wd, tau):
    cfg = load_config(ROOT / "config" / f"{name}.yaml")
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.weight_decay, cfg.ema.tau_base) == (epochs, lr, wd, tau)
    assert cfg.model.backbone == "resnet50" and cfg.optim.batch_size == 4096 and cfg.optim.warmup_epochs == 10


@pytest.mark.parametrize("epochs", [100, 400])
def test_pixpro_recipes_match_the_authors_scripts(epochs):
    """tools/pixpro_base_r50_{100,400}ep.sh of the PixPro release: LARS base lr 1.0 at batch 1024
    (128 x 8 GPUs), weight decay 1e-5, 5 warm-up epochs, momentum 0.99, p 2, positive ratio 0.7,
    pixel loss only; their MLP2d projector is 2048 -> 4096 -> 256."""
    cfg = load_config(ROOT / "config" / f"pixpro_r50_in1k_{epochs}ep.yaml")
    assert (cfg.epochs, cfg.optim.lr, cfg.optim.batch_size, cfg.optim.weight_decay, cfg.optim.warmup_epochs,
            cfg.ema.tau_base) == (epochs, 1.0, 1024, 1e-5, 5, 0.99)
    m = cfg.model
    assert (m.backbone, m.loss, m.pixel_hidden, m.pixel_out, m.pixpro_gamma, m.pixpro_threshold) == \
        ("resnet50", "pixpro", 4096, 256, 2.0, 0.7)
    assert load_config(ROOT / "config" / "pixpro_demo.yaml").model.loss == "instance+pixpro"


def test_model_init_takes_a_path_and_the_loss_a_choice():
    assert load_config(overrides=["--model.init=/weights/r50.pth"]).model.init == "/weights/r50.pth"
    with pytest.raises(ConfigError, match="model.loss"):
        load_config(overrides=["--model.loss=dense"])


def test_overrides_win_and_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim: {lr: 0.5}\nepochs: 3\n")
    cfg = load_config(f, ["--optim.lr=0.3", "--data.view2.blur_p", "0.5", "--compile=true", "--optim.weight_decay=1"])
    assert cfg.optim.lr == 0.3 and cfg.epochs == 3 and cfg.compile is True
    assert cfg.optim.weight_decay == 1.0 and isinstance(cfg.optim.weight_decay, float)
    # a partial view2 section keeps view2's own defaults (solarize 0.2), not view1's
    assert cfg.data.view2.blur_p == 0.5 and cfg.data.view2.solarize_p == 0.2


def test_exponents_without_a_dot_are_floats(tmp_path):
    # PyYAML reads 5e-4 as a string (YAML 1.1 wants 5.0e-4); users type it either way.
    f = tmp_path / "c.yaml"
    f.write_text("optim: {weight_decay: 1.5e-6}\n")
    cfg = load_config(f, ["--optim.lr=2E1", "--ema.tau_base=+9.9e-1"])
    assert (cfg.optim.weight_decay, cfg.optim.lr, cfg.ema.tau_base) == (1.5 / 10**6, 20.0, 0.99)
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(None, ["--optim.lr=e5"])


@pytest.mark.parametrize("overrides, key", [
    (["--optim.learning_rate=1"], "optim.learning_rate"),
    (["--nonsense=1"], "nonsense"),
    (["--optim.batch_size=abc"], "optim.batch_size"),
    (["--optim.batch_size=1.5"], "optim.batch_size"),
    (["--compile=3"], "compile"),
    (["--data.view1.crop_area=[0.1]"], "data.view1.crop_area"),
    (["--precision=fp8"], "precision"),
    (["--model.backbone=resnet51"], "model.backbone"),
    (["--reader.loader=pil"], "reader.loader"),
    (["--data.loader=dali"], "reader.loader"),  # moved: the message says where to
    (["--optim=1"], "optim"),
    (["--data.view1.blur_kernel=22"], "data.view1.blur_kernel"),  # torchvision's blur needs an odd window
    (["--data.view2.blur_sigma=[0, 2]"], "data.view2.blur_sigma"),  # sigma 0 is no Gaussian
    (["--data.view2.blur_sigma=[2.0, 1.0]"], "data.view2.blur_sigma"),
])
def test_bad_keys_and_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("[", r"\[")):
        load_config(None, overrides)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*optim\.lrr"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid config YAML: line 2") as e:
        load_config(broken)
    assert "\n" not in str(e.value)  # one line, without PyYAML's quoted snippet


# ---------------------------------------------------------------------------- what reading refuses


def write_alias_bomb(path, levels: int = 9):
    """"Billion laughs": each level a list of nine aliases of the level below, 9**9 strings in all
    (about a gigabyte written out) from a few hundred bytes."""
    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_an_alias_bomb_is_refused_at_once_naming_the_file(tmp_path):
    bomb = write_alias_bomb(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 600
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb\.yaml: .*line 1, .*anchors and aliases are not allowed") as e:
        load_config(bomb)
    assert time.monotonic() - start < 1.0 and len(str(e.value)) < 250


@pytest.mark.parametrize("text, line", [("seed: 1\nout_dir: *name\n", 2), ("seed: &s 1\n", 1)])
def test_any_alias_or_anchor_is_refused_with_its_line(tmp_path, text, line):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=rf"c\.yaml: .*line {line}, .*anchors and aliases"):
        load_config(f)


def test_overrides_are_read_by_the_same_bounded_reader():
    with pytest.raises(ConfigError, match=r"--data\.mean: .*anchors and aliases"):
        load_config(None, ["--data.mean=[&x 0.5, *x, *x]"])
    with pytest.raises(ConfigError, match=rf"--data\.mean: .*nested deeper than {MAX_DEPTH}"):
        load_config(None, ["--data.mean=" + "[" * 10_000 + "]" * 10_000])
    with pytest.raises(ConfigError, match=r"--data\.path: .*line 1.*month must be in 1\.\.12"):
        load_config(None, ["--data.path=2001-13-01"])  # a timestamp PyYAML matches but cannot build


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deep_nesting_is_refused_naming_the_file(tmp_path, opening, closing):
    deep = tmp_path / "deep.yaml"
    deep.write_text("data: " + opening * 10_000 + "1" + closing * 10_000 + "\n")
    with pytest.raises(ConfigError, match=rf"deep\.yaml: .*line 1, .*nested deeper than {MAX_DEPTH} levels"):
        load_config(deep)


def test_bytes_that_are_not_utf8_are_refused_naming_the_file_and_offset(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes(b"seed: 1\ndata: {path: caf\xe9}\n")
    with pytest.raises(ConfigError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 24\)"):
        load_config(f)
    f.write_bytes(b"seed: 1\x00\n")  # UTF-8, but no character of a YAML text
    with pytest.raises(ConfigError, match=r"latin1\.yaml: .*character 8 \(#x0000\)"):
        load_config(f)


def test_a_file_larger_than_the_limit_is_refused_unread(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_BYTES + "\n")
    with pytest.raises(ConfigError, match=r"big\.yaml: larger than 1,048,576 bytes"):
        load_config(big)


@pytest.mark.parametrize("text, message", [
    ("seed: " + "9" * 5000 + "\n", r"c\.yaml: .*cannot read int"),  # more digits than Python converts
    ("seed: !!python/object:os.system x\n", r"c\.yaml: .*could not determine a constructor"),
    ("- 1\n", r"c\.yaml: expected a mapping"),
    ("{1: 2, a: 3}\n", r"c\.yaml: unknown config key '1'"),  # keys of mixed types
])
def test_every_yaml_refusal_is_one_line_naming_the_file(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(f)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides", [
    ["--data.interp=" + "x" * 100_000],
    ["--model.backbone=[" + ", ".join(["resnet"] * 20_000) + "]"],
    ["--optim." + "k" * 100_000 + "=1"],
])
def test_a_long_value_is_cut_in_the_error(overrides):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    message = str(e.value)
    assert len(message) < 400 and re.search(r"\.\.\. \([0-9,]+ (characters|items)\)", message), message


def test_a_saved_config_reads_back(tmp_path):
    # The run folder's config.yaml: written without anchors, so the reader that refuses them takes it.
    for schema in (Config, LinearConfig, FinetuneConfig):
        assert load_config(None, to_dict(schema()), cls=schema) == schema()  # the defaults lie in their ranges
    cfg = load_config(ROOT / "config" / "demo.yaml")
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "config.yaml") == cfg and read_yaml(tmp_path / "config.yaml")["epochs"] == 75


# ---------------------------------------------------------------------------- declared ranges


def leaf_fields(schema: type, prefix: str = ""):
    """(dotted key, annotation) of every field of ``schema`` that is not a section, sections walked."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, tp


def number_fields(schema: type):
    """(dotted key, annotation) of every field of ``schema`` that holds numbers (a tuple holds floats)."""
    return [(key, tp) for key, tp in leaf_fields(schema) if tp in (int, float) or typing.get_origin(tp) is tuple]


def test_every_number_field_has_a_declared_range():
    schemas = (Config, LinearConfig, FinetuneConfig)
    fields = {key.rpartition(".")[2]: tp for schema in schemas for key, tp in number_fields(schema)}
    assert set(fields) == set(RANGES)  # every number decided; no entry that nothing uses
    others = {key.rpartition(".")[2] for schema in schemas for key, tp in leaf_fields(schema)
              if (key, tp) not in number_fields(schema)}
    assert others and not others & set(RANGES)  # strings and flags share no name with a range
    assert ORDERED <= set(RANGES) and all(typing.get_origin(fields[name]) is tuple for name in ORDERED)


def out_of_range(spec: str, tp) -> list[str]:
    """Values (as typed on the command line) just outside the interval ``spec``, both ends."""
    lo, hi, lo_in, hi_in = interval(spec)
    step = 1 if tp is int else 0.5
    values = []
    if math.isfinite(lo):
        values.append(lo - step if lo_in else lo)
    if math.isfinite(hi):
        values.append(hi + step if hi_in else hi)
    if tp is float and not math.isfinite(hi) and not hi_in:
        values.append(".inf")
    if tp is float and not math.isfinite(lo):
        values.append(".nan")
    return [str(int(v) if tp is int else v) for v in values]


def range_cases():
    cases, seen = [], set()
    for schema in (Config, LinearConfig, FinetuneConfig):
        defaults = to_dict(schema())
        for key, tp in number_fields(schema):
            if (key, tp) in seen and schema is FinetuneConfig:
                continue  # the same field as linear evaluation's
            seen.add((key, tp))
            spec, element = RANGES[key.rpartition(".")[2]], typing.get_args(tp)[0] if typing.get_args(tp) else tp
            default = defaults
            for part in key.split("."):
                default = default[part]
            for bad in out_of_range(spec, element):
                raw = f"[{', '.join([bad] + [str(v) for v in default[1:]])}]" if typing.get_args(tp) else bad
                where = key + ("[0]" if typing.get_args(tp) else "")
                cases.append(pytest.param(schema, f"--{key}={raw}", where, spec, id=f"{schema.__name__}-{key}={bad}"))
    return cases


@pytest.mark.parametrize("schema, override, where, spec", range_cases())
def test_a_value_out_of_its_range_is_refused_naming_the_key_and_the_range(schema, override, where, spec):
    bound = "a finite number" if spec == "(-inf, inf)" else spec if spec.startswith(">") else f"in {spec}"
    with pytest.raises(ConfigError, match=re.escape(f"{where}: must be {bound}, got ")):
        load_config(None, [override], cls=schema)


def test_the_range_cases_cover_every_schema_field():
    keys = {case.values[2].removesuffix("[0]") for case in range_cases()}
    assert {"optim.batch_size", "seed", "data.image_size", "data.view2.hue", "reader.prefetch", "holdout",
            "label_fraction", "checkpoint_minutes", "monitor.knn_temperature"} <= keys
    assert len(keys) == len({k for s in (Config, LinearConfig, FinetuneConfig) for k, _ in number_fields(s)})


@pytest.mark.parametrize("override, message", [
    ("--optim.batch_size=0", "optim.batch_size: must be >= 1, got 0"),
    ("--seed=-1", "seed: must be >= 0, got -1"),
    ("--data.image_size=0", "data.image_size: must be >= 1, got 0"),
    ("--data.view1.flip_p=1.5", "data.view1.flip_p: must be in [0, 1], got 1.5"),
    ("--optim.lr=.nan", "optim.lr: must be >= 0, got nan"),
    ("--seed=18446744073709551616", "seed: 18446744073709551616 does not fit in 64 bits"),
    ("--optim.lr=1" + "0" * 400, "optim.lr: 1000"),  # ... is too large for a float
])
def test_out_of_range_values_in_a_file_and_on_the_command_line(tmp_path, override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])
    key, value = override[2:].split("=", 1)
    *sections, name = key.split(".")
    f = tmp_path / "c.yaml"
    nested = "".join(f"{'  ' * depth}{section}:\n" for depth, section in enumerate(sections))
    f.write_text(nested + f"{'  ' * len(sections)}{name}: {value}\n")  # the same key and value in YAML
    with pytest.raises(ConfigError, match=re.escape(f"c.yaml: {message}")):
        load_config(f)


@pytest.mark.parametrize("key", sorted(f"data.view1.{k}" for k in ORDERED))
def test_a_range_pair_must_be_in_order(key):
    with pytest.raises(ConfigError, match=re.escape(f"{key}: [0.9, 0.5] is not a range min <= max")):
        load_config(None, [f"--{key}=[0.9, 0.5]"])


def test_an_infinity_only_where_its_range_says_so():
    assert load_config(None, ["--checkpoint_minutes=.inf"]).checkpoint_minutes == math.inf  # never on time
    assert load_config(None, ["--monitor.knn_temperature=-1"]).monitor.knn_temperature == -1.0  # majority votes


def test_the_train_command_refuses_a_bomb_in_one_line(tmp_path):
    bomb = write_alias_bomb(tmp_path / "bomb.yaml")
    res = subprocess.run([sys.executable, "-m", "byol_fast.train", "--config", str(bomb)], cwd=ROOT, env=CHILD_ENV,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bomb.yaml" in lines[0], res.stderr[-2000:]
