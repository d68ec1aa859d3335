import pytest

from configurator import configure

SCRIPT = '''"""A script with settings."""
batch_size = 16  # sequences per step
learning_rate = 6e-4  # peak learning rate
compile = True  # torch.compile
out_dir = "out"  # where checkpoints go
steer = ""  # concept=scale pairs
dtype = None  # optional
'''


@pytest.fixture
def g(tmp_path):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    g = {"__file__": str(path), "__doc__": "A script with settings."}
    exec(SCRIPT, g)
    return g


def test_overrides_are_typed(g):
    cfg = configure(g, ["--batch_size=8", "--learning_rate=1", "--compile=False", "--out_dir=a=b", "--dtype=bfloat16"])
    assert g["batch_size"] == 8 and type(g["batch_size"]) is int
    assert g["learning_rate"] == 1.0 and type(g["learning_rate"]) is float  # an int where a float is expected
    assert g["compile"] is False
    assert g["out_dir"] == "a=b"  # values keep their own '='
    assert g["dtype"] == "bfloat16"
    assert cfg == {"batch_size": 8, "learning_rate": 1.0, "compile": False, "out_dir": "a=b", "steer": "",
                   "dtype": "bfloat16"}


def test_space_separated_values_and_bare_flags(g):
    configure(g, ["--steer", "12783=5,19193=-3", "--compile", "--batch_size", "4"])
    assert g["steer"] == "12783=5,19193=-3" and g["compile"] is True and g["batch_size"] == 4
    configure(g, ["--compile", "false"])
    assert g["compile"] is False


def test_config_file_then_overrides(g, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 32\nlearning_rate = 3e-4\nout_dir = 'x'\n")
    configure(g, [str(cfg), "--batch_size=2"])
    assert (g["batch_size"], g["learning_rate"], g["out_dir"]) == (2, 3e-4, "x")


@pytest.mark.parametrize("argv, message", [
    (["--batch_sise=8"],
     "unknown key 'batch_sise'; valid keys: batch_size, compile, dtype, learning_rate, out_dir, steer"),
    (["--batch_size=8.5"], "batch_size must be int"),
    (["--batch_size=lots"], "batch_size must be int"),
    (["--learning_rate=fast"], "learning_rate must be float"),
    (["--compile=maybe"], "compile must be bool"),
    (["--batch_size"], "--batch_size needs a value"),
    (["--out_dir", "--compile=False"], "--out_dir needs a value"),
    (["missing_config.py"], "cannot read config file 'missing_config.py'"),
])
def test_errors(g, argv, message):
    with pytest.raises(SystemExit) as e:
        configure(g, argv)
    assert message in str(e.value.code)


def test_errors_in_config_files(g, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_sise = 32\n")
    with pytest.raises(SystemExit, match="unknown key 'batch_sise' in"):
        configure(g, [str(cfg)])
    cfg.write_text("batch_size = '32'\n")
    with pytest.raises(SystemExit, match="batch_size must be int"):
        configure(g, [str(cfg)])


def test_help_lists_every_key_with_its_comment(g, capsys):
    with pytest.raises(SystemExit) as e:
        configure(g, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "A script with settings." in out
    for line in ("--batch_size     16             sequences per step",
                 "--steer          ''             concept=scale pairs"):
        assert line in out


RANGES = {"batch_size": "[1, inf)", "learning_rate": "(0, 1]", "steps": "[0, batch_size) if compile"}


@pytest.mark.parametrize("argv, message", [
    (["--batch_size=0"], "error: batch_size must be in [1, inf), got 0"),
    (["--learning_rate=0"], "error: learning_rate must be in (0, 1], got 0.0"),
    (["--learning_rate=1.5"], "error: learning_rate must be in (0, 1], got 1.5"),
    (["--steps=16"], "error: steps must be in [0, batch_size) (here [0, 16)) when compile, got 16"),
    (["--batch_size=4", "--steps=-1"], "error: steps must be in [0, batch_size) (here [0, 4)) when compile, got -1"),
])
def test_a_setting_out_of_its_range_is_named_with_its_range(g, argv, message):
    g["steps"] = 2
    with pytest.raises(SystemExit) as e:
        configure(g, argv, RANGES)
    assert e.value.code == message


def test_a_range_applies_only_where_its_condition_holds_and_help_shows_it(g, capsys):
    g["steps"] = 2
    assert configure(g, ["--compile=False", "--steps=99", "--learning_rate=1"], RANGES)["steps"] == 99
    with pytest.raises(SystemExit):
        configure(g, ["--help"], RANGES)
    assert "--batch_size     16             sequences per step; range [1, inf)" in capsys.readouterr().out
