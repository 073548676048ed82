"""The README's Python example runs as written (on a small simulated MTZ)."""
import re
from pathlib import Path

import numpy as np

from physppl.merging.quality import true_amplitudes

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, small_sim):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    small_sim[0].write_mtz(str(tmp_path / "unmerged.mtz"))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    F, truth, data = namespace["F"], small_sim[1], namespace["data"]
    assert F.shape == (data.n_refl,) and bool((F > 0).all())
    t = true_amplitudes(truth, data.hkl, data.friedel)
    assert np.corrcoef(F.numpy(), t)[0, 1] > 0.95
