"""Sentence embeddings against sentence-transformers, and the CLI commands of the foundation."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdistil import FastStudent
from fastdistil.cli import main

TEXTS = ["A man is eating food.", "hi", "The girl is carrying a baby on her back while walking. " * 12,
         "A monkey is playing drums.", "Someone in a gorilla costume is playing a set of drums.", "x y z"]


def test_encode_matches_sentence_transformers(minilm_dir):
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(minilm_dir), device="cpu")
    ours = FastStudent.from_pretrained(minilm_dir)
    ref = torch.from_numpy(st.encode(TEXTS, batch_size=4))
    got = ours.encode(TEXTS, batch_size=4)  # batches sorted by length inside; output in input order
    assert got.shape == ref.shape and (got - ref).abs().max() <= 1e-5
    raw = ours.encode(TEXTS, normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)))
    with pytest.raises(TypeError, match="list of strings"):
        ours.encode("one string")


def test_info_command(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "native" in out and "selected backend" in out


def test_demo_command(capsys):
    assert main(["demo", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "max |fastdistil - transformers|" in out and "ms" in out


def test_embed_command(tmp_path, minilm_dir):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(TEXTS) + "\n\n")
    out = tmp_path / "emb.npy"
    assert main(["embed", "--model", str(minilm_dir), "--input", str(src), "--output", str(out)]) == 0
    emb = np.load(out)  # the blank last line is a row too (the empty text): row i is always line i + 1
    assert emb.shape == (len(TEXTS) + 1, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert main(["embed", "--input", str(tmp_path / "missing.txt"), "--output", str(out)]) == 1


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "fastdistil", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "fastdistil" in r.stdout


def test_import_touches_no_gpu_and_no_heavy_modules():
    code = ("import sys, fastdistil; bad = [m for m in ('triton', 'transformers') if m in sys.modules]; "
            "import torch; print(json.dumps(bad))")
    r = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
