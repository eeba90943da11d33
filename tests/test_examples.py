import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_reloads_to_identical_outputs(capsys):
    runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "reloaded model matches the trained one" in out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0]  # it trained
