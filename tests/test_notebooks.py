"""Notebooks run under papermill with tiny settings (the real runs are the study's job)."""
import json

import pytest

from linearize.paths import ROOT


def run(notebook, tmp_path, **params):
    import papermill as pm

    out = tmp_path / notebook
    pm.execute_notebook(str(ROOT / "notebooks" / notebook), str(out), parameters=params, cwd=str(ROOT),
                        kernel_name="python3", progress_bar=False)
    return out


@pytest.mark.slow
def test_teacher_notebook(tmp_path):
    run("00_teacher.ipynb", tmp_path, eval_blocks=2, seq_len=64, layer=2, max_new_tokens=4,
        output_dir=str(tmp_path / "teacher"))
    summary = json.loads((tmp_path / "teacher" / "teacher.json").read_text())
    assert "Paris" in summary["completion"]
    assert summary["validation_blocks"] == 2 and 1 < summary["validation_perplexity"] < 200
    assert (tmp_path / "teacher" / "attention_layer2.png").stat().st_size > 10_000
