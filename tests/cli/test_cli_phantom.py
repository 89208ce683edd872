import numpy as np

from octpipe.cli import main
from octpipe.io.heyex_vol import read_heyex_vol

SMALL = ["--shape", "3,248,256", "--spacing", "0.24,0.00774,0.0226"]


def test_phantom_command_writes_reproducible_cohort(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["phantom", "-o", str(a), "--n", "2", "--seed", "5", "--formats", "vol,png", *SMALL]) == 0
    assert main(["phantom", "-o", str(b), "--n", "2", "--seed", "5", "--formats", "vol,png", *SMALL]) == 0
    assert "wrote 2 phantoms" in capsys.readouterr().out
    for name in ("phantom-0000", "phantom-0001"):
        va, vb = read_heyex_vol(a / f"{name}.vol"), read_heyex_vol(b / f"{name}.vol")
        np.testing.assert_array_equal(va.data, vb.data)
        assert va.shape == (3, 248, 256)
    assert (a / "manifest.csv").read_text() == (b / "manifest.csv").read_text()


def test_phantom_command_refuses_to_overwrite(tmp_path, capsys):
    args = ["phantom", "-o", str(tmp_path), "--n", "1", "--formats", "png", *SMALL]
    assert main(args) == 0
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "holds an earlier cohort" in err[0]
    assert main([*args, "--overwrite"]) == 0


def test_phantom_command_usage_errors(tmp_path):
    assert main(["phantom", "-o", str(tmp_path), "--lesions", "cnv"]) == 2
    assert main(["phantom", "-o", str(tmp_path), "--shape", "3,248"]) == 2
    assert main(["phantom", "-o", str(tmp_path), "--formats", "mp4", *SMALL]) == 2
    assert main(["phantom"]) == 2


def test_version_and_help(capsys):
    assert main(["--version"]) == 0
    assert "octpipe" in capsys.readouterr().out
    assert main(["phantom", "--help"]) == 0
    assert "Example: octpipe phantom" in capsys.readouterr().out
