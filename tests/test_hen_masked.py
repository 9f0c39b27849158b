"""Masked queries: mask checks, the fill, latent cell weights, and masked recall on real images."""
import pytest
import torch

pytest.importorskip("skimage")
pytest.importorskip("scipy")

from hen_kernels.hen import HEN, codecs, masks, metrics  # noqa: E402
from hen_kernels.hen.data import (HALVES, fashion_mnist_available, load_fashion_mnist, occlude,  # noqa: E402
                                  visible_mask)
from hen_kernels.hen.taef2 import find_taef2_dir  # noqa: E402

needs_fashion = pytest.mark.skipif(not fashion_mnist_available(), reason="Fashion-MNIST absent "
                                   "(apt-get install dataset-fashion-mnist)")
needs_taef2 = pytest.mark.skipif(find_taef2_dir() is None, reason="TAEF2 weights absent (set HEN_TAEF2_DIR)")


def test_check_mask_broadcasts_and_names_errors():
    imgs = torch.rand(3, 1, 8, 6)
    m = torch.ones(8, 6, dtype=torch.bool)
    assert masks.check_mask(m, imgs).shape == (3, 8, 6)
    assert masks.check_mask(m[None, None].expand(3, 1, 8, 6), imgs).shape == (3, 8, 6)
    with pytest.raises(TypeError, match="mask"):
        masks.check_mask(m.float(), imgs)
    with pytest.raises(TypeError, match="mask"):
        masks.check_mask([[True]], imgs)
    with pytest.raises(ValueError, match="mask"):
        masks.check_mask(torch.ones(8, 5, dtype=torch.bool), imgs)
    empty = torch.ones(3, 8, 6, dtype=torch.bool)
    empty[1] = False
    with pytest.raises(ValueError, match="query 1 has no known pixel"):
        masks.check_mask(empty, imgs)


def test_mirror_fill_reflects_across_the_edge_and_ignores_hidden_values():
    h, w = 6, 4
    img = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w) / (h * w)
    m = torch.ones(1, h, w, dtype=torch.bool)
    m[:, 3:] = False  # bottom half hidden
    junk = img.clone()
    junk[..., 3:, :] = float("nan")
    out = masks.fill_hidden(junk, m, "mirror")
    # hidden row 3 + k copies row 2 - k: the mirror image through the edge
    for k in range(3):
        torch.testing.assert_close(out[0, 0, 3 + k], img[0, 0, 2 - k])
    torch.testing.assert_close(out[..., :3, :], img[..., :3, :])
    near = masks.fill_hidden(junk, m, "nearest")
    for k in range(3):
        torch.testing.assert_close(near[0, 0, 3 + k], img[0, 0, 2])
    assert masks.fill_hidden(junk, m, "black")[..., 3:, :].eq(0).all()
    with pytest.raises(ValueError, match="fill"):
        masks.fill_hidden(img, m, "blur")


def test_fill_per_distinct_mask():
    img = torch.rand(4, 3, 8, 8)
    m = torch.stack([visible_mask((8, 8), k) for k in ("bottom", "top", "bottom", "noise")])
    out = masks.fill_hidden(img, m)
    torch.testing.assert_close(out[0, :, 4:], img[0, :, :4].flip(-2))
    torch.testing.assert_close(out[1, :, :4], img[1, :, 4:].flip(-2))
    torch.testing.assert_close(out[2, :, 4:], img[2, :, :4].flip(-2))
    torch.testing.assert_close(out[3], img[3])


def test_footprint_weights_centred_padding_hides_whole_cells():
    # 28 -> 32 padded 2 + 28 + 2: each half of the image is exactly two of the four latent rows
    for half, cells in (("bottom", [1, 1, 0, 0]), ("top", [0, 0, 1, 1])):
        m = visible_mask((28, 28), half)[None]
        w = masks.footprint_weights(m, (2, 2, 2, 2), 8, (4, 4)).reshape(4, 4)
        torch.testing.assert_close(w, torch.tensor(cells, dtype=torch.float32)[:, None].expand(4, 4))
    m = visible_mask((28, 28), "left")[None]
    w = masks.footprint_weights(m, (2, 2, 2, 2), 8, (4, 4)).reshape(4, 4)
    torch.testing.assert_close(w, torch.tensor([0.0, 0, 1, 1]).expand(4, 4))
    # right/bottom-only padding puts the edge inside latent row 1: three quarters of it visible
    w = masks.footprint_weights(visible_mask((28, 28), "bottom")[None], (0, 4, 0, 4), 8, (4, 4)).reshape(4, 4)
    torch.testing.assert_close(w[:, 0], torch.tensor([1.0, 0.75, 0, 0]))
    with pytest.raises(ValueError, match="mask"):
        masks.footprint_weights(visible_mask((28, 28), "bottom")[None], (2, 2, 2, 2), 8, (3, 3))


def test_identity_codec_weights_are_the_mask():
    c = codecs.IdentityCodec()
    imgs = torch.rand(2, 3, 4, 4)
    m = visible_mask((4, 4), "left")
    lat, w = c.encode_masked(imgs, m)
    assert w.shape == lat.shape == (2, 48)
    torch.testing.assert_close(w.reshape(2, 3, 4, 4), m.float().expand(2, 3, 4, 4))


class _FlatCodec(codecs.ImageCodec):
    """A codec whose latent has no spatial grid (a global summary)."""

    name = "flat"

    def encode(self, images, *, progress=None):
        return images.reshape(len(images), images.shape[1], -1).mean(-1)


def test_codec_without_spatial_latent_refuses_a_mask():
    with pytest.raises(ValueError, match="mask: the 'flat' codec's latent has no spatial grid"):
        _FlatCodec().encode_masked(torch.rand(2, 3, 8, 8), visible_mask((8, 8), "bottom"))


def test_diffusers_codec_weights_follow_its_grid(tmp_path):
    from tests.test_codecs import _tiny_diffusers

    c = codecs.DiffusersCodec(_tiny_diffusers("AutoencoderKL"))
    imgs = torch.rand(2, 3, 16, 16)
    lat, w = c.encode_masked(imgs, visible_mask((16, 16), "bottom"))
    assert w.shape == lat.shape
    ch, gh, gw = c._latent_shape
    grid = w.reshape(2, ch, gh, gw)
    assert grid[:, :, : gh // 2].eq(1).all() and grid[:, :, gh // 2:].eq(0).all()


@pytest.fixture(scope="module")
def fashion():
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST absent")
    x, _ = load_fashion_mnist("train", n=1500)
    return x


@needs_fashion
def test_raw_pixels_masked_recall_reaches_visible_nn(fashion):
    hen = HEN(codecs.IdentityCodec(), beta=200.0, max_steps=20)
    hen.store(fashion)
    for half in HALVES:
        m = visible_mask((28, 28), half)
        q = occlude(fashion[:100], half)
        plain = hen.recall(q, decode=False)
        masked = hen.recall(q, mask=m, decode=False)
        assert metrics.identity_accuracy(masked.index, torch.arange(100)) == 1.0, half
        assert metrics.identity_accuracy(plain.index, torch.arange(100)) < 0.8, half  # the mask is what helps
        # the first step lands on the stored pattern; later steps just confirm it
        assert (masked.steps == 2).all() and masked.converged.all()


@needs_fashion
@needs_taef2
def test_taef2_masked_recall_of_every_half(fashion):
    taef2 = codecs.TAEF2Codec(download=False)
    hen = HEN(taef2, beta=200.0, max_steps=20)
    hen.store(fashion)
    for half in HALVES:
        q = occlude(fashion[:100], half)
        q[..., ~visible_mask((28, 28), half)] = float("nan")  # hidden pixels may hold anything
        r = hen.recall(q, mask=visible_mask((28, 28), half))
        assert metrics.identity_accuracy(r.index, torch.arange(100)) >= 0.95, half
        assert r.images.shape == (100, 1, 28, 28) and torch.isfinite(r.images).all()
    unmasked = hen.recall(occlude(fashion[:100], "bottom"), decode=False)
    assert metrics.identity_accuracy(unmasked.index, torch.arange(100)) < 0.7


@needs_fashion
def test_masked_query_on_memories_with_text(fashion):
    text = codecs.PixelTextEncoder(codecs.IdentityCodec((1, 28, 28)))
    caps = [f"item {i}" for i in range(300)]
    hen = HEN(codecs.IdentityCodec(), text_encoder=text, beta=200.0, max_steps=10)
    hen.store(fashion[:300], caps)
    plain = HEN(codecs.IdentityCodec(), beta=200.0, max_steps=10)
    plain.store(fashion[:300])
    m = visible_mask((28, 28), "top")
    q = occlude(fashion[:50], "top")
    a, b = hen.recall(q, mask=m, decode=False), plain.recall(q, mask=m, decode=False)
    assert torch.equal(a.index, b.index) and metrics.identity_accuracy(a.index, torch.arange(50)) == 1.0
    w = hen.image_weights(codecs.IdentityCodec((1, 28, 28)).latent_weights(m[None].expand(2, 28, 28)))
    assert w.shape == (2, hen.row_dim) and w[:, hen.image_dim:].eq(0).all()
    torch.testing.assert_close(w[:, :hen.image_dim].mean(1), torch.ones(2))  # rescaled to mean 1


def test_recall_argument_errors():
    imgs = torch.rand(6, 1, 8, 8)
    hen = HEN(codecs.IdentityCodec(), beta=50.0)
    hen.store(imgs)
    lat = codecs.IdentityCodec().encode(imgs)
    m = visible_mask((8, 8), "bottom")
    with pytest.raises(ValueError, match="mask"):
        hen.recall(latents=lat, mask=m)
    with pytest.raises(ValueError, match="latent_weights"):
        hen.recall(latents=lat, latent_weights=torch.ones(6, 5))
    with pytest.raises(ValueError, match="latent_weights"):
        hen.recall(latents=lat, latent_weights=-torch.ones(6, 64))
    with pytest.raises(ValueError, match="mask"):
        hen.recall(latents=lat, latent_weights=torch.zeros(6, 64))
    with pytest.raises(ValueError, match="latents"):
        hen.recall(latents=lat[:, :10])
